// DFP16 quantization and dequantization on CUDA, bit-identical to the CPU backends.
//
// The input is the contiguous float32 tensor viewed as (O, N, I) (docs/design.md); a group
// is the whole tensor (mode 0), one index n of N (mode 1) or a run of B consecutive n at
// fixed (o, i) (mode 2, NB = ceil(N / B) runs). Blocks need no maximum over the tensor:
// one launch, dfp_quantize_blocks. The other modes take three:
//   1. dfp_amax_{tensor,channel}: the largest |x| bit pattern of every group into
//      `amax` (int32, zeroed by the caller). |x| bits are ordered like |x| and a NaN or
//      Inf has bits >= 0x7f800000, so one integer max finds both the scale and any
//      non-finite value; all |x| bits fit in a non-negative int32.
//   2. dfp_exponents: the group exponents, and `nonfinite[0] = 1` if a group held NaN/Inf
//      (dfp.quantize reads it once, after the launches, and raises; the training layers
//      leave it on the device: dfp/cuda/quantize.py, quantize3d_marked).
//   3. dfp_quantize: every element, with the random bits of its row-major flat index (all
//      0 where the flag is set).
// Sizes are int: the caller keeps tensors below 2^30 elements and grids below 2^30
// threads, so no index or grid stride overflows.
#include "dfp_cuda.h"

using namespace dfp;

// Largest value over the warp; every lane gets it.
__device__ __forceinline__ i32 warp_max(i32 v) {
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Four independent loads per thread and step, so that more bytes are in flight per thread
// (on the H200 this kernel ran at 58 % of copy bandwidth; the one-load form was not timed
// alone).
extern "C" __global__ void dfp_amax_tensor(const float* __restrict__ x, int count, int* __restrict__ amax) {
  const int stride = gridDim.x * blockDim.x;
  u32 v0 = 0u, v1 = 0u, v2 = 0u, v3 = 0u;
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  for (; idx < count - 3 * stride; idx += 4 * stride) {
    v0 = max(v0, abs_bits(x[idx]));
    v1 = max(v1, abs_bits(x[idx + stride]));
    v2 = max(v2, abs_bits(x[idx + 2 * stride]));
    v3 = max(v3, abs_bits(x[idx + 3 * stride]));
  }
  for (; idx < count; idx += stride) v0 = max(v0, abs_bits(x[idx]));
  const i32 v = warp_max(i32(max(max(v0, v1), max(v2, v3))));
  if ((threadIdx.x & 31) == 0) atomicMax(amax, v);
}

// Mode 1. Thread j owns column j = (n, i) of the (O, N*I) view and the rows
// [blockIdx.y * rows_per_block, ...): reads are coalesced whatever I is. A warp whose
// columns all share one n (I >= 32, or a run inside one n) does one atomic.
extern "C" __global__ void dfp_amax_channel(const float* __restrict__ x, int rows, int n_count, int inner,
                                            int rows_per_block, int* __restrict__ amax) {
  const int columns = n_count * inner;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const bool valid = j < columns;
  const int n = valid ? j / inner : -1;
  i32 v = 0;
  if (valid) {
    const int first = blockIdx.y * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    int o = first;
    for (; o < last - 3; o += 4) {  // four rows in flight, as in dfp_amax_tensor
      const u32 b0 = abs_bits(x[o * columns + j]), b1 = abs_bits(x[(o + 1) * columns + j]);
      const u32 b2 = abs_bits(x[(o + 2) * columns + j]), b3 = abs_bits(x[(o + 3) * columns + j]);
      v = max(v, i32(max(max(b0, b1), max(b2, b3))));
    }
    for (; o < last; ++o) v = max(v, i32(abs_bits(x[o * columns + j])));
  }
  // lane 0 is valid whenever any lane is (j grows with the lane)
  const int n0 = __shfl_sync(0xffffffffu, n, 0);
  if (__all_sync(0xffffffffu, !valid || n == n0)) {
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0 && n0 >= 0) atomicMax(&amax[n0], v);
  } else if (valid) {
    atomicMax(&amax[n], v);
  }
}

