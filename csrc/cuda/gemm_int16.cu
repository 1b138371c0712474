// The DFP16 GEMM on CUDA cores: int16 x int16 -> int32 multiply-adds, for every GPU
// (Pascal sm_61 has no int8 tensor cores; a CUDA 12 NVRTC still compiles sm_61) and for
// every chain length and K-block layout (the tensor-core kernel needs chains of >= 32).
//
// On Pascal, `int(short) * int(short) + int` is one XMAD (a 16 x 16 + 32-bit multiply-add);
// from Volta on it is one IMAD. A chain's int32 sum cannot overflow (docs/design.md: L
// products of at most Ma * Mb each, L * Ma * Mb <= 2^31 - 1), and every partial sum of a
// chain is bounded by the same number.
//
// Layout: A (M, K) and B (K, N) with any element strides; out (M, N) float32 row-major.
// With DFP_GATHER=1 both are read through int32 offset tables instead, element (r, k) at
// r_offsets[r] + k_offsets[k]: a convolution's patches read in place from the padded image
// (implicit GEMM, dfp/cuda/patches.py); the strides then only say which axis runs contiguous.
// Exponents come as the epilogue shifts ra (M,), rb (N,) and, with K-blocks (KB > 1), the
// fp32 block scales sa (M, KB), sb (KB, N) of docs/design.md (exact powers of two).
// Tile: 64 x 64 outputs per block of 256 threads, 4 x 4 per thread, 32 k per step.
#include "dfp_cuda.h"

using namespace dfp;

namespace {

constexpr int kTile = 64;   // rows and columns of C per block
constexpr int kStep = 32;   // k per shared-memory step
constexpr int kPad = 2;     // shorts of padding per shared-memory row (one bank)
constexpr int kThreads = 256;

#ifndef DFP_GATHER
#define DFP_GATHER 0
#endif
constexpr bool kGather = DFP_GATHER != 0;

// Where element (r, k) of an operand lies: by its strides, or (kGather) its offset tables.
__device__ __forceinline__ i64 element_at(int r, int k, int r_stride, int k_stride, const int* __restrict__ r_offsets,
                                          const int* __restrict__ k_offsets) {
  return kGather ? i64(r_offsets[r]) + k_offsets[k] : i64(r) * r_stride + i64(k) * k_stride;
}

// acc + float32(S) * (the scale of block `blk` for output (m, n)), without K-blocks acc + S.
__device__ __forceinline__ float add_chain_sum(float acc, i32 chain_sum, const float* sa, const float* sb, int kb,
                                               int n_count, int m, int n, int blk) {
  if (kb == 1) return add_chain(acc, chain_sum);
  return add_chain(acc, chain_sum, mul_rn(sa[m * kb + blk], sb[blk * n_count + n]));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    dfp_gemm_int16(const short* __restrict__ a, int a_row_stride, int a_k_stride, const short* __restrict__ b,
                   int b_k_stride, int b_col_stride, int m_count, int n_count, int k_count, int kblock, int chain,
                   const float* __restrict__ sa, const float* __restrict__ sb, int kb, const int* __restrict__ ra,
                   const int* __restrict__ rb, const float* __restrict__ bias, int has_bias,
                   float* __restrict__ out, const int* __restrict__ a_rows, const int* __restrict__ a_ks,
                   const int* __restrict__ b_ks, const int* __restrict__ b_columns) {
  // k-major, each k row padded by one 4-byte bank: a warp that stores 32 consecutive k of
  // one row or column (a K-contiguous operand) then hits 32 different banks, where
  // unpadded 128-byte rows would put all 32 stores in one. A thread reads its 4 rows (or
  // columns) of one k as four scalar loads.
  __shared__ short a_tile[kStep][kTile + kPad];
  __shared__ short b_tile[kStep][kTile + kPad];
  __shared__ int ends_chain[kStep];  // the block index when k ends a chain, else -1

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.x * kTile, n0 = blockIdx.y * kTile;

  i32 sums[4][4] = {};
  float acc[4][4] = {};

  for (int k0 = 0; k0 < k_count; k0 += kStep) {
    // Consecutive threads read consecutive addresses for row-major and column-major operands.
    for (int e = tid; e < kTile * kStep; e += kThreads) {
      const int kl = a_k_stride == 1 ? e % kStep : e / kTile;
      const int ml = a_k_stride == 1 ? e / kStep : e % kTile;
      const int m = m0 + ml, k = k0 + kl;
      a_tile[kl][ml] = (m < m_count && k < k_count)
                           ? a[element_at(m, k, a_row_stride, a_k_stride, a_rows, a_ks)]
                           : short(0);
      const int kl_b = b_col_stride == 1 ? e / kTile : e % kStep;
      const int nl = b_col_stride == 1 ? e % kTile : e / kStep;
      const int n = n0 + nl, kk = k0 + kl_b;
      b_tile[kl_b][nl] = (n < n_count && kk < k_count)
                             ? b[element_at(n, kk, b_col_stride, b_k_stride, b_columns, b_ks)]
                             : short(0);
    }
    if (tid < kStep) {
      const int k = k0 + tid;
      const int in_block = k % kblock;
      const bool ends = k + 1 == k_count || in_block + 1 == kblock || (in_block + 1) % chain == 0;
      ends_chain[tid] = (k < k_count && ends) ? k / kblock : -1;
    }
    __syncthreads();

    const int steps = min(kStep, k_count - k0);
    for (int kl = 0; kl < steps; ++kl) {
      i32 av[4], bv[4];
      for (int i = 0; i < 4; ++i) av[i] = a_tile[kl][ty * 4 + i];
      for (int j = 0; j < 4; ++j) bv[j] = b_tile[kl][tx * 4 + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) sums[i][j] += av[i] * bv[j];
      const int blk = ends_chain[kl];
      if (blk >= 0) {  // uniform over the block
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 4; ++j) {
            const int m = min(m0 + ty * 4 + i, m_count - 1), n = min(n0 + tx * 4 + j, n_count - 1);
            acc[i][j] = add_chain_sum(acc[i][j], sums[i][j], sa, sb, kb, n_count, m, n, blk);
            sums[i][j] = 0;
          }
        }
      }
    }
    __syncthreads();
  }

  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m >= m_count) break;
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n >= n_count) break;
      const float v = scale_result(acc[i][j], ra[m] + rb[n]);
      out[i64(m) * n_count + n] = has_bias ? add_rn(v, bias[n]) : v;
    }
  }
}
