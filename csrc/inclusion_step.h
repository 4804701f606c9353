// Host scalars of one inclusion step, cast once to fp32 exactly as the torch reference casts its
// Python-float operands (so the fused loop reproduces reference.inclusion_step bit for bit).
#pragma once
#include <cmath>
#include <cstdint>

namespace spp_ext {

struct InclusionScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, weight_decay, nu, step_size, inv_sqrt_bc2, rho,
      lam, kappa;
  int32_t step;
  bool adamw, signed_mode, coupled, has_wd, record;
};

#if defined(__CUDACC__)
#define SPP_HD __host__ __device__ __forceinline__
#else
#define SPP_HD inline
#endif

// One unit of SPEC §2; the order of operations mirrors reference.inclusion_step.
SPP_HD void inclusion_unit(const InclusionScalars& s, float& m, float grad, float& ea, float& eq, float& z, float& gamma,
                           int32_t& entry, int32_t& count) {
  float g = grad;
  const float gam = gamma;
  if (s.coupled) g = g + (m - gam) / s.nu;
  if (s.adamw) {
    if (s.has_wd) m = m * s.decay;
    ea = ea * s.beta1 + g * s.one_minus_beta1;
    eq = eq * s.beta2 + (g * g) * s.one_minus_beta2;
    const float denom = sqrtf(eq) * s.inv_sqrt_bc2 + s.eps;
    m = m - (ea / denom) * s.step_size;
  } else {
    if (s.has_wd) g = g + m * s.weight_decay;
    m = m - g * s.step_size;
  }
  z = z + (m - gam) * s.rho;
  float ng;
  if (s.signed_mode) {
    const float sgn = static_cast<float>((z > 0.0f) - (z < 0.0f));
    const float a = fabsf(z) - s.lam;
    ng = (sgn * (a < 0.0f ? 0.0f : a)) * s.kappa;
  } else {
    const float a = z - s.lam;
    ng = (a < 0.0f ? 0.0f : a) * s.kappa;
  }
  gamma = ng;
  const bool nz = ng != 0.0f;
  if (nz && entry == -1) entry = s.step;
  if (s.record) count += nz ? 1 : 0;
}

}  // namespace spp_ext
