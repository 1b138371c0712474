#include "batch_norm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "threads.h"

namespace dfp {
namespace {

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

inline float widen(float v) { return v; }
inline float widen(BFloat16 v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rounding to nearest even, as torch's bfloat16 does. A NaN whose payload lies in the low
// half would come out as Inf, so NaN is written as torch's quiet NaN.
template <typename T>
T narrow(float v);
template <>
inline float narrow<float>(float v) {
  return v;
}
template <>
inline BFloat16 narrow<BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return {uint16_t(v != v ? 0x7fc0u : rounded)};
}

// The sums run over channels in chunks of W = 16, 8, 4 and 1 whose width the compiler
// knows, so that a chunk is a vector kept in registers over all rows of a block (read once
// per chunk, from L1 or L2): summed in memory, each row waited on the
// previous row's store. Even and odd rows are summed apart and then added, so that two
// additions are in flight. Arguments by value and unaliased pointers: read through
// references (-fno-strict-aliasing) the channel count could change with every store, and
// no loop was vectorized.
template <int W, typename T>
void add_chunk(const T* __restrict x, int64_t rows, int64_t channels, float* __restrict sums) {
  float even[W] = {}, odd[W] = {};
  int64_t r = 0;
  for (; r + 1 < rows; r += 2)
    for (int c = 0; c < W; ++c) {
      even[c] += widen(x[r * channels + c]);
      odd[c] += widen(x[(r + 1) * channels + c]);
    }
  if (r < rows)
    for (int c = 0; c < W; ++c) even[c] += widen(x[r * channels + c]);
  for (int c = 0; c < W; ++c) sums[c] += even[c] + odd[c];
}

template <int W, typename T>
void add_squared_chunk(const T* __restrict x, int64_t rows, int64_t channels, const float* __restrict mean,
                       float* __restrict sums) {
  float even[W] = {}, odd[W] = {}, m[W];
  for (int c = 0; c < W; ++c) m[c] = mean[c];
  int64_t r = 0;
  for (; r + 1 < rows; r += 2)
    for (int c = 0; c < W; ++c) {
      const float d0 = widen(x[r * channels + c]) - m[c], d1 = widen(x[(r + 1) * channels + c]) - m[c];
      even[c] += d0 * d0;
      odd[c] += d1 * d1;
    }
  if (r < rows)
    for (int c = 0; c < W; ++c) {
      const float d = widen(x[r * channels + c]) - m[c];
      even[c] += d * d;
    }
  for (int c = 0; c < W; ++c) sums[c] += even[c] + odd[c];
}

// Calls chunk<W>(c0) over [0, channels) in chunks of 16, then 8, 4 and 1.
template <typename Chunk>
void over_chunks(int64_t channels, Chunk chunk) {
  int64_t c0 = 0;
  for (; c0 + 16 <= channels; c0 += 16) chunk(std::integral_constant<int, 16>{}, c0);
  if (c0 + 8 <= channels) chunk(std::integral_constant<int, 8>{}, c0), c0 += 8;
  if (c0 + 4 <= channels) chunk(std::integral_constant<int, 4>{}, c0), c0 += 4;
  for (; c0 < channels; ++c0) chunk(std::integral_constant<int, 1>{}, c0);
}

template <typename T>
void add_rows(const T* x, int64_t rows, int64_t channels, float* sums) {
  over_chunks(channels, [=](auto w, int64_t c0) { add_chunk<w()>(x + c0, rows, channels, sums + c0); });
}

template <typename T>
void add_squared_deviations(const T* x, int64_t rows, int64_t channels, const float* mean, float* sums) {
  over_chunks(channels,
              [=](auto w, int64_t c0) { add_squared_chunk<w()>(x + c0, rows, channels, mean + c0, sums + c0); });
}

// Which ReLU gate a backward pass applies (ReluGate): none, recomputed from x, or read.
enum class Gate { kNone, kRecomputed, kRead };

// dy where the forward's output at this element was not <= 0, else 0. centred is x - mean.
template <Gate G, typename T>
inline float gated(float dy, float centred, const ReluGate<T>& gate, int64_t r, int64_t c, int64_t channels) {
  if constexpr (G == Gate::kNone) return dy;
  float out;
  if constexpr (G == Gate::kRecomputed)
    out = widen(narrow<T>(centred * gate.scale[c] + gate.shift[c]));  // the forward's value, as stored
  else
    out = widen(gate.out[r * channels + c]);
  return out <= 0.0f ? 0.0f : dy;
}

// Calls body with the gate's kind as a compile-time constant: each kind's loops are
// compiled apart, free of its tests.
template <typename T, typename Body>
void with_gate(const ReluGate<T>& gate, Body body) {
  if (gate.out)
    body(std::integral_constant<Gate, Gate::kRead>{});
  else if (gate.scale)
    body(std::integral_constant<Gate, Gate::kRecomputed>{});
  else
    body(std::integral_constant<Gate, Gate::kNone>{});
}

template <Gate G, typename T>
void add_gradient_rows(const T* __restrict dy, const T* __restrict x, int64_t r0, int64_t r1, int64_t channels,
                       const float* __restrict mean, const ReluGate<T> gate, float* __restrict sums_dy,
                       float* __restrict sums_centered, T* __restrict gated_dy) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < channels; ++c) {
      const float centred = widen(x[r * channels + c]) - mean[c];
      const float g = gated<G>(widen(dy[r * channels + c]), centred, gate, r, c, channels);
      if (gated_dy) gated_dy[r * channels + c] = narrow<T>(g);
      sums_dy[c] += g;
      sums_centered[c] += g * centred;
    }
}

