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

// A ReLU behind the norm, fused into its passes (dfp.nn.BatchNorm2d's relu): the forward
// writes max(y, 0) at once, and the backward gates dy where the forward's output was <= 0,
// as torch's threshold_backward does (so a NaN output lets dy through). That output is
// recomputed from x, by the forward's own float operations (-ffp-contract=off: the same
// bits), with the forward's scale and shift; or, where the forward added a residual
// before the ReLU, read from the saved output. All null: no gate.
template <typename T>
struct ReluGate {
  const float* scale = nullptr;
  const float* shift = nullptr;
  const T* out = nullptr;
};

// The norm in training on its batch statistics (mean and biased variance, double): out =
// (x - mean) * scale + shift per channel, + residual where not null, then max(., 0) where
// relu (NaN stays NaN), in one pass, x centred first (x * a + b with b holding mean * a
// would cancel where the mean is large against the spread; a bfloat16 out is the float
// result rounded to nearest even). The per channel vectors in double, as torch's ops
// made them (the same bits): mean32 = float(mean), invstd = 1 / sqrt(variance + eps),
// scale = float(invstd * weight) (invstd without a weight), shift = bias (0 without).
// One call each way, not twenty torch ops of a few channels on the calling thread while
// the other threads wait (80 us less per norm and step, AMD Zen 3).
template <typename T>
void batch_norm_train_forward(const T* x, const double* mean, const double* variance, double eps,
                              const float* weight, const float* bias, const T* residual, bool relu, int64_t rows,
                              int64_t channels, T* out, float* mean32, double* invstd, float* scale, float* shift,
                              int nthreads);
// Its backward from dy, in one call: the per channel sums of g and of g * (x - mean), g =
// dy gated where `gate` asks (where it reads the forward's output, g is written to
// gated_dy, a residual's gradient, and differentiated ungated from there), then dx (null:
// not asked) = (x - mean) * x_scale + g * dy_scale + shift in one pass, with gain = invstd
// * weight (invstd without a weight): x_scale = float(-invstd^2 * (sum(g * (x - mean)) /
// rows) * gain), dy_scale = float(gain), shift = float(-sum(g) / rows * gain); and the
// weight's and bias's gradients float(sum(g * (x - mean)) * invstd) and float(sum(g))
// (each null: not asked).
template <typename T>
void batch_norm_train_backward(const T* dy, const T* x, const float* mean32, const double* invstd,
                               const float* weight, const ReluGate<T>& gate, int64_t rows, int64_t channels, T* dx,
                               float* grad_weight, float* grad_bias, T* gated_dy, int nthreads);

// batch_norm_train_backward but its pass over dx: the sums, the weight's and bias's
// gradients (each null: not asked), gated_dy where `gate` reads the output, and what dx
// needs per channel: x_scale, dy_scale and shift (float32).
template <typename T>
void batch_norm_backward_scales(const T* dy, const T* x, const float* mean32, const double* invstd,
                                const float* weight, const ReluGate<T>& gate, int64_t rows, int64_t channels,
                                float* x_scale, float* dy_scale, float* shift, float* grad_weight, float* grad_bias,
                                T* gated_dy, int nthreads);

// A norm's input gradient, not written: dx = (x - mean) * x_scale + g * dy_scale + shift
// per channel, g = dy gated where `gate` recomputes the forward's output (where the gate
// read the output, dy is the gated dy already and `gate` none), float32, rows x channels:
// the bits of batch_norm_train_backward's dx. The convolution before the norm makes it a
// block of rows at a time as its quantization reads them (conv_backward, layer.h),
// instead of the norm writing dx to memory and the convolution reading it back.
struct NormInputGradient {
  const float *x, *dy, *mean, *x_scale, *dy_scale, *shift;
  ReluGate<float> gate;
  int64_t channels;
  // dx's rows [r0, r1) into out ((r1 - r0) x channels)
  void rows(int64_t r0, int64_t r1, float* out) const;
};

}  // namespace dfp
