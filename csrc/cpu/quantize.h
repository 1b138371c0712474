// Quantization of whole tensors (docs/design.md): amax per group, exponents, mantissas.
#pragma once
#include <cstdint>

namespace dfp {

// Groups of a contiguous float32 tensor viewed as (O, N, I).
enum class Grouping : int { tensor = 0, channel = 1, block = 2 };

struct QuantizeShape {
  int64_t outer, n, inner;
  Grouping grouping;
  int64_t block;  // with Grouping::block
  int64_t groups() const;
};

// Writes the exponents (1, N or O*ceil(N/block)*I of them). Returns false, writing
// nothing else, when x holds NaN or Inf.
bool compute_exponents(const float* x, const QuantizeShape& shape, int headroom, int32_t* exponent,
                       int nthreads);

// Writes the mantissas of x given its exponents; seed is used when stochastic.
void quantize_with_exponents(const float* x, const QuantizeShape& shape, int headroom, const int32_t* exponent,
                             bool stochastic, uint64_t seed, int16_t* mantissa, int nthreads);

// A channels-last image (images, rows, cols, channels) and the zero-padded copy that
// convolutions read: pad_rows and pad_cols of zeros around, and out_channels >= channels
// (zeros in the extra ones).
struct PaddedImage {
  int64_t images, rows, cols, channels;
  int64_t pad_rows, pad_cols, out_channels;
};

// Quantizes x (per tensor, nearest) straight into the padded image `out`, with the bits
// of quantizing x and then copying it: one pass over the output instead of two. Returns
// false, writing nothing else, when x holds NaN or Inf.
bool quantize_padded(const float* x, const PaddedImage& image, int headroom, int16_t* out, int32_t* exponent,
                     int nthreads);

}  // namespace dfp
