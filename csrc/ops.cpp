// The napo_C operator library: every schema declared once here; the CPU (csrc/cpu) and CUDA
// (csrc/cuda) implementations register against these schemas per dispatch key. Contracts: the
// module docstring of napo_kernels/kernels/torch_chunked.py.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "cpu/tiled_linear.h"

// `import napo_kernels._C` loads this shared library, which runs the registrations below; the
// module itself is empty (the ops live in torch.ops.napo_C).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "napo-kernels C++/CUDA kernels (torch.ops.napo_C)", -1, nullptr};
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

// The [rows, columns] logits block the CPU kernel works in for a [chunk_size, vocab] budget: the
// plan of csrc/cpu/tiled_linear.h itself (NAPO_KERNELS_CPU_VOCAB_TILE included), so that Python
// reports (napo_kernels.kernels.extension.cpu_block_shape) can never drift from the kernel.
std::vector<int64_t> cpu_block_shape(int64_t rows, int64_t vocab, int64_t chunk_size) {
  TORCH_CHECK_VALUE(rows >= 0 && vocab >= 0 && chunk_size >= 1, "napo_C::cpu_block_shape: needs rows >= 0, ",
                    "vocab >= 0 and chunk_size >= 1, got ", rows, ", ", vocab, ", ", chunk_size);
  const napo::cpu::TilePlan plan = napo::cpu::plan_tiles(rows, vocab, chunk_size);
  return {napo::cpu::block_rows(plan, rows), plan.width};
}
}  // namespace

TORCH_LIBRARY(napo_C, m) {
  // The fake (meta) implementations for torch.compile / opcheck are registered in Python.
  m.set_python_module("napo_kernels.kernels.extension");
  m.def(
      "linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int chunk_size, "
      "bool compute_expected, float? softcap=None, float logit_scale=1.0, bool keep_logits=False) "
      "-> (Tensor logp, Tensor lse, Tensor expected, Tensor kept)");
  // kept: on the CPU the forward's raw logits, kept in the memory of the weight gradient
  // (csrc/cpu/tiled_linear.h; the backward writes the weight gradient into it and returns d_weight
  // empty); on CUDA the [rows, V] block of probabilities (csrc/chunked_linear.h; the backward turns it
  // into the logits' gradient)
  m.def(
      "linear_logprobs_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor lse, int chunk_size, bool need_hidden, bool need_weight, bool need_bias, "
      "float? softcap=None, float logit_scale=1.0, Tensor(a!)? kept=None) "
      "-> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
  // The chunk loop of csrc/chunked_linear.h (what the CUDA build runs, kept path included) with the
  // CPU passes: CPU only, for the tests. Same arguments; kept: the [rows, V] block of probabilities.
  m.def(
      "_chunked_linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "int chunk_size, bool compute_expected, float? softcap=None, float logit_scale=1.0, "
      "bool keep_logits=False) -> (Tensor logp, Tensor lse, Tensor expected, Tensor kept)");
  m.def(
      "_chunked_linear_logprobs_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor lse, int chunk_size, bool need_hidden, bool need_weight, bool need_bias, "
      "float? softcap=None, float logit_scale=1.0, Tensor(a!)? kept=None) "
      "-> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
  m.def("logits_logprobs_fwd(Tensor logits, Tensor targets) -> (Tensor logp, Tensor lse)");
  m.def("logits_logprobs_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor lse) -> Tensor");
  m.def(
      "preference_fwd(Tensor chosen, Tensor rejected, Tensor select, Tensor coef, Tensor margin, int agg) "
      "-> (Tensor rows, Tensor weights)");
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("cpu_block_shape(int rows, int vocab, int chunk_size) -> int[]", &cpu_block_shape);
}
