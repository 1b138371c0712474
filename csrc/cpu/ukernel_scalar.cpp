// gemm_s16s16s32 in portable C++: the same tile code over plain arrays of 8 lanes.
#include "gemm.h"
#include "ukernel_impl.h"

namespace {

struct Lanes8 {
  static constexpr int lanes = 8;
  struct I {
    int32_t v[8];
  };
  struct F {
    float v[8];
  };
  static I zeroi() { return I{}; }
  static F zerof() { return F{}; }
  static I loadi(const int32_t* p) {
    I r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  static I broadcast(const void* p) {
    I r;
    for (int i = 0; i < 8; ++i) r.v[i] = dfp::load_pair(p);
    return r;
  }
  static I dot_pairs(I acc, I a, I b) {
    for (int i = 0; i < 8; ++i)
      acc.v[i] += int32_t(int16_t(a.v[i])) * int16_t(b.v[i]) + int32_t(int16_t(a.v[i] >> 16)) * int16_t(b.v[i] >> 16);
    return acc;
  }
  static F loadf(const float* p) {
    F r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  static void storef(float* p, F x) {
    for (int i = 0; i < 8; ++i) p[i] = x.v[i];
  }
  static F setf(float x) {
    F r;
    for (int i = 0; i < 8; ++i) r.v[i] = x;
    return r;
  }
  static F to_float(I x) {
    F r;
    for (int i = 0; i < 8; ++i) r.v[i] = float(x.v[i]);
    return r;
  }
  static F addf(F a, F b) {
    for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
    return a;
  }
  static F mulf(F a, F b) {
    for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static F mul_add(F a, F b, F c) { return addf(mulf(a, b), c); }  // a * b is exact where it is used
};

}  // namespace

const dfp::MicroKernel dfp::gemm_s16s16s32_scalar_4x8 = {"gemm_s16s16s32_scalar_4x8", 4, 8, 256, 64, 256,
                                                          TileKernel<Lanes8, 4, 1>::run};
