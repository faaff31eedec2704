// Host entry points of the CUDA kernels, on raw device pointers. Plain C++ (no CUDA or torch
// types), so csrc/cuda/ops_cuda.cpp can call them while nvcc compiles the .cu files without any
// torch header. Each launcher takes one struct of named fields (the caller fills them by name, with
// C++20 designated initializers; inputs are const pointers, outputs not), so two arguments cannot
// be swapped by position, and returns nullptr on success or the CUDA error message of the launch.
// Element types are erased (`void*`): `dtype` says what the data pointers hold; per-row values
// (logp, lse, grad, d_bias) are in the accumulation dtype: double for kFloat64, float otherwise.
#pragma once

#include <cstdint>

#include "napo_math.h"

namespace napo::cuda {

enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Stage 1 forward over [rows, vocab] raw logits (one block per row), on the head's logits z of `spec`.
struct LogprobRowsArgs {
  DType dtype;         // of logits and probs
  const void* logits;  // [rows, vocab]
  void* probs;         // [rows, vocab] receives softmax(z) * dz/draw; may equal logits; may be null
  int64_t rows;
  int64_t vocab;
  const int64_t* targets;  // [rows], trusted: a target outside [0, vocab) gives logp = NaN
  void* logp;              // [rows], accumulation dtype
  void* lse;               // [rows], accumulation dtype
  LogitSpec spec;          // the head's logit scale and soft cap (napo_math.h)
  void* stream;            // cudaStream_t
};
const char* logprob_rows(const LogprobRowsArgs& args);

// Rows per partial sum of the fused bias gradient: `scratch` must hold
// bias_scratch_groups(rows) * vocab accumulation-dtype values when `d_bias` is not null.
int64_t bias_scratch_groups(int64_t rows);

// Stage 1 backward: out = grad_r * (onehot - softmax(z)) * dz/draw; d_bias += the column sums, reduced
// in a fixed order (bitwise reproducible, no atomics).
struct LogitGradRowsArgs {
  DType dtype;     // of in and out
  const void* in;  // [rows, vocab] logits
  void* out;       // [rows, vocab]; may equal in
  int64_t rows;
  int64_t vocab;
  const int64_t* targets;  // [rows]
  const void* grad;        // [rows], accumulation dtype
  const void* lse;         // [rows], accumulation dtype
  void* d_bias;            // [vocab], accumulation dtype, added to; may be null
  void* scratch;           // see bias_scratch_groups; may be null when d_bias is
  LogitSpec spec;          // the head's logit scale and soft cap (napo_math.h)
  void* stream;            // cudaStream_t
};
const char* logit_grad_rows(const LogitGradRowsArgs& args);

// Stage 1 backward from a trainable head's kept block (csrc/chunked_linear.h): q = softmax * dz/draw
// becomes, in place, grad_r * ([v == y_r] target_slope_r - q) (napo_math.h kept_grad); d_bias as above.
struct KeptGradRowsArgs {
  DType dtype;  // of q
  void* q;      // [rows, vocab], in place
  int64_t rows;
  int64_t vocab;
  const int64_t* targets;    // [rows]
  const void* grad;          // [rows], accumulation dtype
  const void* target_slope;  // [rows], accumulation dtype: dz/draw at the target
  void* d_bias;              // [vocab], accumulation dtype, added to; may be null
  void* scratch;             // see bias_scratch_groups; may be null when d_bias is
  void* stream;              // cudaStream_t
};
const char* kept_grad_rows(const KeptGradRowsArgs& args);

// Stage 2 (one block per prompt row) over the [batch, pool] reward matrix. A row with no selected
// term gets loss and weights NaN.
struct PreferenceRowsArgs {
  DType dtype;           // kFloat32 or kFloat64, of every float pointer below
  const void* chosen;    // [batch]
  const void* rejected;  // [pool]
  const bool* select;    // [batch, pool]
  const void* coef;      // [batch, pool]
  const void* margin;    // [batch, pool]
  int64_t batch;
  int64_t pool;
  int agg;          // kAggLse or kAggMean (napo_math.h)
  void* loss_rows;  // [batch]
  void* weights;    // [batch, pool]
  void* stream;     // cudaStream_t
};
const char* preference_rows(const PreferenceRowsArgs& args);

}  // namespace napo::cuda
