// The numerics contract of docs/design.md, shared by every kernel.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dfp {

constexpr uint32_t kNonFiniteBits = 0x7f800000u;  // |x| bits >= this: Inf or NaN

static inline int32_t max_mantissa(int headroom) { return (1 << (15 - headroom)) - 1; }

// Exponent of a group from the bit pattern of its largest |x| (finite). Bit arithmetic
// rather than frexp/ldexp: with small blocks this runs once per 32 elements.
static inline int32_t group_exponent(uint32_t amax_bits, int headroom) {
  const int digits = 15 - headroom;
  if (amax_bits == 0) return -149 + 1 - digits;  // as the smallest subnormal
  // amax = S * 2^(E - L) with the significand S of L bits: frexp's E, and f = S / 2^L.
  const uint32_t biased = amax_bits >> 23;
  const int64_t significand = biased ? (amax_bits & 0x7fffff) | 0x800000 : amax_bits;
  const int length = biased ? 24 : 32 - __builtin_clz(amax_bits);
  const int32_t big_e = biased ? int32_t(biased) - 126 : length - 149;
  const int32_t e = big_e - digits;
  // One more when amax would round (or stochastically round) above the largest
  // mantissa M, i.e. f * 2^digits > M: then the clamp never acts, so rounding stays
  // unbiased and within half a step. Not at the top of the fp32 range, where the
  // rounded value would be 2^128 (inf).
  const bool above = (significand << digits) > (int64_t(1) << length) * max_mantissa(headroom);
  return above && big_e < 128 ? e + 1 : e;
}

// Whether every rounding of values scaled by 2^-e, e group_exponent's of their maximum,
// stays within the largest mantissa M: it does wherever group_exponent could add its one
// (the scaled maximum is then at most M, an integer), below the top of fp32's range
// (e = 128 - digits there, either way).
static inline bool clamp_never_acts(int32_t e, int headroom) { return e + 15 - headroom < 128; }

// group_exponent of n maxima: normal numbers by branch-free steps that the compiler
// turns into vector code (blocks of 32 have an exponent per 32 elements, which one at a
// time cost as much as quantizing them); zeros and subnormals by group_exponent.
static inline void group_exponents(const uint32_t* __restrict amax_bits, int64_t n, int headroom,
                                   int32_t* __restrict e) {
  const int32_t digits = 15 - headroom;
  // a normal amax rounds above the largest mantissa when its significand (24 bits, leading
  // 1) exceeds 2^24 - 2^(24 - digits): group_exponent's test with length 24
  const int32_t threshold = (1 << 24) - (1 << (24 - digits));
  int32_t rare = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t bits = int32_t(amax_bits[i]), biased = bits >> 23, significand = (bits & 0x7fffff) | 0x800000;
    e[i] = biased - 126 - digits + (int32_t(significand > threshold) & int32_t(biased < 254));
    rare |= int32_t(biased == 0);
  }
  if (rare)
    for (int64_t i = 0; i < n; ++i)
      if ((amax_bits[i] >> 23) == 0) e[i] = group_exponent(amax_bits[i], headroom);
}

// Two int16 as one int32 K-pair, lo first (the layout vpmaddwd and vpdpwssd read).
static inline int32_t pair(int16_t lo, int16_t hi) {
  return int32_t(uint32_t(uint16_t(lo)) | (uint32_t(uint16_t(hi)) << 16));
}

// dst[t] = the K-pair (a[t], b[t]). The buffers never overlap; saying so lets the
// compiler interleave whole vectors instead of one pair at a time.
static inline void interleave(int32_t* __restrict dst, const int16_t* __restrict a, const int16_t* __restrict b,
                              int64_t n) {
  for (int64_t t = 0; t < n; ++t) dst[t] = pair(a[t], b[t]);
}

// copy_pixels for C channels and one added (static: an AVX-512 file's instance must not be
// the one the linker keeps for all files)
template <int C>
static void widen_pixels(const int16_t* __restrict from, int64_t pixels, int16_t* __restrict to) {
  for (int64_t j = 0; j < pixels; ++j)
    for (int c = 0; c <= C; ++c) to[j * (C + 1) + c] = c < C ? from[j * C + c] : int16_t(0);
}

