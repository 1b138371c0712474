// The DFP16 GEMM on int8 tensor cores (sm_75 and newer), exact: every int16 mantissa is
// split on chip into two int8 limbs and each chain's int16 sum is rebuilt from four int8
// products.
//
// Split (balanced, see dfp_cuda.h): x = 256 h + l with l the low byte of x read as signed
// and h = (x + 128) >> 8, both int8 for |x| <= 32639, i.e. for every headroom >= 1 (the
// caller routes headroom 0 to the CUDA-core kernel). For one 32-product piece of a chain:
//     sum a b = 65536 sum ha hb + 256 (sum ha lb + sum la hb) + sum la lb
// with each int8 sum at most 32 * 2^14 = 2^19 (the middle one 2^20) in magnitude, so no
// tensor-core accumulator can overflow. The pieces are added modulo 2^32 in unsigned
// arithmetic (dfp::combine_limbs); the chain's true sum fits int32 (L * Ma * Mb <= 2^31 - 1,
// docs/design.md), so the modular sum is that sum exactly, and the fp32 steps that follow
// are the contract's: acc += float32(S) * s per chain in order of k, then the epilogue.
//
// Instructions: mma.sync m16n8k32 s8 (sm_80+) or, on sm_75, four m8n8k16 s8 with the same
// fragment layout (rows g and g+8, k 0..15 and 16..31).
//
// K layout: the caller lists "k tiles" (int32 x4: first k, length <= 32, ends-a-chain
// flag, K-block index) that never straddle a chain, so one tile is at most one piece of
// one chain; a short chain or block tail is zero-padded on chip. This needs chains of at
// least 32 products and headroom >= 1 on both operands: chain_length(ha, hb) >= 32, e.g.
// (2, 2), (1, 3) or (3, 1) (dfp/cuda/gemm.py, mma_applies).
//
// Operands: A (M, K) int16 with unit k stride and row stride lda; B given transposed,
// Bt (N, K) with unit k stride and row stride ldb (B's columns are K-contiguous, as
// the "col" operand of mma wants). With DFP_MMA_GATHER=1 both are read through int32
// offset tables instead, element (r, k) at row_offsets[r] + k_offsets[k]: a convolution's
// patches read in place from the padded image (implicit GEMM, dfp/cuda/patches.py).
//
// Tile: 128 x 128 outputs per block of 8 warps (2 x 4), 64 x 32 per warp (4 x 4 mma
// tiles), k tiles of 32, two shared-memory stages filled through registers (the split
// happens between the global load and the shared store).
//
// Split K: a GEMM with fewer 128 x 128 output tiles than the GPU has multiprocessors (a
// convolution's weight gradient: Cout x KH*KW*Cin outputs, a reduction over every pixel of
// the batch) would run on a few of them. The contract's fp32 sum runs over the chains in
// order of k, so the reduction cannot be cut into partial fp32 sums; instead the
// DFP_MMA_CHAIN_SUMS variant cuts it across the grid's z and stores each chain's exact
// int32 sum, and dfp_gemm_add_chains adds them to the fp32 accumulator in order: the same
// steps, so the same bits.
#include "mma_int8.h"

using namespace dfp;

namespace {

constexpr int kBlockM = 128, kBlockN = 128, kTileK = 32;
constexpr int kThreads = 256;
constexpr int kWarpM = 64, kWarpN = 32;
constexpr int kMmaM = kWarpM / 16, kMmaN = kWarpN / 8;  // mma tiles per warp
constexpr int kWordsPerRow = kTileK / 4;                // 4 int8 per 32-bit word

struct Stage {
  u32 a_high[kBlockM * kWordsPerRow], a_low[kBlockM * kWordsPerRow];
  u32 b_high[kBlockN * kWordsPerRow], b_low[kBlockN * kWordsPerRow];
};

// Word `word` of row `row` in a limb plane. Rows with bit 2 set swap the two halves of
// the row (XOR 4 on the word): the fragment reads (rows g = 0..7, words t and t + 4 for
// t = 0..3) then hit 32 different banks, and 8-byte units stay 8-byte aligned.
__device__ __forceinline__ int swizzle(int row, int word) { return row * kWordsPerRow + (word ^ (((row >> 2) & 1) << 2)); }

struct Chunk {  // 8 consecutive int16 of one row, as 4 words
  u32 w[4];
};

#ifndef DFP_MMA_GATHER
#define DFP_MMA_GATHER 0
#endif
constexpr bool kGather = DFP_MMA_GATHER != 0;

// Where k of a row lies from the row's start: k itself, or (kGather) its offset.
__device__ __forceinline__ int k_at(const int* __restrict__ k_offsets, int k) { return kGather ? k_offsets[k] : k; }

__device__ __forceinline__ Chunk load_chunk(const short* __restrict__ row, const int* __restrict__ k_offsets,
                                            bool row_valid, bool vec8, int k0, int len, int c) {
  Chunk out = {{0u, 0u, 0u, 0u}};
  if (!row_valid) return out;
  if (vec8) {  // the 8 k of the chunk lie side by side, 16-byte aligned
    if (8 * c < len) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + k_at(k_offsets, k0 + 8 * c));
      out.w[0] = v.x, out.w[1] = v.y, out.w[2] = v.z, out.w[3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int kk = 8 * c + e;
      const u32 v = kk < len ? u32(u16(row[k_at(k_offsets, k0 + kk)])) : 0u;
      out.w[e / 2] |= v << (16 * (e % 2));
    }
  }
  return out;
}

