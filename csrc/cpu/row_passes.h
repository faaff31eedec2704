// The vectorisable CPU row loops. Not an ordinary header (no include guard, on purpose):
// csrc/cpu/row_kernels.cpp includes it once per instruction set, each time inside
// `#pragma GCC target(...)` and with NAPO_CPU_ISA naming the namespace, so the same text is compiled
// for plain x86-64 / AVX2 / AVX-512 and picked at run time.
// OpenMP over rows (forward) or over column blocks (backward) on `threads` threads: every output
// element is produced by one thread in a fixed order, so results do not depend on the thread count.

namespace napo::cpu::NAPO_CPU_ISA {

// `#pragma omp simd` marks the inner loops as free of cross-iteration dependencies: they vectorise
// even when the output is the input (the in-place passes), and the max / sum reductions may be
// split over vector lanes. The split is fixed by the compiled code, so results stay reproducible.

// Elements per partial of the row log-sum-exp (the block is re-read from L1 for the exp sum).
constexpr int64_t kRowBlock = 1024;
// Columns per span of the backward pass (with a bias gradient, per task: rows inner, so each column
// is owned by one thread). Small enough that a 512-wide vocabulary tile still splits over threads.
constexpr int64_t kColBlock = 128;
// Below this many elements a pass runs on one thread (thread start-up would dominate).
constexpr int64_t kParallelMin = 1 << 15;

// Every pass reads raw logits (the GEMM's output) and maps them to the head's logits z on the fly
// (`map`: PlainLogits, ScaledLogits or CappedLogits of napo_math.h), in the accumulation type.

// (max, sum-exp) of one block of a row: max first, then the exp sum relative to it. A NaN element
// makes the sum NaN (exp(NaN - m)), so it reaches the row's lse whatever the max does with it.
template <class F, class M>
LsePair<AccOf<F>> block_lse(const Storage<F>* x, int64_t n, M map) {
  using Acc = AccOf<F>;
  if constexpr (!std::is_same_v<M, PlainLogits>) {
    // map each logit once (a tanh costs more than the exp), then the plain block in Acc
    using AccFormat = std::conditional_t<std::is_same_v<Acc, double>, Float64, Float32>;
    Acc z[kRowBlock];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = map.value(F::load(x[j]));
    return block_lse<AccFormat>(z, n, PlainLogits{});
  }
  Acc m = neg_inf<Acc>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const Acc v = map.value(F::load(x[j]));
    m = v > m ? v : m;
  }
  if (m == neg_inf<Acc>()) {  // all -inf (the block adds nothing), unless a NaN hides among them
    for (int64_t j = 0; j < n; ++j) {
      const Acc v = map.value(F::load(x[j]));
      if (v != v) return {v, Acc(1)};
    }
    return lse_empty<Acc>();
  }
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_acc(map.value(F::load(x[j])) - m);
  return {m, s};
}

template <class F, class M>
void logprob_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t vocab,
                  const int64_t* targets, AccOf<F>* logp, AccOf<F>* lse, M map, int threads) {
  using T = Storage<F>;
  using Acc = AccOf<F>;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * vocab;
    LsePair<Acc> acc = lse_empty<Acc>();
    for (int64_t lo = 0; lo < vocab; lo += kRowBlock)
      acc = lse_merge(acc, block_lse<F>(x + lo, std::min(kRowBlock, vocab - lo), map));
    const Acc row_lse = lse_value(acc);
    lse[r] = row_lse;
    // the one check on a target: a bounds guard for memory safety (its value is trusted otherwise)
    const int64_t y = targets[r];
    logp[r] = 0 <= y && y < vocab ? map.value(F::load(x[y])) - row_lse : static_cast<Acc>(NAN);
    if (probs != nullptr) {  // softmax_v * dz_v/draw_v: the frozen head's sum over v of it times W_v
      T* p = probs + r * vocab;
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) {
        Acc slope;
        const Acc z = map.value(F::load(x[v]), slope);
        p[v] = F::store(softmax_prob(z, row_lse) * slope);
      }
    }
  }
}

