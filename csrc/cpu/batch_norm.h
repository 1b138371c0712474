// Batch normalisation in training, over channels-last float32 or bfloat16 tensors seen as
// rows x channels (rows = n * h * w); sums and arithmetic in float and double. torch's
// CPU kernel keeps each thread's per-channel sums side by side in one buffer and updates
// them on every row: where a row of channels is not a whole number of cache lines (8, 24
// or 56 channels: the widths of pruned and half-width networks) two threads write one
// line all the time, and a 2-thread batch norm ran 2.5-4x slower than a 1-thread one
// (Intel Xeon, docs/harness.md). Here each task sums fixed blocks of rows (of an image's
// pixels, for the statistics) into its own memory, and the blocks are combined in double
// in their order: the same bits on any number of threads.
#pragma once
#include <cstdint>

namespace dfp {

// bfloat16 as torch stores it: the upper half of a float's bits. x, dy and out of one call
// share an element type, float or BFloat16 (torch's autocast hands bf16 to a batch norm).
struct BFloat16 {
  uint16_t bits;
};

// The statistics' blocks: each image's rows (its pixels) in blocks of rows_per_block
// (the last one of an image shorter), summed in float; the blocks' means and squared
// deviations are joined in double in order (Chan et al.), within each image and then
// image after image. The bits so depend on neither the thread count nor who sums a
// block: a convolution's forward sums its output's blocks as it writes them, and a batch
// norm fed that output gets the same mean and variance as it would find (layer.h).
struct MomentBlocks {
  int64_t pixels, rows_per_block, per_image;
  MomentBlocks(int64_t pixels, int64_t channels);
};

// The float mean and sum of squared deviations of each block of images [first,
// first + count): (count * per_image, channels) each. One thread.
template <typename T>
void block_moments(const T* x, int64_t first, int64_t count, int64_t channels, const MomentBlocks& blocks,
                   float* mean, float* m2);

// The per channel mean and biased variance of `images` images from all their blocks'
// moments (block_moments of every image).
void join_block_moments(const float* mean, const float* m2, int64_t images, int64_t channels,
                        const MomentBlocks& blocks, double* batch_mean, double* batch_variance);

// Per channel mean and biased variance of x (images x pixels rows x channels).
template <typename T>
void batch_norm_statistics(const T* x, int64_t images, int64_t pixels, int64_t channels, double* mean,
                           double* variance, int nthreads);

// Per channel sums of dy and of dy * (x - mean), for the backward.
template <typename T>
void batch_norm_gradient_sums(const T* dy, const T* x, const float* mean, int64_t rows, int64_t channels,
                              double* sum_dy, double* sum_dy_centered, int nthreads);

// out = (x - mean) * x_scale + dy * dy_scale + shift per channel (dy null: no such
// term). The forward is (x - mean) * (invstd * weight) + bias; the input's gradient
// (x - mean) * (-k * g) + dy * g - mean(dy) * g with g = invstd * weight and
// k = invstd^2 * mean(dy * (x - mean)). x is centred first: x * a + b with b holding
// mean * a would cancel where the mean is large against the spread.
// A bfloat16 out is the float result rounded to nearest even; NaN stays NaN.
template <typename T>
void batch_norm_affine(const T* x, const float* mean, const float* x_scale, const T* dy, const float* dy_scale,
                       const float* shift, int64_t rows, int64_t channels, T* out, int nthreads);

}  // namespace dfp