// 8 int16 -> 8 high limbs and 8 low limbs (two words each), k order kept.
__device__ __forceinline__ void split_chunk(const Chunk& x, uint2& high, uint2& low) {
  low.x = __byte_perm(x.w[0], x.w[1], 0x6420);  // low bytes of the 4 int16: signed l
  low.y = __byte_perm(x.w[2], x.w[3], 0x6420);
  // per 16-bit lane, without carries between lanes: x + 128; its high byte is h
  const u32 r0 = __vadd2(x.w[0], 0x00800080u), r1 = __vadd2(x.w[1], 0x00800080u);
  const u32 r2 = __vadd2(x.w[2], 0x00800080u), r3 = __vadd2(x.w[3], 0x00800080u);
  high.x = __byte_perm(r0, r1, 0x7531);
  high.y = __byte_perm(r2, r3, 0x7531);
}

}  // namespace

// Compile-time variants: those of mma_int8.h, and
//   DFP_MMA_VEC8: K, lda, ldb and every tile's first k are multiples of 8 and both operands
//     16-byte aligned (8 mantissas per 16-byte load); with DFP_MMA_GATHER, every row offset
//     and every 8th k offset a multiple of 8, and each run of 8 k offsets consecutive.
#ifndef DFP_MMA_VEC8
#define DFP_MMA_VEC8 0
#endif
constexpr bool kVec8 = DFP_MMA_VEC8 != 0;

