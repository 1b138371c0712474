// AVX-512 quantization of channels-last runs: the column maxima of a tile and the
// mantissas of a tile or a run, 16 lanes at a time with masked tails, the rounding fixed
// at compile time. Dithered rounding hashes every element, which makes these passes
// bound by arithmetic, not memory: 16 lanes halve the instructions of AVX2's 8. The rest
// of the kernel set is AVX2's (quantize_avx2.cpp). Compiled with -mavx512f -mavx512bw
// only in this file; bit-identical to quantize_one() in numerics.h. No std:: templates
// or inline functions with external linkage here (an AVX-512 instance could be the one
// the linker keeps for all files). AVX-512F and BW only, no VL: the 16-bit results of
// a tail leave by a masked down-converting store.
#include <immintrin.h>

#include "quantize_kernels.h"

namespace dfp {
namespace {

__mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// x >> n per lane (GCC 12's _mm512_srli_epi32 warns of an uninitialised operand).
__m512i shift_right(__m512i x, int n) { return _mm512_srl_epi32(x, _mm_cvtsi32_si128(n)); }

__m512i mix16(__m512i x) {
  x = _mm512_xor_si512(x, shift_right(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, shift_right(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x846ca68bu)));
  return _mm512_xor_si512(x, shift_right(x, 16));
}

// The 16 mantissas of x (scaled to v) at flat indices index.. index + 15, as int32.
// Inlined into the loops: called once per vector, the dithered hash's chain of
// dependent operations could not overlap the next vector's (dY in pixel blocks, 16
// channels 32x32: 3.1x -> 2.6x the time of quantizing it per tensor). Within the limit
// no clamp, and to nearest the conversion rounds (embedded, not the MXCSR's mode): the
// clamp and the explicit rounding were three of four instructions after the scaling.
template <typename R>
[[gnu::always_inline]] inline __m512i round16(__m512 v, __m512 x, const RoundingArgs& r, uint64_t index) {
  if constexpr (R::value == Rounding::nearest && !R::clamped)
    return _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 q;
  if constexpr (R::value == Rounding::nearest) {
    q = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(index))),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i bits;
    if constexpr (R::value == Rounding::stochastic) {  // the 16 lanes share the high half (callers check)
      const __m512i high = _mm512_set1_epi32(int(mix32(uint32_t(index >> 32) ^ r.k1)));
      bits = _mm512_xor_si512(mix16(_mm512_xor_si512(lo, _mm512_set1_epi32(int(r.k0)))), high);
    } else {  // (x & mask) ^ lo ^ key in one ternary-logic instruction
      const __m512i sign_significand =
          _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int(kDitherMask)));
      bits = mix16(_mm512_ternarylogic_epi32(sign_significand, lo, _mm512_set1_epi32(int(kDitherKey)), 0x96));
    }
    const __m512 rnd = _mm512_add_ps(_mm512_cvtepi32_ps(shift_right(bits, 9)), _mm512_set1_ps(0.5f));
    const __m512 fl = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 frac = _mm512_mul_ps(_mm512_sub_ps(v, fl), _mm512_set1_ps(8388608.0f));
    q = _mm512_mask_add_ps(fl, _mm512_cmp_ps_mask(rnd, frac, _CMP_LT_OQ), fl, _mm512_set1_ps(1.0f));
  }
  if constexpr (R::clamped) {
    const __m512 lim = _mm512_set1_ps(r.limit);
    q = _mm512_max_ps(_mm512_min_ps(q, lim), _mm512_sub_ps(_mm512_setzero_ps(), lim));
  }
  return _mm512_cvtps_epi32(q);
}

// 16 mantissas into q: whole vectors converted in a register and stored plainly (the
// masked down-converting store, which tails need, wrote 25-30 % slower on Zen 4).
[[gnu::always_inline]] inline void store16(int16_t* q, __mmask16 m, __m512i mantissas) {
  if (m == 0xffff)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtsepi32_epi16(mantissas));
  else
    _mm512_mask_cvtsepi32_storeu_epi16(q, m, mantissas);
}