// One tile row's softmax numerators with one exp per element (the frozen head's hot loop): with
// `top` the row's max after this tile, p[v] = exp(z_v - top) * dz/draw_v, and the sum of
// exp(z_v - top) is returned. Two loops per block: the exp and the sum in the accumulation type,
// then the stores (a fused loop with fp16/bf16 stores does not vectorise).
template <class F, class M>
AccOf<F> tile_probs(const Storage<F>* x, Storage<F>* p, int64_t width, AccOf<F> top, M map) {
  using Acc = AccOf<F>;
  Acc total = 0;
  for (int64_t lo = 0; lo < width; lo += kRowBlock) {
    const int64_t n = std::min(kRowBlock, width - lo);
    Acc e[kRowBlock], slope[kRowBlock];
    Acc s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const Acc z = map.value(F::load(x[lo + j]), slope[j]);
      e[j] = exp_acc(z - top);
      s += e[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) p[lo + j] = F::store(e[j] * slope[j]);
    total += s;
  }
  return total;
}

// One vocabulary tile [rows, width] (columns offset .. offset + width of the full rows) of the
// online forward: merges the tile into each row's running (max, sum), picks up the target's logit
// when it falls in the tile, writes exp(x - new max) into `probs` when not null (may be `logits`)
// and scale[r] = exp(old max - new max), the factor for whatever was summed against the old max.
// With `probs` the tile's max is found first, so each element's exp is taken once, against the new
// max, and serves both the sum and the probabilities (the frozen head's forward: half the exps).
template <class F, class M>
void logprob_tile_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t width,
                       int64_t offset, const int64_t* targets, AccOf<F>* run_max, AccOf<F>* run_sum,
                       AccOf<F>* target_logit, AccOf<F>* scale, M map, int threads) {
  using T = Storage<F>;
  using Acc = AccOf<F>;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * width >= kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * width;
    const Acc old_max = run_max[r], old_sum = run_sum[r];
    const int64_t y = targets[r] - offset;
    if (0 <= y && y < width) target_logit[r] = map.value(F::load(x[y]));
    if (probs != nullptr) {
      T* p = probs + r * width;
      Acc m = neg_inf<Acc>();
#pragma omp simd reduction(max : m)
      for (int64_t v = 0; v < width; ++v) {
        const Acc z = map.value(F::load(x[v]));
        m = z > m ? z : m;
      }
      Acc top = m > old_max ? m : old_max;  // NaN logits: the sum below becomes NaN
      if (top == neg_inf<Acc>()) {  // only -inf so far: probability 0, nothing summed, unless a NaN hides
        bool nan = false;
        for (int64_t v = 0; v < width && !nan; ++v) {
          const Acc z = map.value(F::load(x[v]));
          nan = z != z;
        }
        if (!nan) {
          for (int64_t v = 0; v < width; ++v) p[v] = F::store(Acc(0));
          scale[r] = Acc(1);
          continue;
        }
        top = static_cast<Acc>(NAN);
      }
      const Acc s = tile_probs<F>(x, p, width, top, map);
      // equal maxima need no rescaling; an old max of -inf has nothing summed (exp(-inf) = 0)
      scale[r] = top == old_max ? Acc(1) : exp_acc(old_max - top);
      run_max[r] = top;
      run_sum[r] = old_sum * scale[r] + s;
      continue;
    }
    LsePair<Acc> tile = lse_empty<Acc>();
    for (int64_t lo = 0; lo < width; lo += kRowBlock)
      tile = lse_merge(tile, block_lse<F>(x + lo, std::min(kRowBlock, width - lo), map));
    const LsePair<Acc> merged = lse_merge(LsePair<Acc>{old_max, old_sum}, tile);
    // equal maxima (including both -inf: nothing summed yet) need no rescaling
    scale[r] = merged.max == old_max ? Acc(1) : exp_acc(old_max - merged.max);
    run_max[r] = merged.max;
    run_sum[r] = merged.sum;
  }
}

// The end of a backward span: d (len values) added to bias_sum when it is not null, then stored.
// Two simple loops vectorise where one fused loop does not (fp16 stores).
template <class F>
inline void store_span(const AccOf<F>* d, Storage<F>* o, int len, AccOf<F>* bias_sum) {
  if (bias_sum != nullptr) {
#pragma omp simd
    for (int v = 0; v < len; ++v) bias_sum[v] += d[v];
  }
#pragma omp simd
  for (int v = 0; v < len; ++v) o[v] = F::store(d[v]);
}