// 170-255 registers per thread, by variant: one block of 8 warps per SM.
extern "C" __global__ void __launch_bounds__(kThreads)
    dfp_gemm_mma(const short* __restrict__ a, int lda, const short* __restrict__ bt, int ldb, int m_count,
                 int n_count, const int* __restrict__ tiles, int tile_count, const float* __restrict__ sa,
                 const float* __restrict__ sb, int kb, const int* __restrict__ ra, const int* __restrict__ rb,
                 const float* __restrict__ bias, int has_bias, float* __restrict__ out,
                 const int* __restrict__ split_tiles, int chain_base, i32* __restrict__ chain_sums,
                 const int* __restrict__ a_rows, const int* __restrict__ a_ks, const int* __restrict__ b_rows,
                 const int* __restrict__ b_ks) {
  __shared__ __align__(16) Stage stages[2];
  if (kChainSums) {  // this block's share of the k tiles
    const int first = split_tiles[blockIdx.z];
    tiles += 4 * first;
    tile_count = split_tiles[blockIdx.z + 1] - first;
  }

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int warp_m = (warp / 4) * kWarpM, warp_n = (warp % 4) * kWarpN;
  const int m0 = blockIdx.x * kBlockM, n0 = blockIdx.y * kBlockN;

  // The two 8-mantissa chunks of A and of Bt that this thread moves per k tile.
  const short* a_starts[2];
  const short* b_starts[2];
  bool a_valid[2], b_valid[2];
  int row_of[2], chunk_of[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = tid + r * kThreads;
    row_of[r] = q >> 2, chunk_of[r] = q & 3;
    a_valid[r] = m0 + row_of[r] < m_count;
    b_valid[r] = n0 + row_of[r] < n_count;
    const int m = a_valid[r] ? m0 + row_of[r] : 0, n = b_valid[r] ? n0 + row_of[r] : 0;
    a_starts[r] = a + (kGather ? i64(a_rows[m]) : i64(m) * lda);
    b_starts[r] = bt + (kGather ? i64(b_rows[n]) : i64(n) * ldb);
  }

  // The k-tile table is read one tile ahead of its use: a chunk load's address depends on
  // it, and waiting for it at the top of every iteration stalled the warps (ncu on an H200).
  int4 tile_next = tile_count > 0 ? reinterpret_cast<const int4*>(tiles)[0] : int4{0, 0, 0, 0};
  Chunk a_next[2], b_next[2];
  auto load_tile = [&](const int4& tile) {
    const int k0 = tile.x, len = tile.y;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      a_next[r] = load_chunk(a_starts[r], a_ks, a_valid[r], kVec8, k0, len, chunk_of[r]);
      b_next[r] = load_chunk(b_starts[r], b_ks, b_valid[r], kVec8, k0, len, chunk_of[r]);
    }
  };
  auto store_tile = [&](Stage& s) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int at = swizzle(row_of[r], 2 * chunk_of[r]);
      uint2 high, low;
      split_chunk(a_next[r], high, low);
      *reinterpret_cast<uint2*>(&s.a_high[at]) = high;
      *reinterpret_cast<uint2*>(&s.a_low[at]) = low;
      split_chunk(b_next[r], high, low);
      *reinterpret_cast<uint2*>(&s.b_high[at]) = high;
      *reinterpret_cast<uint2*>(&s.b_low[at]) = low;
    }
  };

  float acc[kMmaM][kMmaN][4] = {};
  // The current chain's sum so far, modulo 2^32 (unused, so optimised away, where every
  // tile is a whole chain).
  u32 running[kMmaM][kMmaN][4] = {};

  // acc += float32(S) * s for the chain sums S of one chain end, s the product of the
  // block scales of its row and column: 8 rows and 8 columns per thread, so 16 scale loads
  // serve the 64 elements. (No generic lambda: NVRTC takes its template for host code.)
  auto add_chain_sums = [&](const u32(&sums)[kMmaM][kMmaN][4], int blk) {
    float row_scale[kMmaM][2], column_scale[kMmaN][2];
    if (kKBlocks) {
      load_block_scales(sa, sb, kb, blk, m0 + warp_m, n0 + warp_n, m_count, n_count, row_scale, column_scale);
    }
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const i32 chain_sum = i32(sums[mi][ni][r]);
          acc[mi][ni][r] = kKBlocks ? add_chain(acc[mi][ni][r], chain_sum,
                                                mul_rn(row_scale[mi][r >> 1], column_scale[ni][r & 1]))
                                    : add_chain(acc[mi][ni][r], chain_sum);
        }
      }
    }
  };

  // The chain sums of one chain end, stored for dfp_gemm_add_chains (DFP_MMA_CHAIN_SUMS).
  auto store_chain_sums = [&](const u32(&sums)[kMmaM][kMmaN][4], int chain) {
    i32* plane = chain_sums + i64(chain - chain_base) * m_count * n_count;
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int m = m0 + warp_m + mi * 16 + g + 8 * (r >> 1);
          const int n = n0 + warp_n + ni * 8 + 2 * t4 + (r & 1);
          if (m < m_count && n < n_count) plane[i64(m) * n_count + n] = i32(sums[mi][ni][r]);
        }
      }
    }
  };

  int4 tile_now = tile_next;
  if (tile_count > 0) {
    load_tile(tile_now);
    store_tile(stages[0]);
  }
  if (tile_count > 1) tile_next = reinterpret_cast<const int4*>(tiles)[1];
  __syncthreads();

  for (int t = 0; t < tile_count; ++t) {
    if (t + 1 < tile_count) load_tile(tile_next);  // in flight while the tensor cores work
    const int4 tile = tile_now;  // (first k, length, ends a chain, K-block) of tile t
    tile_now = tile_next;
    if (t + 2 < tile_count) tile_next = reinterpret_cast<const int4*>(tiles)[t + 2];
    const Stage& s = stages[t & 1];

    u32 ah[kMmaM][4], al[kMmaM][4], bh[kMmaN][2], bl[kMmaN][2];
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
      const int row = warp_m + mi * 16 + g;
      const int at[4] = {swizzle(row, t4), swizzle(row + 8, t4), swizzle(row, t4 + 4), swizzle(row + 8, t4 + 4)};
#pragma unroll
      for (int j = 0; j < 4; ++j) ah[mi][j] = s.a_high[at[j]], al[mi][j] = s.a_low[at[j]];
    }