template <bool kResidual, bool kRelu, typename T>
void forward_rows(const T* __restrict x, const float* __restrict mean, const float* __restrict scale,
                  const float* __restrict shift, const T* __restrict residual, int64_t r0, int64_t r1,
                  int64_t channels, T* __restrict out) {
  for (int64_t i = r0 * channels; i < r1 * channels; i += channels)
    for (int64_t c = 0; c < channels; ++c) {
      float v = (widen(x[i + c]) - mean[c]) * scale[c] + shift[c];
      if constexpr (kResidual) v += widen(residual[i + c]);
      if constexpr (kRelu) v = v < 0.0f ? 0.0f : v;
      out[i + c] = narrow<T>(v);
    }
}

template <Gate G, typename T>
void input_gradient_rows(const T* __restrict x, const float* __restrict mean, const float* __restrict x_scale,
                         const T* __restrict dy, const float* __restrict dy_scale, const float* __restrict shift,
                         const ReluGate<T> gate, int64_t r0, int64_t r1, int64_t channels, T* __restrict dx) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < channels; ++c) {
      const float centred = widen(x[r * channels + c]) - mean[c];
      const float g = gated<G>(widen(dy[r * channels + c]), centred, gate, r, c, channels);
      dx[r * channels + c] = narrow<T>(centred * x_scale[c] + g * dy_scale[c] + shift[c]);
    }
}

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
  for (int64_t i = 0; i < count; ++i) {
    const T* image = x + (first + i) * blocks.pixels * channels;
    for (int64_t b = 0; b < blocks.per_image; ++b) {
      const int64_t r0 = b * blocks.rows_per_block, rows = std::min(blocks.pixels, r0 + blocks.rows_per_block) - r0;
      float* s = mean + (i * blocks.per_image + b) * channels;
      add_rows(image + r0 * channels, rows, channels, s);
      for (int64_t c = 0; c < channels; ++c) s[c] /= float(rows);
      add_squared_deviations(image + r0 * channels, rows, channels, s, m2 + (i * blocks.per_image + b) * channels);
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
  with_gate(gate, [&](auto kind) {
    parallel_for(tasks.count, nthreads, [&](int64_t t) {
      const int64_t r0 = t * tasks.rows_per_task, r1 = std::min(rows, r0 + tasks.rows_per_task);
      OwnLines<float> block_dy(channels), block_centered(channels);
      OwnLines<double> sums_dy(channels), sums_centered(channels);
      float *s = block_dy.data(), *p = block_centered.data();
      for (int64_t b0 = r0; b0 < r1; b0 += tasks.rows_per_block) {
        std::fill_n(s, channels, 0.0f);
        std::fill_n(p, channels, 0.0f);
        add_gradient_rows<kind()>(dy, x, b0, std::min(r1, b0 + tasks.rows_per_block), channels, mean, gate, s, p,
                                  gated_dy);
        for (int64_t c = 0; c < channels; ++c) {
          sums_dy.data()[c] += s[c];
          sums_centered.data()[c] += p[c];
        }
      }
      std::copy_n(sums_dy.data(), channels, task_dy.data() + t * channels);
      std::copy_n(sums_centered.data(), channels, task_centered.data() + t * channels);
    });
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
  for_row_chunks(rows, channels, nthreads, [&](int64_t r0, int64_t r1) {
    if (residual)
      relu ? forward_rows<true, true>(x, mean, scale, shift, residual, r0, r1, channels, out)
           : forward_rows<true, false>(x, mean, scale, shift, residual, r0, r1, channels, out);
    else
      relu ? forward_rows<false, true>(x, mean, scale, shift, residual, r0, r1, channels, out)
           : forward_rows<false, false>(x, mean, scale, shift, residual, r0, r1, channels, out);
  });
}

// dx = (x - mean) * x_scale + g * dy_scale + shift per channel, g = dy gated by `gate`.
template <typename T>
void batch_norm_input_gradient(const T* x, const float* mean, const float* x_scale, const T* dy,
                               const float* dy_scale, const float* shift, const ReluGate<T>& gate, int64_t rows,
                               int64_t channels, T* dx, int nthreads) {
  with_gate(gate, [&](auto kind) {
    for_row_chunks(rows, channels, nthreads, [&](int64_t r0, int64_t r1) {
      input_gradient_rows<kind()>(x, mean, x_scale, dy, dy_scale, shift, gate, r0, r1, channels, dx);
    });
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
void batch_norm_train_backward(const T* dy, const T* x, const float* mean32, const double* invstd,
                               const float* weight, const ReluGate<T>& gate, int64_t rows, int64_t channels, T* dx,
                               float* grad_weight, float* grad_bias, T* gated_dy, int nthreads) {
  std::vector<double> sum_dy(channels), sum_centered(channels);
  const bool gated_once = gate.out != nullptr;  // g written by the sums, read ungated by dx's pass
  batch_norm_gradient_sums(dy, x, mean32, gate, rows, channels, sum_dy.data(), sum_centered.data(),
                           gated_once ? gated_dy : nullptr, nthreads);
  if (dx) {
    std::vector<float> x_scale(channels), dy_scale(channels), shift(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const double gain = weight ? invstd[c] * double(weight[c]) : invstd[c];
      x_scale[c] = float(-(invstd[c] * invstd[c]) * (sum_centered[c] / double(rows)) * gain);
      dy_scale[c] = float(gain);
      shift[c] = float(-sum_dy[c] / double(rows) * gain);
    }
    batch_norm_input_gradient(x, mean32, x_scale.data(), gated_once ? gated_dy : dy, dy_scale.data(), shift.data(),
                              gated_once ? ReluGate<T>{} : gate, rows, channels, dx, nthreads);
  }
  for (int64_t c = 0; c < channels; ++c) {
    if (grad_weight) grad_weight[c] = float(sum_centered[c] * invstd[c]);
    if (grad_bias) grad_bias[c] = float(sum_dy[c]);
  }
}

#define DFP_BATCH_NORM_FOR(T)                                                                                  \
  template void block_moments(const T*, int64_t, int64_t, int64_t, const MomentBlocks&, float*, float*);            \
  template void batch_norm_statistics(const T*, int64_t, int64_t, int64_t, double*, double*, int);                  \
  template void batch_norm_train_forward(const T*, const double*, const double*, double, const float*,             \
                                         const float*, const T*, bool, int64_t, int64_t, T*, float*, double*,      \
                                         float*, float*, int);                                                     \
  template void batch_norm_train_backward(const T*, const T*, const float*, const double*, const float*,           \
                                          const ReluGate<T>&, int64_t, int64_t, T*, float*, float*, T*, int);
DFP_BATCH_NORM_FOR(float)
DFP_BATCH_NORM_FOR(BFloat16)
#undef DFP_BATCH_NORM_FOR

}  // namespace dfp