// Stochastic rounding hashes the high half of the index once per vector: a vector whose
// indices cross a multiple of 2^32 (never in practice) goes to AVX2, which handles it.
bool crosses_high_half(const RoundingArgs& r, int64_t n) {
  return r.rounding == Rounding::stochastic && (r.index0 >> 32) != ((r.index0 + uint64_t(n)) >> 32);
}

// The loops read the rounding arguments from a local copy: from the caller's memory the
// compiler reloaded them after every store (int16 stores may alias them here, with
// -fno-strict-aliasing), and on Zen 4 each reload waited for the masked store before
// it: quantization ran at a quarter of its speed.
template <typename R>
void run_as(const float* x, int16_t* q, int64_t n, Scale s, const RoundingArgs& args) {
  const RoundingArgs r = args;
  const __m512 f = _mm512_set1_ps(s.first), g = _mm512_set1_ps(s.second);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    read_ahead(x + i, r.read_ahead);
    const __m512 xi = _mm512_maskz_loadu_ps(m, x + i);
    store16(q + i, m, round16<R>(_mm512_mul_ps(_mm512_mul_ps(xi, f), g), xi, r, r.index0 + i));
  }
}

void run(const float* x, int16_t* q, int64_t n, Scale s, const RoundingArgs& r) {
  if (crosses_high_half(r, n)) return quantize_avx2.run(x, q, n, s, r);
  with_rule(r, [&](auto rule) { run_as<decltype(rule)>(x, q, n, s, r); });
}

// A tile with a scale per column, 16 columns at a time down the rows (the scales loaded
// once per column run).
template <typename R>
void run_rows_as(const float* x, int16_t* q, int64_t rows, int64_t cols, const float* first, const float* second,
                 const RoundingArgs& args) {
  const RoundingArgs r = args;  // a local copy: see run_as
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 m = tail_mask(cols - c);
    const __m512 f = _mm512_maskz_loadu_ps(m, first + c), g = _mm512_maskz_loadu_ps(m, second + c);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t at = row * cols + c;
      read_ahead(x + at, r.read_ahead);
      const __m512 xi = _mm512_maskz_loadu_ps(m, x + at);
      const __m512i mantissas = round16<R>(_mm512_mul_ps(_mm512_mul_ps(xi, f), g), xi, r, r.index0 + at);
      store16(q + at, m, mantissas);
    }
  }
}

void run_rows(const float* x, int16_t* q, int64_t rows, int64_t cols, const float* first, const float* second,
              const RoundingArgs& r) {
  if (crosses_high_half(r, rows * cols)) return quantize_avx2.run_rows(x, q, rows, cols, first, second, r);
  with_rule(r, [&](auto rule) { run_rows_as<decltype(rule)>(x, q, rows, cols, first, second, r); });
}

// run_rows straight into the K-pairs of panels (PairPanels, quantize.h): rows 2p and
// 2p + 1 as K-pair p, 16 columns at a time, row 2p's mantissa in each int32's low half
// and row 2p + 1's in its high half (the mantissas lie within the limit, so within
// int16, and each one's low half is its int16). Through a buffer and an interleaving
// pass, one-thread ResNet-20 steps took 1.038x the time on an AMD Zen 4 (docs/step.md).
template <typename R>
void rows_into_pairs_as(const float* x, int64_t rows, int64_t cols, const float* first, const float* second,
                        const RoundingArgs& args, int32_t* pairs, int64_t width, int64_t kpairs) {
  const RoundingArgs r = args;  // a local copy: see run_as
  for (int64_t c = 0; c < cols; c += 16) {
    const __m512 f = _mm512_loadu_ps(first + c), g = _mm512_loadu_ps(second + c);
    int32_t* out = pairs + c / width * kpairs * width + c % width;
    for (int64_t row = 0; row < rows; row += 2, out += width) {
      const float* even = x + row * cols + c;
      const float* odd = even + cols;
      read_ahead(even, r.read_ahead);
      read_ahead(odd, r.read_ahead);
      const __m512 xe = _mm512_loadu_ps(even), xo = _mm512_loadu_ps(odd);
      const uint64_t index = r.index0 + uint64_t(row * cols + c);
      const __m512i low = round16<R>(_mm512_mul_ps(_mm512_mul_ps(xe, f), g), xe, r, index);
      const __m512i high = round16<R>(_mm512_mul_ps(_mm512_mul_ps(xo, f), g), xo, r, index + uint64_t(cols));
      const __m512i high_half = _mm512_sll_epi32(high, _mm_cvtsi32_si128(16));
      _mm512_storeu_si512(out, _mm512_mask_blend_epi16(__mmask32(0xAAAAAAAAu), low, high_half));
    }
  }
}

