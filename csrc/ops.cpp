// The napo_C operator library: every schema declared once here; the CPU (csrc/cpu) and CUDA
// (csrc/cuda) implementations register against these schemas per dispatch key. Contracts: the
// module docstring of napo_kernels/kernels/torch_chunked.py.
#include <Python.h>
#include <torch/library.h>

// `import napo_kernels._C` loads this shared library, which runs the registrations below; the
// module itself is empty (the ops live in torch.ops.napo_C).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "napo-kernels C++/CUDA kernels (torch.ops.napo_C)", -1,
                               nullptr};
  return PyModule_Create(&module);
}

namespace {
bool has_cuda() {
#ifdef NAPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(napo_C, m) {
  // The fake (meta) implementations for torch.compile / opcheck are registered in Python.
  m.set_python_module("napo_kernels.kernels.cpp");
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int chunk_size, "
      "bool compute_expected) -> (Tensor logp, Tensor lse, Tensor expected)");
  m.def(
      "linear_logprobs_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
      "int chunk_size, bool need_hidden, bool need_weight, bool need_bias) "
      "-> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
  m.def("logits_logprobs_fwd(Tensor logits, Tensor targets) -> (Tensor logp, Tensor lse)");
  m.def("logits_logprobs_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor lse) -> Tensor");
  m.def(
      "preference_fwd(Tensor chosen, Tensor rejected, Tensor select, Tensor coef, Tensor margin, int agg) "
      "-> (Tensor rows, Tensor weights)");
  m.def("has_cuda() -> bool", &has_cuda);
}
