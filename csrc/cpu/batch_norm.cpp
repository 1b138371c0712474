#include "batch_norm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batch_norm_rows.h"
#include "isa.h"
#include "threads.h"

namespace dfp {

const BatchNormKernels batch_norm_portable = batch_norm_here();

namespace {

// The loops of the build for the instruction set that runs (batch_norm_rows.h).
template <typename T>
const BatchNormRows<T>& rows_of() {
  const Isa isa = active_isa();
  const BatchNormKernels* k = &batch_norm_portable;
#ifdef DFP_X86_KERNELS
  if (isa == Isa::avx512bw || isa == Isa::avx512_vnni) k = &batch_norm_avx512bw;
  if (isa == Isa::avx2) k = &batch_norm_avx2;
#endif
  if constexpr (std::is_same_v<T, float>)
    return k->f32;
  else
    return k->bf16;
}

// Fixed task and block sizes, whatever the thread count: the sums, and so the bits, do
// not depend on it. A block of the backward's sums (at most 16 KB) stays in L1; one of the
// statistics (at most 64 KB) is read twice, for its sum and its squared deviations, from
// L1 or L2, and larger blocks there mean fewer joins in double (a wide layer's blocks of a
// few rows spent more on joining than on summing). Float sums run over at most 256
// values; a task is enough work to hand to a thread.
constexpr int64_t kBlockElements = 4096, kMomentBlockElements = 1 << 14, kMaxBlockRows = 256;
constexpr int64_t kTaskElements = 1 << 16;

// n values on cache lines of their own, zeroed: no other thread's data shares a line.
template <typename T>
class OwnLines {
 public:
  explicit OwnLines(int64_t n) : lines_((n * int64_t(sizeof(T)) + 63) / 64) {}
  T* data() { return reinterpret_cast<T*>(lines_.data()); }

 private:
  struct alignas(64) Line {
    unsigned char bytes[64];
  };
  std::vector<Line> lines_;
};

struct Tasks {
  int64_t rows_per_block, blocks_per_task, rows_per_task, count;
  Tasks(int64_t rows, int64_t channels) {
    rows_per_block = std::clamp<int64_t>(kBlockElements / std::max<int64_t>(channels, 1), 1, kMaxBlockRows);
    blocks_per_task = std::max<int64_t>(1, kTaskElements / (rows_per_block * std::max<int64_t>(channels, 1)));
    rows_per_task = rows_per_block * blocks_per_task;
    count = (rows + rows_per_task - 1) / rows_per_task;
  }
};

// Chan et al.'s pairwise update: a part of nb rows, its per-channel means and sums of
// squared deviations, joined to those of the n rows before it.
template <typename T>
void join(double n, double nb, const T* __restrict part_mean, const T* __restrict part_m2, int64_t channels,
          double* __restrict mean, double* __restrict m2) {
  const double share = nb / (n + nb), weight = n * share;  // once per part: a division per channel was its cost
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = double(part_mean[c]) - mean[c];
    mean[c] += delta * share;
    m2[c] += double(part_m2[c]) + delta * delta * weight;
  }
}

}  // namespace

MomentBlocks::MomentBlocks(int64_t pixels, int64_t channels) : pixels(pixels) {
  rows_per_block = std::clamp<int64_t>(kMomentBlockElements / std::max<int64_t>(channels, 1), 1, kMaxBlockRows);
  per_image = (pixels + rows_per_block - 1) / rows_per_block;
}

template <typename T>
void block_moments(const T* x, int64_t first, int64_t count, int64_t channels, const MomentBlocks& blocks,
                   float* mean, float* m2) {
  // each chunk's sums stay in registers (add_chunk), so a block's land in the outputs once
  std::fill_n(mean, count * blocks.per_image * channels, 0.0f);
  std::fill_n(m2, count * blocks.per_image * channels, 0.0f);
  const BatchNormRows<T>& k = rows_of<T>();
  for (int64_t i = 0; i < count; ++i) {
    const T* image = x + (first + i) * blocks.pixels * channels;
    for (int64_t b = 0; b < blocks.per_image; ++b) {
      const int64_t r0 = b * blocks.rows_per_block, rows = std::min(blocks.pixels, r0 + blocks.rows_per_block) - r0;
      const int64_t at = (i * blocks.per_image + b) * channels;
      k.moments(image + r0 * channels, rows, channels, mean + at, m2 + at);
    }
  }
}

