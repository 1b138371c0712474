// The numerics contract of docs/design.md for the CUDA kernels, a line-by-line port of
// csrc/cpu/numerics.h: group exponents, exact power-of-two scales, the counter-based
// random bits of stochastic rounding and the bits of dithered rounding, one element's
// quantization, the GEMM's chain accumulation and epilogue. Every function is
// __host__ __device__, so the tests can run it on the CPU (tests/test_cuda_compile.py)
// and compare it with dfp.reference.
//
// No standard headers: NVRTC compiles these files without the host's include paths.
// Kernel parameters are int (32-bit), double or pointers only: that is what
// torch.cuda._compile_kernel passes for Python ints, floats and tensors.
#pragma once

#define DFP_HD __host__ __device__ __forceinline__

namespace dfp {

typedef signed char i8;
typedef short i16;
typedef unsigned short u16;
typedef int i32;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

constexpr u32 kNonFiniteBits = 0x7f800000u;  // |x| bits >= this: Inf or NaN

DFP_HD u32 float_bits(float x) {
  union {
    float f;
    u32 u;
  } v;
  v.f = x;
  return v.u;
}

DFP_HD float bits_float(u32 u) {
  union {
    u32 u;
    float f;
  } v;
  v.u = u;
  return v.f;
}

DFP_HD double bits_double(u64 u) {
  union {
    u64 u;
    double d;
  } v;
  v.u = u;
  return v.d;
}

DFP_HD u32 abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

DFP_HD int count_leading_zeros(u32 x) {
#ifdef __CUDA_ARCH__
  return __clz(x);
#else
  return __builtin_clz(x);
#endif
}

// Correctly rounded fp32 steps that the compiler may never fuse into an FMA.
DFP_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DFP_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DFP_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

DFP_HD i32 max_mantissa(int headroom) { return (1 << (15 - headroom)) - 1; }

// Exponent of a group from the bit pattern of its largest |x| (finite), as numerics.h.
DFP_HD i32 group_exponent(u32 amax_bits, int headroom) {
  const int digits = 15 - headroom;
  if (amax_bits == 0) return -149 + 1 - digits;  // as the smallest subnormal
  // amax = S * 2^(E - L) with the significand S of L bits: frexp's E, and f = S / 2^L.
  const u32 biased = amax_bits >> 23;
  const i64 significand = biased ? i64((amax_bits & 0x7fffffu) | 0x800000u) : i64(amax_bits);
  const int length = biased ? 24 : 32 - count_leading_zeros(amax_bits);
  const i32 big_e = biased ? i32(biased) - 126 : length - 149;
  const i32 e = big_e - digits;
  // One more when f * 2^digits > M, so that rounding never reaches the clamp; not at the
  // top of the fp32 range, where the rounded value would be 2^128 (inf).
  const bool above = (significand << digits) > (i64(1) << length) * max_mantissa(headroom);
  return above && big_e < 128 ? e + 1 : e;
}

// 2^k for k in the normal fp32 range [-126, 127], from its bits.
DFP_HD float pow2f(int k) { return bits_float(u32(k + 127) << 23); }

// 2^k for k in the normal fp64 range [-1022, 1023], from its bits.
DFP_HD double pow2d(int k) { return bits_double(u64(k + 1023) << 52); }

// 2^-e as two exact fp32 powers of two (-e in [-126, 163]), so x * first * second is exact.
struct Scale {
  float first, second;
};

DFP_HD Scale inverse_scale(i32 e) {
  const int total = -e;
  const int first = total > 127 ? 64 : total;
  return {pow2f(first), pow2f(total - first)};
}

DFP_HD u32 mix32(u32 x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The 23 random bits of element `index` (row-major flat index of the contiguous input).
DFP_HD u32 random_bits(u64 index, u32 k0, u32 k1) {
  return (mix32(u32(index) ^ k0) ^ mix32(u32(index >> 32) ^ k1)) >> 9;
}

// The 23 bits of dithered rounding: a hash of the element's sign and significand bits
// and the low half of its flat index.
DFP_HD u32 dither_bits(float x, u64 index) {
  return mix32((float_bits(x) & 0x807fffffu) ^ u32(index) ^ 0x9e3779b9u) >> 9;
}

// Rounding codes (dfp.format.ROUNDINGS).
enum Rounding : int { kNearest = 0, kStochastic = 1, kDithered = 2 };

// One element: v = x 2^-e exactly, rounded to nearest even, stochastically or with
// dithering, clamped.
DFP_HD i16 quantize_one(float x, Scale s, float limit, int rounding, u64 index, u32 k0, u32 k1) {
  const float v = mul_rn(mul_rn(x, s.first), s.second);
  float q;
  if (rounding == kNearest) {
    q = rintf(v);  // half to even
  } else {
    const u32 bits = rounding == kStochastic ? random_bits(index, k0, k1) : dither_bits(x, index);
    const float fl = floorf(v);
    const float r = float(bits) + 0.5f;  // exact: r < 2^23
    q = add_rn(fl, (r < mul_rn(sub_rn(v, fl), 8388608.0f)) ? 1.0f : 0.0f);
  }
  q = q > limit ? limit : (q < -limit ? -limit : q);
  return i16(q);
}

// The group of flat element `idx` of a contiguous (O, N, I) view: 0 per tensor (mode 0),
// n per index of N (mode 1), (o, n / B, i) flattened per block of B along N (mode 2).
// idx <= 2^30 - 1 (dfp/cuda/quantize.py's MAX_ELEMENTS): 32-bit division.
DFP_HD int group_of(int idx, int mode, int n_count, int inner, int block) {
  if (mode == 0) return 0;
  const int i = idx % inner;
  const int t = idx / inner;
  const int n = t % n_count;
  if (mode == 1) return n;
  const int n_blocks = (n_count + block - 1) / block;
  return ((t / n_count) * n_blocks + n / block) * inner + i;
}

// Group g of mode 2 (the run n in [nb B, min(N, nb B + B)) at fixed (o, i)): the flat
// index of its first element (the others follow every `inner`), and its length.
DFP_HD void block_group_span(int g, int n_count, int inner, int block, int* first, int* length) {
  const int n_blocks = (n_count + block - 1) / block;
  const int i = g % inner, nb = g / inner % n_blocks, o = g / inner / n_blocks;
  *first = (o * n_count + nb * block) * inner + i;
  *length = (nb + 1) * block < n_count ? block : n_count - nb * block;
}

// One lane's part of a group, its elements n = lane, lane + lanes, ... < length (a thread
// owns a whole group with lane 0 of 1; a warp shares one with lanes 32): their largest
// |x| bits, and their mantissas with the group's exponent e.
DFP_HD u32 group_amax_part(const float* x, int first, int inner, int length, int lane, int lanes) {
  u32 amax = 0u;
  for (int n = lane; n < length; n += lanes) {
    const u32 bits = abs_bits(x[first + n * inner]);
    amax = bits > amax ? bits : amax;
  }
  return amax;
}

DFP_HD void quantize_group_part(const float* x, int first, int inner, int length, int lane, int lanes, i32 e,
                                int headroom, int rounding, u32 k0, u32 k1, i16* out) {
  const Scale s = inverse_scale(e);
  const float limit = float(max_mantissa(headroom));
  for (int n = lane; n < length; n += lanes) {
    const int idx = first + n * inner;
    out[idx] = quantize_one(x[idx], s, limit, rounding, u64(idx), k0, k1);
  }
}

DFP_HD float int_to_float_rn(i32 x) {
#ifdef __CUDA_ARCH__
  return __int2float_rn(x);
#else
  return float(x);
#endif
}

// acc + float32(S) * s for one chain sum S (|S| < 2^31): the product is exact, one rounding
// for the conversion and one for the sum, as dfp.reference does in fp32.
DFP_HD float add_chain(float acc, i32 chain_sum, float s) { return add_rn(acc, mul_rn(int_to_float_rn(chain_sum), s)); }

// The same without K-blocks (s = 1: the multiply would change nothing).
DFP_HD float add_chain(float acc, i32 chain_sum) { return add_rn(acc, int_to_float_rn(chain_sum)); }

// The epilogue: float32(double(acc) * 2^e). In fp32 when 2^e is a normal fp32 number: one
// rounding of the exact product either way, so the bits are those of the fp64 rule.
DFP_HD float scale_result(float acc, int e) {
  if (e >= -126 && e <= 127) return mul_rn(acc, pow2f(e));
#ifdef __CUDA_ARCH__
  return __double2float_rn(double(acc) * pow2d(e));
#else
  return float(double(acc) * pow2d(e));
#endif
}

// 2^k for an integer k <= 0 as float32, as fp64's exact 2^k rounds to it (dfp.format.exact_pow2
// then .float()): normal, subnormal from 2^-127 down to 2^-149, and 0 below (2^-150, halfway
// to the smallest subnormal, rounds to the even 0).
DFP_HD float exact_scale(i64 k) {
  if (k >= -126) return pow2f(int(k));
  return k >= -149 ? bits_float(1u << int(k + 149)) : 0.0f;
}

// One line of a GEMM's exponents (a row of ea or a column of eb), shared by `lanes` lanes
// (lane takes blocks b = lane, lane + lanes, ...): its K-block exponents e[b * step] give
// the epilogue shift r = their maximum (the largest of the lanes' line_max_part) and the
// block scales s[b * s_step] = 2^(e - r) (exact_scale), as dfp/cuda/gemm.py passes them.
DFP_HD int line_max_part(const int* e, int blocks, i64 step, int lane, int lanes) {
  int top = e[0];
  for (int b = lane; b < blocks; b += lanes) top = e[b * step] > top ? e[b * step] : top;
  return top;
}

DFP_HD void line_scales_part(const int* e, int blocks, i64 step, int top, float* s, i64 s_step, int lane, int lanes) {
  for (int b = lane; b < blocks; b += lanes) s[b * s_step] = exact_scale(i64(e[b * step]) - top);
}

// The balanced int8 limbs of an int16 x with |x| <= 32639 (every headroom >= 1):
// x = 256 h + l, l = the low byte of x read as signed (in [-128, 127]), h = (x + 128) >> 8
// (in [-128, 127]). Unlike the offset split of dfp/cuda/limbs.py it needs no correction.
DFP_HD i32 limb_high(i32 x) { return (x + 128) >> 8; }
DFP_HD i32 limb_low(i32 x) { return i32(i8(x & 0xff)); }

// Eight limbs of each plane of dfp_split_limbs (gemm_mma_pipelined.cu): the balanced
// limbs of x[row_offset + (tile_first + kk) ld_k] for kk = first .. first + 7, zero from
// the tile's length on; four int8 per word, in order of k.
DFP_HD void split_limbs_piece(const i16* x, i64 row_offset, i64 ld_k, int tile_first, int tile_length, int first,
                              u32 (&high)[2], u32 (&low)[2]) {
  high[0] = high[1] = low[0] = low[1] = 0u;
  for (int e = 0; e < 8; ++e) {
    const int kk = first + e;
    const i32 v = kk < tile_length ? i32(x[row_offset + (tile_first + kk) * ld_k]) : 0;
    high[e / 4] |= (u32(limb_high(v)) & 0xffu) << (8 * (e % 4));
    low[e / 4] |= (u32(limb_low(v)) & 0xffu) << (8 * (e % 4));
  }
}

// One chain piece's int16 sum from its three int8 sums, modulo 2^32: hh = sum h h',
// mid = sum h l' + sum l h', ll = sum l l'. The true chain sum fits int32 (the contract),
// so adding the pieces' contributions modulo 2^32 (unsigned, well defined) gives it exactly
// even where a partial term would not fit.
DFP_HD u32 combine_limbs(i32 hh, i32 mid, i32 ll) { return (u32(hh) << 16) + (u32(mid) << 8) + u32(ll); }

}  // namespace dfp
