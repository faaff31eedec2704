// The fused per-row passes of the CPU kernels, on raw row-major pointers (no torch headers here, so
// the file that implements them compiles in seconds). F is a storage format of formats.h (Float32,
// Float64, Float16, BFloat16): Storage<F> is the stored type (raw bits for fp16/bf16), AccOf<F> the
// accumulation type (double for Float64, float otherwise).
// Targets are trusted (the public API validates labels); the passes never read outside a row: a
// target outside [0, vocab) gives logp = NaN (one compare per row). `threads` is the
// OpenMP team size (the caller passes torch's intra-op thread count, so torch.set_num_threads holds).
// Stage 1 reads raw logits (h W^T + b) and works on the head's logits z of `spec` (napo_math.h:
// scale, then an optional soft cap); with the default spec z is the raw logit.
#pragma once

#include <cstdint>

#include "cpu/formats.h"
#include "napo_math.h"

namespace napo::cpu {

// Forward over a [rows, vocab] block: lse[r] = log sum_v exp(z[r, v]) and logp[r] = z[r, y_r] - lse[r].
// When `probs` is not null it receives softmax(z) * dz/draw (it may be `logits` itself: the
// frozen-head path turns the chunk in place into what multiplies W in d logp / d h).
template <class F>
void logprob_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t vocab,
                  const int64_t* targets, AccOf<F>* logp, AccOf<F>* lse, const LogitSpec& spec, int threads);

// Online forward over one vocabulary tile [rows, width], columns offset .. offset + width of the
// full rows: merges the tile into the running (run_max, run_sum) of each row, sets target_logit[r]
// when y_r falls in the tile, writes exp(z - new max) * dz/draw into `probs` when not null (may be `logits`)
// and scale[r] = exp(old max - new max) (1 when the max did not move): the factor by which anything
// summed against the old max must be multiplied. After the last tile lse = max + log(sum).
template <class F>
void logprob_tile_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t width,
                       int64_t offset, const int64_t* targets, AccOf<F>* run_max, AccOf<F>* run_sum,
                       AccOf<F>* target_logit, AccOf<F>* scale, const LogitSpec& spec, int threads);

// Backward over a [rows, vocab] block whose column 0 is vocabulary entry `offset` (0 for whole
// rows, the tile start for a vocabulary tile):
// out[r, v] = grad[r] * ([offset + v == y_r] - exp(z[r, v] - lse[r])) * dz/draw[r, v] with z the map of
// in[r, v] (`out` may be `in`). When `d_bias` is not null, d_bias[v] += sum_r of those values, summed in
// the accumulation type before they are rounded for storage, in a fixed order (bitwise reproducible).
template <class F>
void logit_grad_rows(const Storage<F>* in, Storage<F>* out, int64_t rows, int64_t vocab, int64_t offset,
                     const int64_t* targets, const AccOf<F>* grad, const AccOf<F>* lse, AccOf<F>* d_bias,
                     const LogitSpec& spec, int threads);

// Backward from what a trainable head's forward kept (chunked_linear.h): q[r, v] = softmax * dz/draw
// becomes, in place, grad[r] * ([v == y_r] target_slope[r] - q[r, v]) (napo_math.h kept_grad);
// d_bias as in logit_grad_rows.
template <class F>
void kept_grad_rows(Storage<F>* q, int64_t rows, int64_t vocab, const int64_t* targets, const AccOf<F>* grad,
                    const AccOf<F>* target_slope, AccOf<F>* d_bias, int threads);

// Stage 2: per prompt row i of [B, M]: loss_rows[i] and weights[i, :] (see napo_math.h).
// Returns the index of the first row with no selected term (-1 if none); such a row is left unset.
template <typename Acc>
int64_t preference_rows(const Acc* chosen, const Acc* rejected, const bool* select, const Acc* coef,
                        const Acc* margin, int64_t batch, int64_t pool, int agg, Acc* loss_rows, Acc* weights,
                        int threads);

}  // namespace napo::cpu
