// gemm_s16s16s32 on AVX2: vpmaddwd (two int16 products summed into int32) + vpaddd.
// 6 x 16 tile: 12 int32 accumulators + 2 B vectors + 1 A broadcast + 1 product = 16 ymm;
// the fp32 accumulators, touched once per chain, live in L1. Measured on Zen 3 (best of
// 5 runs, four shapes), 6 x 16 beat 3 x 16 (all accumulators in registers) by 5-18%.
#include <immintrin.h>

#include "gemm.h"
#include "ukernel_impl.h"

namespace {

struct Avx2 {
  using I = __m256i;
  using F = __m256;
  static constexpr int lanes = 8;
  static I zeroi() { return _mm256_setzero_si256(); }
  static F zerof() { return _mm256_setzero_ps(); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I broadcast(const void* p) { return _mm256_set1_epi32(dfp::load_pair(p)); }
  static I dot_pairs(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F setf(float x) { return _mm256_set1_ps(x); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F addf(F a, F b) { return _mm256_add_ps(a, b); }
  static F mulf(F a, F b) { return _mm256_mul_ps(a, b); }
  static F mul_add(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
};

}  // namespace

const dfp::MicroKernel dfp::gemm_s16s16s32_avx2_6x16 = {"gemm_s16s16s32_avx2_6x16", 6, 16, 256, 192, 256,
                                                         TileKernel<Avx2, 6, 2>::run};
