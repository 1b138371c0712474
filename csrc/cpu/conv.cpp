// Patch gathering for the convolution GEMMs (conv.h).
#include "conv.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "numerics.h"
#include "planes.h"
#include "scratch.h"
#include "threads.h"

namespace dfp {
namespace {

// Copies n int16 (n even, as runs inside K-pair rows are): whole 32-byte chunks by
// fixed-size copies that compile to vector moves, since the runs are short (a tap's
// channels) and a call to memcpy per run would cost more than the copy.
inline void copy_run(int16_t* dst, const int16_t* src, int64_t n) {
  for (; n >= 16; n -= 16, dst += 16, src += 16) std::memcpy(dst, src, 32);
  for (; n >= 2; n -= 2, dst += 2, src += 2) std::memcpy(dst, src, 4);
}

// A run of consecutive patch elements that are consecutive in the image too: the same
// for every pixel of a block, so found once per block (divisions are slow).
struct Run {
  int64_t src, dst, length;  // src from the pixel's patch origin; dst in the block's layout
};

// Output pixels from `first` on, walked in order without dividing per pixel; along an
// image row the patch origin steps by a constant (a forward's row pointers took 1 % of a
// ResNet-20 step when each was made with four multiplies).
class PixelWalk {
 public:
  PixelWalk(const ConvShape& s, int64_t first)
      : s_(s), ow_(s.ow()), oh_(s.oh()), col_step_(s.sw * s.channels) {
    col_ = first % ow_, row_ = first / ow_ % oh_, image_ = first / (ow_ * oh_);
    origin_ = row_origin() + col_ * col_step_;
  }
  int64_t origin() const { return origin_; }
  void next() {
    if (++col_ < ow_) {
      origin_ += col_step_;
      return;
    }
    col_ = 0;
    if (++row_ == oh_) row_ = 0, ++image_;
    origin_ = row_origin();
  }

 private:
  int64_t row_origin() const { return (image_ * s_.hp + row_ * s_.sh) * s_.wp * s_.channels; }
  const ConvShape& s_;
  int64_t ow_, oh_, col_step_, col_, row_, image_, origin_;
};

#if defined(__SSE2__)
// Eight channels of four pixel pairs (eight rows of dy, ld apart) into eight rows of
// four K-pairs (ldd apart): the pairs of a row are interleaved, then 4x4 blocks of
// int32 transposed.
inline void transpose_pairs_4x8(const int16_t* dy, int64_t ld, int32_t* dst, int64_t ldd) {
  __m128i lo[4], hi[4];  // pixel pair i: the K-pairs of channels 0-3 and 4-7
  for (int i = 0; i < 4; ++i) {
    const __m128i even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dy + 2 * i * ld));
    const __m128i odd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dy + (2 * i + 1) * ld));
    lo[i] = _mm_unpacklo_epi16(even, odd);
    hi[i] = _mm_unpackhi_epi16(even, odd);
  }
  for (int half = 0; half < 2; ++half) {
    const __m128i* v = half ? hi : lo;
    const __m128i t0 = _mm_unpacklo_epi32(v[0], v[1]), t1 = _mm_unpackhi_epi32(v[0], v[1]);
    const __m128i t2 = _mm_unpacklo_epi32(v[2], v[3]), t3 = _mm_unpackhi_epi32(v[2], v[3]);
    int32_t* d = dst + 4 * half * ldd;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi64(t0, t2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + ldd), _mm_unpackhi_epi64(t0, t2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * ldd), _mm_unpacklo_epi64(t1, t3));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 3 * ldd), _mm_unpackhi_epi64(t1, t3));
  }
}
#endif

// x's columns inside a window: [left, right) of the window's.
struct WindowColumns {
  WindowColumns(const Window& win, int64_t w)
      : left(std::clamp<int64_t>(-win.c0, 0, win.c1 - win.c0)),
        right(std::clamp<int64_t>(w - win.c0, left, win.c1 - win.c0)) {}
  int64_t left, right;
};

