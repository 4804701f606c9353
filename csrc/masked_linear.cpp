// masked_linear on CPU: one fp32 GEMM (linear_nt: oneDNN or the BLAS) followed by a fused bias-free
// activation + mask epilogue; backward gives dx and the per-column dm, and dW/db only when asked.
#include "epilogue.h"

#include <vector>

namespace spp_ext {

at::Tensor act_forward(const at::Tensor& pre, Act act, bool inplace) {
  // ATen's own activation kernels: bit-identical to the reference (and to the dense model at m = 1).
  // Out of place, the kernel writes the copy itself (one pass, not a clone and a second pass);
  // without an activation pre itself is returned (the callers only read it).
  at::Tensor a = pre;  // a handle: in place writes go to pre's storage
  switch (act) {
    case Act::None: return a;
    case Act::Gelu: return inplace ? at::gelu_(a, "none") : at::gelu(pre, "none");
    case Act::GeluTanh: return inplace ? at::gelu_(a, "tanh") : at::gelu(pre, "tanh");
    case Act::Relu: return inplace ? at::relu_(a) : at::relu(pre);
    case Act::Silu: return inplace ? at::silu_(a) : at::silu(pre);
  }
  return a;
}

void act_backward_(at::Tensor& grad, const at::Tensor& pre, Act act) {
  // elementwise, so the gradient may be written over itself
  switch (act) {
    case Act::None: break;
    case Act::Gelu: at::gelu_backward_out(grad, grad, pre, "none"); break;
    case Act::GeluTanh: at::gelu_backward_out(grad, grad, pre, "tanh"); break;
    case Act::Relu: at::threshold_backward_out(grad, grad, pre, 0); break;
    case Act::Silu: at::silu_backward_out(grad, grad, pre); break;
  }
}

void scale_columns(const at::Tensor& a, const at::Tensor& mvec, at::Tensor& out) {
  const int64_t T = a.size(0), N = a.size(1);
  const float* P = a.data_ptr<float>();
  const float* M = mvec.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "spp_scale_columns", [&] {
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(N), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* p = P + t * N;
        scalar_t* o = O + t * N;
        for (int64_t c = 0; c < N; ++c) o[c] = static_cast<scalar_t>(p[c] * M[c]);
      }
    });
  });
}

void epilogue_forward(const at::Tensor& pre, const at::Tensor& mvec, Act act, at::Tensor& out) {
  const bool inplace = out.data_ptr() == pre.data_ptr();
  at::Tensor a = act_forward(pre, act, inplace);
  scale_columns(a, mvec, out);
}

void epilogue_backward(const at::Tensor& g_in, at::Tensor& gh, const at::Tensor& pre, const at::Tensor& mvec, Act act,
                       at::Tensor& dm) {
  const int64_t T = pre.size(0), N = pre.size(1);
  const at::Tensor a = act_forward(pre, act, false);  // the activation itself, for dm
  const float* Gi = g_in.data_ptr<float>();
  float* G = gh.data_ptr<float>();
  const float* P = a.data_ptr<float>();
  const float* M = mvec.data_ptr<float>();
  float* D = dm.data_ptr<float>();
  constexpr int64_t kCols = 64;  // columns per task: each column is summed over tokens in order
  const int64_t blocks = (N + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float acc[kCols];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kCols, c1 = std::min(N, c0 + kCols), w = c1 - c0;
      for (int64_t j = 0; j < w; ++j) acc[j] = 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        const float* gi = Gi + t * N + c0;
        float* g = G + t * N + c0;
        const float* p = P + t * N + c0;
        for (int64_t j = 0; j < w; ++j) {
          const float v = gi[j];
          acc[j] += v * p[j];
          g[j] = v * M[c0 + j];
        }
      }
      for (int64_t j = 0; j < w; ++j) D[c0 + j] = acc[j];
    }
  });
  act_backward_(gh, pre, act);
}

// x: (T, K) any float dtype; W: (N, K); b: (N,) or None; mvec: (N,) fp32.
// Returns (out (T, N) in x's dtype, pre (T, N) fp32 when need_pre else an empty tensor).
std::tuple<at::Tensor, at::Tensor> masked_linear_cpu(const at::Tensor& x, const at::Tensor& W,
                                                     const std::optional<at::Tensor>& b, const at::Tensor& mvec,
                                                     c10::string_view act_name, bool need_pre) {
  TORCH_CHECK_VALUE(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "masked_linear: x (T, K) and W (N, K) disagree");
  TORCH_CHECK_VALUE(mvec.dim() == 1 && mvec.size(0) == W.size(0), "masked_linear: mvec must have W.size(0) entries");
  TORCH_CHECK_TYPE(mvec.scalar_type() == at::kFloat, "masked_linear: mvec must be float32");
  const Act act = parse_act(std::string(act_name));
  const at::Tensor xf = f32(x), Wf = f32(W), mf = mvec.contiguous();
  at::Tensor pre = linear_nt(xf, Wf, b.has_value() ? std::optional<at::Tensor>(f32(*b)) : std::nullopt);
  at::Tensor out;
  if (need_pre || x.scalar_type() != at::kFloat) {
    out = at::empty(pre.sizes(), x.options());
  } else {
    out = pre;  // in place: nothing keeps the pre-activation
  }
  epilogue_forward(pre, mf, act, out);
  return {out, need_pre ? pre : at::empty({0}, pre.options())};
}

// Backward of masked_linear: (dx in x's dtype or empty, dmvec fp32, dW in W's dtype or empty, db or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& W, const at::Tensor& pre, const at::Tensor& mvec,
    c10::string_view act_name, bool need_dx, bool need_dW, bool need_db) {
  const Act act = parse_act(std::string(act_name));
  TORCH_CHECK_VALUE(pre.dim() == 2 && grad.sizes() == pre.sizes(), "masked_linear_backward: grad and pre must be (T, N)");
  // the epilogue reads the upstream gradient and writes the pre-activation gradient into g: a
  // fresh fp32 copy is written over in place, the caller's own tensor never
  const at::Tensor gin = grad.to(at::kFloat).contiguous();
  at::Tensor g = gin.is_same(grad) ? at::empty_like(gin) : gin;
  at::Tensor dm = at::empty({pre.size(1)}, pre.options());
  epilogue_backward(gin, g, pre.contiguous(), mvec.contiguous(), act, dm);
  at::Tensor dx = need_dx ? linear_nt(g, f32(W).t(), std::nullopt).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dW = need_dW ? at::mm(g.t(), f32(x)).to(W.scalar_type()) : at::empty({0}, W.options());
  at::Tensor db = need_db ? g.sum(0).to(W.scalar_type()) : at::empty({0}, W.options());
  return {dx, dm, dW, db};
}

}  // namespace spp_ext