void join_block_moments(const float* mean, const float* m2, int64_t images, int64_t channels,
                        const MomentBlocks& blocks, double* batch_mean, double* batch_variance) {
  std::fill_n(batch_mean, channels, 0.0);
  std::vector<double> batch_m2(channels, 0.0), image_mean(channels), image_m2(channels);
  for (int64_t i = 0; i < images; ++i) {
    std::fill(image_mean.begin(), image_mean.end(), 0.0);
    std::fill(image_m2.begin(), image_m2.end(), 0.0);
    for (int64_t b = 0; b < blocks.per_image; ++b) {
      const int64_t r0 = b * blocks.rows_per_block, rows = std::min(blocks.pixels, r0 + blocks.rows_per_block) - r0;
      const int64_t at = (i * blocks.per_image + b) * channels;
      join(double(r0), double(rows), mean + at, m2 + at, channels, image_mean.data(), image_m2.data());
    }
    join(double(i * blocks.pixels), double(blocks.pixels), image_mean.data(), image_m2.data(), channels,
         batch_mean, batch_m2.data());
  }
  const double rows = double(images * blocks.pixels);
  for (int64_t c = 0; c < channels; ++c) batch_variance[c] = rows > 0 ? batch_m2[c] / rows : 0.0;
}

template <typename T>
void batch_norm_statistics(const T* x, int64_t images, int64_t pixels, int64_t channels, double* mean,
                           double* variance, int nthreads) {
  const MomentBlocks blocks(pixels, channels);
  // tasks of whole images (one image runs on one thread)
  std::vector<float> block_mean(images * blocks.per_image * channels), block_m2(block_mean.size());
  const int64_t per_task = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(pixels * channels, 1));
  parallel_for((images + per_task - 1) / per_task, nthreads, [&](int64_t t) {
    const int64_t first = t * per_task, count = std::min(images, first + per_task) - first;
    const int64_t at = first * blocks.per_image * channels;
    block_moments(x, first, count, channels, blocks, block_mean.data() + at, block_m2.data() + at);
  });
  join_block_moments(block_mean.data(), block_m2.data(), images, channels, blocks, mean, variance);
}

namespace {

// Per channel sums of g and of g * (x - mean), g = dy gated by `gate`; g is written to
// gated_dy where that is not null.
template <typename T>
void batch_norm_gradient_sums(const T* dy, const T* x, const float* mean, const ReluGate<T>& gate, int64_t rows,
                              int64_t channels, double* sum_dy, double* sum_dy_centered, T* gated_dy,
                              int nthreads) {
  const Tasks tasks(rows, channels);
  std::vector<double> task_dy(tasks.count * channels), task_centered(tasks.count * channels);
  const BatchNormRows<T>& k = rows_of<T>();
  parallel_for(tasks.count, nthreads, [&](int64_t t) {
    const int64_t r0 = t * tasks.rows_per_task, r1 = std::min(rows, r0 + tasks.rows_per_task);
    OwnLines<float> block_dy(channels), block_centered(channels);
    OwnLines<double> sums_dy(channels), sums_centered(channels);
    float *s = block_dy.data(), *p = block_centered.data();
    for (int64_t b0 = r0; b0 < r1; b0 += tasks.rows_per_block) {
      std::fill_n(s, channels, 0.0f);
      std::fill_n(p, channels, 0.0f);
      k.gradient_sums(dy, x, b0, std::min(r1, b0 + tasks.rows_per_block), channels, mean, gate, s, p, gated_dy);
      for (int64_t c = 0; c < channels; ++c) {
        sums_dy.data()[c] += s[c];
        sums_centered.data()[c] += p[c];
      }
    }
    std::copy_n(sums_dy.data(), channels, task_dy.data() + t * channels);
    std::copy_n(sums_centered.data(), channels, task_centered.data() + t * channels);
  });
  std::fill_n(sum_dy, channels, 0.0);
  std::fill_n(sum_dy_centered, channels, 0.0);
  for (int64_t t = 0; t < tasks.count; ++t)
    for (int64_t c = 0; c < channels; ++c) {
      sum_dy[c] += task_dy[t * channels + c];
      sum_dy_centered[c] += task_centered[t * channels + c];
    }
}

// out = (x - mean) * scale + shift per channel, + residual where not null, then max(., 0)
// where relu.
template <typename T>
void batch_norm_forward(const T* x, const float* mean, const float* scale, const float* shift, const T* residual,
                        bool relu, int64_t rows, int64_t channels, T* out, int nthreads) {
  const BatchNormRows<T>& k = rows_of<T>();
  for_row_chunks(rows, channels, nthreads, [&](int64_t r0, int64_t r1) {
    k.forward(x, mean, scale, shift, residual, relu, r0, r1, channels, out);
  });
}

// dx = (x - mean) * x_scale + g * dy_scale + shift per channel, g = dy gated by `gate`.
template <typename T>
void batch_norm_input_gradient(const T* x, const float* mean, const float* x_scale, const T* dy,
                               const float* dy_scale, const float* shift, const ReluGate<T>& gate, int64_t rows,
                               int64_t channels, T* dx, int nthreads) {
  const BatchNormRows<T>& k = rows_of<T>();
  for_row_chunks(rows, channels, nthreads, [&](int64_t r0, int64_t r1) {
    k.input_gradient(x, mean, x_scale, dy, dy_scale, shift, gate, r0, r1, channels, dx, 0);
  });
}

}  // namespace

