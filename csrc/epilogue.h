// Shared pieces of the CPU GEMM ops: the activation names and the epilogue / reduction loops run
// over row-major (tokens, columns) fp32 buffers after the GEMM.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <optional>
#include <string>

namespace spp_ext {

enum class Act { None, Gelu, GeluTanh, Relu, Silu };

inline Act parse_act(const std::string& name) {
  if (name == "none") return Act::None;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK_VALUE(false, "act must be one of gelu, gelu_tanh, none, relu, silu; got '", name, "'");
}

// Rows per parallel task: enough work per task that small problems stay on one thread.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// act(pre) with ATen's activation kernels (bit-identical to the reference), in place or a copy
// (without an activation: pre itself, to be read only).
at::Tensor act_forward(const at::Tensor& pre, Act act, bool inplace);
// grad <- the gradient of pre given the gradient of act(pre), in place.
void act_backward_(at::Tensor& grad, const at::Tensor& pre, Act act);

// out[t, c] = act(pre[t, c]) * mvec[c], written in out's dtype (may alias pre when fp32).
void epilogue_forward(const at::Tensor& pre, const at::Tensor& mvec, Act act, at::Tensor& out);

// Backward epilogue over columns c of (T, N): given the upstream gradient g_in (fp32, T x N) of
// h = act(pre) * mvec, writes dm[c] = sum_t g_in * act(pre) (fixed token order per column, so the
// result does not depend on the thread count) and gh <- g_in * mvec * act'(pre); gh may be g_in.
void epilogue_backward(const at::Tensor& g_in, at::Tensor& gh, const at::Tensor& pre, const at::Tensor& mvec, Act act,
                       at::Tensor& dm);

// a (T, K) · bᵀ (+ bias) for b (N, K) of any strides: oneDNN where enabled (linear.cpp), else the BLAS.
at::Tensor linear_nt(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias);

// The fp32, contiguous version of t (no copy when it already is).
inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace spp_ext