bool run_rows_into_pairs(const float* x, int64_t rows, int64_t cols, const float* first, const float* second,
                         const RoundingArgs& r, int32_t* pairs, int64_t width, int64_t kpairs) {
  if (cols % 16 || rows % 2 || width % 16 || crosses_high_half(r, rows * cols)) return false;
  with_rule(r, [&](auto rule) {
    rows_into_pairs_as<decltype(rule)>(x, rows, cols, first, second, r, pairs, width, kpairs);
  });
  return true;
}

void absmax_rows(const float* x, int64_t rows, int64_t cols, uint32_t* acc) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 m = tail_mask(cols - c);
    __m512i top = _mm512_maskz_loadu_epi32(m, acc + c);
    for (int64_t row = 0; row < rows; ++row)
      top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, x + row * cols + c), abs_mask));
    _mm512_mask_storeu_epi32(acc + c, m, top);
  }
}

// The members AVX-512 does not change, called through AVX2's set.
uint32_t absmax(const float* x, int64_t n) { return quantize_avx2.absmax(x, n); }
void absmax_into(const float* x, uint32_t* acc, int64_t n) { quantize_avx2.absmax_into(x, acc, n); }
void run_scaled(const float* x, int16_t* q, int64_t n, const float* first, const float* second,
                const RoundingArgs& r) {
  quantize_avx2.run_scaled(x, q, n, first, second, r);
}

// Blocks of whole vectors (a linear layer's 32 channels) in one loop: AVX2's set calls
// a function per block, which cost more than a block of 32.
void absmax_blocks(const float* x, int64_t n, int64_t block, uint32_t* out) {
  if (block % 16) return quantize_avx2.absmax_blocks(x, n, block, out);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t b = 0, start = 0; start < n; ++b, start += block) {
    __m512i top = _mm512_setzero_si512();
    for (int64_t i = start; i < start + block && i < n; i += 16)
      top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail_mask(n - i), x + i), abs_mask));
    out[b] = _mm512_reduce_max_epu32(top);
  }
}

template <typename R>
void run_blocks_as(const float* x, int16_t* q, int64_t n, int64_t block, const float* first, const float* second,
                   const RoundingArgs& args) {
  const RoundingArgs r = args;  // a local copy: see run_as
  for (int64_t b = 0, start = 0; start < n; ++b, start += block) {
    const __m512 f = _mm512_set1_ps(first[b]), g = _mm512_set1_ps(second[b]);
    for (int64_t i = start; i < start + block && i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      read_ahead(x + i, r.read_ahead);
      const __m512 xi = _mm512_maskz_loadu_ps(m, x + i);
      store16(q + i, m, round16<R>(_mm512_mul_ps(_mm512_mul_ps(xi, f), g), xi, r, r.index0 + i));
    }
  }
}

void run_blocks(const float* x, int16_t* q, int64_t n, int64_t block, const float* first, const float* second,
                const RoundingArgs& r) {
  if (block % 16 || crosses_high_half(r, n)) return quantize_avx2.run_blocks(x, q, n, block, first, second, r);
  with_rule(r, [&](auto rule) { run_blocks_as<decltype(rule)>(x, q, n, block, first, second, r); });
}

}  // namespace

const QuantizeKernels quantize_avx512bw = {absmax,     absmax_into, run,         run_scaled,         absmax_blocks,
                                           run_blocks, absmax_rows, run_rows,    run_rows_into_pairs};

}  // namespace dfp
