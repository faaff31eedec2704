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
// Columns per task of the backward pass (rows inner: each column is owned by one thread).
constexpr int64_t kColBlock = 512;
// Below this many elements a pass runs on one thread (thread start-up would dominate).
constexpr int64_t kParallelMin = 1 << 15;

// (max, sum-exp) of one block of a row: max first, then the exp sum relative to it. A NaN element
// makes the sum NaN (exp(NaN - m)), so it reaches the row's lse whatever the max does with it.
template <class F>
LsePair<AccOf<F>> block_lse(const Storage<F>* x, int64_t n) {
  using Acc = AccOf<F>;
  Acc m = neg_inf<Acc>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const Acc v = F::load(x[j]);
    m = v > m ? v : m;
  }
  if (m == neg_inf<Acc>()) {  // all -inf (the block adds nothing), unless a NaN hides among them
    for (int64_t j = 0; j < n; ++j)
      if (F::load(x[j]) != F::load(x[j])) return {F::load(x[j]), Acc(1)};
    return lse_empty<Acc>();
  }
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_acc(F::load(x[j]) - m);
  return {m, s};
}

template <class F>
void logprob_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t vocab,
                  const int64_t* targets, AccOf<F>* logp, AccOf<F>* lse, int threads) {
  using T = Storage<F>;
  using Acc = AccOf<F>;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * vocab;
    LsePair<Acc> acc = lse_empty<Acc>();
    for (int64_t lo = 0; lo < vocab; lo += kRowBlock)
      acc = lse_merge(acc, block_lse<F>(x + lo, std::min(kRowBlock, vocab - lo)));
    const Acc row_lse = lse_value(acc);
    lse[r] = row_lse;
    logp[r] = F::load(x[targets[r]]) - row_lse;
    if (probs != nullptr) {
      T* p = probs + r * vocab;
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) p[v] = F::store(softmax_prob(F::load(x[v]), row_lse));
    }
  }
}

template <class F>
void logit_grad_rows(const Storage<F>* in, Storage<F>* out, int64_t rows, int64_t vocab,
                     const int64_t* targets, const AccOf<F>* grad, const AccOf<F>* lse, AccOf<F>* d_bias,
                     int threads) {
  using T = Storage<F>;
  using Acc = AccOf<F>;
  const int64_t blocks = (vocab + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kColBlock;
    const int len = static_cast<int>(std::min(kColBlock, vocab - lo));
    Acc bias_sum[kColBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = in + r * vocab + lo;
      T* o = out + r * vocab + lo;
      const Acc g = grad[r];
      const Acc row_lse = lse[r];
      // the target's column within this block, -1 when outside (32-bit: cheap vector compares)
      const int y = targets[r] >= lo && targets[r] < lo + len ? static_cast<int>(targets[r] - lo) : -1;
      Acc d[kColBlock];  // two simple loops vectorise where one fused loop does not (fp16 stores)
#pragma omp simd
      for (int v = 0; v < len; ++v) {
        d[v] = logit_grad(g, v == y, F::load(x[v]), row_lse);
        bias_sum[v] += d[v];
      }
#pragma omp simd
      for (int v = 0; v < len; ++v) o[v] = F::store(d[v]);
    }
    if (d_bias != nullptr) {
#pragma omp simd
      for (int v = 0; v < len; ++v) d_bias[lo + v] += bias_sum[v];
    }
  }
}

}  // namespace napo::cpu::NAPO_CPU_ISA
