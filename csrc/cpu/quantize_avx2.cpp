// AVX2 quantization kernels (also used by the AVX-512 paths: quantization is bound by
// memory bandwidth, and 256-bit vectors already saturate it). Compiled with -mavx2 -mfma
// only in this file. Bit-identical to quantize_one() in numerics.h. No std:: templates
// here: an instance compiled with AVX2 could be the one the linker keeps for all files.
#include <immintrin.h>

#include "quantize_kernels.h"

namespace dfp {
namespace {

// No SIMD constants at namespace scope: their initialisers would run AVX instructions
// when the library loads, also on CPUs that never take this path.
inline __m256i abs_bits8(const float* x) {
  return _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(x)), _mm256_set1_epi32(0x7fffffff));
}

uint32_t absmax(const float* x, int64_t n) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epi32(m0, abs_bits8(x + i));
    m1 = _mm256_max_epi32(m1, abs_bits8(x + i + 8));
    m2 = _mm256_max_epi32(m2, abs_bits8(x + i + 16));
    m3 = _mm256_max_epi32(m3, abs_bits8(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_epi32(m0, abs_bits8(x + i));
  m0 = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m0);
  uint32_t m = 0;
  for (uint32_t lane : lanes) m = lane > m ? lane : m;
  for (; i < n; ++i) m = abs_bits(x[i]) > m ? abs_bits(x[i]) : m;
  return m;
}

void absmax_into(const float* x, uint32_t* acc, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i* a = reinterpret_cast<__m256i*>(acc + i);
    _mm256_storeu_si256(a, _mm256_max_epi32(_mm256_loadu_si256(a), abs_bits8(x + i)));
  }
  for (; i < n; ++i) acc[i] = abs_bits(x[i]) > acc[i] ? abs_bits(x[i]) : acc[i];
}

inline __m256i mix8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// Rounds 8 scaled values v (of the elements x) to integers (as float), then clamps.
inline __m256 round8(__m256 v, __m256 x, const RoundingArgs& r, uint64_t index) {
  __m256 q;
  if (r.rounding == Rounding::nearest) {
    q = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    __m256i bits;
    const __m256i lo =
        _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(index))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    if (r.rounding == Rounding::stochastic) {
      // One hash per element: mix(lo ^ k0), xored with the hash of the high half, which
      // the 8 lanes share.
      const __m256i high = _mm256_set1_epi32(int(mix32(uint32_t(index >> 32) ^ r.k1)));
      bits = _mm256_xor_si256(mix8(_mm256_xor_si256(lo, _mm256_set1_epi32(int(r.k0)))), high);
    } else {
      const __m256i sign_significand = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(int(kDitherMask)));
      bits = mix8(_mm256_xor_si256(_mm256_xor_si256(sign_significand, lo), _mm256_set1_epi32(int(kDitherKey))));
    }
    const __m256 rnd = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 9)), _mm256_set1_ps(0.5f));
    const __m256 fl = _mm256_floor_ps(v);
    const __m256 frac = _mm256_mul_ps(_mm256_sub_ps(v, fl), _mm256_set1_ps(8388608.0f));
    q = _mm256_add_ps(fl, _mm256_and_ps(_mm256_cmp_ps(rnd, frac, _CMP_LT_OQ), _mm256_set1_ps(1.0f)));
  }
  const __m256 lim = _mm256_set1_ps(r.limit);
  return _mm256_max_ps(_mm256_min_ps(q, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
}

inline void store16(int16_t* q, __m256 a, __m256 b) {
  const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(packed, 0xD8));
}

