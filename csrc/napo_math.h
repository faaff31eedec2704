// The per-element math of both stages, shared by the C++ CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda): the CPU tests exercise the same text the GPU compiles.
//
// Plain C++ only: no torch headers, no storage types. Callers load fp16/bf16/fp32/fp64 values,
// convert them to the accumulation type `Acc` (float, or double for fp64 inputs) and call these.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define NAPO_HOST_DEVICE __host__ __device__
#else
#define NAPO_HOST_DEVICE
#endif

// The per-element functions below must be inlined into the CPU row loops, or those loops do not
// vectorise (a loop that calls exp stays scalar). GCC stops inlining once a translation unit has
// grown by its --param inline-unit-growth, and csrc/cpu/row_kernels.cpp instantiates every loop per
// instruction set, storage format and logit map: the forward's exp-sum then ran at 6-8 ns per
// element instead of 0.7 (2-core Xeon, AVX-512), 8x slower, whatever the instruction set.
#if defined(__CUDACC__)
#define NAPO_INLINE __forceinline__
#elif defined(__GNUC__)
#define NAPO_INLINE inline __attribute__((always_inline))
#else
#define NAPO_INLINE inline
#endif

namespace napo {

// Stage-2 aggregation codes (the `agg` argument of preference_fwd).
constexpr int kAggLse = 0;
constexpr int kAggMean = 1;

#if !defined(__CUDA_ARCH__)
// float exp for the CPU loops. libm's expf is an opaque call, so a loop that calls it cannot be
// vectorised; this version has no branches (only selects) and vectorises. exp(x) = 2^n e^r with
// n = round(x / ln 2), |r| <= ln(2) / 2 and e^r from its Taylor series up to r^7 (truncation
// < 6e-9 relative): within 1 ulp of the exact value. 2^n is applied as two halves so that
// n in [-150, 128] never leaves the normal exponent range.
NAPO_INLINE float exp_vectorizable(float x) {
  const float lo = -104.0f, hi = 88.7228394f;  // below lo exp(x) rounds to 0, above hi to inf
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float round_shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (xc * 1.44269504f + round_shift) - round_shift;
  const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 split so n * hi is exact
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k = static_cast<int32_t>(n);
  const int32_t k1 = k / 2, k2 = k - k1;
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, sizeof s1);
  memcpy(&s2, &b2, sizeof s2);
  float y = (p * s1) * s2;
  y = x < lo ? 0.0f : y;
  y = x > hi ? static_cast<float>(INFINITY) : y;
  return x != x ? x : y;  // NaN stays NaN
}

// float tanh for the CPU loops (vectorises, like exp_vectorizable; within 2 ulp of the exact value),
// and its derivative 1 - tanh(x)^2 = 4 e / (1 + e)^2, e = exp(-2|x|), to a few ulps relative (also
// where it is tiny: 1 - t^2 from a rounded t would lose every digit once |t| rounds near 1).
// |x| >= 0.625: tanh = (1 - e) / (1 + e), e <= 0.29, so 1 - e does not cancel; below, the Taylor
// series x (1 + x^2 P(x^2)) up to x^19 (truncation < 1e-8 relative).
NAPO_INLINE float tanh_vectorizable(float x, float& sech2) {
  const float a = x < 0.0f ? -x : x;
  const float e = exp_vectorizable(-2.0f * a);  // 0 for |x| = inf: tanh = +-1, sech2 = 0
  const float large = (1.0f - e) / (1.0f + e);
  sech2 = 4.0f * e / ((1.0f + e) * (1.0f + e));
  const float b = a < 0.625f ? a : 0.625f;  // the series only where it is used (no overflow beyond)
  const float s = b * b;
  float p = -443861162.0f / 1856156927625.0f;
  p = p * s + 6404582.0f / 10854718875.0f;
  p = p * s - 929569.0f / 638512875.0f;
  p = p * s + 21844.0f / 6081075.0f;
  p = p * s - 1382.0f / 155925.0f;
  p = p * s + 62.0f / 2835.0f;
  p = p * s - 17.0f / 315.0f;
  p = p * s + 2.0f / 15.0f;
  p = p * s - 1.0f / 3.0f;
  const float small = b + b * s * p;
  const float t = a < 0.625f ? small : large;  // NaN: large is NaN
  return x < 0.0f ? -t : t;
}
#endif

