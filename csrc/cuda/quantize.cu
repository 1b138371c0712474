// DFP16 quantization and dequantization on CUDA, bit-identical to the CPU backends.
//
// The input is the contiguous float32 tensor viewed as (O, N, I) (docs/design.md); a group
// is the whole tensor (mode 0), one index n of N (mode 1) or a run of B consecutive n at
// fixed (o, i) (mode 2, NB = ceil(N / B) runs). Blocks need no maximum over the tensor:
// one launch, dfp_quantize_blocks (dfp_quantize_blocks_vec4 for runs along the last axis
// in whole 16-byte quads). The other modes take three:
//   1. dfp_amax_{tensor,channel}: the largest |x| bit pattern of every group into
//      `amax` (int32, zeroed by the caller). |x| bits are ordered like |x| and a NaN or
//      Inf has bits >= 0x7f800000, so one integer max finds both the scale and any
//      non-finite value; all |x| bits fit in a non-negative int32.
//   2. dfp_exponents: the group exponents, and `nonfinite[0] = 1` if a group held NaN/Inf
//      (dfp.quantize reads it once, after the launches, and raises; the training layers
//      leave it on the device: dfp/cuda/quantize.py, quantize3d_marked).
//   3. dfp_quantize: every element, with the random bits of its row-major flat index (all
//      0 where the flag is set).
// These kernels only move memory: their speed is the bytes in flight. So x is read in
// 16-byte float4 loads wherever the count (or the run, or the channel's inner size) is a
// multiple of 4 and the data 16-byte aligned (`vec4`, checked by the caller), several
// loads per thread are issued before any is used, and a block's values stay in registers
// between its maximum and its rounding: each element is read from DRAM once per pass.
// On the H200 (8192 x 8192, device time by torch.profiler, GB/s over copy's counting 6
// bytes per element): blocks of 32 along the last axis went from 19 % (a warp per group,
// one 4-byte load per lane) to 73 %, blocks of 64 to 256 run at 93 %, the per-tensor
// rounding from 38 % (one float per thread and step) to 93 %; the per-tensor maximum was
// at copy bandwidth already (4 bytes per element).
// Sizes are int: the caller keeps tensors below 2^30 elements and grids below 2^30
// threads, so no index or grid stride overflows.
#include "dfp_cuda.h"

using namespace dfp;

// Blocks of 256 threads (dfp/cuda/quantize.py's _THREADS), at least 4 of them resident per
// SM (at most 64 registers a thread): the grid-stride kernels marked so are launched with
// 4 blocks per SM, all running at once, none left for a second, nearly empty wave.
#define DFP_FOUR_PER_SM __launch_bounds__(256, 4)

// Largest value over the warp; every lane gets it.
__device__ __forceinline__ i32 warp_max(i32 v) {
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

struct __align__(8) Vec4Short {  // one 8-byte store
  short x, y, z, w;
};

// The largest |x| bits of four floats.
__device__ __forceinline__ u32 abs_bits4(float4 v) {
  return max(max(abs_bits(v.x), abs_bits(v.y)), max(abs_bits(v.z), abs_bits(v.w)));
}

// Four consecutive elements, the first of flat index idx, with one scale.
__device__ __forceinline__ Vec4Short quantize4(float4 v, Scale s, float limit, int rounding, u64 idx, u32 k0,
                                               u32 k1) {
  return {quantize_one(v.x, s, limit, rounding, idx, k0, k1), quantize_one(v.y, s, limit, rounding, idx + 1, k0, k1),
          quantize_one(v.z, s, limit, rounding, idx + 2, k0, k1),
          quantize_one(v.w, s, limit, rounding, idx + 3, k0, k1)};
}

// Four independent loads per thread and step, so that more bytes are in flight per thread:
// float4 loads where vec4 (count % 4 == 0, x 16-byte aligned), else single floats.
extern "C" __global__ void DFP_FOUR_PER_SM dfp_amax_tensor(const float* __restrict__ x, int count, int vec4,
                                                           int* __restrict__ amax) {
  const int stride = gridDim.x * blockDim.x;
  u32 v0 = 0u, v1 = 0u, v2 = 0u, v3 = 0u;
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (vec4) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int quads = count / 4;
    for (; idx < quads - 3 * stride; idx += 4 * stride) {
      const float4 a = x4[idx], b = x4[idx + stride], c = x4[idx + 2 * stride], d = x4[idx + 3 * stride];
      v0 = max(v0, abs_bits4(a));
      v1 = max(v1, abs_bits4(b));
      v2 = max(v2, abs_bits4(c));
      v3 = max(v3, abs_bits4(d));
    }
    for (; idx < quads; idx += stride) v0 = max(v0, abs_bits4(x4[idx]));
  } else {
    for (; idx < count - 3 * stride; idx += 4 * stride) {
      v0 = max(v0, abs_bits(x[idx]));
      v1 = max(v1, abs_bits(x[idx + stride]));
      v2 = max(v2, abs_bits(x[idx + 2 * stride]));
      v3 = max(v3, abs_bits(x[idx + 3 * stride]));
    }
    for (; idx < count; idx += stride) v0 = max(v0, abs_bits(x[idx]));
  }
  const i32 v = warp_max(i32(max(max(v0, v1), max(v2, v3))));
  if ((threadIdx.x & 31) == 0) atomicMax(amax, v);
}

