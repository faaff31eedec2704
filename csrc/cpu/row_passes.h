// The vectorisable CPU row loops. Not an ordinary header (no include guard, on purpose):
// csrc/cpu/row_kernels.cpp includes it once per instruction set, each time inside
// `#pragma GCC target(...)` and with NAPO_CPU_ISA naming the namespace, so the same text is compiled
// for plain x86-64 / AVX2 / AVX-512 and picked at run time.
// OpenMP over rows (forward) or over column blocks (backward) on `threads` threads: every output
// element is produced by one thread in a fixed order, so results do not depend on the thread count.

namespace napo::cpu::NAPO_CPU_ISA {

// Fixed-width lanes: the inner loops have no cross-iteration dependency inside a lane group, so
// the compiler can vectorise them without reassociating floating-point sums (no -ffast-math).
constexpr int64_t kLanes = 16;
// Elements per partial of the row log-sum-exp (the block is re-read from L1 for the exp sum).
constexpr int64_t kRowBlock = 1024;
// Columns per task of the backward pass (rows inner: each column is owned by one thread).
constexpr int64_t kColBlock = 512;
// Below this many elements a pass runs on one thread (thread start-up would dominate).
constexpr int64_t kParallelMin = 1 << 15;

template <typename Acc, typename T>
inline Acc load(T x) {
  return static_cast<Acc>(x);
}

// (max, sum-exp) of one block of a row: max first, then the exp sum relative to it.
template <typename T, typename Acc>
LsePair<Acc> block_lse(const T* x, int64_t n) {
  Acc lane_max[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = neg_inf<Acc>();
  // NaN wins the max (v != v), so it reaches the exp sum and the row's lse is NaN, never finite.
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const Acc v = load<Acc>(x[j + l]);
      lane_max[l] = (v > lane_max[l] || v != v) ? v : lane_max[l];
    }
  Acc m = neg_inf<Acc>();
  for (int64_t l = 0; l < kLanes; ++l) m = (lane_max[l] > m || lane_max[l] != lane_max[l]) ? lane_max[l] : m;
  for (; j < n; ++j) {
    const Acc v = load<Acc>(x[j]);
    m = (v > m || v != v) ? v : m;
  }
  if (m == neg_inf<Acc>()) return lse_empty<Acc>();  // all -inf: adds nothing, skip the exp sum
  Acc lane_sum[kLanes] = {};
  j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane_sum[l] += exp_acc(load<Acc>(x[j + l]) - m);
  Acc s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane_sum[l];
  for (; j < n; ++j) s += exp_acc(load<Acc>(x[j]) - m);
  return {m, s};
}

template <typename T, typename Acc>
void logprob_rows(const T* logits, T* probs, int64_t rows, int64_t vocab, const int64_t* targets,
                  Acc* logp, Acc* lse, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * vocab;
    LsePair<Acc> acc = lse_empty<Acc>();
    for (int64_t lo = 0; lo < vocab; lo += kRowBlock)
      acc = lse_merge(acc, block_lse<T, Acc>(x + lo, std::min(kRowBlock, vocab - lo)));
    const Acc row_lse = lse_value(acc);
    lse[r] = row_lse;
    logp[r] = load<Acc>(x[targets[r]]) - row_lse;
    if (probs != nullptr) {
      T* p = probs + r * vocab;
      for (int64_t v = 0; v < vocab; ++v) p[v] = static_cast<T>(softmax_prob(load<Acc>(x[v]), row_lse));
    }
  }
}

template <typename T, typename Acc>
void logit_grad_rows(const T* in, T* out, int64_t rows, int64_t vocab, const int64_t* targets,
                     const Acc* grad, const Acc* lse, Acc* d_bias, int threads) {
  const int64_t blocks = (vocab + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * vocab >= kParallelMin && blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kColBlock;
    const int64_t len = std::min(kColBlock, vocab - lo);
    Acc bias_sum[kColBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = in + r * vocab + lo;
      T* o = out + r * vocab + lo;
      const Acc g = grad[r];
      const Acc row_lse = lse[r];
      const int64_t y = targets[r] - lo;  // the target's column within this block (maybe outside)
      for (int64_t v = 0; v < len; ++v) {
        const Acc d = logit_grad(g, v == y, load<Acc>(x[v]), row_lse);
        o[v] = static_cast<T>(d);
        bias_sum[v] += d;
      }
    }
    if (d_bias != nullptr)
      for (int64_t v = 0; v < len; ++v) d_bias[lo + v] += bias_sum[v];
  }
}

}  // namespace napo::cpu::NAPO_CPU_ISA