// Mode 2 in one launch: each group's maximum, exponent and mantissas (x read again from
// cache); `nonfinite[0] = 1` and exponent 0 where a group held NaN/Inf (the caller reads
// the flag once and raises). I > 1: one thread per group (o, nb, i), i fastest, so that
// neighbouring threads read neighbouring addresses. I = 1 (blocks along the last axis):
// one warp per group, its lanes over the run, for the same reason.
extern "C" __global__ void dfp_quantize_blocks(const float* __restrict__ x, int rows, int n_count, int inner,
                                               int block, int headroom, int rounding, int seed_low, int seed_high,
                                               short* __restrict__ out, int* __restrict__ exponent,
                                               int* __restrict__ nonfinite) {
  const int groups = rows * ((n_count + block - 1) / block) * inner;
  const bool warp_groups = inner == 1;
  const int lanes = warp_groups ? 32 : 1, lane = warp_groups ? threadIdx.x & 31 : 0;
  const int step = gridDim.x * blockDim.x / lanes;  // blockDim.x is a multiple of 32
  for (int g = (blockIdx.x * blockDim.x + threadIdx.x) / lanes; g < groups; g += step) {
    int first, length;
    block_group_span(g, n_count, inner, block, &first, &length);
    i32 amax = i32(group_amax_part(x, first, inner, length, lane, lanes));
    if (warp_groups) amax = warp_max(amax);
    if (u32(amax) >= kNonFiniteBits) {
      if (lane == 0) {
        exponent[g] = 0;
        nonfinite[0] = 1;
      }
      continue;
    }
    const i32 e = group_exponent(u32(amax), headroom);
    if (lane == 0) exponent[g] = e;
    quantize_group_part(x, first, inner, length, lane, lanes, e, headroom, rounding, u32(seed_low), u32(seed_high),
                        out);
  }
}

extern "C" __global__ void dfp_exponents(const int* __restrict__ amax, int groups, int headroom,
                                         int* __restrict__ exponent, int* __restrict__ nonfinite) {
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x) {
    const u32 bits = u32(amax[g]);
    if (bits >= kNonFiniteBits) {
      nonfinite[0] = 1;
      exponent[g] = 0;
    } else {
      exponent[g] = group_exponent(bits, headroom);
    }
  }
}

struct __align__(8) Vec4Short {  // one 8-byte store
  short x, y, z, w;
};

// Per tensor (mode 0) with `count` a multiple of 4 and 16-byte aligned data: four elements
// per thread and step, in one 16-byte load and one 8-byte store.
__device__ __forceinline__ void quantize_tensor_vec4(const float* __restrict__ x, int count, Scale s, float limit,
                                                     int rounding, u32 k0, u32 k1, short* __restrict__ out) {
  const float4* x4 = reinterpret_cast<const float4*>(x);
  Vec4Short* out4 = reinterpret_cast<Vec4Short*>(out);
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < count / 4; q += gridDim.x * blockDim.x) {
    const float4 v = x4[q];
    const u64 idx = u64(q) * 4;
    out4[q] = {quantize_one(v.x, s, limit, rounding, idx, k0, k1),
               quantize_one(v.y, s, limit, rounding, idx + 1, k0, k1),
               quantize_one(v.z, s, limit, rounding, idx + 2, k0, k1),
               quantize_one(v.w, s, limit, rounding, idx + 3, k0, k1)};
  }
}

