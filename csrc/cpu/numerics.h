// The numerics contract of docs/design.md, shared by every kernel.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dfp {

constexpr uint32_t kNonFiniteBits = 0x7f800000u;  // |x| bits >= this: Inf or NaN

static inline int32_t max_mantissa(int headroom) { return (1 << (15 - headroom)) - 1; }

// Exponent of a group from the bit pattern of its largest |x| (finite).
static inline int32_t group_exponent(uint32_t amax_bits, int headroom) {
  float amax;
  std::memcpy(&amax, &amax_bits, 4);
  if (amax_bits == 0) return -149 + 1 - (15 - headroom);  // as the smallest subnormal
  int e2;
  std::frexp(amax, &e2);
  const int32_t e = e2 - (15 - headroom);
  // One more when amax would round (or stochastically round) above the largest
  // mantissa: then the clamp never acts, so rounding stays unbiased and within half a step.
  // Not at the top of the fp32 range, where the rounded value would be 2^128 (inf).
  return std::ldexp(double(amax), -e) > max_mantissa(headroom) && e2 < 128 ? e + 1 : e;
}

// 2^-e as two fp32 factors, both exact powers of two, so x * lo * hi is exact.
struct Scale {
  float first, second;
};
static inline Scale inverse_scale(int32_t e) {
  const int total = -e;
  const int first = total > 127 ? 64 : total;
  return {std::ldexp(1.0f, first), std::ldexp(1.0f, total - first)};
}

// Largest power of two L with L * Ma * Mb <= 2^31 - 1: int32 chains never overflow.
static inline int chain_length(int headroom_a, int headroom_b) {
  const int64_t bound = int64_t(max_mantissa(headroom_a)) * max_mantissa(headroom_b);
  int len = 2;
  while (int64_t(len) * 2 * bound <= INT32_MAX) len *= 2;
  return len;
}

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The 23 random bits of element `index` for stochastic rounding.
static inline uint32_t random_bits(uint64_t index, uint32_t k0, uint32_t k1) {
  return mix32(mix32(uint32_t(index) ^ k0) ^ k1 ^ uint32_t(index >> 32)) >> 9;
}

static inline uint32_t abs_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u & 0x7fffffffu;
}

// One element, scalar: the reference every SIMD path must match.
static inline int16_t quantize_one(float x, Scale s, float limit, bool stochastic, uint64_t index, uint32_t k0,
                            uint32_t k1) {
  const float v = x * s.first * s.second;
  float q;
  if (stochastic) {
    const float fl = std::floor(v);
    const float r = float(random_bits(index, k0, k1)) + 0.5f;
    q = fl + ((r < (v - fl) * 8388608.0f) ? 1.0f : 0.0f);
  } else {
    q = std::nearbyint(v);
  }
  q = q > limit ? limit : (q < -limit ? -limit : q);
  return int16_t(q);
}

}  // namespace dfp
