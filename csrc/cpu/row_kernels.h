// The fused per-row passes of the CPU kernels, on raw row-major pointers (no ATen here, so the
// file that implements them compiles in seconds). T is the storage type (float, double,
// c10::Half, c10::BFloat16), Acc the accumulation type (double for double, float otherwise).
// Targets are assumed valid (in [0, vocab)): the ATen wrappers check them first. `threads` is the
// OpenMP team size (the caller passes torch's intra-op thread count, so torch.set_num_threads holds).
#pragma once

#include <cstdint>

namespace napo::cpu {

// Forward over a [rows, vocab] block: lse[r] = log sum_v exp(logits[r, v]) and
// logp[r] = logits[r, y_r] - lse[r]. When `probs` is not null it receives softmax(logits) (it may
// be `logits` itself: the frozen-head path turns the chunk into probabilities in place).
template <typename T, typename Acc>
void logprob_rows(const T* logits, T* probs, int64_t rows, int64_t vocab, const int64_t* targets,
                  Acc* logp, Acc* lse, int threads);

// Backward over a [rows, vocab] block: out[r, v] = grad[r] * ([v == y_r] - exp(in[r, v] - lse[r]))
// (`out` may be `in`). When `d_bias` is not null, d_bias[v] += sum_r of those values, summed in
// Acc before they are rounded to T and in a fixed order (bitwise reproducible).
template <typename T, typename Acc>
void logit_grad_rows(const T* in, T* out, int64_t rows, int64_t vocab, const int64_t* targets,
                     const Acc* grad, const Acc* lse, Acc* d_bias, int threads);

// Stage 2: per prompt row i of [B, M]: loss_rows[i] and weights[i, :] (see napo_math.h).
// Returns the index of the first row with no selected term (-1 if none); such a row is left unset.
template <typename Acc>
int64_t preference_rows(const Acc* chosen, const Acc* rejected, const bool* select, const Acc* coef,
                        const Acc* margin, int64_t batch, int64_t pool, int agg, Acc* loss_rows,
                        Acc* weights, int threads);

}  // namespace napo::cpu
