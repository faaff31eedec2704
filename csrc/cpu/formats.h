// Storage formats of the CPU row loops: how a stored element becomes the accumulation type and back.
// fp16/bf16 are handled as raw 16-bit patterns with integer arithmetic and selects only (no branches,
// no struct temporaries), so the loops that load and store them vectorise; rounding is to nearest
// even, bit-identical to torch's conversions (tests/test_cpp_kernels.py checks every pattern).
#pragma once

#include <cstdint>
#include <cstring>

#include "napo_math.h"  // NAPO_INLINE

namespace napo::cpu {

NAPO_INLINE uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

NAPO_INLINE float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// The stored and the accumulation type of a format (alias templates: F is never deduced from them).
template <class F>
using Storage = typename F::storage;
template <class F>
using AccOf = typename F::acc;

struct Float32 {
  using storage = float;
  using acc = float;
  NAPO_INLINE static float load(float x) { return x; }
  NAPO_INLINE static float store(float x) { return x; }
};

struct Float64 {
  using storage = double;
  using acc = double;
  NAPO_INLINE static double load(double x) { return x; }
  NAPO_INLINE static double store(double x) { return x; }
};

// bfloat16: the upper half of a float32.
struct BFloat16 {
  using storage = uint16_t;
  using acc = float;
  NAPO_INLINE static float load(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
  NAPO_INLINE static uint16_t store(float f) {
    const uint32_t b = float_bits(f);
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;    // the carry may reach inf: correct
    return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);  // NaN: the canonical quiet NaN
  }
};

// IEEE float16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
struct Float16 {
  using storage = uint16_t;
  using acc = float;
  NAPO_INLINE static float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7FFFu;                            // exponent and mantissa
    const uint32_t normal = (em << 13) + ((127u - 15u) << 23);  // rebias the exponent
    const uint32_t inf_nan = (em << 13) | 0x7F800000u;          // exponent 31 -> 255, payload kept
    const uint32_t sub = float_bits(static_cast<float>(em) * 5.9604644775390625e-8f);  // em * 2^-24, exact
    const uint32_t mag = em >= 0x7C00u ? inf_nan : (em < 0x0400u ? sub : normal);
    return bits_float(sign | mag);
  }
  NAPO_INLINE static uint16_t store(float f) {
    const uint32_t b = float_bits(f);
    const uint32_t sign = (b >> 16) & 0x8000u;
    const uint32_t a = b & 0x7FFFFFFFu;  // |f|
    // normal halves (|f| >= 2^-14): rebias, then round away the 13 extra mantissa bits to nearest even
    const uint32_t normal = (a - ((127u - 15u) << 23) + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14 the half spacing is 2^-24, the float32 spacing of [0.5, 1): adding 0.5 lets the FPU
    // round |f| to that spacing (nearest even); the bits above 0.5's are the half's subnormal code
    const uint32_t sub = float_bits(bits_float(a) + 0.5f) - float_bits(0.5f);
    uint32_t mag = a < 0x38800000u ? sub : normal;
    mag = a >= 0x477FF000u ? 0x7C00u : mag;  // 65520 and above round to inf
    mag = a > 0x7F800000u ? 0x7E00u : mag;   // NaN: a quiet NaN
    return static_cast<uint16_t>(sign | mag);
  }
};

}  // namespace napo::cpu