// Overloads instead of templates so float stays float on host and device alike.
NAPO_HOST_DEVICE NAPO_INLINE float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_vectorizable(x);
#endif
}
NAPO_HOST_DEVICE NAPO_INLINE double exp_acc(double x) { return exp(x); }
NAPO_HOST_DEVICE NAPO_INLINE float log_acc(float x) { return logf(x); }
NAPO_HOST_DEVICE NAPO_INLINE double log_acc(double x) { return log(x); }
NAPO_HOST_DEVICE inline float log1p_acc(float x) { return log1pf(x); }
NAPO_HOST_DEVICE inline double log1p_acc(double x) { return log1p(x); }
// tanh(x), and in `sech2` its derivative 1 - tanh(x)^2 = 4 e / (1 + e)^2 with e = exp(-2|x|)
// (relative accuracy everywhere; 0 once e underflows).
NAPO_HOST_DEVICE NAPO_INLINE float tanh_acc(float x, float& sech2) {
#if defined(__CUDA_ARCH__)
  const float e = expf(-2.0f * fabsf(x));
  sech2 = 4.0f * e / ((1.0f + e) * (1.0f + e));
  return tanhf(x);
#else
  return tanh_vectorizable(x, sech2);
#endif
}
NAPO_HOST_DEVICE NAPO_INLINE double tanh_acc(double x, double& sech2) {
  const double e = exp(-2.0 * fabs(x));
  sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e));
  return tanh(x);
}