#pragma unroll
    for (int ni = 0; ni < kMmaN; ++ni) {
      const int col = warp_n + ni * 8 + g;
      const int at[2] = {swizzle(col, t4), swizzle(col, t4 + 4)};
#pragma unroll
      for (int j = 0; j < 2; ++j) bh[ni][j] = s.b_high[at[j]], bl[ni][j] = s.b_low[at[j]];
    }

    // This tile's piece of every element's chain, from four int8 products.
    u32 piece[kMmaM][kMmaN][4];
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni) {
        i32 hh[4] = {0, 0, 0, 0}, mid[4] = {0, 0, 0, 0}, ll[4] = {0, 0, 0, 0};
        mma_16x8x32(hh, ah[mi], bh[ni][0], bh[ni][1]);
        mma_16x8x32(mid, ah[mi], bl[ni][0], bl[ni][1]);
        mma_16x8x32(mid, al[mi], bh[ni][0], bh[ni][1]);
        mma_16x8x32(ll, al[mi], bl[ni][0], bl[ni][1]);
#pragma unroll
        for (int r = 0; r < 4; ++r) piece[mi][ni][r] = combine_limbs(hh[r], mid[r], ll[r]);
      }
    }
    const int blk = kKBlocks ? tile.w : 0;
    if (kChainPerTile) {
      if (kChainSums) {
        store_chain_sums(piece, tile.z - 1);
      } else {
        add_chain_sums(piece, blk);
      }
    } else {
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kMmaN; ++ni) {
#pragma unroll
          for (int r = 0; r < 4; ++r) running[mi][ni][r] += piece[mi][ni][r];
        }
      }
      if (tile.z != 0) {  // this tile ends a chain: uniform over the block
        if (kChainSums) {
          store_chain_sums(running, tile.z - 1);
        } else {
          add_chain_sums(running, blk);
        }
#pragma unroll
        for (int mi = 0; mi < kMmaM; ++mi) {
#pragma unroll
          for (int ni = 0; ni < kMmaN; ++ni) {
#pragma unroll
            for (int r = 0; r < 4; ++r) running[mi][ni][r] = 0u;
          }
        }
      }
    }

    if (t + 1 < tile_count) store_tile(stages[(t + 1) & 1]);
    __syncthreads();
  }
  if (!kChainSums) {  // else dfp_gemm_add_chains finishes the sums
    store_results(acc, m0 + warp_m, n0 + warp_n, m_count, n_count, ra, rb, bias, has_bias, out);
  }
}

// The second half of a split-K GEMM (DFP_MMA_CHAIN_SUMS): chain sums [0, chain_count) of
// chain_sums (planes of M x N), chain c of K-block chain_blocks[c], added to each output
// element's fp32 accumulator in order, as dfp_gemm_mma adds them over a whole K. The
// accumulator starts at 0 where `first`, else comes from acc (the previous part of K);
// where `last` the epilogue writes out, else acc keeps the sum for the next part.
//
// The sum is serial per element, so the loads are not: a block owns 32 consecutive
// elements, and its 8 warps turn chunks of 64 chains into their products float32(S) * s
// (coalesced loads, 8 in flight per thread) in shared memory, one chunk ahead of warp 0,
// whose lanes add them up. (One thread per element, the loads in its own loop, kept
// about 70 warps busy for a 16 x 144 weight gradient: 0.4 ms on an H200.)
constexpr int kAddElements = 32, kAddChunk = 64, kAddWarps = 8;

extern "C" __global__ void __launch_bounds__(kAddWarps * 32)
    dfp_gemm_add_chains(const i32* __restrict__ chain_sums, int chain_count, const int* __restrict__ chain_blocks,
                        int m_count, int n_count, const float* __restrict__ sa, const float* __restrict__ sb, int kb,
                        const int* __restrict__ ra, const int* __restrict__ rb, const float* __restrict__ bias,
                        int has_bias, int first, int last, float* __restrict__ acc, float* __restrict__ out) {
  __shared__ float products[2][kAddChunk][kAddElements];
  const i64 plane = i64(m_count) * n_count;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const i64 idx = i64(blockIdx.x) * kAddElements + lane;  // this lane's element
  const bool valid = idx < plane;
  const int m = valid ? int(idx / n_count) : 0, n = valid ? int(idx % n_count) : 0;
  auto fill = [&](int buffer, int c0) {
#pragma unroll
    for (int i = 0; i < kAddChunk / kAddWarps; ++i) {
      const int row = warp + kAddWarps * i, c = c0 + row;
      float product = 0.0f;
      if (valid && c < chain_count) {
        const int blk = chain_blocks[c];
        product = mul_rn(int_to_float_rn(chain_sums[c * plane + idx]), mul_rn(sa[m * kb + blk], sb[blk * n_count + n]));
      }
      products[buffer][row][lane] = product;
    }
  };
  float sum = first || !valid ? 0.0f : acc[idx];
  const int chunks = (chain_count + kAddChunk - 1) / kAddChunk;
  if (chunks > 0) fill(0, 0);
  __syncthreads();
  for (int chunk = 0; chunk < chunks; ++chunk) {
    if (chunk + 1 < chunks) fill((chunk + 1) & 1, (chunk + 1) * kAddChunk);
    if (warp == 0) {
      const int count = min(kAddChunk, chain_count - chunk * kAddChunk);
      for (int row = 0; row < count; ++row) sum = add_rn(sum, products[chunk & 1][row][lane]);
    }
    __syncthreads();
  }
  if (warp != 0 || !valid) return;
  if (!last) {
    acc[idx] = sum;
    return;
  }
  const float v = scale_result(sum, ra[m] + rb[n]);
  out[idx] = has_bias ? add_rn(v, bias[n]) : v;
}
