// What the compiled layer's products (layer.cpp, grad_input.cpp) share.
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "layer.h"
#include "quantize.h"

namespace dfp {

// The int16 rows a product takes at a time (the forward's and grad_input's pieces of a
// few images), inside the L2 of every core dfp runs on (512 KB on Zen 3) beside their
// output.
constexpr int64_t kPieceBytes = 256 << 10;

// The exponent that marks a tensor quantized from NaN/Inf (dfp._conv_layout.NONFINITE).
constexpr int32_t kNonFiniteExponent = INT32_MAX;

// Where [o][ci][i][j] of the layer's (cout, c / groups, kh, kw) weight (or dW) lies. The
// strides are copied: read from the layer inside a loop that stores floats, they were
// read again for every element (the build has no strict aliasing); gathering the weight
// and scattering dW took 77 and 46 us of a 64-channel 2x2 layer's backward, 17 together
// after (perf, Intel Xeon).
struct Strides {
  explicit Strides(const ConvLayer& l)
      : o(l.weight_strides[0]), ci(l.weight_strides[1]), i(l.weight_strides[2]), j(l.weight_strides[3]) {}
  int64_t at(int64_t o_, int64_t ci_, int64_t i_, int64_t j_) const { return o_ * o + ci_ * ci + i_ * i + j_ * j; }
  int64_t o, ci, i, j;
};

// Whether the weight (and dW) at the layer's strides already lie as the (cout, K) rows
// the products read and write: a 1x1 or linear layer's contiguous weight, no channel
// added. Then nothing is gathered or scattered.
inline bool weight_is_rows(const ConvLayer& l) {
  return l.kh == 1 && l.kw == 1 && l.channels == l.c && l.weight_strides[1] == 1 &&
         l.weight_strides[0] == l.c / l.groups;
}

// n floats from src at element stride `from` into dst at stride `to`: a weight's channels
// gathered into the rows a product reads, or dW's scattered back. By unaliased pointers:
// indexed element by element through a threaded loop's captures, a 4096 x 4096 dW took
// 60 ms to scatter on an AMD Zen 3 (a tenth of its layer's forward and backward).
inline void copy_strided(const float* __restrict src, int64_t from, float* __restrict dst, int64_t to, int64_t n) {
  if (from == 1 && to == 1) {
    std::copy_n(src, n, dst);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * to] = src[i * from];
}

// Quantizes a gathered copy of the weight (rows laid out as the product reads them);
// the bits do not depend on the order or the threads: each element rounds alone against
// its group's exponent.
inline bool quantize_gathered(const float* gathered, const QuantizeShape& shape, int headroom, int16_t* mantissa,
                              int32_t* exponent, int nthreads) {
  if (!compute_exponents(gathered, shape, headroom, exponent, nthreads)) return false;
  quantize_with_exponents(gathered, shape, headroom, exponent, Rounding::nearest, 0, mantissa, nthreads);
  return true;
}

// Whether any of `count` exponents marks NaN/Inf. A loop without an early exit and an
// int accumulator, which the compiler vectorizes (std::find's and a bool's stayed scalar:
// a third of a linear layer's C++ backward, which checks its 32 k input exponents twice).
inline bool any_nonfinite(const int32_t* e, int64_t count) {
  int32_t marked = 0;
  for (int64_t i = 0; i < count; ++i) marked |= int32_t(e[i] == kNonFiniteExponent);
  return marked != 0;
}

}  // namespace dfp
