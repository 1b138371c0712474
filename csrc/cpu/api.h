// The entry points of the compiled core, on raw buffers (no torch headers).
#pragma once
#include <cstdint>
#include <vector>

namespace dfp {

struct Packed;  // gemm.h

// x: contiguous (O, N, I); see QuantizeShape. rounding: a Rounding code (numerics.h).
// False (nothing written) on NaN/Inf.
bool quantize3d(const float* x, int64_t O, int64_t N, int64_t I, int mode, int64_t block, int headroom,
                int rounding, uint64_t seed, int16_t* mantissa, int32_t* exponent, int nthreads);

// c (M, N) = a (M, K; strides sam, sak) x b (K, N; strides sbk, sbn); ea (M, KB),
// eb (KB, N) contiguous; bias (N,) or null.
void gemm_int16(const int16_t* a, int64_t sam, int64_t sak, const int16_t* b, int64_t sbk, int64_t sbn,
                int64_t M, int64_t N, int64_t K, const int32_t* ea, const int32_t* eb, int64_t kblock,
                int headroom_a, int headroom_b, const float* bias, float* c, int nthreads);

// How x (M, K) is grouped in a fused matmul; y (K, N) gets the mirrored grouping.
enum class MatmulGrouping : int { tensor = 0, rows = 1, k_blocks = 2 };

// c = quantize(x) quantize(y), quantization fused into packing. x, y contiguous.
// False (nothing written) on NaN/Inf in x or y.
bool matmul_float(const float* x, const float* y, int64_t M, int64_t N, int64_t K, int headroom,
                  MatmulGrouping grouping, int64_t block, int rounding, uint64_t seed_x, uint64_t seed_y,
                  const float* bias, float* c, int nthreads);

// A convolution's geometry: a contiguous zero-padded int16 image (n, hp, wp, channels)
// and a kernel (kh, kw) with stride and dilation, in `groups` groups.
struct ConvGeometry {
  int64_t n, hp, wp, channels, groups, kh, kw, sh, sw, dh, dw;
};

// The exponents of a convolution's image: one (count 1), one per image (count n), or
// (channel_block > 0) one per image row and block of that many channels, (n, hp,
// channels / channel_block) row-major, count n * hp * channels / channel_block.
struct ImageExponents {
  const int32_t* values;
  int64_t count;
  int64_t channel_block = 0;
};

// Where a product's output pixels lie: one after the other (line 0); or as a grid of
// `lines` lines of `line` pixels per image, pixel_stride, line_stride and image_stride
// elements apart (a phase of a strided convolution's grad_input: every s-th pixel of
// every s-th row of dx).
struct OutputGrid {
  int64_t line = 0, lines = 0, pixel_stride = 0, line_stride = 0, image_stride = 0;
};

// Rows and columns at the image's edges known to hold zeros (a forward's padding): the
// products of the patches' taps there are skipped where whole chains read only them.
struct ZeroBorder {
  int64_t top = 0, bottom = 0, left = 0, right = 0;
};

// y (pixels, groups * nout) = per group g: patches_g (pixels, K) x w_g (K, nout), K over
// (kh, kw, ci), with w_g at w + g * swg (element strides swk, swn); ex the image's
// exponents (per image row and channel block, which divides channels / groups: K-blocks
// of kblock = ex.channel_block, or where that is a group's channels, kw times that);
// ew (groups, KB, nout) contiguous, or with ew_one_row (groups, 1, nout): the same row
// for every K-block (a weight's exponents per tensor or output channel), which spares
// every call a table of chain scales that are all 1; bias (groups * nout) or null; y's
// pixels on `grid`; packed_weight: w as pack_conv_weight packed it (else packed in the call);
// zeros: x's border known to be zeros (ZeroBorder).
void conv_gemm_int16(const int16_t* x, const ConvGeometry& geometry, ImageExponents ex, int hx, const int16_t* w,
                     int64_t swg, int64_t swk, int64_t swn, int64_t nout, const int32_t* ew, int64_t kblock, int hw,
                     const float* bias, float* y, int nthreads, const OutputGrid& grid = {},
                     const std::vector<Packed>* packed_weight = nullptr, bool ew_one_row = false,
                     ZeroBorder zeros = {});

// conv_gemm_int16's w (the same strides, nout and kblock) packed into `packed`, one per
// group of `geometry`, for calls that share it: the forward's pieces of a few images
// each had packed a 512-channel layer's 4.7 MB weight again, 19 times a forward.
void pack_conv_weight(const ConvGeometry& geometry, const int16_t* w, int64_t swg, int64_t swk, int64_t swn,
                      int64_t nout, int64_t kblock, std::vector<Packed>& packed, int nthreads);

// The exponents of grad_weight's image: one, or (per_sample) one per sample and
// channel, (n, channels) row-major. The samples of a K-block of grad_weight share theirs,
// as do those of the fewest whole samples that are whole K-blocks (quantize_input groups
// them so): grad_weight reads each such group's first sample's.
// channel_major: the image itself lies as channel planes (n, channels, hp, wp), as
// quantize_input writes it where grad_weight_reads_channel_major (else channels last).
struct InputExponents {
  const int32_t* values;
  bool per_sample = false;
  bool channel_major = false;
};

// dw (cout, K) = per group g: dy_g^T (cout / groups, pixels) x patches_g (pixels, K);
// dy (pixels, cout) contiguous with exponents ey (KB, cout), one per block of kblock
// pixels (KB = ceil(pixels / kblock); kblock even unless KB = 1) and channel; the
// image's exponents ex. dy_panel_width > 0: dy already in the K-pair panels the
// product reads (quantize_gradient's PairPanels of that width, the K-pairs of
// KLayout(pixels, kblock)), which grad_weight_panel_width gave.
// channels: where not all, only dW's columns of those input channels (a layer whose
// image grad_weight reads as channel planes, one group): parts of dW that threads compute
// side by side, with the bits of the whole. A part starts at a multiple of
// kPatchChannelGroup channels and ends at one or at the last channel.
constexpr int64_t kPatchChannelGroup = 4;  // PatchRowOrder's groups (conv.h)
struct ChannelRange {
  int64_t first = 0, last = INT64_MAX;
  bool all() const { return first == 0 && last == INT64_MAX; }
};
void conv_grad_weight_int16(const int16_t* dy, int64_t cout, const int32_t* ey, int64_t kblock, int hy,
                            const int16_t* x, const ConvGeometry& geometry, InputExponents ex, int hx, float* dw,
                            int64_t dy_panel_width, int nthreads, ChannelRange channels = {});

// The panel width in which conv_grad_weight_int16 reads dy (cout channels) where that
// product packs dy whole (one group, its columns whole panels), else 0.
int64_t grad_weight_panel_width(const ConvGeometry& geometry, int64_t cout);

// Whether conv_grad_weight_int16 reads the image as channel planes (a 16- to 64-channel
// layer of stride 1): given so (InputExponents::channel_major), it transposes nothing.
bool grad_weight_reads_channel_major(const ConvGeometry& geometry, int64_t cout);

}  // namespace dfp
