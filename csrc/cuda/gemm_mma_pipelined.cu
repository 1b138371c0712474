// The DFP16 GEMM on int8 tensor cores with a pipelined operand feed (sm_80 and newer; it
// compiles and runs on sm_75 too, without the overlap). Same products, chains and fp32
// steps as gemm_mma.cu, so the same bits; what differs is how the operands reach the
// tensor cores:
//
// 1. dfp_split_limbs splits each int16 operand once, in its own pass, into two int8 limb
//    planes (the balanced split of dfp_cuda.h: x = 256 h + l), laid out tile by tile:
//    plane row r holds, for every k tile of the tile table, its 32 limbs (a short chain
//    or block tail zero-padded). The operand's strides, alignment and tails are handled
//    there, once, instead of in the GEMM's inner loop.
// 2. dfp_gemm_mma_pipelined copies 16-byte chunks of the planes into kStages shared-memory
//    stages with cp.async (global -> shared without registers, kStages - 1 tiles in
//    flight while the tensor cores work on the oldest), and loads the mma fragments with
//    ldmatrix: no split, no register staging and no byte shuffles in the inner loop, and
//    the copies of later tiles stay in flight through a whole tile's tensor-core work.
//
// Layout of a stage: per plane, 128 rows of two 16-byte chunks (k 0..15, 16..31); rows
// with bit 2 set swap their two chunks, so each 8-address phase of ldmatrix hits 32
// different banks. 4 planes x 4 KB = 16 KB per stage; three stages fill the 48 KB of
// static shared memory.
//
// Operands: A (M, K) and B given transposed, Bt (N, K), any strides (dfp_split_limbs reads
// them); their planes (M, T * 32) and (N, T * 32) int8 for T k tiles, row stride T * 32.
// Tile table, K-blocks, chain sums and split K: as gemm_mma.cu (its header comment).
//
// Measured on an H200 (same run, bits equal): 8192^3 in 9.3 ms (118 TOP/s) against the
// registers feed's 15.3 ms, 4096^3 1.31x, chains of 128 (headroom 3) 1.06x; two blocks per
// SM (128 registers, a few bytes spilled) beat one (255 registers, 8 warps per SM: ncu saw
// 5.6 cycles per issued instruction, latency-bound) by 1.1-1.15x. A weight gradient that
// splits K ran 0.91x (the planes' extra pass is a third of its time): dfp/cuda/gemm.py
// keeps the registers feed there.
#include "mma_int8.h"

using namespace dfp;

namespace {

constexpr int kBlockM = 128, kBlockN = 128, kTileK = 32;
constexpr int kThreads = 256, kStages = 3;
constexpr int kWarpM = 64, kWarpN = 32;
constexpr int kMmaM = kWarpM / 16, kMmaN = kWarpN / 8;  // mma tiles per warp
constexpr int kChunks = kTileK / 16;                    // 16-byte chunks per plane row and tile

struct Stage {
  uint4 a_high[kBlockM * kChunks], a_low[kBlockM * kChunks];
  uint4 b_high[kBlockN * kChunks], b_low[kBlockN * kChunks];
};

__device__ __forceinline__ int chunk_at(int row, int chunk) { return row * kChunks + (chunk ^ ((row >> 2) & 1)); }

__device__ __forceinline__ u32 shared_address(const void* p) { return u32(__cvta_generic_to_shared(p)); }

// 16 bytes from global to shared memory, zeros where !valid (src is then never read).
__device__ __forceinline__ void copy_chunk(uint4* dst, const i8* src, bool valid) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#else
  *dst = valid ? *reinterpret_cast<const uint4*>(src) : uint4{0u, 0u, 0u, 0u};
#endif
}

__device__ __forceinline__ void commit_copies() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `pending` committed groups of this thread's copies are in flight.
template <int pending>
__device__ __forceinline__ void wait_copies() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// Four 8 x 16-byte matrices of shared memory, lane L addressing row L % 8 of matrix L / 8;
// register j of lane L gets bytes 4 (L % 4) .. + 3 of row L / 4 of matrix j.
__device__ __forceinline__ void load_matrices(u32 (&r)[4], const uint4* at) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(at)));
}

}  // namespace