// The gradient of `len` columns of one row (see logit_grad_rows), y the target's column among
// them or -1; the values are also added to bias_sum when it is not null.
template <class F, class M>
inline void logit_grad_span(const Storage<F>* x, Storage<F>* o, int len, int y, AccOf<F> g, AccOf<F> row_lse,
                            AccOf<F>* bias_sum, M map) {
  using Acc = AccOf<F>;
  Acc d[kColBlock];
#pragma omp simd
  for (int v = 0; v < len; ++v) {
    Acc slope;
    const Acc z = map.value(F::load(x[v]), slope);
    d[v] = logit_grad(g, v == y, z, row_lse, slope);
  }
  store_span<F>(d, o, len, bias_sum);
}

// The same from kept probabilities q (kept_grad_rows), in place.
template <class F>
inline void kept_grad_span(Storage<F>* q, int len, int y, AccOf<F> g, AccOf<F> target_slope,
                           AccOf<F>* bias_sum) {
  using Acc = AccOf<F>;
  Acc d[kColBlock];
#pragma omp simd
  for (int v = 0; v < len; ++v) d[v] = kept_grad(g, v == y, target_slope, F::load(q[v]));
  store_span<F>(d, q, len, bias_sum);
}

// The threading of both backward passes over a [rows, vocab] block whose column 0 is vocabulary
// entry `offset`: span(r, lo, len, y, bias_sum) produces row r's columns [lo, lo + len), y the
// target's column among them or -1. Without a bias gradient every (row, column block) span is
// independent; with one, each column block is owned by one thread and its rows summed in order
// into d_bias (bitwise reproducible).
template <typename Acc, class Span>
void grad_spans(int64_t rows, int64_t vocab, int64_t offset, const int64_t* targets, Acc* d_bias, int threads,
                Span span) {
  const int64_t blocks = (vocab + kColBlock - 1) / kColBlock;
  // the target's column within block [lo, lo + len), -1 when outside (32-bit: cheap vector compares)
  auto target_in = [&](int64_t r, int64_t lo, int64_t len) {
    const int64_t y = targets[r] - offset - lo;
    return 0 <= y && y < len ? static_cast<int>(y) : -1;
  };
  if (d_bias == nullptr) {
    const int64_t spans = rows * blocks;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && spans > 1)
    for (int64_t i = 0; i < spans; ++i) {
      const int64_t r = i / blocks, lo = (i % blocks) * kColBlock;
      const int len = static_cast<int>(std::min(kColBlock, vocab - lo));
      span(r, lo, len, target_in(r, lo, len), static_cast<Acc*>(nullptr));
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kColBlock;
    const int len = static_cast<int>(std::min(kColBlock, vocab - lo));
    Acc bias_sum[kColBlock] = {};
    for (int64_t r = 0; r < rows; ++r) span(r, lo, len, target_in(r, lo, len), bias_sum);
#pragma omp simd
    for (int v = 0; v < len; ++v) d_bias[lo + v] += bias_sum[v];
  }
}

template <class F, class M>
void logit_grad_rows(const Storage<F>* in, Storage<F>* out, int64_t rows, int64_t vocab, int64_t offset,
                     const int64_t* targets, const AccOf<F>* grad, const AccOf<F>* lse, AccOf<F>* d_bias,
                     M map, int threads) {
  grad_spans(rows, vocab, offset, targets, d_bias, threads,
             [&](int64_t r, int64_t lo, int len, int y, AccOf<F>* bias_sum) {
               logit_grad_span<F>(in + r * vocab + lo, out + r * vocab + lo, len, y, grad[r], lse[r],
                                  bias_sum, map);
             });
}

template <class F>
void kept_grad_rows(Storage<F>* q, int64_t rows, int64_t vocab, const int64_t* targets, const AccOf<F>* grad,
                    const AccOf<F>* target_slope, AccOf<F>* d_bias, int threads) {
  grad_spans(rows, vocab, 0, targets, d_bias, threads,
             [&](int64_t r, int64_t lo, int len, int y, AccOf<F>* bias_sum) {
               kept_grad_span<F>(q + r * vocab + lo, len, y, grad[r], target_slope[r], bias_sum);
             });
}

}  // namespace napo::cpu::NAPO_CPU_ISA