// `pixels` pixels of `channels` int16 each into pixels of out_channels >= channels, the
// added channels zero. One loop of element moves: a copy and a fill per pixel would be
// two library calls per pixel for a few channels (3 -> 4 channels, 32x32, one thread:
// the first layer's quantization 2.1 -> 0.7 ms).
static inline void copy_pixels(const int16_t* from, int64_t pixels, int64_t channels, int16_t* to,
                               int64_t out_channels) {
  // the first layers' one zero channel, with the counts known to the vectorizer
  if (channels == 1 && out_channels == 2) return widen_pixels<1>(from, pixels, to);
  if (channels == 3 && out_channels == 4) return widen_pixels<3>(from, pixels, to);
  for (int64_t j = 0; j < pixels; ++j, from += channels, to += out_channels)
    for (int64_t c = 0; c < out_channels; ++c) to[c] = c < channels ? from[c] : int16_t(0);
}

// 2^k for k in the normal fp32 range [-126, 127], from its bits.
static inline float pow2f(int k) {
  const uint32_t bits = uint32_t(k + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 2^k for k in [-149, 127], every power of two fp32 holds, from its bits: a subnormal
// one is the single bit k + 149 (ldexp's calls took 2 % of the main job's dfp16 step on an Intel Xeon:
// the rows of zeros in grad_input's dY window have subnormal chain scales). 0 below.
static inline float pow2f_any(int k) {
  const uint32_t normal = uint32_t(k + 127) << 23, subnormal = 1u << ((k + 149) & 31);
  const uint32_t bits = k >= -126 ? normal : k >= -149 ? subnormal : 0u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 2^-e as two fp32 factors, both exact powers of two, so x * first * second is exact.
// -e lies in [-126, 163] (design.md), so both factors are normal numbers.
struct Scale {
  float first, second;
};
static inline Scale inverse_scale(int32_t e) {
  const int total = -e;
  const int first = total > 127 ? 64 : total;
  return {pow2f(first), pow2f(total - first)};
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

// How a scaled value becomes an integer (docs/design.md, "Quantization"); the codes
// are the Python side's (dfp.format.ROUNDINGS).
enum class Rounding : int { nearest = 0, stochastic = 1, dithered = 2 };

// The 23 random bits of element `index` for stochastic rounding.
static inline uint32_t random_bits(uint64_t index, uint32_t k0, uint32_t k1) {
  return (mix32(uint32_t(index) ^ k0) ^ mix32(uint32_t(index >> 32) ^ k1)) >> 9;
}

// The 23 bits of dithered rounding: a hash of the element's sign and significand bits
// and the low half of its flat index. No seed, so no generator; the value, so that the
// bits change from step to step; the index, so that equal values spread their errors;
// not the exponent field, so that a power-of-two scale (a loss scale, a mean over half
// the batch) changes no rounding, as with rounding to nearest.
constexpr uint32_t kDitherMask = 0x807fffffu, kDitherKey = 0x9e3779b9u;
static inline uint32_t dither_bits(float x, uint64_t index) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return mix32((u & kDitherMask) ^ uint32_t(index) ^ kDitherKey) >> 9;
}

static inline uint32_t abs_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u & 0x7fffffffu;
}

// One element, scalar: the reference every SIMD path must match. `x` is the element
// before scaling (dithered rounding hashes it).
static inline int16_t quantize_one(float x, Scale s, float limit, Rounding rounding, uint64_t index, uint32_t k0,
                                   uint32_t k1) {
  const float v = x * s.first * s.second;
  float q;
  if (rounding == Rounding::nearest) {
    q = std::nearbyint(v);
  } else {
    const uint32_t bits = rounding == Rounding::stochastic ? random_bits(index, k0, k1) : dither_bits(x, index);
    const float fl = std::floor(v);
    q = fl + ((float(bits) + 0.5f < (v - fl) * 8388608.0f) ? 1.0f : 0.0f);
  }
  q = q > limit ? limit : (q < -limit ? -limit : q);
  return int16_t(q);
}

}  // namespace dfp
