#include "batch_norm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "threads.h"

namespace dfp {
namespace {

// Fixed task and block sizes, whatever the thread count: the sums, and so the bits, do
// not depend on it. A block (at most 16 KB) is read twice from L1 for its squared
// deviations, and its float sums run over at most 256 values; a task is enough work to
// hand to a thread.
constexpr int64_t kBlockElements = 4096, kMaxBlockRows = 256, kTaskElements = 1 << 16;

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

// The loops over a block's rows, on arguments by value and unaliased pointers: read
// through the lambdas' references (-fno-strict-aliasing) the channel count could change
// with every store, and no loop was vectorized.
template <typename T>
void add_rows(const T* __restrict x, int64_t rows, int64_t channels, float* __restrict sums) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c) sums[c] += widen(x[r * channels + c]);
}

template <typename T>
void add_squared_deviations(const T* __restrict x, int64_t rows, int64_t channels,
                            const float* __restrict mean, float* __restrict sums) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c) {
      const float d = widen(x[r * channels + c]) - mean[c];
      sums[c] += d * d;
    }
}

template <typename T>
void add_gradient_rows(const T* __restrict dy, const T* __restrict x, int64_t rows, int64_t channels,
                       const float* __restrict mean, float* __restrict sums_dy, float* __restrict sums_centered) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c) {
      const float g = widen(dy[r * channels + c]);
      sums_dy[c] += g;
      sums_centered[c] += g * (widen(x[r * channels + c]) - mean[c]);
    }
}

template <typename T>
void affine_rows(const T* __restrict x, const float* __restrict mean, const float* __restrict x_scale,
                 const T* __restrict dy, const float* __restrict dy_scale, const float* __restrict shift,
                 int64_t rows, int64_t channels, T* __restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * channels;
    T* o = out + r * channels;
    if (dy) {
      const T* g = dy + r * channels;
      for (int64_t c = 0; c < channels; ++c)
        o[c] = narrow<T>((widen(xr[c]) - mean[c]) * x_scale[c] + widen(g[c]) * dy_scale[c] + shift[c]);
    } else {
      for (int64_t c = 0; c < channels; ++c) o[c] = narrow<T>((widen(xr[c]) - mean[c]) * x_scale[c] + shift[c]);
    }
  }
}

// Chan et al.'s pairwise update: a part of nb rows, its per-channel means and sums of
// squared deviations, joined to those of the n rows before it.
template <typename T>
void join(double n, double nb, const T* part_mean, const T* part_m2, int64_t channels, double* mean, double* m2) {
  const double total = n + nb;
  for (int64_t c = 0; c < channels; ++c) {
    const double delta = double(part_mean[c]) - mean[c];
    mean[c] += delta * nb / total;
    m2[c] += double(part_m2[c]) + delta * delta * n * nb / total;
  }
}

}  // namespace

template <typename T>
void batch_norm_statistics(const T* x, int64_t rows, int64_t channels, double* mean, double* variance,
                           int nthreads) {
  const Tasks tasks(rows, channels);
  // each task's count, mean and sum of squared deviations, combined in order below
  std::vector<double> task_mean(tasks.count * channels), task_m2(tasks.count * channels);
  parallel_for(tasks.count, nthreads, [&](int64_t t) {
    const int64_t r0 = t * tasks.rows_per_task, r1 = std::min(rows, r0 + tasks.rows_per_task);
    OwnLines<float> sums(channels), squares(channels), block_mean(channels);
    OwnLines<double> m(channels), m2(channels);
    float *s = sums.data(), *q = squares.data(), *bm = block_mean.data();
    double n = 0;
    for (int64_t b0 = r0; b0 < r1; b0 += tasks.rows_per_block) {
      const int64_t b1 = std::min(r1, b0 + tasks.rows_per_block);
      std::fill_n(s, channels, 0.0f);
      std::fill_n(q, channels, 0.0f);
      add_rows(x + b0 * channels, b1 - b0, channels, s);
      const float count = float(b1 - b0);
      for (int64_t c = 0; c < channels; ++c) bm[c] = s[c] / count;
      add_squared_deviations(x + b0 * channels, b1 - b0, channels, bm, q);
      join(n, double(count), bm, q, channels, m.data(), m2.data());
      n += double(count);
    }
    std::copy_n(m.data(), channels, task_mean.data() + t * channels);
    std::copy_n(m2.data(), channels, task_m2.data() + t * channels);
  });
  std::fill_n(mean, channels, 0.0);
  std::vector<double> m2(channels, 0.0);
  for (int64_t t = 0; t < tasks.count; ++t) {
    const double n = double(t * tasks.rows_per_task), nb = double(std::min(rows, (t + 1) * tasks.rows_per_task)) - n;
    join(n, nb, task_mean.data() + t * channels, task_m2.data() + t * channels, channels, mean, m2.data());
  }
  for (int64_t c = 0; c < channels; ++c) variance[c] = rows > 0 ? m2[c] / double(rows) : 0.0;
}

template <typename T>
void batch_norm_gradient_sums(const T* dy, const T* x, const float* mean, int64_t rows, int64_t channels,
                              double* sum_dy, double* sum_dy_centered, int nthreads) {
  const Tasks tasks(rows, channels);
  std::vector<double> task_dy(tasks.count * channels), task_centered(tasks.count * channels);
  parallel_for(tasks.count, nthreads, [&](int64_t t) {
    const int64_t r0 = t * tasks.rows_per_task, r1 = std::min(rows, r0 + tasks.rows_per_task);
    OwnLines<float> block_dy(channels), block_centered(channels);
    OwnLines<double> sums_dy(channels), sums_centered(channels);
    float *s = block_dy.data(), *p = block_centered.data();
    for (int64_t b0 = r0; b0 < r1; b0 += tasks.rows_per_block) {
      const int64_t b1 = std::min(r1, b0 + tasks.rows_per_block);
      std::fill_n(s, channels, 0.0f);
      std::fill_n(p, channels, 0.0f);
      add_gradient_rows(dy + b0 * channels, x + b0 * channels, b1 - b0, channels, mean, s, p);
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

template <typename T>
void batch_norm_affine(const T* x, const float* mean, const float* x_scale, const T* dy, const float* dy_scale,
                       const float* shift, int64_t rows, int64_t channels, T* out, int nthreads) {
  for_row_chunks(rows, channels, nthreads, [&](int64_t r0, int64_t r1) {
    affine_rows(x + r0 * channels, mean, x_scale, dy ? dy + r0 * channels : nullptr, dy_scale, shift, r1 - r0,
                channels, out + r0 * channels);
  });
}

#define DFP_BATCH_NORM_FOR(T)                                                                                \
  template void batch_norm_statistics(const T*, int64_t, int64_t, double*, double*, int);                         \
  template void batch_norm_gradient_sums(const T*, const T*, const float*, int64_t, int64_t, double*, double*, int); \
  template void batch_norm_affine(const T*, const float*, const float*, const T*, const float*, const float*,      \
                                  int64_t, int64_t, T*, int);
DFP_BATCH_NORM_FOR(float)
DFP_BATCH_NORM_FOR(BFloat16)
#undef DFP_BATCH_NORM_FOR

}  // namespace dfp
