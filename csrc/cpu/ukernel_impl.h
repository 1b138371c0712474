// The micro-kernel, written once over a small vector interface V that each ISA file
// provides (V::I int32 vector, V::F fp32 vector, `lanes` int32 lanes per vector).
// Included only by the per-ISA files; the anonymous namespace gives each file its own
// instantiation, compiled with that file's flags.
//
// Tile: MR rows x NV vectors. Per K-pair: NV loads of B, MR broadcasts from MR rows of A, MR*NV
// multiply-adds into int32 accumulators. Closing a chain converts the int32 sums to
// fp32 and adds them (times the chain's scale when K is blocked) to fp32 accumulators,
// which the last K slice of a whole tile scales and writes to C itself: a pass of the
// epilogue over the tile in memory cost a fifth of a 16-channel convolution's time.
#pragma once
#include "gemm.h"

// The tile loops must be fully unrolled so that the accumulators live in registers.
#define DFP_UNROLL _Pragma("GCC unroll 16")

namespace {

// Which chain scales a tile applies: none (K not blocked), the rows' (A's), the
// columns' (B's), or both; a side whose scales are all 1 gives none.
enum class ChainScales { none, rows, cols, both };

template <typename V, int MR, int NV>
struct TileKernel {
  static_assert(MR <= dfp::kMaxMr);

  // kStrided: the rows lie in groups of four at one common byte stride (checked by
  // `stride_of`), addressed from one base register per group: twelve row pointers, the
  // offsets, B and the loop's counters outgrow the general registers, and the spilled
  // pointers were reloaded on every K-pair.
  template <ChainScales kScales, bool kOffsets, bool kStrided>
  static void run_chains(const dfp::MicroKernelArgs& p, int64_t stride) {
    constexpr bool kRows = kScales == ChainScales::rows || kScales == ChainScales::both;
    constexpr bool kCols = kScales == ChainScales::cols || kScales == ChainScales::both;
    constexpr int NR = NV * V::lanes;
    typename V::F f[MR][NV];
    DFP_UNROLL
    for (int r = 0; r < MR; ++r)
      DFP_UNROLL
      for (int v = 0; v < NV; ++v) f[r][v] = p.accumulate ? V::loadf(p.acc + r * p.ldacc + v * V::lanes) : V::zerof();
    const char* a[MR];
    DFP_UNROLL
    for (int r = 0; r < MR; ++r) a[r] = static_cast<const char*>(p.a_rows[r]);
    const int32_t* b = p.b;
    int64_t q = 0;  // the K-pair, from the slice's first
    for (int64_t c = 0; c < p.nchains; ++c) {
      if (p.skip && p.skip[c]) {  // zeros only: adds nothing (MicroKernelArgs::skip)
        q += p.chains[c].kpairs, b += p.chains[c].kpairs * NR;
        continue;
      }
      typename V::I acc[MR][NV];
      DFP_UNROLL
      for (int r = 0; r < MR; ++r)
        DFP_UNROLL
        for (int v = 0; v < NV; ++v) acc[r][v] = V::zeroi();
      for (const int64_t end = q + p.chains[c].kpairs; q < end; ++q, b += NR) {
        const int64_t at = kOffsets ? p.a_offsets[q] : 4 * q;  // bytes
        typename V::I bv[NV];
        DFP_UNROLL
        for (int v = 0; v < NV; ++v) bv[v] = V::loadi(b + v * V::lanes);
        if constexpr (kStrided) {
          const char* group[MR / 4];
          DFP_UNROLL
          for (int g = 0; g < MR / 4; ++g) group[g] = a[4 * g] + at;
          DFP_UNROLL
          for (int r = 0; r < MR; ++r) {
            const typename V::I av = V::broadcast(group[r / 4] + (r % 4) * stride);
            DFP_UNROLL
            for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_pairs(acc[r][v], av, bv[v]);
          }
        } else {
          DFP_UNROLL
          for (int r = 0; r < MR; ++r) {
            const typename V::I av = V::broadcast(a[r] + at);
            DFP_UNROLL
            for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_pairs(acc[r][v], av, bv[v]);
          }
        }
      }
      if constexpr (kScales != ChainScales::none) {
        const dfp::Chain& chain = p.chains[c];
        typename V::F cs[NV];
        if constexpr (kCols) {
          DFP_UNROLL
          for (int v = 0; v < NV; ++v)
            cs[v] = V::loadf(p.col_scale + chain.b_block * p.col_scale_stride + v * V::lanes);
        }
        DFP_UNROLL
        for (int r = 0; r < MR; ++r) {
          typename V::F rs{};
          if constexpr (kRows) rs = V::setf(p.row_scale[r * p.row_scale_stride + chain.a_block]);
          // The contract rounds the sum only, so one fused multiply-add: the product is
          // exact anyway, an integer-valued fp32 times a power of two >= 2^-149 (or 0),
          // which is a multiple of 2^-149 with at most 24 significant bits. A side of
          // scales 1 is left out, which changes no bits (rs * 1 = rs).
          DFP_UNROLL
          for (int v = 0; v < NV; ++v) {
            const typename V::F scale = kRows && kCols ? V::mulf(rs, cs[v]) : kRows ? rs : cs[v];
            f[r][v] = V::mul_add(V::to_float(acc[r][v]), scale, f[r][v]);
          }
        }
      } else {
        DFP_UNROLL
        for (int r = 0; r < MR; ++r)
          DFP_UNROLL
          for (int v = 0; v < NV; ++v) f[r][v] = V::addf(f[r][v], V::to_float(acc[r][v]));
      }
    }
    if (p.out) {
      typename V::F cs[NV];
      DFP_UNROLL
      for (int v = 0; v < NV; ++v) cs[v] = V::loadf(p.out_col_scale + v * V::lanes);
      DFP_UNROLL
      for (int r = 0; r < MR; ++r) {
        const typename V::F rs = V::setf(p.out_row_scale[r]);
        float* out = p.out_rows ? p.out_rows[r] : p.out + r * p.ldc;
        DFP_UNROLL
        for (int v = 0; v < NV; ++v) {
          typename V::F y = V::mulf(f[r][v], V::mulf(rs, cs[v]));
          if (p.bias) y = V::addf(y, V::loadf(p.bias + v * V::lanes));
          V::storef(out + v * V::lanes, y);
        }
      }
      return;
    }
    DFP_UNROLL
    for (int r = 0; r < MR; ++r)
      DFP_UNROLL
      for (int v = 0; v < NV; ++v) V::storef(p.acc + r * p.ldacc + v * V::lanes, f[r][v]);
  }

