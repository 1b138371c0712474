// A batch norm's loops over rows of channels, compiled once per instruction set (the
// portable build in batch_norm.cpp, batch_norm_avx2.cpp, batch_norm_avx512bw.cpp) and
// picked at run time (rows_of, batch_norm.cpp): only the vectorizer's widths differ, never an
// operation or its order (-ffp-contract=off), so every build gives the same bits. The
// loops run over channels, vector lanes across them; with SSE2's four lanes the norm's
// input gradient, made a block at a time in a convolution's backward, took 12 of a
// 290 ms one-thread ResNet-20 step, with AVX-512's sixteen 9 (AMD Zen 4).
// Everything here has internal linkage and calls no std:: function: an instance compiled
// with AVX-512 must not be the one the linker keeps for the portable build.
#pragma once
#include <cstdint>
#include <type_traits>

#include "batch_norm.h"

namespace dfp {

// One build's loops for rows of element type T (float or BFloat16).
template <typename T>
struct BatchNormRows {
  // one block's float mean and sum of squared deviations per channel (mean, m2 zeroed)
  void (*moments)(const T* x, int64_t rows, int64_t channels, float* mean, float* m2);
  // rows [r0, r1): sums of g and g * (x - mean) added into sums_dy and sums_centered; g
  // written to gated_dy where not null
  void (*gradient_sums)(const T* dy, const T* x, int64_t r0, int64_t r1, int64_t channels, const float* mean,
                        const ReluGate<T>& gate, float* sums_dy, float* sums_centered, T* gated_dy);
  // rows [r0, r1) of out = (x - mean) * scale + shift, + residual (null: none), ReLU where relu
  void (*forward)(const T* x, const float* mean, const float* scale, const float* shift, const T* residual,
                  bool relu, int64_t r0, int64_t r1, int64_t channels, T* out);
  // rows [r0, r1) of dx = (x - mean) * x_scale + g * dy_scale + shift; ahead > 0: x's and
  // dy's rows that far ahead asked into the cache
  void (*input_gradient)(const T* x, const float* mean, const float* x_scale, const T* dy, const float* dy_scale,
                         const float* shift, const ReluGate<T>& gate, int64_t r0, int64_t r1, int64_t channels,
                         T* dx, int64_t ahead);
};

struct BatchNormKernels {
  BatchNormRows<float> f32;
  BatchNormRows<BFloat16> bf16;
};

extern const BatchNormKernels batch_norm_portable;
extern const BatchNormKernels batch_norm_avx2;
extern const BatchNormKernels batch_norm_avx512bw;

namespace {

inline float widen(float v) { return v; }
inline float widen(BFloat16 v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
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
  __builtin_memcpy(&bits, &v, sizeof bits);
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

// ahead > 0: x's and dy's rows that far ahead are asked into the cache, a line at a time
template <Gate G, typename T>
void input_gradient_rows(const T* __restrict x, const float* __restrict mean, const float* __restrict x_scale,
                         const T* __restrict dy, const float* __restrict dy_scale, const float* __restrict shift,
                         const ReluGate<T> gate, int64_t r0, int64_t r1, int64_t channels, T* __restrict dx,
                         int64_t ahead = 0) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; ahead && c < channels; c += kLine) {
      __builtin_prefetch(x + (r + ahead) * channels + c, 0, 2);
      __builtin_prefetch(dy + (r + ahead) * channels + c, 0, 2);
    }
    for (int64_t c = 0; c < channels; ++c) {
      const float centred = widen(x[r * channels + c]) - mean[c];
      const float g = gated<G>(widen(dy[r * channels + c]), centred, gate, r, c, channels);
      dx[r * channels + c] = narrow<T>(centred * x_scale[c] + g * dy_scale[c] + shift[c]);
    }
  }
}

template <typename T>
void moments_block(const T* x, int64_t rows, int64_t channels, float* mean, float* m2) {
  add_rows(x, rows, channels, mean);
  for (int64_t c = 0; c < channels; ++c) mean[c] /= float(rows);
  add_squared_deviations(x, rows, channels, mean, m2);
}

template <typename T>
void gradient_sums_rows(const T* dy, const T* x, int64_t r0, int64_t r1, int64_t channels, const float* mean,
                        const ReluGate<T>& gate, float* sums_dy, float* sums_centered, T* gated_dy) {
  with_gate(gate, [&](auto kind) {
    add_gradient_rows<kind()>(dy, x, r0, r1, channels, mean, gate, sums_dy, sums_centered, gated_dy);
  });
}

template <typename T>
void forward_of_rows(const T* x, const float* mean, const float* scale, const float* shift, const T* residual,
                     bool relu, int64_t r0, int64_t r1, int64_t channels, T* out) {
  if (residual)
    relu ? forward_rows<true, true>(x, mean, scale, shift, residual, r0, r1, channels, out)
         : forward_rows<true, false>(x, mean, scale, shift, residual, r0, r1, channels, out);
  else
    relu ? forward_rows<false, true>(x, mean, scale, shift, residual, r0, r1, channels, out)
         : forward_rows<false, false>(x, mean, scale, shift, residual, r0, r1, channels, out);
}

template <typename T>
void input_gradient_of_rows(const T* x, const float* mean, const float* x_scale, const T* dy, const float* dy_scale,
                            const float* shift, const ReluGate<T>& gate, int64_t r0, int64_t r1, int64_t channels,
                            T* dx, int64_t ahead) {
  with_gate(gate, [&](auto kind) {
    input_gradient_rows<kind()>(x, mean, x_scale, dy, dy_scale, shift, gate, r0, r1, channels, dx, ahead);
  });
}

template <typename T>
constexpr BatchNormRows<T> rows_here() {
  return {moments_block<T>, gradient_sums_rows<T>, forward_of_rows<T>, input_gradient_of_rows<T>};
}

// This build's loops.
constexpr BatchNormKernels batch_norm_here() { return {rows_here<float>(), rows_here<BFloat16>()}; }

}  // namespace
}  // namespace dfp
