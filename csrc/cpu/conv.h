// Convolution as GEMM without an im2col matrix in memory: the patches of a zero-padded
// int16 NHWC image are gathered one cache block at a time, in the layout the
// micro-kernel reads (docs/design.md, "Layers"). K runs over (kh, kw, ci).
#pragma once
#include <cstdint>
#include <vector>

#include "gemm.h"

namespace dfp {

// One group of a convolution over a contiguous padded image (n, hp, wp, channels).
struct ConvShape {
  int64_t n, hp, wp, channels;  // the image; channels = groups * cg
  int64_t cg;                   // channels of this group (its first at the image pointer)
  int64_t kh, kw, sh, sw, dh, dw;
  int64_t oh() const { return fits(hp, kh, dh) ? (hp - dh * (kh - 1) - 1) / sh + 1 : 0; }
  int64_t ow() const { return fits(wp, kw, dw) ? (wp - dw * (kw - 1) - 1) / sw + 1 : 0; }
  static bool fits(int64_t size, int64_t k, int64_t d) { return size >= d * (k - 1) + 1; }
  int64_t pixels() const { return n * oh() * ow(); }  // output pixels: rows of the patch matrix
  int64_t k() const { return kh * kw * cg; }          // patch length
};

// Offsets in int16 elements of each kernel tap from a patch's origin pixel.
class PatchIndex {
 public:
  explicit PatchIndex(const ConvShape& s);
  int64_t tap(int64_t t) const { return taps_[t]; }

