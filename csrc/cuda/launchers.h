// Host entry points of the CUDA kernels, on raw device pointers. Plain C++ (no CUDA or torch
// types), so csrc/cuda/ops_cuda.cpp can call them while nvcc compiles the .cu files without any
// torch header. `stream` is a cudaStream_t; each launcher returns nullptr on success or the CUDA
// error message of the launch.
#pragma once

#include <cstdint>

namespace napo::cuda {

enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Stage 1 forward over [rows, vocab] (one block per row): lse, logp in the accumulation dtype
// (double for kFloat64, float otherwise); `probs` (may equal `logits`, may be null) receives the
// softmax. A row whose target lies outside [0, vocab) gets logp = NaN (checked on the device,
// without a host synchronisation).
const char* logprob_rows(DType dtype, const void* logits, void* probs, int64_t rows, int64_t vocab,
                         const int64_t* targets, void* logp, void* lse, void* stream);

// Rows per partial sum of the fused bias gradient: `scratch` must hold
// bias_scratch_groups(rows) * vocab accumulation-dtype values when `d_bias` is not null.
int64_t bias_scratch_groups(int64_t rows);

// Stage 1 backward: out = grad_r * (onehot - softmax) (`out` may equal `in`); d_bias (may be null)
// += the column sums, reduced in a fixed order (bitwise reproducible, no atomics).
const char* logit_grad_rows(DType dtype, const void* in, void* out, int64_t rows, int64_t vocab,
                            const int64_t* targets, const void* grad, const void* lse, void* d_bias,
                            void* scratch, void* stream);

// Stage 2 (one block per prompt row), float32 or float64 (`is_double`). A row with no selected
// term gets loss and weights NaN.
const char* preference_rows(bool is_double, const void* chosen, const void* rejected, const bool* select,
                            const void* coef, const void* margin, int64_t batch, int64_t pool, int agg,
                            void* loss_rows, void* weights, void* stream);

}  // namespace napo::cuda
