// Per-ISA building blocks of quantization: contiguous runs, no temporaries.
#pragma once
#include <cstdint>

#include "isa.h"
#include "numerics.h"

namespace dfp {

struct RoundingArgs {
  float limit;          // the largest mantissa, as float
  Rounding rounding;
  uint64_t index0;      // flat index of the run's first element (stochastic, dithered rounding)
  uint32_t k0, k1;      // the seed's halves
  // Elements from x[i] to the x that the next pass reads, asked into the L2 cache as
  // x[i] is read (0: nothing asked), so that its first read from memory overlaps this
  // pass's work.
  int64_t read_ahead = 0;
  // No rounding takes an element past the limit: its exponent came from a maximum over
  // it, below the top of fp32's range (`clamp_never_acts`). The kernels may then leave
  // out the clamp (or ignore this).
  bool within_limit = false;
};

// The line at x + ahead asked into the L2 cache (where ahead != 0): one per 16 floats
// read, spread over the loop; asked in bursts, the requests stalled the passes that
// issued them.
static inline void read_ahead(const float* x, int64_t ahead) {
  if (ahead) __builtin_prefetch(x + ahead, 0, 2);
}

struct QuantizeKernels {
  // max over the run of the bit pattern of |x|: >= kNonFiniteBits means NaN/Inf
  uint32_t (*absmax)(const float* x, int64_t n);
  // acc[i] = max(acc[i], bits of |x[i]|)
  void (*absmax_into)(const float* x, uint32_t* acc, int64_t n);
  // q[i] = quantize(x[i] * s.first * s.second)
  void (*run)(const float* x, int16_t* q, int64_t n, Scale s, const RoundingArgs& r);
  // the same with a scale per element: first[i], second[i]
  void (*run_scaled)(const float* x, int16_t* q, int64_t n, const float* first, const float* second,
                     const RoundingArgs& r);
  // Runs cut into blocks of `block` (the last may be shorter), in one call: short blocks
  // would otherwise pay a call per block. out[b] / first[b], second[b] per block.
  void (*absmax_blocks)(const float* x, int64_t n, int64_t block, uint32_t* out);
  void (*run_blocks)(const float* x, int16_t* q, int64_t n, int64_t block, const float* first, const float* second,
                     const RoundingArgs& r);
  // A (rows, cols) tile with a scale per column, in one call: a call per short row (16
  // channels: 64 bytes) would cost more than the row. acc[c] = max(acc[c], |x[r, c]|);
  // q[r, c] = quantize(x[r, c] * first[c] * second[c]).
  void (*absmax_rows)(const float* x, int64_t rows, int64_t cols, uint32_t* acc);
  void (*run_rows)(const float* x, int16_t* q, int64_t rows, int64_t cols, const float* first, const float* second,
                   const RoundingArgs& r);
  // run_rows into the K-pairs of panels of `width` columns (PairPanels, quantize.h), the
  // first row pair's at `pairs` (rows 2p and 2p + 1 as K-pair p). Null, or false (nothing
  // written) for a layout it leaves to run_rows and an interleaving pass.
  bool (*run_rows_into_pairs)(const float* x, int64_t rows, int64_t cols, const float* first, const float* second,
                              const RoundingArgs& r, int32_t* pairs, int64_t width, int64_t kpairs);
};

// dst[i] = max(dst[i], src[i]): maxima as the bits of absolute values (restrict: one
// vector instruction per 16, where aliasing kept the loop scalar).
static inline void max_into(uint32_t* __restrict dst, const uint32_t* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] < src[i] ? src[i] : dst[i];
}

// The block loops, written once over a kernel set's own absmax and run (inlined).
template <uint32_t (*Absmax)(const float*, int64_t)>
void absmax_blocks_of(const float* x, int64_t n, int64_t block, uint32_t* out) {
  for (int64_t b = 0; b * block < n; ++b) out[b] = Absmax(x + b * block, n - b * block < block ? n - b * block : block);
}

template <void (*Run)(const float*, int16_t*, int64_t, Scale, const RoundingArgs&)>
void run_blocks_of(const float* x, int16_t* q, int64_t n, int64_t block, const float* first, const float* second,
                   const RoundingArgs& r) {
  RoundingArgs at = r;
  for (int64_t b = 0; b * block < n; ++b) {
    at.index0 = r.index0 + uint64_t(b * block);
    Run(x + b * block, q + b * block, n - b * block < block ? n - b * block : block, {first[b], second[b]}, at);
  }
}

// The row loops of a tile, written once over a kernel set's own absmax_into and
// run_scaled (inlined, so no call per row).
template <void (*AbsmaxInto)(const float*, uint32_t*, int64_t)>
void absmax_rows_of(const float* x, int64_t rows, int64_t cols, uint32_t* acc) {
  for (int64_t r = 0; r < rows; ++r) AbsmaxInto(x + r * cols, acc, cols);
}

template <void (*RunScaled)(const float*, int16_t*, int64_t, const float*, const float*, const RoundingArgs&)>
void run_rows_of(const float* x, int16_t* q, int64_t rows, int64_t cols, const float* first, const float* second,
                 const RoundingArgs& r) {
  RoundingArgs at = r;
  for (int64_t row = 0; row < rows; ++row) {
    at.index0 = r.index0 + uint64_t(row * cols);
    RunScaled(x + row * cols, q + row * cols, cols, first, second, at);
  }
}

// The rounding loops of the SIMD kernel sets take the rule as a template argument, so
// that a loop for the nearest rule carries nothing of the others (the flat indices), and
// a loop within the limit no clamp (RoundingArgs::within_limit). In an anonymous
// namespace: each kernel file's instances are its own, compiled with its flags.
namespace {

template <Rounding kRounding, bool kClamped>
struct Rule {
  static constexpr Rounding value = kRounding;
  static constexpr bool indexed = kRounding != Rounding::nearest;
  static constexpr bool clamped = kClamped;
};

template <bool kClamped, typename Loop>
void with_rule(Rounding rounding, Loop loop) {
  if (rounding == Rounding::nearest)
    loop(Rule<Rounding::nearest, kClamped>{});
  else if (rounding == Rounding::stochastic)
    loop(Rule<Rounding::stochastic, kClamped>{});
  else
    loop(Rule<Rounding::dithered, kClamped>{});
}

// Calls loop(Rule<...>{}) with r's rule.
template <typename Loop>
void with_rule(const RoundingArgs& r, Loop loop) {
  r.within_limit ? with_rule<false>(r.rounding, loop) : with_rule<true>(r.rounding, loop);
}

}  // namespace

extern const QuantizeKernels quantize_scalar;
extern const QuantizeKernels quantize_avx2;
extern const QuantizeKernels quantize_avx512bw;

inline const QuantizeKernels& quantize_kernels(Isa isa) {
#ifdef DFP_X86_KERNELS
  if (isa == Isa::avx512bw || isa == Isa::avx512_vnni) return quantize_avx512bw;
  if (isa == Isa::avx2) return quantize_avx2;
#endif
  return quantize_scalar;
}

}  // namespace dfp