// The zeros of a window's row (image row r of x, h rows high): all of it past x's top or
// bottom, else its columns past x's sides. True where x has pixels in the row.
bool zero_border_of_row(int64_t r, int64_t h, const WindowColumns& span, int64_t cols, int64_t oc, int16_t* dst) {
  if (r < 0 || r >= h || span.left == span.right) {
    std::fill_n(dst, cols * oc, int16_t(0));
    return false;
  }
  std::fill_n(dst, span.left * oc, int16_t(0));
  std::fill_n(dst + span.right * oc, (cols - span.right) * oc, int16_t(0));
  return true;
}

}  // namespace

PatchIndex::PatchIndex(const ConvShape& s) : taps_(s.kh * s.kw) {
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) taps_[i * s.kw + j] = (i * s.dh * s.wp + j * s.dw) * s.channels;
}

PatchRows::PatchRows(const int16_t* x, const ConvShape& s, const KLayout& kl, const int64_t* origins)
    : x_(x),
      s_(s),
      kl_(kl),
      index_(s),
      pairs_in_taps_(pairs_in_taps(s, kl)),
      in_place_(reads_in_place(x, s, kl)),
      origins_(origins) {
  if (origins && !in_place_)
    throw std::invalid_argument("PatchRows: patches in another order need patches read in place");
  if (!in_place_) return;
  offsets_.resize(kl.kpairs());  // the same for every block of rows: made once
  for (int64_t q = 0; q < kl.kpairs(); ++q) {
    const int64_t k = 2 * q, tap = k / s.cg;
    offsets_[q] = int64_t(sizeof(int16_t)) * (index_.tap(tap) + k - tap * s.cg);
  }
}

