// Stage 1 on the CPU as a grid of [row chunk, vocabulary tile] blocks, for vocabularies wider than
// one tile. The untiled loop (chunked_linear.h) streams the whole weight once per row chunk and per
// product; here a tile of weight rows is used by every product of a chunk while it is still in
// cache, and a chunk can hold many more rows for the same block memory, so the weight is read
// about once per step. Measured on a 2-core Xeon (H = 1024, V = 32000, 1024 rows, fp32): the three
// products of a trainable step in 128-row chunks took 1.27x the time of the same products on the
// whole batch; as 1024 x 512 blocks, 0.97x.
//
// Forward: an online log-sum-exp over the tiles of a row (running max and sum, napo_math.h). With a
// frozen head the expected hidden state sum_v softmax_v W_v is summed unnormalised against the
// running max; a row whose max moves is rescaled first, and the sum is divided at the end.
// Backward: the tile's logits are recomputed and turned into their gradient with the row's final
// lse; the weight gradient of a tile is written once per row chunk, the hidden gradient summed
// over tiles (in fp32 for fp16/bf16, rounded once per chunk as in the untiled loop).
// fp16 (chunked_linear.h, wide_half): the hidden chunk is converted to fp32 once per chunk, each
// weight tile once per chunk and tile, and every product of the tile runs in fp32.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "arg_checks.h"
#include "chunked_linear.h"

namespace napo::cpu {

// Vocabulary columns per tile: 512 fp32 weight rows of H = 1024 are 2 MiB, about one core's L2.
constexpr int64_t kVocabTile = 512;
// Rows per chunk at most: enough that the weight is read once for typical batches, few enough that
// a chunk of hidden states stays in the last-level cache while the tiles pass.
constexpr int64_t kMaxChunkRows = 1024;

struct TilePlan {
  int64_t rows;   // rows per chunk
  int64_t width;  // vocabulary columns per tile
  bool tiled;     // false: one tile spans the vocabulary (the untiled loop runs)
};

// NAPO_KERNELS_CPU_VOCAB_TILE=<columns> overrides the tile width (the tests use narrow tiles so
// that small vocabularies cross many tile borders).
inline int64_t vocab_tile_width() {
  if (const char* env = std::getenv("NAPO_KERNELS_CPU_VOCAB_TILE")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return kVocabTile;
}

// The caller's budget is one [chunk_size, V] block; tiling reshapes it to at most chunk_size * V
// elements of [rows, width], never fewer rows than chunk_size.
inline TilePlan plan_tiles(int64_t rows, int64_t vocab, int64_t chunk_size) {
  const int64_t width = vocab_tile_width();
  if (vocab <= width) return {chunk_size, vocab, false};
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, rows));
  const int64_t reshaped = std::min(kMaxChunkRows, chunk * (vocab / width));
  return {std::max(chunk, reshaped), width, true};
}

// Rows of the logits block a plan allocates for `rows` rows (the untiled loop too: its chunks are
// plan.rows = chunk_size rows of the whole vocabulary).
inline int64_t block_rows(const TilePlan& plan, int64_t rows) { return std::min(plan.rows, rows); }

inline std::optional<at::Tensor> bias_tile(const std::optional<at::Tensor>& bias, int64_t v0, int64_t w) {
  return bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, v0, w)) : std::nullopt;
}