template <typename T>
void batch_norm_train_forward(const T* x, const double* mean, const double* variance, double eps,
                              const float* weight, const float* bias, const T* residual, bool relu, int64_t rows,
                              int64_t channels, T* out, float* mean32, double* invstd, float* scale, float* shift,
                              int nthreads) {
  for (int64_t c = 0; c < channels; ++c) {
    mean32[c] = float(mean[c]);
    invstd[c] = 1.0 / std::sqrt(variance[c] + eps);
    scale[c] = float(weight ? invstd[c] * double(weight[c]) : invstd[c]);
    shift[c] = bias ? bias[c] : 0.0f;
  }
  batch_norm_forward(x, mean32, scale, shift, residual, relu, rows, channels, out, nthreads);
}

template <typename T>
void batch_norm_backward_scales(const T* dy, const T* x, const float* mean32, const double* invstd,
                                const float* weight, const ReluGate<T>& gate, int64_t rows, int64_t channels,
                                float* x_scale, float* dy_scale, float* shift, float* grad_weight, float* grad_bias,
                                T* gated_dy, int nthreads) {
  std::vector<double> sum_dy(channels), sum_centered(channels);
  batch_norm_gradient_sums(dy, x, mean32, gate, rows, channels, sum_dy.data(), sum_centered.data(),
                           gate.out ? gated_dy : nullptr, nthreads);
  for (int64_t c = 0; c < channels; ++c) {
    const double gain = weight ? invstd[c] * double(weight[c]) : invstd[c];
    x_scale[c] = float(-(invstd[c] * invstd[c]) * (sum_centered[c] / double(rows)) * gain);
    dy_scale[c] = float(gain);
    shift[c] = float(-sum_dy[c] / double(rows) * gain);
    if (grad_weight) grad_weight[c] = float(sum_centered[c] * invstd[c]);
    if (grad_bias) grad_bias[c] = float(sum_dy[c]);
  }
}

template <typename T>
void batch_norm_train_backward(const T* dy, const T* x, const float* mean32, const double* invstd,
                               const float* weight, const ReluGate<T>& gate, int64_t rows, int64_t channels, T* dx,
                               float* grad_weight, float* grad_bias, T* gated_dy, int nthreads) {
  std::vector<float> x_scale(channels), dy_scale(channels), shift(channels);
  batch_norm_backward_scales(dy, x, mean32, invstd, weight, gate, rows, channels, x_scale.data(), dy_scale.data(),
                             shift.data(), grad_weight, grad_bias, gated_dy, nthreads);
  const bool gated_once = gate.out != nullptr;  // g written by the sums, read ungated by dx's pass
  if (dx)
    batch_norm_input_gradient(x, mean32, x_scale.data(), gated_once ? gated_dy : dy, dy_scale.data(), shift.data(),
                              gated_once ? ReluGate<T>{} : gate, rows, channels, dx, nthreads);
}

void NormInputGradient::rows(int64_t r0, int64_t r1, float* out) const {
  // asks for the next rows as it goes: called a block at a time between other work, the
  // reads from memory stalled where the norm's own pass streamed
  rows_of<float>().input_gradient(x + r0 * channels, mean, x_scale, dy + r0 * channels, dy_scale, shift, gate, 0,
                                  r1 - r0, channels, out, r1 - r0);
}

#define DFP_BATCH_NORM_FOR(T)                                                                                  \
  template void block_moments(const T*, int64_t, int64_t, int64_t, const MomentBlocks&, float*, float*);            \
  template void batch_norm_statistics(const T*, int64_t, int64_t, int64_t, double*, double*, int);                  \
  template void batch_norm_train_forward(const T*, const double*, const double*, double, const float*,             \
                                         const float*, const T*, bool, int64_t, int64_t, T*, float*, double*,      \
                                         float*, float*, int);                                                     \
  template void batch_norm_train_backward(const T*, const T*, const float*, const double*, const float*,           \
                                          const ReluGate<T>&, int64_t, int64_t, T*, float*, float*, T*, int);      \
  template void batch_norm_backward_scales(const T*, const T*, const float*, const double*, const float*,          \
                                           const ReluGate<T>&, int64_t, int64_t, float*, float*, float*, float*,   \
                                           float*, T*, int);
DFP_BATCH_NORM_FOR(float)
DFP_BATCH_NORM_FOR(BFloat16)
#undef DFP_BATCH_NORM_FOR

}  // namespace dfp
