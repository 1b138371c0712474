// What the compiled layer's products (layer.cpp, grad_input.cpp) share.
#pragma once
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

// weight[o][ci][i][j] of the layer's (cout, c / groups, kh, kw) float32 weight.
inline float weight_at(const float* weight, const ConvLayer& l, int64_t o, int64_t ci, int64_t i, int64_t j) {
  const int64_t* s = l.weight_strides;
  return weight[o * s[0] + ci * s[1] + i * s[2] + j * s[3]];
}

// Quantizes a gathered copy of the weight (rows laid out as the product reads them);
// the bits do not depend on the order: each element rounds alone against its group's
// exponent. Weights are small: one thread.
inline bool quantize_gathered(const std::vector<float>& gathered, const QuantizeShape& shape, int headroom,
                              int16_t* mantissa, int32_t* exponent) {
  if (!compute_exponents(gathered.data(), shape, headroom, exponent, 1)) return false;
  quantize_with_exponents(gathered.data(), shape, headroom, exponent, Rounding::nearest, 0, mantissa, 1);
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