ABlock PatchRows::block(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const {
  return in_place_ ? in_place(i0, rows, kp0, len, scratch) : gathered(i0, rows, kp0, len, scratch);
}

ABlock PatchRows::in_place(int64_t i0, int64_t rows, int64_t kp0, int64_t, AScratch& scratch) const {
  // Rows past the last pixel repeat it: whatever they sum is never stored.
  scratch.rows.resize(rows);
  const int64_t valid = std::clamp<int64_t>(s_.pixels() - i0, 1, rows);
  if (origins_) {
    for (int64_t r = 0; r < valid; ++r) scratch.rows[r] = x_ + origins_[i0 + r];
  } else {
    PixelWalk pixel(s_, i0);
    for (int64_t r = 0; r < valid; ++r, pixel.next()) scratch.rows[r] = x_ + pixel.origin();
  }
  std::fill(scratch.rows.begin() + valid, scratch.rows.end(), scratch.rows[valid - 1]);
  ABlock block{};
  block.rows = scratch.rows.data();
  block.offsets = offsets_.data() + kp0;
  return block;
}

ABlock PatchRows::gathered(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& ascratch) const {
  std::vector<int32_t>& scratch = ascratch.patches;
  scratch.resize(rows * len);
  const int64_t valid = std::clamp<int64_t>(s_.pixels() - i0, 0, rows);
  PixelWalk pixel(s_, i0);
  if (pairs_in_taps_) {  // K-pair q holds k = 2q and 2q + 1: runs of channels per tap
    std::vector<Run> runs;
    const int64_t start = 2 * kp0, stop = std::min(2 * (kp0 + len), s_.k());
    for (int64_t k = start; k < stop;) {
      const int64_t tap = k / s_.cg, ci = k - tap * s_.cg, length = std::min(s_.cg - ci, stop - k);
      runs.push_back({index_.tap(tap) + ci, k - start, length});
      k += length;
    }
    const int64_t filled = std::max<int64_t>(stop - start, 0);
    for (int64_t r = 0; r < valid; ++r, pixel.next()) {
      int16_t* dst = reinterpret_cast<int16_t*>(scratch.data() + r * len);
      const int16_t* origin = x_ + pixel.origin();
      for (const Run& run : runs) copy_run(dst + run.dst, origin + run.src, run.length);
      std::fill(dst + filled, dst + 2 * len, int16_t(0));
    }
  } else {  // a pair may straddle taps, and blocks of odd length end in a zero
    std::vector<int64_t> offsets(2 * len);  // of each slot; -1 for a zero
    for (int64_t slot = 0; slot < 2 * len; ++slot) {
      const int64_t q = kp0 + slot / 2, block = q / kl_.pairs_per_block;
      const int64_t k = block * kl_.kblock + (q % kl_.pairs_per_block) * 2 + slot % 2;
      const bool inside = k < std::min(s_.k(), (block + 1) * kl_.kblock);
      offsets[slot] = inside ? index_.tap(k / s_.cg) + k % s_.cg : -1;
    }
    for (int64_t r = 0; r < valid; ++r, pixel.next()) {
      int16_t* dst = reinterpret_cast<int16_t*>(scratch.data() + r * len);
      const int16_t* origin = x_ + pixel.origin();
      for (int64_t slot = 0; slot < 2 * len; ++slot) dst[slot] = offsets[slot] < 0 ? int16_t(0) : origin[offsets[slot]];
    }
  }
  std::fill(scratch.data() + valid * len, scratch.data() + rows * len, 0);
  return {scratch.data(), len, nullptr, 0, rows};
}

namespace {

// Per output row (or column) of a convolution, a mask of the kernel rows (columns) whose
// taps read the zero border: `size` output positions, `taps` kernel positions, image
// extent `extent` with `low` and `high` zero lines.
std::vector<uint64_t> border_taps(int64_t size, int64_t taps, int64_t stride, int64_t dilation, int64_t extent,
                                  int64_t low, int64_t high) {
  std::vector<uint64_t> mask(size, 0);
  for (int64_t o = 0; o < size; ++o)
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t at = o * stride + t * dilation;
      if (at < low || at >= extent - high) mask[o] |= uint64_t(1) << t;
    }
  return mask;
}

// The distinct values of v, and each element's index among them.
std::vector<uint64_t> distinct(const std::vector<uint64_t>& v, std::vector<uint8_t>& index) {
  std::vector<uint64_t> values;
  index.resize(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    auto at = std::find(values.begin(), values.end(), v[i]);
    if (at == values.end()) at = values.insert(at, v[i]);
    index[i] = uint8_t(at - values.begin());
  }
  return values;
}

// The least share of a convolution's products that the skipped chains must make for the
// order to pay (measured on an AMD Zen 3, one thread, the forward without its order
// against with it, the layer's products in turns: ResNet-20's 64-channel 8x8 layer,
// 16 % skipped, 1.09-1.11x faster; its 32-channel 16x16 layer, 8 %, 0.92-0.97x: the order
// alone, skipping nothing, made it 8 % slower, the 8x8 one 3 %).
constexpr double kMinSkipped = 0.12;

// padding_order's work: false where it does not pay.
bool make_padding_order(const ConvShape& s, const ZeroBorder& zeros, const KLayout& kl, int pairs,
                        int64_t rows_per_exponent, PaddingOrder& out) {
  const int64_t oh = s.oh(), ow = s.ow(), per_image = oh * ow, m = s.pixels();
  if (m == 0 || s.kh > 64 || s.kw > 64) return false;  // masks of 64 taps
  std::vector<uint8_t> row_kind, col_kind;
  const std::vector<uint64_t> rows =
      distinct(border_taps(oh, s.kh, s.sh, s.dh, s.hp, zeros.top, zeros.bottom), row_kind);
  const std::vector<uint64_t> cols =
      distinct(border_taps(ow, s.kw, s.sw, s.dw, s.wp, zeros.left, zeros.right), col_kind);
  if (rows.size() * cols.size() > 255) return false;
  // Each pair of masks' skipped chains (every K-pair of the chain in a zero tap), the
  // pairs with the same chains one kind.
  const std::vector<Chain> chains = make_chains(kl, pairs);
  const int64_t nchains = int64_t(chains.size());
  std::vector<uint8_t> kind_of(rows.size() * cols.size()), skips;
  std::vector<int64_t> skipped_pairs;  // per kind: K-pairs skipped per pixel
  for (size_t r = 0; r < rows.size(); ++r)
    for (size_t c = 0; c < cols.size(); ++c) {
      std::vector<uint8_t> skip(nchains, 0);
      int64_t q = 0, skipped = 0;
      for (int64_t chain = 0; chain < nchains; q += chains[chain].kpairs, ++chain) {
        bool zero = true;
        for (int64_t p = q; p < q + chains[chain].kpairs && zero; ++p) {
          const int64_t block = p / kl.pairs_per_block, tap = (block * kl.kblock + 2 * (p % kl.pairs_per_block)) / s.cg;
          zero = (rows[r] >> (tap / s.kw) & 1) || (cols[c] >> (tap % s.kw) & 1);
        }
        skip[chain] = zero;
        skipped += zero ? chains[chain].kpairs : 0;
      }
      int64_t kind = 0;
      while (kind < int64_t(skipped_pairs.size()) &&
             !std::equal(skip.begin(), skip.end(), skips.begin() + kind * nchains))
        ++kind;
      if (kind == int64_t(skipped_pairs.size())) {
        skips.insert(skips.end(), skip.begin(), skip.end());
        skipped_pairs.push_back(skipped);
      }
      kind_of[r * cols.size() + c] = uint8_t(kind);
    }
  // Pixels of each kind in one image, and whether the skipped products pay for the order.
  std::vector<int64_t> count(skipped_pairs.size(), 0);
  for (int64_t y = 0; y < oh; ++y)
    for (int64_t x = 0; x < ow; ++x) ++count[kind_of[row_kind[y] * cols.size() + col_kind[x]]];
  int64_t skipped = 0;
  for (size_t kind = 0; kind < count.size(); ++kind) skipped += count[kind] * skipped_pairs[kind];
  if (skipped < kMinSkipped * double(per_image * kl.kpairs())) return false;
  // The rows by kind, each kind's in the pixels' order (counting sort).
  std::vector<int64_t> next(count.size(), 0);
  for (size_t kind = 1; kind < count.size(); ++kind) next[kind] = next[kind - 1] + count[kind - 1] * s.n;
  RowOrder& order = out.order;
  for (auto* v : {&order.row, &order.exponent_row, &order.image, &out.origin}) v->resize(m);
  order.kind.resize(m);
  order.skips = std::move(skips);
  order.nchains = nchains;
  for (int64_t image = 0, row = 0; image < s.n; ++image)
    for (int64_t y = 0; y < oh; ++y)
      for (int64_t x = 0; x < ow; ++x, ++row) {
        const uint8_t kind = kind_of[row_kind[y] * cols.size() + col_kind[x]];
        const int64_t at = next[kind]++;
        order.row[at] = row;
        order.exponent_row[at] = rows_per_exponent == ow ? image * oh + y
                                 : rows_per_exponent >= m ? 0
                                                          : row / rows_per_exponent;
        order.image[at] = image;
        order.kind[at] = kind;
        out.origin[at] = ((image * s.hp + y * s.sh) * s.wp + x * s.sw) * s.channels;
      }
  return true;
}

}  // namespace

