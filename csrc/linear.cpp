// The plain products of the CPU GEMM ops (masked_linear, pair_matmul and their backwards):
// a (T, K) · bᵀ (+ bias) for b (N, K), on torch's oneDNN matmul primitive
// (mkldnn::_linear_pointwise, called through the dispatcher) where spp_kernels enabled it (fp32 on
// x86 CPUs, its self-test passed; see spp_kernels/_linear.py) and the product is large enough,
// else on at::addmm / at::mm, which call the BLAS torch links (MKL takes its AVX2 path on AMD
// CPUs, at about half oneDNN's speed).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <optional>
#include <string>

#include "epilogue.h"

namespace spp_ext {
namespace {
std::atomic<bool> g_onednn{false};
std::atomic<int64_t> g_min_macs{int64_t{1} << 21};

std::optional<c10::OperatorHandle> onednn_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}
}  // namespace

void set_linear_backend(bool onednn, int64_t min_macs) {
  g_onednn = onednn && onednn_op().has_value();
  g_min_macs = min_macs;
}

bool linear_onednn() { return g_onednn; }

at::Tensor linear_nt(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "linear_nt: a (T, K) and b (N, K) disagree");
  const bool fast = g_onednn && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                    (!bias.has_value() || bias->scalar_type() == at::kFloat) && a.size(1) > 0 &&
                    a.size(0) * b.size(0) * a.size(1) >= g_min_macs;
  if (!fast) return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(a.contiguous());
  stack.emplace_back(b);
  stack.emplace_back(bias.has_value() ? c10::IValue(bias->contiguous()) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  onednn_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace spp_ext