// count < 2^31 elements (the caller checks). vec4: mode 0, count % 4 == 0, x 16-byte aligned.
// Where nonfinite[0] is set (by dfp_exponents, launched before), every mantissa is 0.
extern "C" __global__ void dfp_quantize(const float* __restrict__ x, int count, int mode, int n_count, int inner,
                                        int block, const int* __restrict__ exponent, int headroom, int rounding,
                                        int seed_low, int seed_high, int vec4, const int* __restrict__ nonfinite,
                                        short* __restrict__ out) {
  if (nonfinite[0]) {
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) out[idx] = 0;
    return;
  }
  const float limit = float(max_mantissa(headroom));
  const u32 k0 = u32(seed_low), k1 = u32(seed_high);
  if (mode == 0) {
    const Scale s = inverse_scale(exponent[0]);
    if (vec4) {
      quantize_tensor_vec4(x, count, s, limit, rounding, k0, k1, out);
      return;
    }
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) {
      out[idx] = quantize_one(x[idx], s, limit, rounding, u64(idx), k0, k1);
    }
    return;
  }
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) {
    const i32 e = exponent[group_of(idx, mode, n_count, inner, block)];
    out[idx] = quantize_one(x[idx], inverse_scale(e), limit, rounding, u64(idx), k0, k1);
  }
}

// float32(mantissa * 2^e), computed as DFPTensor.dequantize does: exact in fp64, one rounding.
extern "C" __global__ void dfp_dequantize(const short* __restrict__ mantissa, int count, int mode, int n_count,
                                          int inner, int block, const int* __restrict__ exponent,
                                          float* __restrict__ out) {
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) {
    const i32 e = exponent[group_of(idx, mode, n_count, inner, block)];
    out[idx] = __double2float_rn(double(mantissa[idx]) * pow2d(e));
  }
}

// The conv layers' quantizations (dfp/cuda/layout.py) in one pass over the output: the
// source x is an image (images, height, width, cols) of float32 (a pixel matrix is an
// image of width 1), the output one of int16 (images, out_height, out_width, out_cols)
// with x at rows [top, top + height) and columns [left, left + width), zeros elsewhere and
// in the channels from cols on. Pixel r = (n * height + h) * width + w of x and channel c
// take exponent[(r / tile_rows) * group_columns + c / tile_cols], and the random bits of
// their index r * cols + c in the pixel matrix (the generic path's rule). Where
// nonfinite[0] is set (by the launches that made the exponents, before this one), every
// mantissa is 0: the marking of a source with NaN/Inf, without a host sync.
extern "C" __global__ void dfp_quantize_grouped(const float* __restrict__ x, int images, int height, int width,
                                                int cols, int top, int left, int out_height, int out_width,
                                                int out_cols, int tile_rows, int tile_cols, int group_columns,
                                                const int* __restrict__ exponent, int headroom, int rounding,
                                                int seed_low, int seed_high, const int* __restrict__ nonfinite,
                                                short* __restrict__ out) {
  const int count = images * out_height * out_width * out_cols;
  const float limit = float(max_mantissa(headroom));
  const bool marked = nonfinite[0] != 0;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) {
    const int c = idx % out_cols, pixel = idx / out_cols;
    const int w = pixel % out_width - left, h = pixel / out_width % out_height - top;
    if (marked || c >= cols || h < 0 || h >= height || w < 0 || w >= width) {
      out[idx] = 0;
      continue;
    }
    const int r = (pixel / (out_width * out_height) * height + h) * width + w;
    const i32 e = exponent[(r / tile_rows) * group_columns + c / tile_cols];
    const int at = r * cols + c;
    out[idx] = quantize_one(x[at], inverse_scale(e), limit, rounding, u64(at), u32(seed_low), u32(seed_high));
  }
}

// Rows [r0, r0 + out_height) and columns [c0, c0 + out_width) of the int16 image x
// (images, height, width, cols), with out_cols >= cols channels: zeros past its edges.
extern "C" __global__ void dfp_window(const short* __restrict__ x, int images, int height, int width, int cols,
                                      int r0, int c0, int out_height, int out_width, int out_cols,
                                      short* __restrict__ out) {
  const int count = images * out_height * out_width * out_cols;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) {
    const int c = idx % out_cols, pixel = idx / out_cols;
    const int w = pixel % out_width + c0, h = pixel / out_width % out_height + r0;
    const int n = pixel / (out_width * out_height);
    const bool inside = c < cols && h >= 0 && h < height && w >= 0 && w < width;
    out[idx] = inside ? x[((n * height + h) * width + w) * cols + c] : short(0);
  }
}
