// CPU fused passes: the ISA-specific row loops of row_passes.h, dispatched at run time, and stage 2.
#include "cpu/row_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "napo_math.h"

#define NAPO_CPU_ISA generic
#include "cpu/row_passes.h"
#undef NAPO_CPU_ISA

// GCC on x86-64: the same loops again for AVX2 and AVX-512 (16 floats per instruction: the
// vectorised exp makes the exp-bound passes several times faster than with libm's expf).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NAPO_CPU_X86_CLONES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NAPO_CPU_ISA avx2
#include "cpu/row_passes.h"
#undef NAPO_CPU_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#define NAPO_CPU_ISA avx512
#include "cpu/row_passes.h"
#undef NAPO_CPU_ISA
#pragma GCC pop_options
#endif

namespace napo::cpu {
namespace {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa widest_supported() {
#ifdef NAPO_CPU_X86_CLONES
  static const Isa widest = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("fma"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return widest;
#else
  return Isa::kGeneric;
#endif
}

// NAPO_KERNELS_CPU_ISA=generic|avx2|avx512 caps the instruction set (the tests run every path);
// a cap above what the CPU supports is lowered to what it supports.
Isa active_isa() {
  Isa want = Isa::kAvx512;
  if (const char* env = std::getenv("NAPO_KERNELS_CPU_ISA")) {
    if (std::strcmp(env, "generic") == 0) want = Isa::kGeneric;
    if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  }
  return std::min(want, widest_supported());
}

}  // namespace

// The three stage-1 passes: the instruction set picked at run time, the logit map by the spec.
#ifdef NAPO_CPU_X86_CLONES
#define NAPO_DISPATCH_ISA(pass, ...)                        \
  with_logit_map<AccOf<F>>(spec, [&](auto map) {            \
    switch (active_isa()) {                                 \
      case Isa::kAvx512:                                    \
        return avx512::pass<F>(__VA_ARGS__, map, threads);  \
      case Isa::kAvx2:                                      \
        return avx2::pass<F>(__VA_ARGS__, map, threads);    \
      default:                                              \
        return generic::pass<F>(__VA_ARGS__, map, threads); \
    }                                                       \
  })
#else
#define NAPO_DISPATCH_ISA(pass, ...) \
  with_logit_map<AccOf<F>>(spec, [&](auto map) { generic::pass<F>(__VA_ARGS__, map, threads); })
#endif

template <class F>
void logprob_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t vocab,
                  const int64_t* targets, AccOf<F>* logp, AccOf<F>* lse, const LogitSpec& spec, int threads) {
  NAPO_DISPATCH_ISA(logprob_rows, logits, probs, rows, vocab, targets, logp, lse);
}

template <class F>
void logprob_tile_rows(const Storage<F>* logits, Storage<F>* probs, int64_t rows, int64_t width,
                       int64_t offset, const int64_t* targets, AccOf<F>* run_max, AccOf<F>* run_sum,
                       AccOf<F>* target_logit, AccOf<F>* scale, const LogitSpec& spec, int threads) {
  NAPO_DISPATCH_ISA(logprob_tile_rows, logits, probs, rows, width, offset, targets, run_max, run_sum,
                    target_logit, scale);
}

template <class F>
void logit_grad_rows(const Storage<F>* in, Storage<F>* out, int64_t rows, int64_t vocab, int64_t offset,
                     const int64_t* targets, const AccOf<F>* grad, const AccOf<F>* lse, AccOf<F>* d_bias,
                     const LogitSpec& spec, int threads) {
  NAPO_DISPATCH_ISA(logit_grad_rows, in, out, rows, vocab, offset, targets, grad, lse, d_bias);
}
#undef NAPO_DISPATCH_ISA

template <class F>
void kept_grad_rows(Storage<F>* q, int64_t rows, int64_t vocab, const int64_t* targets, const AccOf<F>* grad,
                    const AccOf<F>* target_slope, AccOf<F>* d_bias, int threads) {
#ifdef NAPO_CPU_X86_CLONES
  switch (active_isa()) {
    case Isa::kAvx512:
      return avx512::kept_grad_rows<F>(q, rows, vocab, targets, grad, target_slope, d_bias, threads);
    case Isa::kAvx2:
      return avx2::kept_grad_rows<F>(q, rows, vocab, targets, grad, target_slope, d_bias, threads);
    default:
      break;
  }
#endif
  generic::kept_grad_rows<F>(q, rows, vocab, targets, grad, target_slope, d_bias, threads);
}

// Stage 2 is O(B * M) and tiny next to stage 1: one plain version, OpenMP over prompt rows.
template <typename Acc>
int64_t preference_rows(const Acc* chosen, const Acc* rejected, const bool* select, const Acc* coef,
                        const Acc* margin, int64_t batch, int64_t pool, int agg, Acc* loss_rows, Acc* weights,
                        int threads) {
  int64_t first_empty = batch;
#pragma omp parallel for schedule(static) num_threads(threads) \
    reduction(min : first_empty) if (batch * pool >= (1 << 15))
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t base = i * pool;
    LsePair<Acc> acc = lse_empty<Acc>();
    Acc sum = 0;
    int64_t count = 0;
    for (int64_t n = 0; n < pool; ++n) {
      if (!select[base + n]) continue;
      const Acc x = preference_term(chosen[i], rejected[n], coef[base + n], margin[base + n]);
      acc = lse_push(acc, x);
      sum += x;
      ++count;
    }
    if (count == 0) {
      first_empty = std::min(first_empty, i);
      continue;
    }
    const Acc cnt = static_cast<Acc>(count);
    const Acc z = preference_z(agg, acc, sum, cnt);
    const Acc sig = sigmoid(z);
    loss_rows[i] = softplus(z);
    for (int64_t n = 0; n < pool; ++n) {
      weights[base + n] =
          select[base + n]
              ? preference_weight(agg,
                                  preference_term(chosen[i], rejected[n], coef[base + n], margin[base + n]),
                                  coef[base + n], z, sig, cnt)
              : Acc(0);
    }
  }
  return first_empty == batch ? -1 : first_empty;
}