// The limb planes of one operand X (rows, K) with strides (ld_row, ld_k): high and low
// (rows, tile_count * 32) int8, tile t of the table at columns [32 t, 32 t + 32). A thread
// makes 8 limbs of each plane. Neighbouring threads take neighbouring k where k is X's
// unit stride, else neighbouring rows: the reads are coalesced either way.
extern "C" __global__ void dfp_split_limbs(const short* __restrict__ x, int rows, int ld_row, int ld_k,
                                           const int* __restrict__ tiles, int tile_count, i8* __restrict__ high,
                                           i8* __restrict__ low) {
  const int per_row = tile_count * (kTileK / 8);  // 8-limb pieces per plane row
  const int count = rows * per_row;
  const bool k_fastest = ld_k == 1;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) {
    const int row = k_fastest ? idx / per_row : idx % rows;
    const int piece = k_fastest ? idx % per_row : idx / rows;
    const int t = piece / (kTileK / 8), first = 8 * (piece % (kTileK / 8));
    const int4 tile = reinterpret_cast<const int4*>(tiles)[t];  // (first k, length, chain end, K-block)
    u32 h[2], l[2];
    split_limbs_piece(x, i64(row) * ld_row, ld_k, tile.x, tile.y, first, h, l);
    const i64 at = (i64(row) * tile_count + t) * kTileK + first;
    *reinterpret_cast<uint2*>(high + at) = uint2{h[0], h[1]};
    *reinterpret_cast<uint2*>(low + at) = uint2{l[0], l[1]};
  }
}

// Compile-time variants: those of mma_int8.h, and
//   DFP_MMA_MIN_BLOCKS: blocks per multiprocessor the register budget is cut for
//     (dfp/cuda/gemm.py's PIPELINED_TUNING).
#ifndef DFP_MMA_MIN_BLOCKS
#define DFP_MMA_MIN_BLOCKS 1
#endif