const PaddingOrder* padding_order(const ConvShape& s, const ZeroBorder& zeros, const KLayout& kl, int pairs,
                                  int64_t rows_per_exponent) {
  using Key = std::array<int64_t, 19>;
  struct Kept {
    Key key;
    bool pays;
    PaddingOrder order;
  };
  constexpr size_t kShapes = 8;
  thread_local std::vector<Kept> kept;
  thread_local size_t replace = 0;  // the oldest, once all are taken
  const Key key{s.n,  s.hp, s.wp, s.channels, s.cg,      s.kh,         s.kw,       s.sh,        s.sw, s.dh,
                s.dw, kl.k, kl.kblock, pairs, rows_per_exponent, zeros.top, zeros.bottom, zeros.left, zeros.right};
  for (const Kept& k : kept)
    if (k.key == key) return k.pays ? &k.order : nullptr;
  kept.reserve(kShapes);  // never moved: the orders handed out stay where they are
  Kept& slot = kept.size() < kShapes ? kept.emplace_back() : kept[replace++ % kShapes];
  slot.key = key;
  slot.pays = make_padding_order(s, zeros, kl, pairs, rows_per_exponent, slot.order);
  return slot.pays ? &slot.order : nullptr;
}

PatchColumns::PatchColumns(const int16_t* x, const ConvShape& s, int nr) : x_(x), s_(s), nr_(nr), index_(s) {}

