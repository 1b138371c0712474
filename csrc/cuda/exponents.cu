// Exponent bookkeeping of the GEMMs and the convolutions' patches, on the device in one
// launch each (dfp/cuda/gemm.py, dfp/cuda/layout.py).
//
// dfp_gemm_scales: the GEMM's epilogue shifts and fp32 block scales from its int32 exponents, one warp per
// line (a row of ea (M, KB) or a column of eb (KB, N)), in one launch per operand: the
// maxima and exact powers of two that torch ops made in about a dozen launches per GEMM.
// A warp, not a thread, per line: a weight gradient's lines have thousands of K-blocks
// and are few (16 to 144 in ResNet-20), and one thread each took 12 of the 29 ms a
// ResNet-20 step spent on an H200.
// Exponents are read through their strides (an expanded view, stride 0, needs no copy);
// the scales are written dense, sa (M, KB) and sb (KB, N) row-major.
#include "dfp_cuda.h"

using namespace dfp;

extern "C" __global__ void dfp_gemm_scales(const int* __restrict__ e, int lines, int blocks, int line_stride,
                                           int block_stride, int* __restrict__ r, float* __restrict__ s,
                                           int s_line_stride, int s_block_stride) {
  const int lane = threadIdx.x & 31, warps = gridDim.x * blockDim.x / 32;  // blockDim.x: a multiple of 32
  for (int line = (blockIdx.x * blockDim.x + threadIdx.x) / 32; line < lines; line += warps) {
    const int* e_line = e + i64(line) * line_stride;
    int top = line_max_part(e_line, blocks, block_stride, lane, 32);
    for (int offset = 16; offset > 0; offset /= 2) top = max(top, __shfl_xor_sync(0xffffffffu, top, offset));
    if (lane == 0) r[line] = top;
    line_scales_part(e_line, blocks, block_stride, top, s + i64(line) * s_line_stride, s_block_stride, lane, 32);
  }
}

// A convolution's patch-matrix exponents (dfp._ops._patch_row_exponents) for group g: the
// input has one per image row and channel block, ex (N, Hp, blocks); patch row
// (n, oh, ow) and K-block (kh, j, b) of the group's `per_group` blocks (j < KW / taps per
// block) take ex[n, oh * sh + kh * dh, g * per_group + b]. out: (N*OH*OW, KH*(KW/taps)*per_group).
extern "C" __global__ void dfp_patch_row_exponents(const int* __restrict__ ex, int hp, int blocks, int g,
                                                   int per_group, int oh_count, int ow_count, int kh_count,
                                                   int row_blocks, int sh, int dh, int rows, int* __restrict__ out) {
  const int kb = kh_count * row_blocks * per_group;
  const i64 count = i64(rows) * kb;
  for (i64 idx = i64(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += i64(gridDim.x) * blockDim.x) {
    const int column = int(idx % kb), row = int(idx / kb);
    const int b = column % per_group, kh = column / per_group / row_blocks;
    const int pixel_row = row / ow_count, oh = pixel_row % oh_count, n = pixel_row / oh_count;
    out[idx] = ex[(i64(n) * hp + oh * sh + kh * dh) * blocks + g * per_group + b];
  }
}
