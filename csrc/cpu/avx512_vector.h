// The zmm vector interface of ukernel_impl.h, less the pair product (BW and VNNI differ).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "gemm.h"

namespace {

struct Avx512Vector {
  using I = __m512i;
  using F = __m512;
  static constexpr int lanes = 16;
  static I zeroi() { return _mm512_setzero_si512(); }
  static F zerof() { return _mm512_setzero_ps(); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I broadcast(const void* p) { return _mm512_set1_epi32(dfp::load_pair(p)); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F setf(float x) { return _mm512_set1_ps(x); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F addf(F a, F b) { return _mm512_add_ps(a, b); }
  static F mulf(F a, F b) { return _mm512_mul_ps(a, b); }
  static F mul_add(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
};

}  // namespace
