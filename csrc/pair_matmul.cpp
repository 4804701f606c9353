// pair_matmul on CPU over already-gathered active units: GEMM, fused bias/activation/mask
// epilogue, GEMM (linear_nt: oneDNN or the BLAS). The Python side gathers (and caches) the active rows of W1 / columns of W2.
#include "epilogue.h"

namespace spp_ext {

// x: (T, K); W1: (U, K); b1: (U,) or None; m: (U,) fp32; W2: (N, U); b2: (N,) or None.
// Returns (out (T, N) in x's dtype, pre (T, U) fp32 when need_pre else empty).
std::tuple<at::Tensor, at::Tensor> pair_matmul_cpu(const at::Tensor& x, const at::Tensor& W1,
                                                   const std::optional<at::Tensor>& b1, const at::Tensor& m,
                                                   const at::Tensor& W2, const std::optional<at::Tensor>& b2,
                                                   c10::string_view act_name, bool need_pre) {
  TORCH_CHECK_VALUE(x.dim() == 2 && W1.dim() == 2 && W2.dim() == 2, "pair_matmul: x, W1, W2 must be 2-D");
  TORCH_CHECK_VALUE(x.size(1) == W1.size(1) && W2.size(1) == W1.size(0) && m.numel() == W1.size(0),
                    "pair_matmul: shapes disagree");
  TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat, "pair_matmul: m must be float32");
  const Act act = parse_act(std::string(act_name));
  const at::Tensor xf = f32(x), W1f = f32(W1), W2f = f32(W2), mf = m.contiguous();
  at::Tensor pre = linear_nt(xf, W1f, b1.has_value() ? std::optional<at::Tensor>(f32(*b1)) : std::nullopt);
  at::Tensor h = need_pre ? at::empty_like(pre) : pre;
  epilogue_forward(pre, mf, act, h);
  at::Tensor out = linear_nt(h, W2f, b2.has_value() ? std::optional<at::Tensor>(f32(*b2)) : std::nullopt);
  return {out.to(x.scalar_type()), need_pre ? pre : at::empty({0}, pre.options())};
}

// Backward: (dx, dm, dW1, db1, dW2, db2); weight gradients only when need_dW (else empty), in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_matmul_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& W1, const at::Tensor& pre, const at::Tensor& m,
    const at::Tensor& W2, c10::string_view act_name, bool need_dx, bool need_dW) {
  const Act act = parse_act(std::string(act_name));
  const at::Tensor gf = f32(grad), W2f = f32(W2), mf = m.contiguous(), pref = pre.contiguous();
  at::Tensor gh = linear_nt(gf, W2f.t(), std::nullopt);  // (T, U): gradient of h = act(pre) * m
  at::Tensor dm = at::empty({pre.size(1)}, pre.options());
  epilogue_backward(gh, gh, pref, mf, act, dm);  // gh <- gradient of pre
  at::Tensor dx = need_dx ? linear_nt(gh, f32(W1).t(), std::nullopt).to(x.scalar_type()) : at::empty({0}, x.options());
  const auto fopt = pre.options();
  at::Tensor dW1 = at::empty({0}, fopt), db1 = at::empty({0}, fopt), dW2 = at::empty({0}, fopt), db2 = at::empty({0}, fopt);
  if (need_dW) {
    at::Tensor h = at::empty_like(pref);
    epilogue_forward(pref, mf, act, h);
    dW2 = at::mm(gf.t(), h);
    db2 = gf.sum(0);
    dW1 = at::mm(gh.t(), f32(x));
    db1 = gh.sum(0);
  }
  return {dx, dm, dW1, db1, dW2, db2};
}

}  // namespace spp_ext
