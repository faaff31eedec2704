// Stage 1 on the CPU as a grid of [row block, vocabulary tile] blocks, for vocabularies wider than
// one tile. The untiled loop (chunked_linear.h) streams the whole weight once per row chunk and per
// product; here a tile of weight rows is used by every product of a row block while it is still in
// cache, and a block can hold many more rows for the same memory, so the weight is read about once
// per step and per thread. Measured on a 2-core Xeon (H = 1024, V = 32000, 1024 rows, fp32): the
// three products of a trainable step in 128-row chunks took 1.27x the time of the same products on
// the whole batch; as 1024 x 512 blocks, 0.97x.
//
// Threads (parallel_units.h): one parallel region per pass, each thread working whole units with
// single-threaded products and row passes, instead of a region per product and row pass.
// Forward units are [row block, vocabulary group] (rows in blocks of up to 256, the vocabulary in
// as many groups as give each thread about two units): a unit sweeps its group's tiles with an
// online log-sum-exp (running max and sum, napo_math.h) and, when the hidden states need a gradient,
// sums the expected hidden state E = sum_v softmax_v dz_v/draw_v W_v unnormalised against the
// running max (a row whose max moves is rescaled first); the groups' partials are merged at the
// end in a fixed order, each weighted by exp(its max - the row's max). The backward
// then needs no vocabulary work for d hidden = g (c W_y - E) (c = dz/draw at the target), and its
// units are vocabulary tiles: each recomputes its logits for all rows and writes its own slice of
// the weight and bias gradients. Every output is written by one unit in a fixed order, so results
// do not depend on which thread runs which unit.
// Kept logits (a trainable head, rows <= H): the forward writes tile v0's raw logits, as an
// [rows, w] matrix, into the memory of the weight gradient's rows [v0, v0 + w) (rows * w <= w * H),
// allocated by the forward instead of the backward. The backward turns them into the tile's
// gradient in a scratch block and writes the tile's weight gradient over them: 3 products per step
// (logits, E, dW) instead of 4, and no memory beyond what the step returns anyway.
// fp16 (chunked_linear.h, wide_half): the products run in fp32 on converted operands (a unit's
// hidden rows once, each weight tile once per unit and tile).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "arg_checks.h"
#include "chunked_linear.h"
#include "cpu/parallel_units.h"

namespace napo::cpu {

// Vocabulary columns per tile: 512 fp32 weight rows of H = 1024 are 2 MiB, about one core's L2.
constexpr int64_t kVocabTile = 512;
// Rows per chunk at most: enough that the weight is read once for typical batches, few enough that
// a chunk of hidden states stays in the last-level cache while the tiles pass.
constexpr int64_t kMaxChunkRows = 1024;
// Rows per forward unit at most. One core multiplied 256-row blocks by 512-column tiles (H = 1024)
// at 152 GFlop/s, 128-row blocks at 136, 64-row blocks at 104 (the tile is packed once per product).
constexpr int64_t kUnitRows = 256;

struct TilePlan {
  int64_t rows;    // rows per chunk
  int64_t width;   // vocabulary columns per tile
  bool tiled;      // false: one tile spans the vocabulary (the untiled loop runs)
  int64_t budget;  // elements of the caller's [chunk_size, V] block
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
  if (vocab <= width) return {chunk_size, vocab, false, chunk_size * vocab};
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, rows));
  const int64_t reshaped = std::min(kMaxChunkRows, chunk * (vocab / width));
  return {std::max(chunk, reshaped), width, true, chunk_size * vocab};
}

// Rows of the logits block a plan allocates for `rows` rows: the untiled loop's chunks are
// plan.rows = chunk_size rows of the whole vocabulary; the tiles give each of torch's threads a
// slice of up to all rows (whole-batch products run faster than slices of it), within plan.rows.
inline int64_t block_rows(const TilePlan& plan, int64_t rows) {
  return plan.tiled ? std::min(plan.rows, rows * team_size()) : std::min(plan.rows, rows);
}