  // The byte stride of rows in groups of four (0 where they are not so spaced: a tile's
  // group may span two image rows of a convolution's patches).
  static int64_t stride_of(const dfp::MicroKernelArgs& p) {
    const char* const* a = reinterpret_cast<const char* const*>(p.a_rows);
    const int64_t stride = a[1] - a[0];
    for (int r = 0; r < MR; ++r)
      if (a[r] - a[r / 4 * 4] != (r % 4) * stride) return 0;
    return stride;
  }

  template <bool kOffsets, bool kStrided>
  static void run_with(const dfp::MicroKernelArgs& p, int64_t stride) {
    if (p.row_scale && p.col_scale)
      run_chains<ChainScales::both, kOffsets, kStrided>(p, stride);
    else if (p.row_scale)
      run_chains<ChainScales::rows, kOffsets, kStrided>(p, stride);
    else if (p.col_scale)
      run_chains<ChainScales::cols, kOffsets, kStrided>(p, stride);
    else
      run_chains<ChainScales::none, kOffsets, kStrided>(p, stride);
  }

  static void run(const dfp::MicroKernelArgs& p) {
    if constexpr (MR % 4 == 0 && MR > 4) {
      if (const int64_t stride = stride_of(p))
        return p.a_offsets ? run_with<true, true>(p, stride) : run_with<false, true>(p, stride);
    }
    p.a_offsets ? run_with<true, false>(p, 0) : run_with<false, false>(p, 0);
  }
};

}  // namespace