template <class Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tiled_linear_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets_in, TilePlan plan, bool compute_expected, const LogitSpec& spec) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const at::Tensor targets = targets_in.contiguous();
  auto [logp, lse, expected] = linear_fwd_outputs(hidden, compute_expected);
  if (rows == 0) return {logp, lse, expected};

  at::Tensor run_max = at::full({rows}, -std::numeric_limits<double>::infinity(), acc);
  at::Tensor run_sum = at::zeros({rows}, acc);
  // NaN until a tile holds the target: an out-of-range target (never checked) leaves logp = NaN
  at::Tensor target_logit = at::full({rows}, std::numeric_limits<double>::quiet_NaN(), acc);
  at::Tensor scale = at::empty({block_rows(plan, rows)}, acc);
  const bool wide = wide_half<Passes>(hidden);
  const auto gemm = hidden.options().dtype(wide ? acc.dtype() : hidden.dtype());
  at::Tensor block = at::empty({block_rows(plan, rows) * plan.width}, gemm);
  const bool acc_is_input = acc.dtype() == gemm.dtype();  // the products run in the accumulation dtype
  for (int64_t lo = 0; lo < rows; lo += plan.rows) {
    const int64_t n = std::min(plan.rows, rows - lo);
    const at::Tensor h = operand(hidden.narrow(0, lo, n), wide);
    at::Tensor out = compute_expected ? expected.narrow(0, lo, n) : at::Tensor();
    for (int64_t v0 = 0; v0 < vocab; v0 += plan.width) {
      const int64_t w = std::min(plan.width, vocab - v0);
      const at::Tensor wt = operand(weight.narrow(0, v0, w), wide);
      at::Tensor logits = block.narrow(0, 0, n * w).view({n, w});
      chunk_logits(logits, h, wt, operand(bias_tile(bias, v0, w), wide));
      // in place: the logits become exp(z - running max) * dz/draw when the frozen head needs them
      Passes::logprob_tile_rows(logits, compute_expected ? logits : at::Tensor(), targets.narrow(0, lo, n),
                                v0, run_max.narrow(0, lo, n), run_sum.narrow(0, lo, n),
                                target_logit.narrow(0, lo, n), scale.narrow(0, 0, n), spec);
      if (!compute_expected) continue;
      if (v0 == 0) {
        if (acc_is_input)
          at::mm_out(out, logits, wt);
        else  // bf16: each tile's product in the input dtype (as the untiled loop), summed in fp32
          out.copy_(at::mm(logits, wt));
        continue;
      }
      Passes::rescale_rows(out, scale.narrow(0, 0, n));
      if (acc_is_input)
        out.addmm_(logits, wt);
      else
        out.add_(at::mm(logits, wt));
    }
  }
  at::add_out(lse, run_max, run_sum.log());  // max + log(sum); -inf for a row of -inf logits
  at::sub_out(logp, target_logit, lse);
  if (compute_expected) expected.div_(run_sum.unsqueeze(1));
  return {logp, lse, expected};
}

template <class Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tiled_linear_bwd(
    const at::Tensor& grad_in, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets_in, const at::Tensor& lse_in,
    TilePlan plan, bool need_hidden, bool need_weight, bool need_bias, const LogitSpec& spec) {
  const int64_t rows = hidden.size(0), width = hidden.size(1), vocab = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const at::Tensor targets = targets_in.contiguous(), grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const bool wide = wide_half<Passes>(hidden);
  const auto gemm = hidden.options().dtype(wide ? acc.dtype() : hidden.dtype());
  const bool acc_is_input = acc.dtype() == gemm.dtype();  // the products run in the accumulation dtype
  const bool hidden_is_acc = acc.dtype() == hidden.dtype();

  auto [d_hidden, d_weight, d_bias] = linear_grads_begin(hidden, weight, need_hidden, need_weight, need_bias);
  if (rows > 0 && (need_hidden || need_weight || need_bias)) {
    const int64_t max_rows = block_rows(plan, rows);
    at::Tensor block = at::empty({max_rows * plan.width}, gemm);
    // fp16/bf16: a chunk's hidden gradient is summed over the tiles in fp32
    at::Tensor dh_sum = need_hidden && !hidden_is_acc ? at::empty({max_rows, width}, acc) : at::Tensor();
    for (int64_t lo = 0; lo < rows; lo += plan.rows) {
      const int64_t n = std::min(plan.rows, rows - lo);
      const at::Tensor h = operand(hidden.narrow(0, lo, n), wide);
      at::Tensor dh = !need_hidden    ? at::Tensor()
                      : hidden_is_acc ? d_hidden.narrow(0, lo, n)
                                      : dh_sum.narrow(0, 0, n);
      for (int64_t v0 = 0; v0 < vocab; v0 += plan.width) {
        const int64_t w = std::min(plan.width, vocab - v0);
        const at::Tensor wt = operand(weight.narrow(0, v0, w), wide);
        at::Tensor g = block.narrow(0, 0, n * w).view({n, w});
        chunk_logits(g, h, wt, operand(bias_tile(bias, v0, w), wide));
        Passes::logit_grad_rows(g, g, targets.narrow(0, lo, n), grad.narrow(0, lo, n), lse.narrow(0, lo, n),
                                need_bias ? d_bias.narrow(0, v0, w) : at::Tensor(), spec, v0);
        if (need_hidden) {
          if (!acc_is_input)
            v0 == 0 ? dh.copy_(at::mm(g, wt)) : dh.add_(at::mm(g, wt));
          else if (v0 == 0)
            at::mm_out(dh, g, wt);
          else
            dh.addmm_(g, wt);
        }
        if (need_weight) {
          at::Tensor dw = d_weight.narrow(0, v0, w);
          if (!acc_is_input)
            dw.add_(at::mm(g.t(), h));
          else if (lo == 0 && hidden_is_acc)  // fp32/fp64: the first chunk writes it (fp16: zero-filled)
            at::mm_out(dw, g.t(), h);
          else
            dw.addmm_(g.t(), h);
        }
      }
      if (need_hidden && !hidden_is_acc) d_hidden.narrow(0, lo, n).copy_(dh);
    }
  }
  return linear_grads_end(d_hidden, d_weight, d_bias, weight, bias);
}

}  // namespace napo::cpu
