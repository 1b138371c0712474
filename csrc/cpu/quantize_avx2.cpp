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

// The low halves of the flat indices of 8 elements, the first at `index`.
inline __m256i lanes_of(uint64_t index) {
  return _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(index))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}


// Each step of the rounding below runs for all N vectors before the next: a vector's
// dithered or stochastic rounding is a chain of about 35 dependent instructions, and
// chains issued one after the other left an AMD Zen 2's pipes partly idle (two rows in
// lockstep: a dithered gradient 6-12 % faster; docs/step.md).
#define DFP_EACH(i, N) _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i)

template <int N>
[[gnu::always_inline]] inline void mix8(__m256i (&x)[N]) {
  DFP_EACH(i, N) x[i] = _mm256_xor_si256(x[i], _mm256_srli_epi32(x[i], 16));
  DFP_EACH(i, N) x[i] = _mm256_mullo_epi32(x[i], _mm256_set1_epi32(0x7feb352d));
  DFP_EACH(i, N) x[i] = _mm256_xor_si256(x[i], _mm256_srli_epi32(x[i], 15));
  DFP_EACH(i, N) x[i] = _mm256_mullo_epi32(x[i], _mm256_set1_epi32(int(0x846ca68bu)));
  DFP_EACH(i, N) x[i] = _mm256_xor_si256(x[i], _mm256_srli_epi32(x[i], 16));
}

// Rounds N vectors of 8 scaled values v[i] (of the elements x[i], the first at flat
// index index[i], the low halves of all 8 lo[i]) to integers clamped to the limit, q[i].
template <typename R, int N>
[[gnu::always_inline]] inline void round8(const __m256 (&v)[N], const __m256 (&x)[N], const RoundingArgs& r,
                                          const uint64_t (&index)[N], const __m256i (&lo)[N], __m256i (&q)[N]) {
  const __m256 lim = _mm256_set1_ps(r.limit), low = _mm256_sub_ps(_mm256_setzero_ps(), lim);
  if constexpr (R::value == Rounding::nearest && !R::clamped) {
    // cvtps rounds as the MXCSR says: to nearest even, as quantize_one's nearbyint, unless
    // a program changes the mode (the explicit rounding and the clamp were three of the
    // four instructions after the scaling: quantize_input 0.88-0.98x the time without
    // them on an AMD Zen 2)
    DFP_EACH(i, N) q[i] = _mm256_cvtps_epi32(v[i]);
  } else if constexpr (R::value == Rounding::nearest) {
    DFP_EACH(i, N) {
      const __m256 rounded = _mm256_round_ps(v[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[i] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(rounded, lim), low));
    }
  } else {
    __m256i bits[N];
    if constexpr (R::value == Rounding::stochastic) {
      // One hash per element: mix(lo ^ k0), xored with the hash of the high half, which
      // the 8 lanes share.
      DFP_EACH(i, N) bits[i] = _mm256_xor_si256(lo[i], _mm256_set1_epi32(int(r.k0)));
      mix8(bits);
      DFP_EACH(i, N) {
        bits[i] = _mm256_xor_si256(bits[i], _mm256_set1_epi32(int(mix32(uint32_t(index[i] >> 32) ^ r.k1))));
      }
    } else {
      const __m256i key = _mm256_set1_epi32(int(kDitherKey)), mask = _mm256_set1_epi32(int(kDitherMask));
      DFP_EACH(i, N) {
        const __m256i sign_significand = _mm256_and_si256(_mm256_castps_si256(x[i]), mask);
        bits[i] = _mm256_xor_si256(_mm256_xor_si256(sign_significand, lo[i]), key);
      }
      mix8(bits);
    }
    // Clamped (where a value can pass the limit) before the floor, which gives the
    // integers of clamping after it (the limit is an integer; a value past it has no
    // fraction left to round up), and keeps them within int32 for the conversion.
    __m256 rnd[N], clamped[N], fl[N];
    DFP_EACH(i, N) rnd[i] = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits[i], 9)), _mm256_set1_ps(0.5f));
    DFP_EACH(i, N) clamped[i] = R::clamped ? _mm256_max_ps(_mm256_min_ps(v[i], lim), low) : v[i];
    DFP_EACH(i, N) fl[i] = _mm256_floor_ps(clamped[i]);
    DFP_EACH(i, N) {
      const __m256 fraction = _mm256_mul_ps(_mm256_sub_ps(clamped[i], fl[i]), _mm256_set1_ps(8388608.0f));
      const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(rnd[i], fraction, _CMP_LT_OQ));  // -1 where it rounds up
      q[i] = _mm256_sub_epi32(_mm256_cvttps_epi32(fl[i]), up);
    }
  }
}