// The [rows, w] view of tile v0's kept logits: the memory of weight-gradient rows [v0, v0 + w).
inline at::Tensor kept_tile(const at::Tensor& kept, int64_t v0, int64_t w, int64_t rows) {
  return kept.view(-1).narrow(0, v0 * kept.size(1), rows * w).view({rows, w});
}

inline std::optional<at::Tensor> bias_tile(const std::optional<at::Tensor>& bias, int64_t v0, int64_t w) {
  return bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, v0, w)) : std::nullopt;
}

// c_r W[y_r] in the accumulation dtype, c_r = dz/draw at the target (target_slope, chunked_linear.h):
// the target's term of d logp_r / d h_r = c_r W[y_r] - E_r. A target outside [0, V) gives NaN.
inline at::Tensor target_rows(const at::Tensor& hidden, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                              const LogitSpec& spec) {
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const int64_t vocab = weight.size(0);
  if (vocab == 0)
    return at::full({hidden.size(0), hidden.size(1)}, std::numeric_limits<double>::quiet_NaN(), acc);
  const at::Tensor w_y = weight.index_select(0, targets.clamp(0, vocab - 1)).to(acc.dtype());
  return w_y * target_slope(hidden, weight, bias, targets, spec).unsqueeze(1);
}

template <class Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tiled_linear_fwd(const at::Tensor& hidden,
                                                                const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& targets_in, TilePlan plan,
                                                                bool compute_expected, const LogitSpec& spec,
                                                                const at::Tensor& kept = at::Tensor()) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const at::Tensor targets = targets_in.contiguous();
  auto [logp, lse, expected] = linear_fwd_outputs(hidden, compute_expected);
  if (rows == 0) return {logp, lse, expected};

  const bool wide = wide_half<Passes>(hidden);
  const auto gemm = hidden.options().dtype(wide ? acc.dtype() : hidden.dtype());
  const bool acc_is_input = acc.dtype() == gemm.dtype();  // the products run in the accumulation dtype
  // the plan's block, one [unit rows, width] slice per thread
  const int64_t max_rows = block_rows(plan, rows);
  const int threads = static_cast<int>(std::min<int64_t>(team_size(), max_rows));
  const int64_t unit_rows = std::min(kUnitRows, max_rows / threads);
  const int64_t row_blocks = (rows + unit_rows - 1) / unit_rows;
  // units are [row block, vocabulary group]: groups enough for about two units per thread, so a
  // thread the OS does not run holds back one unit, not its share of the pass
  const int64_t tiles = std::max<int64_t>(1, (vocab + plan.width - 1) / plan.width);
  const int64_t wanted = std::clamp<int64_t>((2 * threads + row_blocks - 1) / row_blocks, 1, tiles);
  const int64_t group_tiles = (tiles + wanted - 1) / wanted, groups = (tiles + group_tiles - 1) / group_tiles;
  // each group's running (max, sum) per row, merged below; E of group 0 in `expected`, the others'
  // in `partial`, each summed against its own group's max
  at::Tensor run_max = at::full({groups, rows}, -std::numeric_limits<double>::infinity(), acc);
  at::Tensor run_sum = at::zeros({groups, rows}, acc);
  at::Tensor partial =
      compute_expected && groups > 1 ? at::empty({groups - 1, rows, hidden.size(1)}, acc) : at::Tensor();
  // NaN until a tile holds the target: an out-of-range target (never checked) leaves logp = NaN
  at::Tensor target_logit = at::full({rows}, std::numeric_limits<double>::quiet_NaN(), acc);
  at::Tensor block = at::empty({max_rows * plan.width}, gemm);
  at::Tensor scale = at::empty({threads * unit_rows}, acc);
  for_each_unit(row_blocks * groups, threads, [&](int64_t unit, int slot) {
    const int64_t group = unit % groups, lo = (unit / groups) * unit_rows, n = std::min(unit_rows, rows - lo);
    const int64_t v_begin = group * group_tiles * plan.width;
    const int64_t v_end = std::min(vocab, v_begin + group_tiles * plan.width);
    const at::Tensor h = operand(hidden.narrow(0, lo, n), wide);
    const at::Tensor y = targets.narrow(0, lo, n);
    at::Tensor out = !compute_expected ? at::Tensor()
                     : group == 0      ? expected.narrow(0, lo, n)
                                       : partial[group - 1].narrow(0, lo, n);
    at::Tensor mx = run_max[group].narrow(0, lo, n), sum = run_sum[group].narrow(0, lo, n),
               pick = target_logit.narrow(0, lo, n);
    at::Tensor s = scale.narrow(0, slot * unit_rows, n);
    for (int64_t v0 = v_begin; v0 < v_end; v0 += plan.width) {
      const int64_t w = std::min(plan.width, vocab - v0);
      const at::Tensor wt = operand(weight.narrow(0, v0, w), wide);
      at::Tensor scratch = block.narrow(0, slot * unit_rows * plan.width, n * w).view({n, w});
      at::Tensor logits = kept.defined() ? kept_tile(kept, v0, w, rows).narrow(0, lo, n) : scratch;
      chunk_logits(logits, h, wt, operand(bias_tile(bias, v0, w), wide));
      // exp(z - running max) * dz/draw when E needs them: in place, unless the logits are kept
      const at::Tensor probs = !compute_expected ? at::Tensor() : kept.defined() ? scratch : logits;
      Passes::logprob_tile_rows(logits, probs, y, v0, mx, sum, pick, s, spec);
      if (!compute_expected) continue;
      if (v0 == v_begin) {
        if (acc_is_input)
          at::mm_out(out, probs, wt);
        else  // bf16: each tile's product in the input dtype (as the untiled loop), summed in fp32
          out.copy_(at::mm(probs, wt));
        continue;
      }
      Passes::rescale_rows(out, s);
      if (acc_is_input)
        out.addmm_(probs, wt);
      else
        out.add_(at::mm(probs, wt));
    }
  });
  if (groups == 1) {
    at::add_out(lse, run_max[0], run_sum[0].log());  // max + log(sum); -inf for a row of -inf logits
    if (compute_expected) expected.div_(run_sum[0].unsqueeze(1));
  } else {
    // group g is worth exp(max_g - max) of the row's sum (0 for a group of -inf logits)
    const at::Tensor top = std::get<0>(run_max.max(0));
    const at::Tensor worth = at::where(run_max.isneginf(), 0.0, (run_max - top).exp());
    const at::Tensor total = (run_sum * worth).sum(0);
    at::add_out(lse, top, total.log());
    if (compute_expected) {
      const at::Tensor share = worth / total;  // [groups, rows]: what each group's partial E is worth
      expected.mul_(share[0].unsqueeze(1));
      for (int64_t g = 1; g < groups; ++g) expected.addcmul_(partial[g - 1], share[g].unsqueeze(1));
    }
  }
  at::sub_out(logp, target_logit, lse);
  return {logp, lse, expected};
}

