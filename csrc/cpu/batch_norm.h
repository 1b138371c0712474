// Batch normalisation in training, over channels-last float32 or bfloat16 tensors seen as
// rows x channels (rows = n * h * w); sums and arithmetic in float and double. torch's
// CPU kernel keeps each thread's per-channel sums side by side in one buffer and updates
// them on every row: where a row of channels is not a whole number of cache lines (8, 24
// or 56 channels: the widths of pruned and half-width networks) two threads write one
// line all the time, and a 2-thread batch norm ran 2.5-4x slower than a 1-thread one
// (Intel Xeon, docs/harness.md). Here each task sums fixed blocks of rows into its own
// memory, and the blocks are combined in double in their order: the same bits on any
// number of threads.
#pragma once
#include <cstdint>

namespace dfp {

// bfloat16 as torch stores it: the upper half of a float's bits. x, dy and out of one call
// share an element type, float or BFloat16 (torch's autocast hands bf16 to a batch norm).
struct BFloat16 {
  uint16_t bits;
};

// Per channel mean and biased variance of x (rows x channels), each block's float sums
// combined in double (Chan et al.'s pairwise update of mean and squared deviations).
template <typename T>
void batch_norm_statistics(const T* x, int64_t rows, int64_t channels, double* mean, double* variance,
                           int nthreads);

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
