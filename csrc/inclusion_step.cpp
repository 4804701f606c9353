// inclusion_step on CPU: one parallel pass over the flat arenas (SPEC §2), plus a read-only
// finiteness pass before it when check_finite (so bad input leaves the state untouched).
#include "inclusion_step.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <string>

namespace spp_ext {

InclusionScalars make_scalars(int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                              double kappa, double lam, double nu, double step_size, double inv_sqrt_bc2, double rho,
                              const std::string& mode, const std::string& optimizer, bool record) {
  TORCH_CHECK_VALUE(mode == "nonneg" || mode == "signed", "mode must be 'nonneg' or 'signed', got '", mode, "'");
  TORCH_CHECK_VALUE(optimizer == "adamw" || optimizer == "sgd", "optimizer must be 'adamw' or 'sgd', got '", optimizer, "'");
  TORCH_CHECK_VALUE(step >= 1 && step <= INT32_MAX, "step must be in [1, 2^31), got ", step);
  InclusionScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.weight_decay = static_cast<float>(weight_decay);
  s.nu = static_cast<float>(nu);
  s.step_size = static_cast<float>(step_size);
  s.inv_sqrt_bc2 = static_cast<float>(inv_sqrt_bc2);
  s.rho = static_cast<float>(rho);
  s.lam = static_cast<float>(lam);
  s.kappa = static_cast<float>(kappa);
  s.step = static_cast<int32_t>(step);
  s.adamw = optimizer == "adamw";
  s.signed_mode = mode == "signed";
  s.coupled = std::isfinite(nu);
  s.has_wd = weight_decay != 0.0;
  s.record = record;
  return s;
}

void check_arenas(const at::Tensor& m, const at::Tensor& grad, const at::Tensor& ea, const at::Tensor& eq,
                  const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& entry, const at::Tensor& count,
                  c10::DeviceType dev) {
  const int64_t n = m.numel();
  const at::Tensor* fl[] = {&m, &grad, &ea, &eq, &z, &gamma};
  const char* names[] = {"m", "grad", "exp_avg", "exp_avg_sq", "z", "gamma"};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK_TYPE(fl[i]->scalar_type() == at::kFloat, names[i], " must be float32");
    TORCH_CHECK_VALUE(fl[i]->dim() == 1 && fl[i]->numel() == n && fl[i]->is_contiguous(), names[i],
                      " must be a contiguous 1-D tensor with ", n, " elements like m");
    TORCH_CHECK_VALUE(fl[i]->device().type() == dev, names[i], " is on the wrong device");
  }
  const at::Tensor* in[] = {&entry, &count};
  const char* inames[] = {"entry", "support_count"};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_TYPE(in[i]->scalar_type() == at::kInt, inames[i], " must be int32");
    TORCH_CHECK_VALUE(in[i]->dim() == 1 && in[i]->numel() == n && in[i]->is_contiguous(), inames[i],
                      " must be a contiguous 1-D tensor with ", n, " elements like m");
    TORCH_CHECK_VALUE(in[i]->device().type() == dev, inames[i], " is on the wrong device");
  }
}

// The fused update over units [i0, i1): the arithmetic of inclusion_unit (inclusion_step.h), written
// branch-free with selects so that it vectorises; cloned for AVX2 and baseline x86-64 (picked at load).
template <bool ADAM, bool SIGNED, bool COUPLED>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void update_range(const InclusionScalars s, int64_t i0, int64_t i1, float* __restrict__ M, const float* __restrict__ G,
                  float* __restrict__ A, float* __restrict__ B, float* __restrict__ Z, float* __restrict__ Gam,
                  int32_t* __restrict__ E, int32_t* __restrict__ C) {
  const int32_t rec = s.record ? 1 : 0;
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    float m = M[i], g = G[i];
    const float gam = Gam[i];
    if constexpr (COUPLED) g = g + (m - gam) / s.nu;  // a division per unit only when coupled
    if constexpr (ADAM) {
      m = m * s.decay;  // decay is exactly 1.0f without weight decay: no select, and m * 1 == m
      const float ea = A[i] * s.beta1 + g * s.one_minus_beta1;
      const float eq = B[i] * s.beta2 + (g * g) * s.one_minus_beta2;
      const float denom = __builtin_sqrtf(eq) * s.inv_sqrt_bc2 + s.eps;
      m = m - (ea / denom) * s.step_size;
      A[i] = ea;
      B[i] = eq;
    } else {
      const float gw = g + m * s.weight_decay;
      g = s.has_wd ? gw : g;
      m = m - g * s.step_size;
    }
    const float z = Z[i] + (m - gam) * s.rho;
    float ng;
    if constexpr (SIGNED) {
      const float sgn = static_cast<float>((z > 0.0f) - (z < 0.0f));
      const float a = std::fabs(z) - s.lam;
      ng = (sgn * (a < 0.0f ? 0.0f : a)) * s.kappa;
    } else {
      const float a = z - s.lam;
      ng = (a < 0.0f ? 0.0f : a) * s.kappa;
    }
    const int32_t nz = ng != 0.0f ? 1 : 0;
    const int32_t e = E[i];
    M[i] = m;
    Z[i] = z;
    Gam[i] = ng;
    E[i] = (nz & (e == -1)) ? s.step : e;
    C[i] = C[i] + (nz & rec);
  }
}