// Mode 1. Thread j owns column j = (n, i) of the (O, N*I) view (with vec4 where I % 4 == 0
// and x is 16-byte aligned: the four columns 4j..4j+3, all of one n, in one float4) and the
// rows [blockIdx.y * rows_per_block, ...): reads are coalesced whatever I is. A warp whose
// columns all share one n (I >= 32, or a run inside one n) does one atomic.
extern "C" __global__ void dfp_amax_channel(const float* __restrict__ x, int rows, int n_count, int inner,
                                            int rows_per_block, int vec4, int* __restrict__ amax) {
  const int width = vec4 ? 4 : 1;  // columns per thread
  const int units = n_count * inner / width;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const bool valid = j < units;
  const int n = valid ? j * width / inner : -1;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  auto bits = [&](int o) { return vec4 ? abs_bits4(x4[o * units + j]) : abs_bits(x[o * units + j]); };
  i32 v = 0;
  if (valid) {
    const int first = blockIdx.y * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    int o = first;
    for (; o < last - 3; o += 4) {  // four rows in flight, as in dfp_amax_tensor
      const u32 b0 = bits(o), b1 = bits(o + 1), b2 = bits(o + 2), b3 = bits(o + 3);
      v = max(v, i32(max(max(b0, b1), max(b2, b3))));
    }
    for (; o < last; ++o) v = max(v, i32(bits(o)));
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
// neighbouring threads read neighbouring addresses. I = 1 (blocks along the last axis)
// where dfp_quantize_blocks_vec4 cannot run: one warp per group, its lanes over the run,
// for the same reason.
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

// Quads (float4) a lane keeps in registers between its group's maximum and rounding.
constexpr int kQuadsPerLane = 4;

// Mode 2 with I = 1 and the run in whole quads (N % 4 == 0, B % 4 == 0, x 16-byte
// aligned, checked by the caller): every group starts on a quad and holds length / 4 of
// them. `lanes` (a power of two <= 32) consecutive lanes share a group, lane l taking its
// quads l, l + lanes, ...; a warp takes 32 / lanes consecutive groups, and the loop runs
// while the warp's first group exists, so that every lane reaches the shuffles. Each
// element is read once (16-byte loads, all issued before the maximum), rounded from
// registers (quads past kQuadsPerLane per lane, B > 512, are read again) and stored 4 to
// an 8-byte store; the maximum, exponent, NaN/Inf handling and random bits (flat index)
// are those of dfp_quantize_blocks. dfp/cuda/quantize.py picks lanes = B / 16 (4 quads
// each), at least 4 (a 64-byte run of a group per load): on the H200 that ran at 93 % of
// copy bandwidth for B = 64 to 256 and 74 % for B = 32, where 2 lanes of 4 quads (32-byte
// runs) gave 70 %, 8 lanes of 1 quad 47 %, and 4 groups per lane with a lane per quad 63 %
// (the per-group arithmetic four times over).
extern "C" __global__ void DFP_FOUR_PER_SM dfp_quantize_blocks_vec4(const float* __restrict__ x, int rows,
                                                                    int n_count, int block, int lanes, int headroom,
                                                                    int rounding, int seed_low, int seed_high,
                                                                    short* __restrict__ out,
                                                                    int* __restrict__ exponent,
                                                                    int* __restrict__ nonfinite) {
  const int groups = rows * ((n_count + block - 1) / block);
  const float4* x4 = reinterpret_cast<const float4*>(x);
  Vec4Short* out4 = reinterpret_cast<Vec4Short*>(out);
  const int lane = threadIdx.x & (lanes - 1), slot = (threadIdx.x & 31) / lanes;
  const int step = gridDim.x * blockDim.x / lanes;  // groups per sweep of the grid
  const float limit = float(max_mantissa(headroom));
  const u32 k0 = u32(seed_low), k1 = u32(seed_high);
  for (int g0 = (blockIdx.x * blockDim.x + threadIdx.x) / 32 * (32 / lanes); g0 < groups; g0 += step) {
    const int g = g0 + slot;
    int first = 0, length = 0;  // a lane past the last group loads and stores nothing
    if (g < groups) block_group_span(g, n_count, 1, block, &first, &length);
    const int base = first / 4, quads = length / 4;
    float4 v[kQuadsPerLane];
    u32 amax = 0u;
#pragma unroll
    for (int k = 0; k < kQuadsPerLane; ++k) {
      if (lane + k * lanes < quads) v[k] = x4[base + lane + k * lanes];
    }
#pragma unroll
    for (int k = 0; k < kQuadsPerLane; ++k) {
      if (lane + k * lanes < quads) amax = max(amax, abs_bits4(v[k]));
    }
    for (int q = lane + kQuadsPerLane * lanes; q < quads; q += lanes) amax = max(amax, abs_bits4(x4[base + q]));
    for (int offset = lanes / 2; offset > 0; offset /= 2) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (g >= groups) continue;
    if (amax >= kNonFiniteBits) {
      if (lane == 0) {
        exponent[g] = 0;
        nonfinite[0] = 1;
      }
      continue;
    }
    const i32 e = group_exponent(amax, headroom);
    if (lane == 0) exponent[g] = e;
    const Scale s = inverse_scale(e);
#pragma unroll
    for (int k = 0; k < kQuadsPerLane; ++k) {
      const int q = base + lane + k * lanes;
      if (lane + k * lanes < quads) out4[q] = quantize4(v[k], s, limit, rounding, u64(q) * 4, k0, k1);
    }
    for (int q = base + lane + kQuadsPerLane * lanes; q < base + quads; q += lanes) {
      out4[q] = quantize4(x4[q], s, limit, rounding, u64(q) * 4, k0, k1);
    }
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

// Modes 0 and 1 with vec4 (count % 4 == 0, for mode 1 also I % 4 == 0 so that a quad's
// four elements share a channel; x 16-byte aligned): four quads per thread and step, all
// loaded before any is rounded, in 16-byte loads and 8-byte stores.
__device__ __forceinline__ void quantize_vec4(const float* __restrict__ x, int count, int mode, int n_count,
                                              int inner, const int* __restrict__ exponent, float limit,
                                              int rounding, u32 k0, u32 k1, short* __restrict__ out) {
  const float4* x4 = reinterpret_cast<const float4*>(x);
  Vec4Short* out4 = reinterpret_cast<Vec4Short*>(out);
  const int quads = count / 4, stride = gridDim.x * blockDim.x;
  const Scale tensor_scale = inverse_scale(exponent[0]);
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < quads; q += 4 * stride) {
    float4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (q + k * stride < quads) v[k] = x4[q + k * stride];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int at = q + k * stride;
      if (at < quads) {
        const Scale s = mode == 0 ? tensor_scale : inverse_scale(exponent[group_of(4 * at, 1, n_count, inner, 1)]);
        out4[at] = quantize4(v[k], s, limit, rounding, u64(at) * 4, k0, k1);
      }
    }
  }
}

// count < 2^31 elements (the caller checks). vec4: mode 0 or 1, as quantize_vec4 says.
// Where nonfinite[0] is set (by dfp_exponents, launched before), every mantissa is 0.
extern "C" __global__ void DFP_FOUR_PER_SM dfp_quantize(const float* __restrict__ x, int count, int mode,
                                                        int n_count, int inner, int block,
                                                        const int* __restrict__ exponent, int headroom, int rounding,
                                                        int seed_low, int seed_high, int vec4,
                                                        const int* __restrict__ nonfinite, short* __restrict__ out) {
  if (nonfinite[0]) {
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < count; idx += gridDim.x * blockDim.x) out[idx] = 0;
    return;
  }
  const float limit = float(max_mantissa(headroom));
  const u32 k0 = u32(seed_low), k1 = u32(seed_high);
  if (vec4) {
    quantize_vec4(x, count, mode, n_count, inner, exponent, limit, rounding, k0, k1, out);
    return;
  }
  if (mode == 0) {
    const Scale s = inverse_scale(exponent[0]);
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