template <typename Acc>
NAPO_HOST_DEVICE NAPO_INLINE Acc neg_inf() {
  return static_cast<Acc>(-INFINITY);
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp: a partial sum over any subset of a row is the pair (max, sum) with
// sum_i exp(x_i) = sum * exp(max). Partials merge in any grouping, so a CPU thread, a CUDA
// thread or a whole block can each own a piece of the row and combine the pieces at the end.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
struct LsePair {
  Acc max;
  Acc sum;
};

template <typename Acc>
NAPO_HOST_DEVICE inline LsePair<Acc> lse_empty() {
  return {neg_inf<Acc>(), Acc(0)};
}

template <typename Acc>
NAPO_HOST_DEVICE inline LsePair<Acc> lse_merge(LsePair<Acc> a, LsePair<Acc> b) {
  // An empty side (max = -inf) adds nothing; without this test exp(-inf - -inf) would be NaN.
  if (b.max == neg_inf<Acc>()) return a;
  if (a.max == neg_inf<Acc>()) return b;
  if (a.max < b.max) {
    LsePair<Acc> t = a;
    a = b;
    b = t;
  }
  // a.max >= b.max: only the smaller side is rescaled, by a factor <= 1 (no overflow).
  // A NaN max fails every comparison above and propagates through the sum.
  return {a.max, a.sum + b.sum * exp_acc(b.max - a.max)};
}

template <typename Acc>
NAPO_HOST_DEVICE inline LsePair<Acc> lse_push(LsePair<Acc> a, Acc x) {
  return lse_merge(a, LsePair<Acc>{x, Acc(1)});
}

template <typename Acc>
NAPO_HOST_DEVICE inline Acc lse_value(LsePair<Acc> a) {
  return a.max == neg_inf<Acc>() ? a.max : a.max + log_acc(a.sum);
}

// ---------------------------------------------------------------------------------------------
// Stage 1, the head's logits: z = scale * raw (Cohere's logit_scale, Granite's 1 / logits_scaling, a
// temperature), then with a soft cap (Gemma 2) z = cap * tanh(z / cap), raw = h W^T + b. The row
// passes take one of three maps (a template parameter, so the plain head compiles to the loops it
// always had); value(raw, slope) also returns dz/draw, the factor of the chain rule.
// ---------------------------------------------------------------------------------------------
struct PlainLogits {  // z = raw
  template <typename Acc>
  NAPO_HOST_DEVICE NAPO_INLINE Acc value(Acc raw) const {
    return raw;
  }
  template <typename Acc>
  NAPO_HOST_DEVICE NAPO_INLINE Acc value(Acc raw, Acc& slope) const {
    slope = Acc(1);
    return raw;
  }
};

template <typename Acc>
struct ScaledLogits {  // z = scale * raw
  Acc scale;
  NAPO_HOST_DEVICE NAPO_INLINE Acc value(Acc raw) const { return scale * raw; }
  NAPO_HOST_DEVICE NAPO_INLINE Acc value(Acc raw, Acc& slope) const {
    slope = scale;
    return scale * raw;
  }
};

// z = cap * tanh(scale * raw / cap): bounded by the cap whatever raw is (1e4, inf), and
// dz/draw = scale (1 - tanh^2), computed as 4 e / (1 + e)^2 (tanh_acc) so that it keeps its relative
// precision where tanh saturates (0 once it has). A raw logit of -inf (a masked entry) becomes -cap,
// as in the formula.
template <typename Acc>
struct CappedLogits {
  Acc cap;
  Acc scale_over_cap;  // scale / cap
  Acc scale;
  NAPO_HOST_DEVICE NAPO_INLINE Acc value(Acc raw) const {
    Acc unused;
    return cap * tanh_acc(scale_over_cap * raw, unused);
  }
  NAPO_HOST_DEVICE NAPO_INLINE Acc value(Acc raw, Acc& slope) const {
    Acc sech2;
    const Acc t = tanh_acc(scale_over_cap * raw, sech2);
    slope = scale * sech2;
    return cap * t;
  }
};

// What the caller asks for (the op's softcap and logit_scale; cap <= 0: none). The public API
// checks that both are finite and positive.
struct LogitSpec {
  double scale = 1.0;
  double cap = 0.0;
};

// Calls fn with the map of `spec` for accumulation type Acc (host side: picks the instantiation).
template <typename Acc, typename Fn>
inline void with_logit_map(const LogitSpec& spec, Fn&& fn) {
  if (spec.cap > 0.0) {
    fn(CappedLogits<Acc>{static_cast<Acc>(spec.cap), static_cast<Acc>(spec.scale / spec.cap),
                         static_cast<Acc>(spec.scale)});
  } else if (spec.scale != 1.0) {
    fn(ScaledLogits<Acc>{static_cast<Acc>(spec.scale)});
  } else {
    fn(PlainLogits{});
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 1: d logp / d z_v = [v == y] - softmax_v, scaled by the row's upstream gradient g and by
// slope = dz_v / draw_v (1 for a plain head: multiplying by it changes no bit).
// ---------------------------------------------------------------------------------------------
template <typename Acc>
NAPO_HOST_DEVICE NAPO_INLINE Acc softmax_prob(Acc logit, Acc lse) {
  return exp_acc(logit - lse);
}

template <typename Acc>
NAPO_HOST_DEVICE NAPO_INLINE Acc logit_grad(Acc g, bool is_target, Acc logit, Acc lse, Acc slope = Acc(1)) {
  return g * ((is_target ? Acc(1) : Acc(0)) - softmax_prob(logit, lse)) * slope;
}

// The same from what a trainable head's forward kept: q_v = softmax_v * dz_v/draw_v (the forward's
// probabilities, as the frozen head multiplies them with W) and c = dz/draw at the target, so that
// g ([v == y] - softmax_v) dz_v/draw_v = g ([v == y] c - q_v): no exp, no logits.
template <typename Acc>
NAPO_HOST_DEVICE NAPO_INLINE Acc kept_grad(Acc g, bool is_target, Acc target_slope, Acc q) {
  return g * ((is_target ? target_slope : Acc(0)) - q);
}

// ---------------------------------------------------------------------------------------------
// Stable logistic functions: exp only ever sees a non-positive argument.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
NAPO_HOST_DEVICE inline Acc softplus(Acc z) {
  const Acc pos = z > Acc(0) ? z : Acc(0);
  const Acc neg_abs = z > Acc(0) ? -z : z;
  return pos + log1p_acc(exp_acc(neg_abs));
}

template <typename Acc>
NAPO_HOST_DEVICE inline Acc sigmoid(Acc z) {
  if (z >= Acc(0)) return Acc(1) / (Acc(1) + exp_acc(-z));
  const Acc e = exp_acc(z);
  return e / (Acc(1) + e);
}

// ---------------------------------------------------------------------------------------------
// Stage 2, one prompt row i: x_n = coef_n * (r_n - r_i^+) + margin_n over the selected n,
// z = LSE_n x_n (agg 0) or mean_n x_n (agg 1), L_i = softplus(z) and
// dL_i/dDelta_n = sigmoid(z) * a_n * coef_n with a_n = softmax_n(x) (LSE) or 1/count (mean).
// ---------------------------------------------------------------------------------------------
template <typename Acc>
NAPO_HOST_DEVICE inline Acc preference_term(Acc chosen, Acc rejected, Acc coef, Acc margin) {
  return coef * (rejected - chosen) + margin;
}

// The aggregate z from the row's partial: the LSE pair (agg 0) or (sum of x, count) (agg 1).
template <typename Acc>
NAPO_HOST_DEVICE inline Acc preference_z(int agg, LsePair<Acc> lse, Acc sum, Acc count) {
  return agg == kAggLse ? lse_value(lse) : sum / count;
}

// The weight of one selected term, given z, sigmoid(z) and the row's count.
template <typename Acc>
NAPO_HOST_DEVICE inline Acc preference_weight(int agg, Acc x, Acc coef, Acc z, Acc sig_z, Acc count) {
  const Acc a = agg == kAggLse ? exp_acc(x - z) : Acc(1) / count;
  return sig_z * a * coef;
}

}  // namespace napo