template <bool ADAM, bool SIGNED>
void dispatch_coupled(const InclusionScalars& s, int64_t i0, int64_t i1, float* M, const float* G, float* A, float* B,
                      float* Z, float* Gam, int32_t* E, int32_t* C) {
  if (s.coupled) update_range<ADAM, SIGNED, true>(s, i0, i1, M, G, A, B, Z, Gam, E, C);
  else update_range<ADAM, SIGNED, false>(s, i0, i1, M, G, A, B, Z, Gam, E, C);
}

void dispatch_range(const InclusionScalars& s, int64_t i0, int64_t i1, float* M, const float* G, float* A, float* B,
                    float* Z, float* Gam, int32_t* E, int32_t* C) {
  if (s.adamw) {
    if (s.signed_mode) dispatch_coupled<true, true>(s, i0, i1, M, G, A, B, Z, Gam, E, C);
    else dispatch_coupled<true, false>(s, i0, i1, M, G, A, B, Z, Gam, E, C);
  } else {
    if (s.signed_mode) dispatch_coupled<false, true>(s, i0, i1, M, G, A, B, Z, Gam, E, C);
    else dispatch_coupled<false, false>(s, i0, i1, M, G, A, B, Z, Gam, E, C);
  }
}

void inclusion_step_cpu(const at::Tensor& m, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& z, const at::Tensor& gamma,
                        const at::Tensor& entry, const at::Tensor& support_count, int64_t step, double lr, double beta1,
                        double beta2, double eps, double weight_decay, double kappa, double lam, double nu,
                        double step_size, double inv_sqrt_bc2, double rho, c10::string_view mode,
                        c10::string_view optimizer, bool record, bool check_finite) {
  check_arenas(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, c10::DeviceType::CPU);
  const InclusionScalars s = make_scalars(step, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, step_size,
                                          inv_sqrt_bc2, rho, std::string(mode), std::string(optimizer), record);
  const int64_t n = m.numel();
  float* M = m.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* A = exp_avg.data_ptr<float>();
  float* B = exp_avg_sq.data_ptr<float>();
  float* Z = z.data_ptr<float>();
  float* Gam = gamma.data_ptr<float>();
  int32_t* E = entry.data_ptr<int32_t>();
  int32_t* C = support_count.data_ptr<int32_t>();
  constexpr int64_t kGrain = 1 << 15;
  if (check_finite) {
    // bit i set: array i holds a non-finite value; the same order of names as the reference
    std::atomic<int> bad{0};
    const float* arrs[] = {G, M, A, B, Z, Gam};
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      int local = 0;
      for (int k = 0; k < 6; ++k) {
        // NaN / Inf: all exponent bits set; an integer OR-reduction vectorises
        const uint32_t* p = reinterpret_cast<const uint32_t*>(arrs[k]);
        uint32_t acc = 0;
        for (int64_t i = i0; i < i1; ++i) acc |= static_cast<uint32_t>((p[i] & 0x7f800000u) == 0x7f800000u);
        if (acc) local |= 1 << k;
      }
      if (local) bad.fetch_or(local);
    });
    const char* names[] = {"grad", "m", "exp_avg", "exp_avg_sq", "z", "gamma"};
    const int flags = bad.load();
    for (int k = 0; k < 6; ++k) TORCH_CHECK_VALUE(!(flags & (1 << k)), names[k], " holds NaN or Inf");
  }
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    dispatch_range(s, i0, i1, M, G, A, B, Z, Gam, E, C);
  });
}

}  // namespace spp_ext