BBlock PatchColumns::block(int64_t j0, int64_t cols, int64_t kp0, int64_t len, std::vector<int32_t>& scratch) const {
  const int64_t panel_stride = len * nr_, pixels = s_.pixels();
  scratch.resize((cols / nr_) * panel_stride);
  // Runs of columns inside one tap and one panel are contiguous on both sides.
  std::vector<Run> runs;
  const int64_t j_end = std::min(j0 + cols, s_.k());
  for (int64_t j = j0; j < j_end;) {
    const int64_t tap = j / s_.cg, ci = j - tap * s_.cg, col = j - j0, lane = col % nr_;
    const int64_t length = std::min({s_.cg - ci, nr_ - lane, j_end - j});
    runs.push_back({index_.tap(tap) + ci, (col / nr_) * panel_stride + lane, length});
    j += length;
  }
  const bool padded = j_end < j0 + cols;  // the last panel has columns past K
  PixelWalk pixel(s_, std::min(2 * kp0, pixels));
  for (int64_t q = kp0; q < kp0 + len; ++q) {
    int32_t* row = scratch.data() + (q - kp0) * nr_;
    if (padded || 2 * q + 1 >= pixels)  // zeros where no column or no pixel is
      for (int64_t p = 0; p < cols / nr_; ++p) std::fill_n(row + p * panel_stride, nr_, 0);
    if (2 * q >= pixels) continue;
    const int16_t* even = x_ + pixel.origin();
    pixel.next();
    const bool has_odd = 2 * q + 1 < pixels;
    const int16_t* odd = has_odd ? x_ + pixel.origin() : nullptr;
    if (has_odd) pixel.next();
    for (const Run& run : runs) {
      const int16_t* a = even + run.src;
      int32_t* dst = row + run.dst;
      if (has_odd)
        interleave(dst, a, odd + run.src, run.length);
      else
        for (int64_t t = 0; t < run.length; ++t) dst[t] = pair(a[t], 0);
    }
  }
  return {scratch.data(), panel_stride};
}

