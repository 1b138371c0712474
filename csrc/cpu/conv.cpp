// Patch gathering for the convolution GEMMs (conv.h).
#include "conv.h"

#include <algorithm>
#include <cstring>

#include "threads.h"

namespace dfp {
namespace {

inline int32_t pair(int16_t lo, int16_t hi) { return int32_t(uint32_t(uint16_t(lo)) | (uint32_t(uint16_t(hi)) << 16)); }

}  // namespace

PatchIndex::PatchIndex(const ConvShape& s) : s_(s), ohw_(s.oh() * s.ow()), ow_(s.ow()), taps_(s.kh * s.kw) {
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) taps_[i * s.kw + j] = (i * s.dh * s.wp + j * s.dw) * s.channels;
}

int64_t PatchIndex::origin(int64_t pixel) const {
  const int64_t image = pixel / ohw_, within = pixel % ohw_, row = within / ow_, col = within % ow_;
  return ((image * s_.hp + row * s_.sh) * s_.wp + col * s_.sw) * s_.channels;
}

PatchRows::PatchRows(const int16_t* x, const ConvShape& s, const KLayout& kl)
    : x_(x), s_(s), kl_(kl), index_(s), pairs_in_taps_(s.cg % 2 == 0 && (kl.nblocks == 1 || kl.kblock % 2 == 0)) {}

// Writes K-pairs [kp0, kp0 + len) of one patch row as 2 * len int16.
void PatchRows::gather_row(int64_t pixel, int64_t kp0, int64_t len, int16_t* dst) const {
  const int16_t* origin = x_ + index_.origin(pixel);
  const int64_t k_end = s_.k();
  if (pairs_in_taps_) {  // K-pair q holds k = 2q and 2q + 1: copy runs of channels per tap
    int64_t k = 2 * kp0;
    const int64_t stop = std::min(2 * (kp0 + len), k_end);
    while (k < stop) {
      const int64_t tap = k / s_.cg, ci = k % s_.cg, run = std::min(s_.cg - ci, stop - k);
      std::memcpy(dst, origin + index_.tap(tap) + ci, run * sizeof(int16_t));
      dst += run, k += run;
    }
    std::fill(dst, dst + std::max<int64_t>(0, 2 * (kp0 + len) - std::max(stop, 2 * kp0)), int16_t(0));
    return;
  }
  for (int64_t q = kp0; q < kp0 + len; ++q) {  // general: a pair may straddle taps, blocks pad pairs
    const int64_t block = q / kl_.pairs_per_block, first = block * kl_.kblock + (q % kl_.pairs_per_block) * 2;
    const int64_t block_end = std::min(k_end, (block + 1) * kl_.kblock);
    for (int64_t e = 0; e < 2; ++e) {
      const int64_t k = first + e;
      *dst++ = k < block_end ? origin[index_.tap(k / s_.cg) + k % s_.cg] : int16_t(0);
    }
  }
}

ABlock PatchRows::block(int64_t i0, int64_t rows, int64_t kp0, int64_t len, std::vector<int32_t>& scratch) const {
  scratch.resize(rows * len);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* dst = scratch.data() + r * len;
    if (i0 + r < s_.pixels())
      gather_row(i0 + r, kp0, len, reinterpret_cast<int16_t*>(dst));
    else
      std::fill(dst, dst + len, 0);
  }
  return {scratch.data(), len, nullptr, 0, rows};
}

PatchColumns::PatchColumns(const int16_t* x, const ConvShape& s, int nr) : x_(x), s_(s), nr_(nr), index_(s) {}

BBlock PatchColumns::block(int64_t j0, int64_t cols, int64_t kp0, int64_t len, std::vector<int32_t>& scratch) const {
  const int64_t panel_stride = len * nr_, k = s_.k(), pixels = s_.pixels();
  scratch.assign((cols / nr_) * panel_stride, 0);
  const int64_t j_end = std::min(j0 + cols, k);
  for (int64_t q = kp0; q < kp0 + len; ++q) {
    const int64_t p0 = 2 * q, p1 = 2 * q + 1;
    if (p0 >= pixels) break;
    const int16_t* even = x_ + index_.origin(p0);
    const int16_t* odd = p1 < pixels ? x_ + index_.origin(p1) : nullptr;
    int32_t* row = scratch.data() + (q - kp0) * nr_;
    // Runs of columns inside one tap and one panel are contiguous on both sides.
    for (int64_t j = j0; j < j_end;) {
      const int64_t tap = j / s_.cg, ci = j % s_.cg, col = j - j0, lane = col % nr_;
      const int64_t run = std::min({s_.cg - ci, nr_ - lane, j_end - j});
      const int16_t* a = even + index_.tap(tap) + ci;
      int32_t* dst = row + (col / nr_) * panel_stride + lane;
      if (odd) {
        const int16_t* b = odd + index_.tap(tap) + ci;
        for (int64_t t = 0; t < run; ++t) dst[t] = pair(a[t], b[t]);
      } else {
        for (int64_t t = 0; t < run; ++t) dst[t] = pair(a[t], 0);
      }
      j += run;
    }
  }
  return {scratch.data(), panel_stride};
}

void pack_transposed(const int16_t* dy, int64_t pixels, int64_t ld, int64_t cout, int mr, RowsA& out, int nthreads) {
  const int64_t kp = (pixels + 1) / 2, padded = (cout + mr - 1) / mr * mr;
  out.owned.assign(padded * kp, 0);
  out.nrows = cout, out.kpairs = kp, out.data = out.owned.data(), out.stride = kp, out.full_rows = padded;
  out.tail.clear();
  constexpr int64_t kPairsPerTask = 64;  // 128 rows of dy in cache, written as runs of 64 pairs
  parallel_for((kp + kPairsPerTask - 1) / kPairsPerTask, nthreads, [&](int64_t t) {
    const int64_t q0 = t * kPairsPerTask, q1 = std::min(kp, q0 + kPairsPerTask);
    for (int64_t c = 0; c < cout; ++c) {
      int32_t* dst = out.owned.data() + c * kp;
      for (int64_t q = q0; q < q1; ++q) {
        const int16_t odd = 2 * q + 1 < pixels ? dy[(2 * q + 1) * ld + c] : int16_t(0);
        dst[q] = pair(dy[2 * q * ld + c], odd);
      }
    }
  });
}

}  // namespace dfp
