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
inline float exp_vectorizable(float x) {
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
#endif

// Overloads instead of templates so float stays float on host and device alike.
NAPO_HOST_DEVICE inline float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_vectorizable(x);
#endif
}
NAPO_HOST_DEVICE inline double exp_acc(double x) { return exp(x); }
NAPO_HOST_DEVICE inline float log_acc(float x) { return logf(x); }
NAPO_HOST_DEVICE inline double log_acc(double x) { return log(x); }
NAPO_HOST_DEVICE inline float log1p_acc(float x) { return log1pf(x); }
NAPO_HOST_DEVICE inline double log1p_acc(double x) { return log1p(x); }

template <typename Acc>
NAPO_HOST_DEVICE inline Acc neg_inf() {
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
// Stage 1: d logp / d logit_v = [v == y] - softmax_v, scaled by the row's upstream gradient g.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
NAPO_HOST_DEVICE inline Acc softmax_prob(Acc logit, Acc lse) {
  return exp_acc(logit - lse);
}

template <typename Acc>
NAPO_HOST_DEVICE inline Acc logit_grad(Acc g, bool is_target, Acc logit, Acc lse) {
  return g * ((is_target ? Acc(1) : Acc(0)) - softmax_prob(logit, lse));
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