TransposedPatches::TransposedPatches(const int16_t* x, const ConvShape& s, int64_t kpairs, PatchRowOrder order)
    : x_(x), s_(s), order_(order) {
  static std::atomic<uint64_t> next_id{1};
  id_ = next_id.fetch_add(1, std::memory_order_relaxed);
  // The calling thread's buffer, kept: 64 k offsets for a 16-channel 32x32 layer at
  // batch 128 were a fresh half megabyte, zeroed, on every call.
  thread_local std::vector<int64_t> buffer;
  const int64_t pairs = s.pixels() / 2, count = std::max(kpairs, pairs);
  offsets_ = at_least(buffer, count);
  std::fill(offsets_ + pairs, offsets_ + count, 0);  // the last K-block's padding: pixel pair 0
  // A pair's second pixel is the first's neighbour in the image row (fits; at stride 2 in
  // its phase of the row): along a row of output pixels the pairs' origins step by two
  // columns (two of the phase).
  // (The output's size is a division: made once, not per pixel pair.)
  const int64_t oh = s.oh(), ow = s.ow(), step = int64_t(sizeof(int16_t)) * 2;
  int64_t* q = offsets_;
  for (int64_t image = 0; image < s.n; ++image)
    for (int64_t row = 0; row < oh; ++row) {
      // bytes, channel major
      const int64_t origin = int64_t(sizeof(int16_t)) * (image * s.channels * s.hp + row * s.sh) * s.wp;
      for (int64_t pair = 0; pair < ow / 2; ++pair) *q++ = origin + pair * step;
    }
}

ABlock TransposedPatches::block(int64_t i0, int64_t rows, int64_t kp0, int64_t, AScratch& scratch) const {
  // The row pointers do not depend on the K slice (its offsets do): made once per block
  // of rows, not for each of its slices (a 16-channel 32x32 dW at batch 128 has 256;
  // each row's divisions took 2.6 ms of a 280 ms one-thread ResNet-20 step, AMD Zen 4).
  AScratch::KeptRows& kept = scratch.kept;
  if (kept.source != id_ || kept.first != i0 || int64_t(kept.rows.size()) != rows) {
    kept.rows.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {  // rows past K repeat the last: what they sum is never stored
      const int64_t k = std::min(i0 + r, s_.k() - 1), tap = order_.tap(k), column = tap % s_.kw * s_.dw;
      // at stride 2, the column in its phase: output column o reads column 2o + column,
      // element o + column / 2 of phase column % 2
      const int64_t at = s_.sw == 2 ? column % 2 * (s_.wp / 2) + column / 2 : column;
      kept.rows[r] = x_ + (order_.channel(k) * s_.hp + tap / s_.kw * s_.dh) * s_.wp + at;
    }
    kept.source = id_, kept.first = i0;
  }
  ABlock block{};
  block.rows = kept.rows.data();
  block.offsets = offsets_ + kp0;
  return block;
}

void copy_window(const int16_t* x, int64_t n, int64_t h, int64_t w, int64_t c, const Window& win, int16_t* out,
                 int nthreads) {
  const int64_t rows = win.r1 - win.r0, cols = win.c1 - win.c0, oc = win.out_channels, row_len = cols * oc;
  const WindowColumns span(win, w);
  for_row_chunks(n * rows, row_len, nthreads, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t image = row / rows, r = win.r0 + row % rows;
      int16_t* dst = out + row * row_len;
      if (!zero_border_of_row(r, h, span, cols, oc, dst)) continue;
      const int16_t* src = x + ((image * h + r) * w + win.c0 + span.left) * c;
      if (oc == c)
        std::copy_n(src, (span.right - span.left) * c, dst + span.left * oc);
      else
        copy_pixels(src, span.right - span.left, c, dst + span.left * oc, oc);
    }
  });
}

void zero_window_border(int64_t n, int64_t h, int64_t w, const Window& win, int16_t* out, int nthreads) {
  const int64_t rows = win.r1 - win.r0, cols = win.c1 - win.c0, oc = win.out_channels, row_len = cols * oc;
  const WindowColumns span(win, w);
  for_row_chunks(n * rows, row_len, nthreads, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row)
      zero_border_of_row(win.r0 + row % rows, h, span, cols, oc, out + row * row_len);
  });
}