extern "C" __global__ void __launch_bounds__(kThreads, DFP_MMA_MIN_BLOCKS)
    dfp_gemm_mma_pipelined(const i8* __restrict__ a_high, const i8* __restrict__ a_low,
                           const i8* __restrict__ b_high, const i8* __restrict__ b_low, int m_count, int n_count,
                           const int* __restrict__ tiles, int tile_count, const float* __restrict__ sa,
                           const float* __restrict__ sb, int kb, const int* __restrict__ ra,
                           const int* __restrict__ rb, const float* __restrict__ bias, int has_bias,
                           float* __restrict__ out, const int* __restrict__ split_tiles, int chain_base,
                           i32* __restrict__ chain_sums) {
  __shared__ __align__(128) Stage stages[kStages];
  const i64 plane_stride = i64(tile_count) * kTileK;  // bytes per plane row: every tile of the table
  int first_tile = 0, count = tile_count;
  if (kChainSums) {  // this block's share of the k tiles
    first_tile = split_tiles[blockIdx.z];
    count = split_tiles[blockIdx.z + 1] - first_tile;
  }
  const int4* table = reinterpret_cast<const int4*>(tiles) + first_tile;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int warp_m = (warp / 4) * kWarpM, warp_n = (warp % 4) * kWarpN;
  const int m0 = blockIdx.x * kBlockM, n0 = blockIdx.y * kBlockN;

  // The chunk this thread copies in each plane: row tid / 2, chunk tid % 2 of the tile.
  const int copy_row = tid >> 1, copy_chunk_index = tid & 1, copy_at = chunk_at(copy_row, copy_chunk_index);
  const bool a_ok = m0 + copy_row < m_count, b_ok = n0 + copy_row < n_count;
  const i64 a_offset = i64(a_ok ? m0 + copy_row : 0) * plane_stride + 16 * copy_chunk_index;
  const i64 b_offset = i64(b_ok ? n0 + copy_row : 0) * plane_stride + 16 * copy_chunk_index;
  auto issue = [&](int t) {  // tile t of this block's share into its stage
    Stage& s = stages[t % kStages];
    const i64 k_offset = i64(first_tile + t) * kTileK;
    copy_chunk(&s.a_high[copy_at], a_high + a_offset + k_offset, a_ok);
    copy_chunk(&s.a_low[copy_at], a_low + a_offset + k_offset, a_ok);
    copy_chunk(&s.b_high[copy_at], b_high + b_offset + k_offset, b_ok);
    copy_chunk(&s.b_low[copy_at], b_low + b_offset + k_offset, b_ok);
  };

  // ldmatrix addresses of this lane (matrix j = lane / 8, its row lane % 8): A's four
  // matrices are rows +0 / +8 of chunk 0, then of chunk 1 (fragment registers a0..a3); B's
  // are chunks 0 / 1 of the ni-th 8 columns, then of the next 8 (b0, b1 of two tiles).
  const int j = lane >> 3, r8 = lane & 7;
  const int a_matrix_at = chunk_at(warp_m + r8 + 8 * (j & 1), j >> 1);
  const int b_matrix_at = chunk_at(warp_n + 8 * (j >> 1) + r8, j & 1);

  float acc[kMmaM][kMmaN][4] = {};
  // The current chain's sum so far, modulo 2^32 (optimised away where every tile is a chain).
  u32 running[kMmaM][kMmaN][4] = {};

  // A chain's end for one output element: into its fp32 sum, or stored (split K).
  auto end_chain = [&](int mi, int ni, int r, u32 sum, float scale, int chain) {
    if (kChainSums) {
      const int m = m0 + warp_m + mi * 16 + g + 8 * (r >> 1);
      const int n = n0 + warp_n + ni * 8 + 2 * t4 + (r & 1);
      if (m < m_count && n < n_count) chain_sums[(i64(chain - chain_base) * m_count + m) * n_count + n] = i32(sum);
    } else {
      const float s = int_to_float_rn(i32(sum));
      acc[mi][ni][r] = add_rn(acc[mi][ni][r], kKBlocks ? mul_rn(s, scale) : s);
    }
  };

#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < count) issue(t);
    commit_copies();  // an empty group past the end keeps the count uniform
  }
  int4 tile_next = count > 0 ? table[0] : int4{0, 0, 0, 0};

  for (int t = 0; t < count; ++t) {
    wait_copies<kStages - 2>();  // tile t has landed (this thread's copies) ...
    __syncthreads();             // ... everyone's, and stage (t - 1) % kStages is free
    if (t + kStages - 1 < count) issue(t + kStages - 1);
    commit_copies();
    const int4 tile = tile_next;  // (first k, length, chain end, K-block) of tile t
    if (t + 1 < count) tile_next = table[t + 1];
    const Stage& s = stages[t % kStages];
    const bool ends = kChainPerTile || tile.z != 0;

    // The K-block scales of this thread's rows and columns, where a chain ends here.
    float row_scale[kMmaM][2], column_scale[kMmaN][2];
    if (kKBlocks && !kChainSums && ends) {
      load_block_scales(sa, sb, kb, tile.w, m0 + warp_m, n0 + warp_n, m_count, n_count, row_scale, column_scale);
    }

    // The K-block scale of element (mi, ni, r) of this thread, where a chain ends here.
    auto scale_of = [&](int mi, int ni, int r) {
      return kKBlocks && !kChainSums ? mul_rn(row_scale[mi][r >> 1], column_scale[ni][r & 1]) : 1.0f;
    };

    u32 bh[kMmaN][2], bl[kMmaN][2];
#pragma unroll
    for (int p = 0; p < kMmaN / 2; ++p) {
      u32 h[4], l[4];
      load_matrices(h, &s.b_high[b_matrix_at + p * 16 * kChunks]);
      load_matrices(l, &s.b_low[b_matrix_at + p * 16 * kChunks]);
      bh[2 * p][0] = h[0], bh[2 * p][1] = h[1], bh[2 * p + 1][0] = h[2], bh[2 * p + 1][1] = h[3];
      bl[2 * p][0] = l[0], bl[2 * p][1] = l[1], bl[2 * p + 1][0] = l[2], bl[2 * p + 1][1] = l[3];
    }
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
      u32 ah[4], al[4];
      load_matrices(ah, &s.a_high[a_matrix_at + mi * 16 * kChunks]);
      load_matrices(al, &s.a_low[a_matrix_at + mi * 16 * kChunks]);
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni) {
        // This tile's piece of the chain, from four int8 products.
        i32 hh[4] = {0, 0, 0, 0}, mid[4] = {0, 0, 0, 0}, ll[4] = {0, 0, 0, 0};
        mma_16x8x32(hh, ah, bh[ni][0], bh[ni][1]);
        mma_16x8x32(mid, ah, bl[ni][0], bl[ni][1]);
        mma_16x8x32(mid, al, bh[ni][0], bh[ni][1]);
        mma_16x8x32(ll, al, bl[ni][0], bl[ni][1]);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const u32 piece = combine_limbs(hh[r], mid[r], ll[r]);
          if (kChainPerTile) {
            end_chain(mi, ni, r, piece, scale_of(mi, ni, r), tile.z - 1);
          } else {
            running[mi][ni][r] += piece;
          }
        }
      }
    }
    if (!kChainPerTile && ends) {  // uniform over the block
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kMmaN; ++ni) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            end_chain(mi, ni, r, running[mi][ni][r], scale_of(mi, ni, r), tile.z - 1);
            running[mi][ni][r] = 0u;
          }
        }
      }
    }
  }
  wait_copies<0>();  // no copy outlives the block (the groups past the end are empty)
  if (!kChainSums) {  // else dfp_gemm_add_chains finishes the sums
    store_results(acc, m0 + warp_m, n0 + warp_n, m_count, n_count, ra, rb, bias, has_bias, out);
  }
}
