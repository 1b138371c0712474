// Channels-last int16 pixels into channel planes, as grad_weight reads a 16- or
// 32-channel image (TransposedPatches: K-pairs of neighbouring pixels).
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dfp {

#if defined(__SSE2__)
// 8 x 8 int16: rows of src (ld apart) into columns of dst (ldd apart).
inline void transpose_8x8(const int16_t* src, int64_t ld, int16_t* dst, int64_t ldd) {
  __m128i r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ld));
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      r[4 * i + j] = _mm_unpacklo_epi32(t[4 * i + j], t[4 * i + j + 2]);
      r[4 * i + j + 2] = _mm_unpackhi_epi32(t[4 * i + j], t[4 * i + j + 2]);
    }
  // r[0..3]: rows 0-3 as column pairs (0,1), (4,5), (2,3), (6,7); r[4..7] the same for rows 4-7
  const int order[8] = {0, 0, 2, 2, 1, 1, 3, 3};
  for (int c = 0; c < 8; ++c) {
    const __m128i lo = r[order[c]], hi = r[4 + order[c]];
    const __m128i v = c % 2 ? _mm_unpackhi_epi64(lo, hi) : _mm_unpacklo_epi64(lo, hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * ldd), v);
  }
}
#endif

// Pixels [p0, p1) of an image with C channels into C planes: with C known, the
// vectorizer turns the interleaved reads into shuffles (a first layer's 4 channels ran
// a fifth of its grad_weight in the scalar loop). Returns p1.
template <int C>
int64_t planes_of(const int16_t* __restrict src, int64_t p0, int64_t p1, int16_t* __restrict dst, int64_t plane) {
  for (int64_t p = p0; p < p1; ++p)
    for (int c = 0; c < C; ++c) dst[c * plane + p] = src[p * C + c];
  return p1;
}

// `count` pixels of `channels` channels (src, channels last) into planes: channel c of
// pixel p to planes[c * plane + p]. pixel_step: elements from one pixel of src to the
// next (channels where they are consecutive; twice that for every other pixel).
inline void pixels_to_planes(const int16_t* src, int64_t count, int64_t channels, int16_t* planes, int64_t plane,
                             int64_t pixel_step) {
  int64_t p = 0;
#if defined(__SSE2__)
  if (channels % 8 == 0 && count >= 8) {
    // where count is not a multiple of 8, the last block overlaps the one before (the
    // same values written twice), so that no pixel goes element by element
    for (int64_t at = 0; at < count; at += 8) {
      p = std::min(at, count - 8);
      for (int64_t c = 0; c < channels; c += 8)
        transpose_8x8(src + p * pixel_step + c, pixel_step, planes + c * plane + p, plane);
    }
    return;
  }
#endif
  if (pixel_step == channels && channels == 2) p = planes_of<2>(src, p, count, planes, plane);
  if (pixel_step == channels && channels == 4) p = planes_of<4>(src, p, count, planes, plane);
  for (; p < count; ++p)
    for (int64_t c = 0; c < channels; ++c) planes[c * plane + p] = src[p * pixel_step + c];
}

}  // namespace dfp
