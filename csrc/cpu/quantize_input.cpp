// The layer's input quantized twice, for the forward and for grad_weight (quantize.h).
#include <algorithm>
#include <atomic>
#include <vector>

#include "isa.h"
#include "numerics.h"
#include "quantize.h"
#include "quantize_kernels.h"
#include "threads.h"

namespace dfp {
namespace {

// A padded row of zeros in both outputs, or the borders of a row of the image.
void zero_row(int16_t* row, int64_t len) { std::fill_n(row, len, int16_t(0)); }

// One image row of x (cols pixels of `channels`) quantized with a scale per channel into
// the padded row `dst` (out_channels per pixel, its left border already skipped).
void quantize_row(const QuantizeKernels& k, const float* x, int64_t cols, int64_t channels, int64_t out_channels,
                  const float* first, const float* second, const RoundingArgs& args, int16_t* dst,
                  std::vector<int16_t>& scratch) {
  if (out_channels == channels) {
    k.run_rows(x, dst, cols, channels, first, second, args);
    return;
  }
  scratch.resize(cols * channels);
  k.run_rows(x, scratch.data(), cols, channels, first, second, args);
  copy_pixels(scratch.data(), cols, channels, dst, out_channels);
}

}  // namespace

bool quantize_input(const float* x, const PaddedImage& im, int headroom, const InputQuantization& out,
                    int nthreads) {
  const QuantizeKernels& k = quantize_kernels(active_isa());
  const int64_t hp = im.rows + 2 * im.pad_rows, wp = im.cols + 2 * im.pad_cols, c = im.channels;
  const int64_t oc = im.out_channels, row_len = wp * oc, border = im.pad_cols * oc, run = im.cols * c;
  const int64_t blocks = oc / out.row_block, s = out.group_samples, ngroups = (im.images + s - 1) / s;
  const int32_t zeros = group_exponent(0, headroom);
  std::atomic<bool> finite{true};
  // Pass 1 per group of samples: every image row's maximum per channel, which give the
  // rows' exponents (per block) and the group's (per channel).
  std::vector<uint32_t> row_max(im.images * im.rows * c, 0);
  for_row_chunks(ngroups, s * im.rows * run, nthreads, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * s * im.rows, r1 = std::min(im.images, (g + 1) * s) * im.rows;
      std::vector<uint32_t> channel_max(oc, 0);  // the added channels stay zeros
      for (int64_t r = r0; r < r1; ++r) {
        uint32_t* m = row_max.data() + r * c;
        k.absmax_rows(x + r * run, im.cols, c, m);
        for (int64_t j = 0; j < c; ++j) channel_max[j] = std::max(channel_max[j], m[j]);
      }
      if (std::any_of(channel_max.begin(), channel_max.end(), [](uint32_t b) { return b >= kNonFiniteBits; }))
        finite.store(false, std::memory_order_relaxed);
      int32_t* e = out.e_channels + g * s * oc;
      group_exponents(channel_max.data(), oc, headroom, e);
      for (int64_t n = g * s + 1; n < std::min(im.images, (g + 1) * s); ++n) std::copy_n(e, oc, e + (n - g * s) * oc);
    }
  });
  if (!finite) return false;
  // Pass 2 per group: each row's exponents and both outputs, x read again from cache.
  const RoundingArgs nearest{float(max_mantissa(headroom)), Rounding::nearest, 0, 0, 0};
  for_row_chunks(ngroups, s * im.rows * run, nthreads, [&](int64_t g0, int64_t g1) {
    thread_local std::vector<float> row_first, row_second, channel_first, channel_second;
    thread_local std::vector<int16_t> scratch;
    row_first.resize(c), row_second.resize(c), channel_first.resize(c), channel_second.resize(c);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t j = 0; j < c; ++j) {
        const Scale scale = inverse_scale(out.e_channels[g * s * oc + j]);
        channel_first[j] = scale.first, channel_second[j] = scale.second;
      }
      for (int64_t n = g * s; n < std::min(im.images, (g + 1) * s); ++n)
        for (int64_t hr = 0; hr < hp; ++hr) {
          const int64_t h = hr - im.pad_rows, offset = (n * hp + hr) * row_len;
          int32_t* e = out.e_rows + (n * hp + hr) * blocks;
          if (h < 0 || h >= im.rows) {
            std::fill_n(e, blocks, zeros);
            zero_row(out.q_rows + offset, row_len);
            zero_row(out.q_channels + offset, row_len);
            continue;
          }
          const int64_t r = n * im.rows + h;
          const uint32_t* m = row_max.data() + r * c;
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t j0 = b * out.row_block, j1 = std::min(c, j0 + out.row_block);
            e[b] = group_exponent(j0 < j1 ? *std::max_element(m + j0, m + j1) : 0, headroom);
            const Scale scale = inverse_scale(e[b]);
            std::fill(row_first.begin() + std::min(j0, c), row_first.begin() + j1, scale.first);
            std::fill(row_second.begin() + std::min(j0, c), row_second.begin() + j1, scale.second);
          }
          for (int16_t* q : {out.q_rows + offset, out.q_channels + offset}) {
            zero_row(q, border);
            zero_row(q + row_len - border, border);
          }
          RoundingArgs args = nearest;
          args.index0 = uint64_t(r * run);
          quantize_row(k, x + r * run, im.cols, c, oc, row_first.data(), row_second.data(), args,
                       out.q_rows + offset + border, scratch);
          quantize_row(k, x + r * run, im.cols, c, oc, channel_first.data(), channel_second.data(), args,
                       out.q_channels + offset + border, scratch);
        }
    }
  });
  return true;
}

}  // namespace dfp