void to_channel_major(const int16_t* x, int64_t n, int64_t pixels, int64_t channels, int16_t* out, int nthreads) {
  // Blocks of 64 pixels: their channels' runs in out stay in L1 while the block is read.
  // A task takes whole images (or runs of blocks of kMinTaskElements or more): tasks of
  // one block each let two threads write the same cache lines of out, and a 16-channel
  // grad_weight's transposition then ran 3x slower on 2 threads than on 1.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (pixels + kBlock - 1) / kBlock;
  if (blocks == 0) return;
  const int64_t per_task =
      std::clamp<int64_t>((kMinTaskElements / std::max<int64_t>(channels, 1) + kBlock - 1) / kBlock, 1, blocks);
  const int64_t tasks_per_image = (blocks + per_task - 1) / per_task;
  parallel_for(n * tasks_per_image, nthreads, [&](int64_t task) {
    const int64_t image = task / tasks_per_image, first = task % tasks_per_image * per_task * kBlock;
    const int16_t* src = x + image * pixels * channels;
    int16_t* dst = out + image * pixels * channels;
    for (int64_t p0 = first; p0 < std::min(pixels, first + per_task * kBlock); p0 += kBlock)
      pixels_to_planes(src + p0 * channels, std::min(pixels, p0 + kBlock) - p0, channels, dst + p0, pixels, channels);
  });
}

void to_phase_planes(const int16_t* x, int64_t n, int64_t hp, int64_t wp, int64_t channels, int16_t* out,
                     int nthreads) {
  // Each row's even pixels, then its odd ones, transposed into the planes' rows.
  const int64_t half = wp / 2, plane = hp * wp;
  for_row_chunks(n * hp, wp * channels, nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int16_t* planes = out + r / hp * channels * plane + r % hp * wp;
      for (int64_t phase = 0; phase < 2; ++phase)
        pixels_to_planes(x + (r * wp + phase) * channels, half, channels, planes + phase * half, plane, 2 * channels);
    }
  });
}

void pack_transposed(const int16_t* dy, int64_t pixels, int64_t ld, int64_t cout, int64_t kpairs, int mr,
                     RowsA& out, int nthreads) {
  const int64_t kp = std::max(kpairs, (pixels + 1) / 2), padded = (cout + mr - 1) / mr * mr;
  int32_t* rows = at_least(out.owned, padded * kp);
  std::fill(rows + cout * kp, rows + padded * kp, 0);  // the rows padding cout; the tasks write the rest
  out.nrows = cout, out.kpairs = kp, out.data = rows, out.stride = kp, out.full_rows = padded;
  out.tail.clear();
  // Tiles of 64 pairs (128 rows of dy) x 64 columns: the rows' slices stay in L1 while
  // each output row gets a run of 64 pairs, also when dy's rows are long (linear).
  constexpr int64_t kTile = 64;
  const int64_t whole_pairs = pixels / 2;  // pairs whose odd pixel exists
  const auto pairs = [&](int64_t c_begin, int64_t c_end, int64_t q_begin, int64_t q_end) {
    for (int64_t c = c_begin; c < c_end; ++c)
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int16_t even = 2 * q < pixels ? dy[2 * q * ld + c] : int16_t(0);
        const int16_t odd = 2 * q + 1 < pixels ? dy[(2 * q + 1) * ld + c] : int16_t(0);
        out.owned[c * kp + q] = pair(even, odd);
      }
  };
  parallel_for((kp + kTile - 1) / kTile, nthreads, [&](int64_t t) {
    const int64_t q0 = t * kTile, q1 = std::min(kp, q0 + kTile);
    for (int64_t c0 = 0; c0 < cout; c0 += kTile) {
      const int64_t c1 = std::min(cout, c0 + kTile);
      int64_t c = c0;
#if defined(__SSE2__)
      for (; c + 8 <= c1; c += 8) {
        int64_t q = q0;
        for (; q + 4 <= std::min(q1, whole_pairs); q += 4)
          transpose_pairs_4x8(dy + 2 * q * ld + c, ld, out.owned.data() + c * kp + q, kp);
        pairs(c, c + 8, q, q1);
      }
#endif
      pairs(c, c1, q0, q1);
    }
  });
}

}  // namespace dfp