template <class Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> tiled_linear_bwd(
    const at::Tensor& grad_in, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets_in, const at::Tensor& lse_in,
    TilePlan plan, bool need_hidden, bool need_weight, bool need_bias, const LogitSpec& spec,
    const at::Tensor& kept = at::Tensor()) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const at::Tensor targets = targets_in.contiguous(), grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const bool wide = wide_half<Passes>(hidden);
  const auto gemm = hidden.options().dtype(wide ? acc.dtype() : hidden.dtype());
  const bool acc_is_input = acc.dtype() == gemm.dtype();  // the products run in the accumulation dtype
  const bool hidden_is_acc = acc.dtype() == hidden.dtype();

  // with kept logits the weight gradient is written into them (d_weight comes back empty)
  const bool keep = kept.defined();
  auto [d_hidden, d_weight, d_bias] =
      linear_grads_begin(hidden, weight, need_hidden, need_weight && !keep, need_bias);
  if (rows > 0 && need_hidden) {
    // the products of a forward with E (as the autograd op keeps it), so that the tiles below own
    // everything they write
    const at::Tensor expected =
        std::get<2>(tiled_linear_fwd<Passes>(hidden, weight, bias, targets, plan, true, spec));
    d_hidden.copy_(grad.unsqueeze(1) * (target_rows(hidden, weight, bias, targets, spec) - expected));
  }
  if (keep && rows == 0 && need_weight) kept.zero_();
  if (keep && rows > 0 && (need_weight || need_bias)) {
    // each unit turns its tile's logits, all rows at once, into their gradient in a scratch block,
    // then writes the tile's weight gradient over them
    const int64_t tiles = (vocab + plan.width - 1) / plan.width;
    // one scratch of all rows per thread, within the budget (the op checks that one fits)
    const int64_t fit = std::max<int64_t>(1, plan.budget / (rows * plan.width));
    const int threads = static_cast<int>(std::min<int64_t>({team_size(), tiles, fit}));
    const at::Tensor h = operand(hidden, wide);
    at::Tensor block = at::empty({threads * rows * plan.width}, gemm);
    for_each_unit(tiles, threads, [&](int64_t tile, int slot) {
      const int64_t v0 = tile * plan.width, w = std::min(plan.width, vocab - v0);
      at::Tensor g = block.narrow(0, slot * rows * plan.width, rows * w).view({rows, w});
      Passes::logit_grad_rows(kept_tile(kept, v0, w, rows), g, targets, grad, lse,
                              need_bias ? d_bias.narrow(0, v0, w) : at::Tensor(), spec, v0);
      if (need_weight) {
        at::Tensor dw = kept.narrow(0, v0, w);
        at::mm_out(dw, g.t(), h);
      }
    });
  } else if (rows > 0 && (need_weight || need_bias)) {
    const int64_t max_rows = block_rows(plan, rows), tiles = (vocab + plan.width - 1) / plan.width;
    const int threads = static_cast<int>(std::min<int64_t>({team_size(), tiles, max_rows}));
    const int64_t chunk = std::min(rows, max_rows / threads);  // rows per product: a slice of the block
    at::Tensor block = at::empty({max_rows * plan.width}, gemm);
    for_each_unit(tiles, threads, [&](int64_t tile, int slot) {
      const int64_t v0 = tile * plan.width, w = std::min(plan.width, vocab - v0);
      const at::Tensor wt = operand(weight.narrow(0, v0, w), wide);
      const std::optional<at::Tensor> bt = operand(bias_tile(bias, v0, w), wide);
      at::Tensor dw = need_weight ? d_weight.narrow(0, v0, w) : at::Tensor();
      for (int64_t lo = 0; lo < rows; lo += chunk) {
        const int64_t n = std::min(chunk, rows - lo);
        const at::Tensor h = operand(hidden.narrow(0, lo, n), wide);
        at::Tensor g = block.narrow(0, slot * chunk * plan.width, n * w).view({n, w});
        chunk_logits(g, h, wt, bt);
        Passes::logit_grad_rows(g, g, targets.narrow(0, lo, n), grad.narrow(0, lo, n), lse.narrow(0, lo, n),
                                need_bias ? d_bias.narrow(0, v0, w) : at::Tensor(), spec, v0);
        if (!need_weight) continue;
        if (!acc_is_input)
          dw.add_(at::mm(g.t(), h));
        else if (lo == 0 && hidden_is_acc)  // fp32/fp64: the first chunk writes it (fp16: zero-filled)
          at::mm_out(dw, g.t(), h);
        else
          dw.addmm_(g.t(), h);
      }
    });
  }
  return linear_grads_end(d_hidden, d_weight, d_bias, weight, bias);
}

}  // namespace napo::cpu