inline void store8(int16_t* q, __m256 a) {
  const __m256i v = _mm256_cvtps_epi32(a);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

// The 8 lanes of a vector at `index` share the high 32 bits of their flat index.
inline bool lanes_share_high_bits(uint64_t index) { return uint32_t(index) <= 0xFFFFFFF8u; }

template <typename ScaleAt>
void run_impl(const float* x, int16_t* q, int64_t n, ScaleAt scale_at, const RoundingArgs& args) {
  // A local copy: from the caller's memory the compiler reloaded the rounding arguments
  // after every store (int16 stores may alias them, with -fno-strict-aliasing).
  const RoundingArgs r = args;
  const bool indexed = r.rounding == Rounding::stochastic;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const uint64_t idx = r.index0 + i;
    if (indexed && !(lanes_share_high_bits(idx) && lanes_share_high_bits(idx + 8))) break;
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    store16(q + i, round8(scale_at(i, x0), x0, r, idx), round8(scale_at(i + 8, x1), x1, r, idx + 8));
  }
  // 8 left (a run of 8 channels: all of it), as one vector
  if (i + 8 <= n && !(indexed && !lanes_share_high_bits(r.index0 + i))) {
    const __m256 x0 = _mm256_loadu_ps(x + i);
    store8(q + i, round8(scale_at(i, x0), x0, r, r.index0 + i));
    i += 8;
  }
  for (; i < n; ++i) q[i] = quantize_one(x[i], scale_at.one(i), r.limit, r.rounding, r.index0 + i, r.k0, r.k1);
}

struct UniformScale {
  Scale s;
  __m256 operator()(int64_t, __m256 x) const {
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(s.first)), _mm256_set1_ps(s.second));
  }
  Scale one(int64_t) const { return s; }
};

struct ElementScale {
  const float *first, *second;
  __m256 operator()(int64_t i, __m256 x) const {
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_loadu_ps(first + i)), _mm256_loadu_ps(second + i));
  }
  Scale one(int64_t i) const { return {first[i], second[i]}; }
};

void run(const float* x, int16_t* q, int64_t n, Scale s, const RoundingArgs& r) {
  run_impl(x, q, n, UniformScale{s}, r);
}

void run_scaled(const float* x, int16_t* q, int64_t n, const float* first, const float* second,
                const RoundingArgs& r) {
  run_impl(x, q, n, ElementScale{first, second}, r);
}

// A tile's column maxima, 8 columns at a time down the rows: the maxima stay in a
// register, not in memory from row to row.
void absmax_rows(const float* x, int64_t rows, int64_t cols, uint32_t* acc) {
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    __m256i* a = reinterpret_cast<__m256i*>(acc + c);
    __m256i m = _mm256_loadu_si256(a);
    for (int64_t r = 0; r < rows; ++r) m = _mm256_max_epi32(m, abs_bits8(x + r * cols + c));
    _mm256_storeu_si256(a, m);
  }
  for (; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) acc[c] = abs_bits(x[r * cols + c]) > acc[c] ? abs_bits(x[r * cols + c]) : acc[c];
}

// A tile with a scale per column, 16 columns at a time down the rows: the scales are
// loaded once per column run, not once per row. Column counts that are not a multiple
// of 16 (rows of 8 take run_impl's last vector), and the rare tiles whose flat indices
// cross a multiple of 2^32 (stochastic rounding hashes the high half once per vector),
// go a row at a time.
void run_rows(const float* x, int16_t* q, int64_t rows, int64_t cols, const float* first, const float* second,
              const RoundingArgs& args) {
  const RoundingArgs r = args;  // a local copy: see run_impl
  const uint64_t last = r.index0 + uint64_t(rows * cols);
  if (cols % 16 || (r.rounding == Rounding::stochastic && (r.index0 >> 32) != (last >> 32)))
    return run_rows_of<run_scaled>(x, q, rows, cols, first, second, r);
  for (int64_t c = 0; c < cols; c += 16) {
    const __m256 f0 = _mm256_loadu_ps(first + c), f1 = _mm256_loadu_ps(first + c + 8);
    const __m256 s0 = _mm256_loadu_ps(second + c), s1 = _mm256_loadu_ps(second + c + 8);
    for (int64_t row = 0; row < rows; ++row) {
      const float* xr = x + row * cols + c;
      const uint64_t index = r.index0 + uint64_t(row * cols + c);
      const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
      const __m256 v0 = _mm256_mul_ps(_mm256_mul_ps(x0, f0), s0), v1 = _mm256_mul_ps(_mm256_mul_ps(x1, f1), s1);
      store16(q + row * cols + c, round8(v0, x0, r, index), round8(v1, x1, r, index + 8));
    }
  }
}

}  // namespace

const QuantizeKernels quantize_avx2 = {absmax, absmax_into, run, run_scaled, absmax_blocks_of<absmax>,
                                            run_blocks_of<run>, absmax_rows, run_rows};

}  // namespace dfp
