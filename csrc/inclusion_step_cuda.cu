// inclusion_step on CUDA: one grid-stride pass over the flat arenas, float4 / int4 loads and
// stores where the arenas are 16-byte aligned, the same per-unit arithmetic as the CPU path.
#include "inclusion_step.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

namespace spp_ext {

InclusionScalars make_scalars(int64_t, double, double, double, double, double, double, double, double, double, double,
                              double, const std::string&, const std::string&, bool);
void check_arenas(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::DeviceType);

__global__ void inclusion_step_kernel(InclusionScalars s, int64_t n, float* __restrict__ m, const float* __restrict__ g,
                                      float* __restrict__ ea, float* __restrict__ eq, float* __restrict__ z,
                                      float* __restrict__ gamma, int32_t* __restrict__ entry,
                                      int32_t* __restrict__ count, bool vec4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    for (int64_t j = i; j < n4; j += stride) {
      float4 M = reinterpret_cast<float4*>(m)[j], A = reinterpret_cast<float4*>(ea)[j];
      float4 B = reinterpret_cast<float4*>(eq)[j], Z = reinterpret_cast<float4*>(z)[j];
      float4 Gm = reinterpret_cast<float4*>(gamma)[j];
      const float4 G = reinterpret_cast<const float4*>(g)[j];
      int4 E = reinterpret_cast<int4*>(entry)[j], C = reinterpret_cast<int4*>(count)[j];
      inclusion_unit(s, M.x, G.x, A.x, B.x, Z.x, Gm.x, E.x, C.x);
      inclusion_unit(s, M.y, G.y, A.y, B.y, Z.y, Gm.y, E.y, C.y);
      inclusion_unit(s, M.z, G.z, A.z, B.z, Z.z, Gm.z, E.z, C.z);
      inclusion_unit(s, M.w, G.w, A.w, B.w, Z.w, Gm.w, E.w, C.w);
      reinterpret_cast<float4*>(m)[j] = M;
      reinterpret_cast<float4*>(ea)[j] = A;
      reinterpret_cast<float4*>(eq)[j] = B;
      reinterpret_cast<float4*>(z)[j] = Z;
      reinterpret_cast<float4*>(gamma)[j] = Gm;
      reinterpret_cast<int4*>(entry)[j] = E;
      reinterpret_cast<int4*>(count)[j] = C;
    }
    done = n4 * 4;
  }
  for (int64_t j = done + i; j < n; j += stride) inclusion_unit(s, m[j], g[j], ea[j], eq[j], z[j], gamma[j], entry[j], count[j]);
}

void inclusion_step_cuda(const at::Tensor& m, const at::Tensor& grad, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& z, const at::Tensor& gamma,
                         const at::Tensor& entry, const at::Tensor& support_count, int64_t step, double lr,
                         double beta1, double beta2, double eps, double weight_decay, double kappa, double lam,
                         double nu, double step_size, double inv_sqrt_bc2, double rho, c10::string_view mode,
                         c10::string_view optimizer, bool record, bool check_finite) {
  check_arenas(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, c10::DeviceType::CUDA);
  const InclusionScalars s = make_scalars(step, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, step_size,
                                          inv_sqrt_bc2, rho, std::string(mode), std::string(optimizer), record);
  if (check_finite) {  // a device-side reduction; one host sync, as the reference's check has
    const char* names[] = {"grad", "m", "exp_avg", "exp_avg_sq", "z", "gamma"};
    at::Tensor ok = at::stack({at::isfinite(grad).all(), at::isfinite(m).all(), at::isfinite(exp_avg).all(),
                               at::isfinite(exp_avg_sq).all(), at::isfinite(z).all(), at::isfinite(gamma).all()})
                        .cpu();
    for (int k = 0; k < 6; ++k) TORCH_CHECK_VALUE(ok[k].item<bool>(), names[k], " holds NaN or Inf");
  }
  const int64_t n = m.numel();
  if (n == 0) return;
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  const bool vec4 = aligned(m) && aligned(grad) && aligned(exp_avg) && aligned(exp_avg_sq) && aligned(z) &&
                    aligned(gamma) && aligned(entry) && aligned(support_count);
  const int threads = 256;
  const int64_t work = vec4 ? (n + 3) / 4 : n;
  const c10::cuda::CUDAGuard guard(m.device());
  int sms = 0;  // (ATen/cuda/CUDAContext.h would need the cuSPARSE headers; the runtime API suffices)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, m.device().index()));
  const int blocks = static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, static_cast<int64_t>(sms) * 8));
  inclusion_step_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      s, n, m.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
      z.data_ptr<float>(), gamma.data_ptr<float>(), entry.data_ptr<int32_t>(), support_count.data_ptr<int32_t>(), vec4);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace spp_ext

TORCH_LIBRARY_IMPL(spp_ext, CUDA, m) { m.impl("inclusion_step", &spp_ext::inclusion_step_cuda); }