inline void store16(int16_t* q, __m256i a, __m256i b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
}

inline void store8(int16_t* q, __m256i a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)));
}

// The 8 lanes of a vector at `index` share the high 32 bits of their flat index.
inline bool lanes_share_high_bits(uint64_t index) { return uint32_t(index) <= 0xFFFFFFF8u; }

template <typename R, typename ScaleAt>
void run_impl(const float* x, int16_t* q, int64_t n, ScaleAt scale_at, const RoundingArgs& r) {
  int64_t i = 0;
  __m256i lo[2] = {lanes_of(r.index0), lanes_of(r.index0 + 8)};  // kept as i moves (indexed rules only)
  for (; i + 16 <= n; i += 16) {
    const uint64_t idx = r.index0 + i;
    if (R::value == Rounding::stochastic && !(lanes_share_high_bits(idx) && lanes_share_high_bits(idx + 8))) break;
    read_ahead(x + i, r.read_ahead);
    const __m256 xs[2] = {_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i + 8)};
    const __m256 v[2] = {scale_at(i, xs[0]), scale_at(i + 8, xs[1])};
    __m256i out[2];
    round8<R>(v, xs, r, {idx, idx + 8}, lo, out);
    store16(q + i, out[0], out[1]);
    if constexpr (R::indexed) DFP_EACH(k, 2) lo[k] = _mm256_add_epi32(lo[k], _mm256_set1_epi32(16));
  }
  // 8 left (a run of 8 channels: all of it), as one vector
  if (i + 8 <= n && !(R::value == Rounding::stochastic && !lanes_share_high_bits(r.index0 + i))) {
    const __m256 xs[1] = {_mm256_loadu_ps(x + i)};
    const __m256 v[1] = {scale_at(i, xs[0])};
    __m256i out[1];
    round8<R>(v, xs, r, {r.index0 + i}, {lanes_of(r.index0 + i)}, out);
    store8(q + i, out[0]);
    i += 8;
  }
  for (; i < n; ++i) q[i] = quantize_one(x[i], scale_at.one(i), r.limit, r.rounding, r.index0 + i, r.k0, r.k1);
}

