// What the two tensor-core GEMM kernels share (gemm_mma.cu: limbs split between the global
// load and the shared store; gemm_mma_pipelined.cu: limb planes through cp.async): the
// int8 mma instruction, their launch-uniform compile-time variants and the epilogue.
#pragma once

#include "dfp_cuda.h"

namespace dfp {

// d += a b for a 16 x 32 int8 A (row), 32 x 8 int8 B (col), int32 D, in mma.sync's
// m16n8k32 fragment layout (a: rows g / g+8 x k 4t.. / 16+4t..; b: k 4t.. / 16+4t..),
// on sm_75 as four m8n8k16 with the same layout.
__device__ __forceinline__ void mma_16x8x32(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+r"(d[0]), "+r"(d[1])
               : "r"(a[0]), "r"(b0));
  asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+r"(d[0]), "+r"(d[1])
               : "r"(a[2]), "r"(b1));
  asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+r"(d[2]), "+r"(d[3])
               : "r"(a[1]), "r"(b0));
  asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+r"(d[2]), "+r"(d[3])
               : "r"(a[3]), "r"(b1));
#endif
}

// This thread's K-block `blk` scales of one warp's tiles of 16 x 8 mma outputs, the first
// at (row0, col0): of its rows from sa (M, KB), of its columns from sb (KB, N) (clamped
// inside M x N: a row or column past the edge is never written).
template <int kTilesM, int kTilesN>
__device__ __forceinline__ void load_block_scales(const float* __restrict__ sa, const float* __restrict__ sb,
                                                  int kb, int blk, int row0, int col0, int m_count, int n_count,
                                                  float (&row_scale)[kTilesM][2], float (&column_scale)[kTilesN][2]) {
  const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
#pragma unroll
  for (int mi = 0; mi < kTilesM; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) row_scale[mi][h] = sa[min(row0 + mi * 16 + g + 8 * h, m_count - 1) * kb + blk];
  }
#pragma unroll
  for (int ni = 0; ni < kTilesN; ++ni) {
#pragma unroll
    for (int c = 0; c < 2; ++c) column_scale[ni][c] = sb[blk * n_count + min(col0 + ni * 8 + 2 * t4 + c, n_count - 1)];
  }
}

// The epilogue of one warp's tiles of 16 x 8 mma outputs, the first at (row0, col0):
// out = scale_result(acc, ra + rb) (+ bias), inside M x N.
template <int kTilesM, int kTilesN>
__device__ __forceinline__ void store_results(const float (&acc)[kTilesM][kTilesN][4], int row0, int col0,
                                              int m_count, int n_count, const int* __restrict__ ra,
                                              const int* __restrict__ rb, const float* __restrict__ bias,
                                              int has_bias, float* __restrict__ out) {
  const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
#pragma unroll
  for (int mi = 0; mi < kTilesM; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kTilesN; ++ni) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = row0 + mi * 16 + g + 8 * (r >> 1);
        const int n = col0 + ni * 8 + 2 * t4 + (r & 1);
        if (m < m_count && n < n_count) {
          const float v = scale_result(acc[mi][ni][r], ra[m] + rb[n]);
          out[i64(m) * n_count + n] = has_bias ? add_rn(v, bias[n]) : v;
        }
      }
    }
  }
}

}  // namespace dfp

// Launch-uniform choices as compile-time variants (the loader passes them as -D options and
// keeps one compiled kernel per combination). As run-time flags they were if-converted into
// the inner loop, where every path paid for the others' instructions: ncu counted 17
// issued instructions per mma on an H200.
//   DFP_MMA_CHAIN_PER_TILE: every tile is a whole chain (chains of 32), so no partial sum
//     is carried from tile to tile.
//   DFP_MMA_K_BLOCKS: more than one K-block, with fp32 scales sa (M, KB) and sb (KB, N).
//   DFP_MMA_CHAIN_SUMS: block z runs tiles [split_tiles[z], split_tiles[z + 1]) and stores
//     the int32 sum of each chain c it ends (a tile's chain-end field is then c + 1) in
//     plane c - chain_base of chain_sums (planes of M x N, row-major); out is not written.
#ifndef DFP_MMA_CHAIN_PER_TILE
#define DFP_MMA_CHAIN_PER_TILE 0
#endif
#ifndef DFP_MMA_K_BLOCKS
#define DFP_MMA_K_BLOCKS 0
#endif
#ifndef DFP_MMA_CHAIN_SUMS
#define DFP_MMA_CHAIN_SUMS 0
#endif
constexpr bool kChainPerTile = DFP_MMA_CHAIN_PER_TILE != 0;
constexpr bool kKBlocks = DFP_MMA_K_BLOCKS != 0;
constexpr bool kChainSums = DFP_MMA_CHAIN_SUMS != 0;
