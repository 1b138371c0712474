// Quantization of whole tensors (docs/design.md): amax per group, exponents, mantissas.
#pragma once
#include <cstdint>

#include "numerics.h"

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

// Writes the mantissas of x given its exponents; seed is used by stochastic rounding.
void quantize_with_exponents(const float* x, const QuantizeShape& shape, int headroom, const int32_t* exponent,
                             Rounding rounding, uint64_t seed, int16_t* mantissa, int nthreads);

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

// The layer's input x for the two products that read it, zero-padded as quantize_padded
// pads it, rounded to nearest from one read of x per group of samples (the second read
// from cache): the forward's, with one exponent per image row and block of `row_block`
// channels, rows of padding the exponent of zeros (e_rows (images, padded rows,
// out_channels / row_block)); and grad_weight's, with one per group of `group_samples`
// consecutive samples and channel, written for each sample of the group (e_channels
// (images, out_channels)). Returns false when x holds NaN or Inf (the outputs then
// undefined). q_channels null: grad_weight's copy is not made (no weight gradient is
// asked), e_channels unused. channel_major: grad_weight's copy as channel planes
// (images, out_channels, padded rows, padded columns), as grad_weight reads a 16- or
// 32-channel image (grad_weight_reads_channel_major), which then transposes nothing.
struct InputQuantization {
  int16_t* q_rows;
  int32_t* e_rows;
  int64_t row_block;
  int16_t* q_channels;
  int32_t* e_channels;
  int64_t group_samples;
  bool channel_major = false;
};
bool quantize_input(const float* x, const PaddedImage& image, int headroom, const InputQuantization& out,
                    int nthreads);

// q_groups as zero-bordered images (grad_input's padded dy): x's row r, pixel (n, h, w)
// of images height x width, goes to pixel (n, h + top, w + left) of images out_height x
// out_width. The border is left as it is (the caller zeroes it).
struct BorderedRows {
  int64_t height = 0, width = 0, top = 0, left = 0, out_height = 0, out_width = 0;
  bool given() const { return out_width > 0; }
  int64_t pixel(int64_t r) const {
    const int64_t n = r / (height * width), h = r / width % height, w = r % width;
    return (n * out_height + h + top) * out_width + w + left;
  }
};

// An output gradient x (rows, cols) for both backward products in two passes over x
// (not four): where q_blocks is given, per block of `block` rows and column into
// q_blocks, e_blocks (ceil(rows / block), cols) (grad_weight); where q_groups is given,
// per group of `group_rows` consecutive rows (an image row's pixels, a sample's; rows:
// per tensor) and `group_cols` columns (0: all) into q_groups, e_groups
// (ceil(rows / group_rows), cols / group_cols) (grad_input). The bits of quantizing x
// each way on its own (quantize3d): the same rounding of element i from the same
// random bits. Each output rounds its own way, stochastic rounding from one seed.
// A third pass finds the groups' maxima where blocks straddle groups. Returns false
// when x holds NaN or Inf (the outputs then undefined: the blocks of other tasks may be
// written).
//
// Where blocks_panels is given, q_blocks is laid out as the GEMM reads B (Packed,
// csrc/cpu/gemm.h): panels of `width` columns (width divides cols), each [K-pair][width]
// of row pairs (2q, 2q + 1), `kpairs` K-pairs (the K-layout's, pairs past the rows
// zero), which needs `block` even or one block: grad_weight then packs nothing.
struct PairPanels {
  int64_t width = 0, kpairs = 0;
  bool given() const { return width > 0; }
};
struct NormInputGradient;  // batch_norm.h
struct GradientQuantization {
  int16_t* q_blocks = nullptr;
  int32_t* e_blocks = nullptr;
  int64_t block = 0;
  Rounding blocks_rounding = Rounding::nearest;
  int16_t* q_groups = nullptr;
  int32_t* e_groups = nullptr;
  int64_t group_rows = 0;
  Rounding groups_rounding = Rounding::nearest;
  int64_t group_cols = 0;  // divides cols
  BorderedRows groups_bordered;  // where given, q_groups' layout
  PairPanels blocks_panels;      // where given, q_blocks' layout
  // Where given, x is made from it a block at a time into the cache (x null), or made
  // whole first where groups straddle blocks: the bits of quantizing the x it makes.
  const NormInputGradient* made = nullptr;
};
bool quantize_gradient(const float* x, int64_t rows, int64_t cols, int headroom, uint64_t seed,
                       const GradientQuantization& out, int nthreads);

}  // namespace dfp
