// The layer's input quantized twice, for the forward and for grad_weight (quantize.h).
#include <algorithm>
#include <atomic>
#include <vector>

#include "isa.h"
#include "numerics.h"
#include "planes.h"
#include "quantize.h"
#include "quantize_kernels.h"
#include "scratch.h"
#include "threads.h"

namespace dfp {
namespace {

// Rows of fewer channels than a vector's lanes (a first layer's 1 or 3) are read and
// written as whole runs of pixels, not a masked vector per pixel.
constexpr int64_t kNarrow = 16;

// One image row of x (cols pixels of `channels`, run = cols * channels floats) into the
// padded row dst (out_channels per pixel, past its left border): `write` quantizes a run
// of channels-last floats into contiguous int16.
template <typename Write>
void write_row(const float* x, int64_t cols, int64_t channels, int64_t out_channels, int16_t* dst,
               std::vector<int16_t>& scratch, Write write) {
  if (out_channels == channels) {
    write(x, dst);
    return;
  }
  scratch.resize(cols * channels);
  write(x, scratch.data());
  copy_pixels(scratch.data(), cols, channels, dst, out_channels);
}

}  // namespace

bool quantize_input(const float* x, const PaddedImage& im, int headroom, const InputQuantization& out,
                    int nthreads) {
  const QuantizeKernels& k = quantize_kernels(active_isa());
  const int64_t hp = im.rows + 2 * im.pad_rows, wp = im.cols + 2 * im.pad_cols, c = im.channels;
  const int64_t oc = im.out_channels, row_len = wp * oc, border = im.pad_cols * oc, run = im.cols * c;
  const int64_t blocks = oc / out.row_block, s = out.group_samples, ngroups = (im.images + s - 1) / s;
  const bool narrow = c < kNarrow, copy_for_weight = out.q_channels != nullptr;
  const int32_t zeros = group_exponent(0, headroom);
  // Rows of one pixel, neither padded nor planes (a linear layer's samples): a group of
  // samples is one tile in x and in both copies, one call per pass for it, not one per
  // sample (and per block of channels).
  const bool tiles = im.cols == 1 && oc == c && im.pad_rows == 0 && im.pad_cols == 0 && !out.channel_major;
  // Both passes over a group of samples before the next, so that the second reads x from
  // cache (pass 1 over all groups first read x from memory twice: 8 MB more per
  // 16-channel 32x32 forward at batch 128), and the second asks for the next group's rows
  // (`read_ahead`), so that pass 1 finds them in the L2 cache, not in memory.
  // Pass 1: each image row's maximum per block of channels (its exponents) and the
  // group's per channel (its exponents, written at once); false where NaN/Inf is met.
  std::vector<uint32_t> block_max(im.images * im.rows * blocks, 0);
  const auto maxima = [&](int64_t g) {
    thread_local std::vector<uint32_t> channel_max, row_channels, pixels;
    const int64_t r0 = g * s * im.rows, r1 = std::min(im.images, (g + 1) * s) * im.rows;
    channel_max.assign(oc, 0);  // the added channels stay zeros
    pixels.assign(narrow && copy_for_weight && !tiles ? run : 0, 0);
    if (tiles) {
      k.absmax_blocks(x + r0 * c, (r1 - r0) * c, out.row_block, block_max.data() + r0 * blocks);
      if (copy_for_weight) k.absmax_rows(x + r0 * c, r1 - r0, c, channel_max.data());
    }
    for (int64_t r = tiles ? r1 : r0; r < r1; ++r) {  // a row at a time, where not tiles
      const float* row = x + r * run;
      uint32_t* m = block_max.data() + r * blocks;
      if (blocks == 1) {
        m[0] = k.absmax(row, run);
        if (!copy_for_weight) continue;
        if (narrow)
          k.absmax_into(row, pixels.data(), run);  // folded into channels after the group
        else
          k.absmax_rows(row, im.cols, c, channel_max.data());
        continue;
      }
      if (im.cols == 1) {  // one pixel (a linear layer's sample): its blocks are runs
        k.absmax_blocks(row, c, out.row_block, m);
        if (copy_for_weight) k.absmax_into(row, channel_max.data(), c);
        continue;
      }
      row_channels.assign(c, 0);
      const uint32_t* rc = row_channels.data();
      k.absmax_rows(row, im.cols, c, row_channels.data());
      for (int64_t b = 0; b * out.row_block < c; ++b)
        m[b] = *std::max_element(rc + b * out.row_block, rc + std::min(c, (b + 1) * out.row_block));
      if (copy_for_weight) max_into(channel_max.data(), rc, c);
    }
    for (int64_t p = 0; p < int64_t(pixels.size()); p += c)  // narrow rows: the pixels' maxima per channel
      max_into(channel_max.data(), pixels.data() + p, c);
    if (std::any_of(block_max.begin() + r0 * blocks, block_max.begin() + r1 * blocks,
                    [](uint32_t b) { return b >= kNonFiniteBits; }))
      return false;
    if (!copy_for_weight) return true;
    int32_t* e = out.e_channels + g * s * oc;
    group_exponents(channel_max.data(), oc, headroom, e);
    for (int64_t n = g * s + 1; n < std::min(im.images, (g + 1) * s); ++n) std::copy_n(e, oc, e + (n - g * s) * oc);
    return true;
  };
  // Pass 2: each row's exponents and both outputs.
  const RoundingArgs nearest{float(max_mantissa(headroom)), Rounding::nearest, 0, 0, 0};
  // The rows r0..r1 of `tiles`, whose group's channel scales are set.
  const auto write_tile = [&](int64_t r0, int64_t r1, const float* channel_first, const float* channel_second,
                              bool channels_within) {
    thread_local std::vector<float> firsts, seconds;
    const int64_t count = (r1 - r0) * blocks;
    int32_t* e = out.e_rows + r0 * blocks;
    group_exponents(block_max.data() + r0 * blocks, count, headroom, e);
    // pointers in the loop: each use of a thread_local vector there called __tls_get_addr
    float *first = at_least(firsts, count), *second = at_least(seconds, count);
    bool within = true;
    for (int64_t i = 0; i < count; ++i) {
      const Scale scale = inverse_scale(e[i]);
      first[i] = scale.first, second[i] = scale.second;
      within &= clamp_never_acts(e[i], headroom);
    }
    RoundingArgs args = nearest;
    args.index0 = uint64_t(r0 * c);
    args.within_limit = within;
    k.run_blocks(x + r0 * c, out.q_rows + r0 * c, (r1 - r0) * c, out.row_block, first, second, args);
    args.within_limit = channels_within;
    if (copy_for_weight)
      k.run_rows(x + r0 * c, out.q_channels + r0 * c, r1 - r0, c, channel_first, channel_second, args);
  };
  const auto write = [&](int64_t g) {
    // scales per channel, and for narrow rows per element of a row (a channel's repeated)
    thread_local std::vector<float> block_first, block_second, row_first, row_second, channel_first, channel_second;
    thread_local std::vector<int16_t> scratch, plane_rows;
    block_first.resize(blocks), block_second.resize(blocks);
    row_first.resize(c), row_second.resize(c);
    channel_first.resize(!copy_for_weight ? 0 : narrow ? run : c), channel_second.resize(channel_first.size());
    bool channels_within = true;
    for (int64_t j = 0; j < c && copy_for_weight; ++j) {
      const Scale scale = inverse_scale(out.e_channels[g * s * oc + j]);
      channel_first[j] = scale.first, channel_second[j] = scale.second;
      channels_within &= clamp_never_acts(out.e_channels[g * s * oc + j], headroom);
    }
    for (int64_t p = c; p < int64_t(channel_first.size()); p += c) {  // narrow rows: repeated per pixel
      std::copy_n(channel_first.begin(), c, channel_first.begin() + p);
      std::copy_n(channel_second.begin(), c, channel_second.begin() + p);
    }
    if (tiles) {
      write_tile(g * s * im.rows, std::min(im.images, (g + 1) * s) * im.rows, channel_first.data(),
                 channel_second.data(), channels_within);
      return;
    }
    for (int64_t n = g * s; n < std::min(im.images, (g + 1) * s); ++n) {
      // grad_weight's image; as channel planes, through a buffer in L1 or L2 (channels
      // last), then into the planes at once (a row at a time, 4x4 images' rows of 6
      // pixels went element by element)
      int16_t* weight_image = !copy_for_weight     ? nullptr
                              : out.channel_major ? at_least(plane_rows, hp * row_len)
                                                  : out.q_channels + n * hp * row_len;
      for (int64_t hr = 0; hr < hp; ++hr) {
        const int64_t h = hr - im.pad_rows, offset = (n * hp + hr) * row_len;
        int32_t* e = out.e_rows + (n * hp + hr) * blocks;
        int16_t* weight_row = weight_image ? weight_image + hr * row_len : nullptr;
        if (h < 0 || h >= im.rows) {
          std::fill_n(e, blocks, zeros);
          std::fill_n(out.q_rows + offset, row_len, int16_t(0));
          if (weight_row) std::fill_n(weight_row, row_len, int16_t(0));
          continue;
        }
        const int64_t r = n * im.rows + h;
        // scales per block, spread over the channels where a row has several pixels
        const bool per_channel = blocks > 1 && im.cols > 1;
        bool row_within = true;
        for (int64_t b = 0; b < blocks; ++b) {
          e[b] = group_exponent(block_max[r * blocks + b], headroom);
          row_within &= clamp_never_acts(e[b], headroom);
          const Scale scale = inverse_scale(e[b]);
          block_first[b] = scale.first, block_second[b] = scale.second;
          if (!per_channel) continue;
          const int64_t j0 = std::min(c, b * out.row_block), j1 = std::min(c, j0 + out.row_block);
          std::fill(row_first.begin() + j0, row_first.begin() + j1, scale.first);
          std::fill(row_second.begin() + j0, row_second.begin() + j1, scale.second);
        }
        for (int16_t* q : {out.q_rows + offset, weight_row}) {
          if (!q) continue;
          std::fill_n(q, border, int16_t(0));
          std::fill_n(q + row_len - border, border, int16_t(0));
        }
        RoundingArgs args = nearest;
        args.index0 = uint64_t(r * run);
        args.within_limit = channels_within;
        const float* row = x + r * run;
        // the first pass over the row asks for the next group's row
        RoundingArgs first_pass = args;
        first_pass.read_ahead = g + 1 < ngroups ? s * im.rows * run : 0;
        first_pass.within_limit = row_within;
        write_row(row, im.cols, c, oc, out.q_rows + offset + border, scratch, [&](const float* from, int16_t* to) {
          if (blocks == 1)
            k.run(from, to, run, {block_first[0], block_second[0]}, first_pass);
          else if (!per_channel)
            k.run_blocks(from, to, run, out.row_block, block_first.data(), block_second.data(), first_pass);
          else
            k.run_rows(from, to, im.cols, c, row_first.data(), row_second.data(), first_pass);
        });
        if (!copy_for_weight) continue;
        write_row(row, im.cols, c, oc, weight_row + border, scratch, [&](const float* from, int16_t* q) {
          if (narrow)
            k.run_scaled(from, q, run, channel_first.data(), channel_second.data(), args);
          else
            k.run_rows(from, q, im.cols, c, channel_first.data(), channel_second.data(), args);
        });
      }
      if (weight_image && out.channel_major)
        pixels_to_planes(weight_image, hp * wp, oc, out.q_channels + n * oc * hp * wp, hp * wp, oc);
    }
  };
  std::atomic<bool> finite{true};
  for_row_chunks(ngroups, s * im.rows * run, nthreads, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      if (!maxima(g)) {
        finite.store(false, std::memory_order_relaxed);
        return;
      }
      write(g);
    }
  });
  return finite;
}

}  // namespace dfp