 private:
  std::vector<int64_t> taps_;
};

// A = the patch matrix (pixels, K) of the image x, in the K-pair layout kl. Where the
// image's K-pairs are whole int32 words (even channel counts, no padding in K) the
// micro-kernel reads them in the image itself, through a row pointer per pixel and an
// offset per K-pair; otherwise each block of patches is gathered into scratch.
class PatchRows : public ASource {
 public:
  // origins: where given (a PaddingOrder's, for patches read in place), row i is the
  // patch at origins[i] (in int16 elements), not output pixel i.
  PatchRows(const int16_t* x, const ConvShape& s, const KLayout& kl, const int64_t* origins = nullptr);
  int64_t rows() const override { return s_.pixels(); }
  // every K-pair lies inside one tap (cg even, blocks of even length)
  static bool pairs_in_taps(const ConvShape& s, const KLayout& kl) {
    return s.cg % 2 == 0 && (kl.nblocks == 1 || kl.kblock % 2 == 0);
  }
  // and is an aligned int32 word of the image, with no padding in K
  static bool reads_in_place(const int16_t* x, const ConvShape& s, const KLayout& kl) {
    return pairs_in_taps(s, kl) && s.channels % 2 == 0 && reinterpret_cast<uintptr_t>(x) % alignof(int32_t) == 0 &&
           s.k() % kl.kblock == 0;
  }
  ABlock block(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const override;

 private:
  ABlock in_place(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const;
  ABlock gathered(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const;

  const int16_t* x_;
  ConvShape s_;
  KLayout kl_;
  PatchIndex index_;
  bool pairs_in_taps_, in_place_;
  std::vector<int64_t> offsets_;  // in place: of every K-pair from a patch's origin, in bytes
  const int64_t* origins_;
};

// The output pixels of a convolution whose image has a border of zeros, grouped by the
// chains of their patches that read only that border (chains of `pairs` K-pairs in kl):
// the RowOrder gemm_packed takes (exponent rows: rows_per_exponent pixels share one) and
// each row's patch origin for PatchRows. Null where the chains skipped would be under
// 12 % of the products, too few to pay for the order. Kept per thread for the last few
// shapes: a layer's calls (and its forward's pieces of a few images) share one; made in
// every call, it had made a 16-channel 32x32 forward 17 % slower (AMD Zen 3).
struct PaddingOrder {
  RowOrder order;
  std::vector<int64_t> origin;
};
const PaddingOrder* padding_order(const ConvShape& s, const ZeroBorder& zeros, const KLayout& kl, int pairs,
                                  int64_t rows_per_exponent);

// B = the patch matrix (pixels, K) of x as the right operand of dW = dY^T patches:
// the reduction runs over pixels, so K-pairs are pixel pairs (kl over pixels).
class PatchColumns : public BSource {
 public:
  PatchColumns(const int16_t* x, const ConvShape& s, int nr);
  int64_t cols() const override { return s_.k(); }
  BBlock block(int64_t j0, int64_t cols, int64_t kp0, int64_t len, std::vector<int32_t>& scratch) const override;

 private:
  const int16_t* x_;
  ConvShape s_;
  int nr_;
  PatchIndex index_;
};

// The order of the rows (ci, tap) of the transposed patch matrix: channels in groups of
// `group` (the last may be smaller), each group's rows over its taps, then its channels.
// Groups of one channel: rows (ci, kh, kw). Groups of four: four rows in a row are one
// tap of four channel planes, at one stride (the plane's size), which a micro-kernel of
// 12 rows reads from three pointers (`TileKernel`'s strided path); over (ci, kh, kw)
// four of its twelve row pointers lived in xmm registers, moved out on every K-pair.
struct PatchRowOrder {
  int64_t channels, taps, group;
  int64_t row(int64_t ci, int64_t tap) const {
    const int64_t first = ci / group * group;
    return first * taps + tap * size(first) + ci - first;
  }
  int64_t channel(int64_t row) const {
    const int64_t first = row / (group * taps) * group;
    return first + (row - first * taps) % size(first);
  }
  int64_t tap(int64_t row) const {
    const int64_t first = row / (group * taps) * group;
    return (row - first * taps) / size(first);
  }
  int64_t size(int64_t first) const { return channels - first < group ? channels - first : group; }
};

// A = the transposed patch matrix (K, pixels) of dW^T = patches^T dY, read in place from
// the image in channel-major layout (n, channels, hp, wp), x at the group's first
// channel: row (ci, kh, kw) at K-pair q holds the tap's inputs for output pixels 2q and
// 2q + 1, neighbours in one row of the image where the stride along w is 1 and the
// output width even (`fits`). At stride 2 along w they are two columns apart: there each
// row of a plane holds its even columns, then its odd ones (`to_phase_planes`, an even
// wp), where they are neighbours again. Rows in PatchRowOrder, channels outermost, so that a
// thread's block of rows reads a share of the planes, each plane for all its taps at
// once (a 32-channel 16x16 dW 3-6 % faster than over taps outermost). kpairs >= pixels
// / 2: the K-pairs of the layout, whose last K-block may be padded (they read pixel
// pair 0, against zeros of dY).
class TransposedPatches : public ASource {
 public:
  TransposedPatches(const int16_t* x, const ConvShape& s, int64_t kpairs, PatchRowOrder order);
  static bool fits(const ConvShape& s) { return (s.sw == 1 || (s.sw == 2 && s.wp % 2 == 0)) && s.ow() % 2 == 0; }
  int64_t rows() const override { return s_.k(); }
  ABlock block(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const override;

 private:
  const int16_t* x_;
  ConvShape s_;
  PatchRowOrder order_;
  uint64_t id_;       // AScratch::KeptRows' source number
  int64_t* offsets_;  // of every pixel pair, in bytes: the same for every block of rows (the
                      // constructing thread's buffer: one TransposedPatches per thread at a time)
};

// Rows [r0, r1) and columns [c0, c1) of the image x (n, h, w, c) with out_channels >= c
// channels, into out (n, r1 - r0, c1 - c0, out_channels): zeros where the window reaches
// past x's edges and in the added channels. Each element of out is written once.
struct Window {
  int64_t r0, r1, c0, c1, out_channels;
};
void copy_window(const int16_t* x, int64_t n, int64_t h, int64_t w, int64_t c, const Window& window, int16_t* out,
                 int nthreads);
// Only the zeros of copy_window's out: where the window reaches past x's edges (a window
// that pads x, whose channel count is x's). x's pixels are left to be written in place.
void zero_window_border(int64_t n, int64_t h, int64_t w, const Window& window, int16_t* out, int nthreads);

// (n, pixels, channels) -> (n, channels, pixels).
void to_channel_major(const int16_t* x, int64_t n, int64_t pixels, int64_t channels, int16_t* out, int nthreads);
// (n, hp, wp, channels) -> (n, channels, hp, wp) with each row's even columns first, then
// its odd ones (wp even): TransposedPatches' image at stride 2 along w.
void to_phase_planes(const int16_t* x, int64_t n, int64_t hp, int64_t wp, int64_t channels, int16_t* out,
                     int nthreads);

// dY^T as rows of kpairs >= ceil(pixels / 2) pixel pairs (zeros past the last pixel):
// rows = the cout columns of dy (pixels, ld) from column 0.
void pack_transposed(const int16_t* dy, int64_t pixels, int64_t ld, int64_t cout, int64_t kpairs, int mr,
                     RowsA& out, int nthreads);

}  // namespace dfp