template <typename ScaleAt>
void run_impl(const float* x, int16_t* q, int64_t n, ScaleAt scale_at, const RoundingArgs& args) {
  // A local copy: from the caller's memory the compiler reloaded the rounding arguments
  // after every store (int16 stores may alias them, with -fno-strict-aliasing).
  const RoundingArgs r = args;
  with_rule(r, [&](auto rule) { run_impl<decltype(rule)>(x, q, n, scale_at, r); });
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
// loaded once per column run, not once per row; two rows at a time (four chains to
// interleave). `out` takes each step's integers: two(row, c, q) those of rows row and
// row + 1 at columns c..c + 15 (q[0], q[1] and q[2], q[3]). Rows: an even number. Needs
// cols a multiple of 16 and, for stochastic rounding, flat indices within one multiple
// of 2^32 (`lockstep_fits`).
template <typename R, typename Out>
void rows_in_lockstep(const float* x, int64_t rows, int64_t cols, const float* first, const float* second,
                      const RoundingArgs& r, Out out) {
  for (int64_t c = 0; c < cols; c += 16) {
    const __m256 f[2] = {_mm256_loadu_ps(first + c), _mm256_loadu_ps(first + c + 8)};
    const __m256 s[2] = {_mm256_loadu_ps(second + c), _mm256_loadu_ps(second + c + 8)};
    const auto scaled = [&](const __m256 x, int k) { return _mm256_mul_ps(_mm256_mul_ps(x, f[k % 2]), s[k % 2]); };
    // the indices' low halves kept as the rows move
    const uint64_t at = r.index0 + uint64_t(c);
    __m256i lo[4] = {lanes_of(at), lanes_of(at + 8), lanes_of(at + cols), lanes_of(at + cols + 8)};
    const __m256i two_rows = _mm256_set1_epi32(int(uint32_t(2 * cols)));
    for (int64_t row = 0; row < rows; row += 2) {
      const float* xr = x + row * cols + c;
      read_ahead(xr, r.read_ahead);
      read_ahead(xr + cols, r.read_ahead);
      const uint64_t index = at + uint64_t(row * cols);
      const __m256 xs[4] = {_mm256_loadu_ps(xr), _mm256_loadu_ps(xr + 8), _mm256_loadu_ps(xr + cols),
                            _mm256_loadu_ps(xr + cols + 8)};
      const __m256 v[4] = {scaled(xs[0], 0), scaled(xs[1], 1), scaled(xs[2], 2), scaled(xs[3], 3)};
      __m256i q[4];
      round8<R>(v, xs, r, {index, index + 8, index + cols, index + cols + 8}, lo, q);
      out.two(row, c, q);
      if constexpr (R::indexed) DFP_EACH(k, 4) lo[k] = _mm256_add_epi32(lo[k], two_rows);
    }
  }
}

// Column counts that are not a multiple of 16 (rows of 8 take run_impl's last vector),
// and the rare tiles whose flat indices cross a multiple of 2^32 (stochastic rounding
// hashes the high half once per vector), go a row at a time.
bool lockstep_fits(int64_t rows, int64_t cols, const RoundingArgs& r) {
  const uint64_t last = r.index0 + uint64_t(rows * cols);
  return cols % 16 == 0 && !(r.rounding == Rounding::stochastic && (r.index0 >> 32) != (last >> 32));
}

// Rows of int16 (cols apart).
struct IntoRows {
  int16_t* q;
  int64_t cols;
  void two(int64_t row, int64_t c, const __m256i (&v)[4]) const {
    store16(q + row * cols + c, v[0], v[1]);
    store16(q + (row + 1) * cols + c, v[2], v[3]);
  }
};

// The K-pairs of panels of 16 columns (PairPanels, quantize.h; the width of AVX2's 6 x 16
// tile): rows 2p and 2p + 1 as K-pair p, a blend per 8 pairs (the integers lie within
// int16, so each one's low half is its int16). A pass over a buffer had interleaved them
// afterwards: without it a ResNet-20 step in the default format ran 1.4 % (one thread)
// and 3.3 % (two) faster on an AMD Zen 2 in the run right after (docs/step.md).
struct IntoPairs {
  static constexpr int64_t kWidth = 16;
  int32_t* pairs;
  int64_t kpairs;
  int32_t* at(int64_t row, int64_t c) const { return pairs + ((c / kWidth) * kpairs + row / 2) * kWidth + c % kWidth; }
  static void store(int32_t* to, __m256i even, __m256i odd) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm256_blend_epi16(even, _mm256_slli_epi32(odd, 16), 0xAA));
  }
  void two(int64_t row, int64_t c, const __m256i (&v)[4]) const {
    store(at(row, c), v[0], v[2]);
    store(at(row, c + 8), v[1], v[3]);
  }
};

void run_rows(const float* x, int16_t* q, int64_t rows, int64_t cols, const float* first, const float* second,
              const RoundingArgs& args) {
  const RoundingArgs r = args;  // a local copy: see run_impl
  if (!lockstep_fits(rows, cols, r)) return run_rows_of<run_scaled>(x, q, rows, cols, first, second, r);
  const int64_t pairs = rows / 2 * 2;
  with_rule(r, [&](auto rule) {
    rows_in_lockstep<decltype(rule)>(x, pairs, cols, first, second, r, IntoRows{q, cols});
  });
  if (pairs < rows) {  // the odd last row
    RoundingArgs last = r;
    last.index0 += uint64_t(pairs * cols);
    run_scaled(x + pairs * cols, q + pairs * cols, cols, first, second, last);
  }
}

bool run_rows_into_pairs(const float* x, int64_t rows, int64_t cols, const float* first, const float* second,
                         const RoundingArgs& args, int32_t* pairs, int64_t width, int64_t kpairs) {
  const RoundingArgs r = args;  // a local copy: see run_impl
  if (!lockstep_fits(rows, cols, r) || rows % 2 || width != IntoPairs::kWidth) return false;
  with_rule(r, [&](auto rule) {
    rows_in_lockstep<decltype(rule)>(x, rows, cols, first, second, r, IntoPairs{pairs, kpairs});
  });
  return true;
}

}  // namespace

const QuantizeKernels quantize_avx2 = {absmax, absmax_into, run, run_scaled, absmax_blocks_of<absmax>,
                                       run_blocks_of<run>, absmax_rows, run_rows, run_rows_into_pairs};

}  // namespace dfp