#define NAPO_INSTANTIATE_ROWS(F)                                                                             \
  template void logprob_rows<F>(const Storage<F>*, Storage<F>*, int64_t, int64_t, const int64_t*, AccOf<F>*, \
                                AccOf<F>*, const LogitSpec&, int);                                           \
  template void logprob_tile_rows<F>(const Storage<F>*, Storage<F>*, int64_t, int64_t, int64_t,              \
                                     const int64_t*, AccOf<F>*, AccOf<F>*, AccOf<F>*, AccOf<F>*,             \
                                     const LogitSpec&, int);                                                 \
  template void logit_grad_rows<F>(const Storage<F>*, Storage<F>*, int64_t, int64_t, int64_t,                \
                                   const int64_t*, const AccOf<F>*, const AccOf<F>*, AccOf<F>*,              \
                                   const LogitSpec&, int);                                                   \
  template void kept_grad_rows<F>(Storage<F>*, int64_t, int64_t, const int64_t*, const AccOf<F>*,            \
                                  const AccOf<F>*, AccOf<F>*, int);
NAPO_INSTANTIATE_ROWS(Float32)
NAPO_INSTANTIATE_ROWS(Float64)
NAPO_INSTANTIATE_ROWS(Float16)
NAPO_INSTANTIATE_ROWS(BFloat16)
#undef NAPO_INSTANTIATE_ROWS

template int64_t preference_rows<float>(const float*, const float*, const bool*, const float*, const float*,
                                        int64_t, int64_t, int, float*, float*, int);
template int64_t preference_rows<double>(const double*, const double*, const bool*, const double*,
                                         const double*, int64_t, int64_t, int, double*, double*, int);

}  // namespace napo::cpu
