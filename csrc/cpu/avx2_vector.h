// The ymm vector interface of ukernel_impl.h, less the pair product (AVX2's vpmaddwd +
// vpaddd and AVX-512VL's vpdpwssd differ).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "gemm.h"

namespace {

struct Avx2Vector {
  using I = __m256i;
  using F = __m256;
  static constexpr int lanes = 8;
  static I zeroi() { return _mm256_setzero_si256(); }
  static F zerof() { return _mm256_setzero_ps(); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I broadcast(const void* p) { return _mm256_set1_epi32(dfp::load_pair(p)); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F setf(float x) { return _mm256_set1_ps(x); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F addf(F a, F b) { return _mm256_add_ps(a, b); }
  static F mulf(F a, F b) { return _mm256_mul_ps(a, b); }
  static F mul_add(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
};

}  // namespace
