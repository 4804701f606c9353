// The TORCH_LIBRARY registration of the spp_ext ops (schemas here, CPU kernels in the per-op
// files, the CUDA kernel in inclusion_step_cuda.cu) and the Python module spp_kernels._C.
// Fake (meta) implementations and autograd are registered in Python: spp_kernels/ext_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace spp_ext {
std::tuple<at::Tensor, at::Tensor> masked_linear_cpu(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                                     c10::string_view, bool);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
    bool, bool, bool);
std::tuple<at::Tensor, at::Tensor> pair_matmul_cpu(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, const at::Tensor&,
                                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                                   c10::string_view, bool);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_matmul_backward_cpu(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view, bool, bool);
void inclusion_step_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double, double,
                        double, double, double, double, double, double, double, double, c10::string_view,
                        c10::string_view, bool, bool);
at::Tensor attention_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                         const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&);
bool attention_cpu_available();
void set_linear_backend(bool onednn, int64_t min_macs);
bool linear_onednn();
const char* attention_cpu_gemm();
}  // namespace spp_ext

TORCH_LIBRARY(spp_ext, m) {
  m.def("masked_linear(Tensor x, Tensor W, Tensor? b, Tensor mvec, str act, bool need_pre) -> (Tensor, Tensor)");
  m.def("masked_linear_backward(Tensor grad, Tensor x, Tensor W, Tensor pre, Tensor mvec, str act, bool need_dx, "
        "bool need_dW, bool need_db) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pair_matmul(Tensor x, Tensor W1, Tensor? b1, Tensor m, Tensor W2, Tensor? b2, str act, bool need_pre) "
        "-> (Tensor, Tensor)");
  m.def("pair_matmul_backward(Tensor grad, Tensor x, Tensor W1, Tensor pre, Tensor m, Tensor W2, str act, "
        "bool need_dx, bool need_dW) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("inclusion_step(Tensor(a!) m, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) z, "
        "Tensor(e!) gamma, Tensor(f!) entry, Tensor(g!) support_count, int step, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, float kappa, float lam, float nu, float step_size, float inv_sqrt_bc2, "
        "float rho, str gamma_mode, str optimizer, bool record, bool check_finite) -> ()");
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? keep, bool causal, Tensor? bias=None) -> Tensor");
  // which GEMM the plain products of masked_linear / pair_matmul run on (spp_kernels/_ext.py sets it)
  m.def("set_linear_backend(bool onednn, int min_macs) -> ()", &spp_ext::set_linear_backend);
  m.def("linear_backend() -> bool", &spp_ext::linear_onednn);
}

TORCH_LIBRARY_IMPL(spp_ext, CPU, m) {
  m.impl("masked_linear", &spp_ext::masked_linear_cpu);
  m.impl("masked_linear_backward", &spp_ext::masked_linear_backward_cpu);
  m.impl("pair_matmul", &spp_ext::pair_matmul_cpu);
  m.impl("pair_matmul_backward", &spp_ext::pair_matmul_backward_cpu);
  m.impl("inclusion_step", &spp_ext::inclusion_step_cpu);
  m.impl("attention", &spp_ext::attention_cpu);
}

extern "C" {
// An empty Python module: importing it runs the static registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "spp_ext ops (see torch.ops.spp_ext)", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod != nullptr) {
#ifdef SPP_WITH_CUDA
    PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
    PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
    // whether the attention op has the GEMM it calls (torch's fp32 brgemm or its exported sgemm_)
    PyModule_AddIntConstant(mod, "attention_cpu", spp_ext::attention_cpu_available() ? 1 : 0);
    // which GEMM its products run on: "brgemm" or "blas" (torch without the fp32 brgemm)
    PyModule_AddStringConstant(mod, "attention_gemm", spp_ext::attention_cpu_gemm());
  }
  return mod;
}
}
