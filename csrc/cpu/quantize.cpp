#include "quantize.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "batch_norm.h"
#include "isa.h"
#include "numerics.h"
#include "quantize_kernels.h"
#include "scratch.h"
#include "threads.h"

namespace dfp {
namespace {

// Runs shorter than this waste the SIMD lanes; such layouts are handled a row at a time.
constexpr int64_t kShortRun = 16;

std::vector<uint32_t> group_absmax(const float* x, const QuantizeShape& sh, int nthreads) {
  const QuantizeKernels& k = quantize_kernels(active_isa());
  const int64_t O = sh.outer, N = sh.n, I = sh.inner;
  std::vector<uint32_t> amax(sh.groups(), 0);
  switch (sh.grouping) {
    case Grouping::tensor: {
      const int64_t total = O * N * I, chunk = 1 << 18;
      const int64_t tasks = std::max<int64_t>(1, (total + chunk - 1) / chunk);
      std::vector<uint32_t> partial(tasks, 0);
      parallel_for(tasks, nthreads, [&](int64_t t) {
        const int64_t b = t * chunk;
        partial[t] = k.absmax(x + b, std::min(chunk, total - b));
      });
      amax[0] = *std::max_element(partial.begin(), partial.end());
      break;
    }
    case Grouping::channel:
      if (I >= kShortRun) {
        for_row_chunks(N, O * I, nthreads, [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t o = 0; o < O; ++o) amax[n] = std::max(amax[n], k.absmax(x + (o * N + n) * I, I));
        });
      } else {  // short rows: element-wise maxima over whole (N, I) slices, folded at the end
        const int64_t per_task = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(N * I, 1));
        const int64_t tasks = (O + per_task - 1) / per_task;
        std::vector<std::vector<uint32_t>> partial(tasks, std::vector<uint32_t>(N * I, 0));
        parallel_for(tasks, nthreads, [&](int64_t t) {
          for (int64_t o = t * per_task; o < std::min(O, (t + 1) * per_task); ++o)
            k.absmax_into(x + o * N * I, partial[t].data(), N * I);
        });
        for (const auto& p : partial)
          for (int64_t j = 0; j < N * I; ++j) amax[j / I] = std::max(amax[j / I], p[j]);
      }
      break;
    case Grouping::block: {
      const int64_t B = sh.block, NB = (N + B - 1) / B;
      if (I == 1) {
        for_row_chunks(O, N, nthreads, [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o) k.absmax_blocks(x + o * N, N, B, amax.data() + o * NB);
        });
        break;
      }
      for_row_chunks(O * NB, B * I, nthreads, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t o = g / NB, n0 = (g % NB) * B, n1 = std::min(N, n0 + B);
          const float* row = x + (o * N + n0) * I;
          for (int64_t n = n0; n < n1; ++n) k.absmax_into(row + (n - n0) * I, amax.data() + g * I, I);
        }
      });
      break;
    }
  }
  return amax;
}

// int16 elements quantized at a time before they are interleaved into PairPanels (8 KB).
constexpr int64_t kPanelBuffer = 4096;

// Rows [r0, r1) of `cols` int16 (r0 even) into their K-pairs of the panels of width W,
// a missing odd row as zeros. W a constant: with a run-time width the interleaving of
// each 16-column row pair stayed a call with scalar prologue and epilogue, which cost as
// much as packing dY afterwards.
template <int W>
void rows_into_panels(const int16_t* rows, int64_t r0, int64_t r1, int64_t cols, int64_t kpairs, int16_t* out) {
  static const int16_t zeros[W] = {};
  int32_t* pairs = reinterpret_cast<int32_t*>(out);
  for (int64_t r = r0; r < r1; r += 2) {
    const int16_t* even = rows + (r - r0) * cols;
    const int16_t* odd = r + 1 < r1 ? even + cols : nullptr;
    for (int64_t c = 0; c < cols; c += W)
      interleave(pairs + (c / W * kpairs + r / 2) * W, even + c, odd ? odd + c : zeros, W);
  }
}

void rows_into_panels(const int16_t* rows, int64_t r0, int64_t r1, int64_t cols, const PairPanels& panels,
                      int16_t* out) {
  switch (panels.width) {  // the micro-kernels' nr
    case 8: return rows_into_panels<8>(rows, r0, r1, cols, panels.kpairs, out);
    case 16: return rows_into_panels<16>(rows, r0, r1, cols, panels.kpairs, out);
    case 32: return rows_into_panels<32>(rows, r0, r1, cols, panels.kpairs, out);
    default: throw std::invalid_argument("rows_into_panels: a panel width of 8, 16 or 32");
  }
}

// The panels' K-pairs past `rows` rows: zeros (the last K-block's padding).
void zero_pairs_past(int64_t rows, int64_t cols, const PairPanels& panels, int16_t* out) {
  int32_t* pairs = reinterpret_cast<int32_t*>(out);
  const int64_t used = (rows + 1) / 2;
  for (int64_t c = 0; c < cols; c += panels.width)
    std::fill(pairs + (c / panels.width * panels.kpairs + used) * panels.width,
              pairs + (c / panels.width + 1) * panels.kpairs * panels.width, 0);
}

}  // namespace

int64_t QuantizeShape::groups() const {
  switch (grouping) {
    case Grouping::tensor: return 1;
    case Grouping::channel: return n;
    default: return outer * ((n + block - 1) / block) * inner;
  }
}

bool compute_exponents(const float* x, const QuantizeShape& shape, int headroom, int32_t* exponent,
                       int nthreads) {
  const std::vector<uint32_t> amax = group_absmax(x, shape, nthreads);
  for (uint32_t bits : amax)
    if (bits >= kNonFiniteBits) return false;
  group_exponents(amax.data(), int64_t(amax.size()), headroom, exponent);
  return true;
}

void quantize_with_exponents(const float* x, const QuantizeShape& sh, int headroom, const int32_t* exponent,
                             Rounding rounding, uint64_t seed, int16_t* q, int nthreads) {
  const QuantizeKernels& k = quantize_kernels(active_isa());
  const int64_t O = sh.outer, N = sh.n, I = sh.inner, G = sh.groups();
  if (O * N * I == 0) return;
  std::vector<float> first(G), second(G);
  for (int64_t g = 0; g < G; ++g) {
    const Scale s = inverse_scale(exponent[g]);
    first[g] = s.first;
    second[g] = s.second;
  }
  const RoundingArgs base{float(max_mantissa(headroom)), rounding, 0, uint32_t(seed), uint32_t(seed >> 32)};
  auto args_at = [&](int64_t index) {
    RoundingArgs r = base;
    r.index0 = uint64_t(index);
    return r;
  };
  auto uniform_run = [&](int64_t offset, int64_t len, int64_t g) {
    k.run(x + offset, q + offset, len, {first[g], second[g]}, args_at(offset));
  };

  switch (sh.grouping) {
    case Grouping::tensor:
      for_row_chunks(O * N * I, 1, nthreads, [&](int64_t b, int64_t e) { uniform_run(b, e - b, 0); });
      break;
    case Grouping::channel:
      if (I >= kShortRun) {
        for_row_chunks(O * N, I, nthreads, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) uniform_run(r * I, I, r % N);
        });
      } else {
        std::vector<float> f(N * I), s(N * I);
        for (int64_t j = 0; j < N * I; ++j) f[j] = first[j / I], s[j] = second[j / I];
        for_row_chunks(O, N * I, nthreads, [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o)
            k.run_scaled(x + o * N * I, q + o * N * I, N * I, f.data(), s.data(), args_at(o * N * I));
        });
      }
      break;
    case Grouping::block: {
      const int64_t B = sh.block, NB = (N + B - 1) / B;
      if (I > 1) {
        for_row_chunks(O * N, I, nthreads, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t g = ((r / N) * NB + (r % N) / B) * I;
            k.run_scaled(x + r * I, q + r * I, I, first.data() + g, second.data() + g, args_at(r * I));
          }
        });
      } else {
        for_row_chunks(O, N, nthreads, [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o)
            k.run_blocks(x + o * N, q + o * N, N, B, first.data() + o * NB, second.data() + o * NB, args_at(o * N));
        });
      }
      break;
    }
  }
}

bool quantize_gradient(const float* x, int64_t rows, int64_t cols, int headroom, uint64_t seed,
                       const GradientQuantization& out, int nthreads) {
  const QuantizeKernels& k = quantize_kernels(active_isa());
  // Row blocks for both passes: grad_weight's, or the groups' where there are none.
  const int64_t block = out.q_blocks ? out.block : out.group_rows;
  const int64_t nblocks = (rows + block - 1) / block;
  const int64_t ngroups = out.q_groups ? (rows + out.group_rows - 1) / out.group_rows : 0;
  // Pass 1: each block's maxima per column, and grad_weight's exponents and scales from
  // them in the same task (a serial loop over every block and column took a fifth of the
  // quantization of a 16-channel gradient). Where row groups split the blocks evenly (an
  // image row of 16 pixels, blocks of 32), the maxima of the groups' rows first, folded
  // into the blocks', so that the groups need no pass of their own. False where NaN/Inf
  // is met.
  std::vector<uint32_t> amax(nblocks * cols, 0);
  const bool split = ngroups && out.group_rows < block && block % out.group_rows == 0;
  // Where every group lies in one block (none, an image row of a block's length or a
  // fraction of it: the default's), each block goes through both passes before the next
  // (below); else x made by `out.made` is made whole first.
  const bool block_by_block = !ngroups || split || out.group_rows == block;
  if (out.made && !block_by_block) {
    thread_local std::vector<float> whole;
    float* made = at_least(whole, rows * cols);
    for_row_chunks(rows, cols, nthreads, [&](int64_t r0, int64_t r1) { out.made->rows(r0, r1, made + r0 * cols); });
    GradientQuantization direct = out;
    direct.made = nullptr;
    return quantize_gradient(made, rows, cols, headroom, seed, direct, nthreads);
  }
  const int64_t fine = split ? out.group_rows : block, fine_blocks = (rows + fine - 1) / fine;
  std::vector<uint32_t> fine_amax(split ? fine_blocks * cols : 0);
  std::vector<float> first(out.q_blocks ? nblocks * cols : 0), second(first.size());
  // x's rows of blocks [b0, b1) from xs, its row b0 * block
  const auto maxima = [&](int64_t b0, int64_t b1, const float* xs) {
    const auto row = [&](int64_t r) { return xs + (r - b0 * block) * cols; };
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block;
      if (!split) {
        k.absmax_rows(row(r0), std::min(rows, r0 + block) - r0, cols, amax.data() + b * cols);
        continue;
      }
      for (int64_t f = r0 / fine; f < std::min(fine_blocks, (r0 + block) / fine); ++f) {
        uint32_t* m = fine_amax.data() + f * cols;
        k.absmax_rows(row(f * fine), std::min(rows, (f + 1) * fine) - f * fine, cols, m);
        max_into(amax.data() + b * cols, m, cols);
      }
    }
    const int64_t g0 = b0 * cols, g1 = b1 * cols;
    if (std::any_of(amax.begin() + g0, amax.begin() + g1, [](uint32_t bits) { return bits >= kNonFiniteBits; }))
      return false;
    if (first.empty()) return true;
    group_exponents(amax.data() + g0, g1 - g0, headroom, out.e_blocks + g0);
    // by local pointers: through the captures, every pointer was loaded again after each store
    const int32_t* __restrict e = out.e_blocks;
    float *__restrict f = first.data(), *__restrict s = second.data();
    for (int64_t g = g0; g < g1; ++g) {
      const Scale scale = inverse_scale(e[g]);
      f[g] = scale.first, s[g] = scale.second;
    }
    return true;
  };
  // The groups' maxima: their blocks' where no block straddles two row groups (entries
  // [e0, e1) of `maxima`, rows_per_entry rows each); else a pass of their own.
  const int64_t group_cols = out.group_cols ? out.group_cols : cols, col_groups = cols / group_cols;
  std::vector<uint32_t> group_amax(ngroups * col_groups, 0);
  const auto fold = [&](const std::vector<uint32_t>& maxima, int64_t rows_per_entry, int64_t e0, int64_t e1) {
    for (int64_t b = e0; b < e1; ++b) {
      uint32_t* m = group_amax.data() + b * rows_per_entry / out.group_rows * col_groups;
      for (int64_t j = 0; j < col_groups; ++j) {
        const uint32_t* v = maxima.data() + b * cols + j * group_cols;
        m[j] = std::max(m[j], *std::max_element(v, v + group_cols));
      }
    }
  };
  std::vector<Scale> group_scale(ngroups * col_groups);
  const auto group_exponents_of = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0 * col_groups; g < g1 * col_groups; ++g) {
      out.e_groups[g] = group_exponent(group_amax[g], headroom);
      group_scale[g] = inverse_scale(out.e_groups[g]);
    }
  };
  // Pass 2, a block of rows at a time: x read again from cache for the second output.
  const auto rounding = [&](Rounding how) {
    return RoundingArgs{float(max_mantissa(headroom)), how, 0, uint32_t(seed), uint32_t(seed >> 32)};
  };
  const auto all_within = [&](const int32_t* e, int64_t n) {
    return std::all_of(e, e + n, [&](int32_t one) { return clamp_never_acts(one, headroom); });
  };
  const PairPanels& panels = out.blocks_panels;
  if (panels.given()) zero_pairs_past(rows, cols, panels, out.q_blocks);
  // Block by block, the second pass reads x from cache (8 MB less read from memory per
  // 16-channel 32x32 gradient at batch 128), and asks for the next block (`read_ahead`),
  // so that the maxima find it in the L2 cache, not in memory (x's and dY's maxima 17.6
  // -> 5.7 ms of a one-thread ResNet-20 step on an AMD Zen 2; docs/step.md).
  const auto write = [&](int64_t b0, int64_t b1, const float* xs) {
    const auto row = [&](int64_t r) { return xs + (r - b0 * block) * cols; };
    thread_local std::vector<float> column_first, column_second;
    thread_local std::vector<int16_t> block_rows;  // a block's rows before they go into panels
    column_first.resize(col_groups > 1 ? cols : 0), column_second.resize(column_first.size());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, r1 = std::min(rows, r0 + block);
      // the first pass over the block asks for the next block, whose maxima come next
      const int64_t ahead = block_by_block && r1 < rows && !out.made ? block * cols : 0;
      RoundingArgs args = rounding(out.blocks_rounding);
      args.index0 = uint64_t(r0 * cols);
      args.read_ahead = ahead;
      args.within_limit = out.q_blocks && all_within(out.e_blocks + b * cols, cols);
      const float *block_first = first.data() + b * cols, *block_second = second.data() + b * cols;
      if (out.q_blocks && !panels.given()) {
        k.run_rows(row(r0), out.q_blocks + r0 * cols, r1 - r0, cols, block_first, block_second, args);
      } else if (out.q_blocks) {
        // straight into the panels where the kernel set can, else through an L1-sized
        // buffer, an even number of rows at a time
        int32_t* const pairs = reinterpret_cast<int32_t*>(out.q_blocks) + r0 / 2 * panels.width;
        const bool written = k.run_rows_into_pairs && k.run_rows_into_pairs(row(r0), r1 - r0, cols, block_first,
                                                                            block_second, args, pairs, panels.width,
                                                                            panels.kpairs);
        const int64_t step = std::max<int64_t>(2, kPanelBuffer / std::max<int64_t>(cols, 1) / 2 * 2);
        for (int64_t r = r0; r < r1 && !written; r += step) {
          int16_t* q = at_least(block_rows, std::min(step, r1 - r0) * cols);
          args.index0 = uint64_t(r * cols);
          const int64_t end = std::min(r1, r + step);
          k.run_rows(row(r), q, end - r, cols, block_first, block_second, args);
          rows_into_panels(q, r, end, cols, panels, out.q_blocks);
        }
      }
      args = rounding(out.groups_rounding);
      if (!out.q_blocks) args.read_ahead = ahead;
      const BorderedRows& bordered = out.groups_bordered;
      for (int64_t r = r0; ngroups && r < r1;) {  // runs of rows inside one group (and image row)
        const int64_t g = r / out.group_rows;
        int64_t end = std::min(r1, (g + 1) * out.group_rows);
        if (bordered.given()) end = std::min(end, (r / bordered.width + 1) * bordered.width);
        int16_t* q = out.q_groups + (bordered.given() ? bordered.pixel(r) : r) * cols;
        args.index0 = uint64_t(r * cols);
        args.within_limit = all_within(out.e_groups + g * col_groups, col_groups);
        if (col_groups > 1) {  // the group's scales, one per column
          for (int64_t j = 0; j < col_groups; ++j) {
            const Scale& scale = group_scale[g * col_groups + j];
            std::fill_n(column_first.data() + j * group_cols, group_cols, scale.first);
            std::fill_n(column_second.data() + j * group_cols, group_cols, scale.second);
          }
          k.run_rows(row(r), q, end - r, cols, column_first.data(), column_second.data(), args);
        } else
          k.run(row(r), q, (end - r) * cols, group_scale[g], args);
        r = end;
      }
    }
  };
  std::atomic<bool> finite{true};
  if (block_by_block) {
    for_row_chunks(nblocks, block * cols, nthreads, [&](int64_t b0, int64_t b1) {
      thread_local std::vector<float> made_rows;  // a block's rows of x, where made
      const auto block_of_x = [&](int64_t b) -> const float* {
        if (x) return x + b * block * cols;
        float* made = at_least(made_rows, block * cols);
        out.made->rows(b * block, std::min(rows, (b + 1) * block), made);
        return made;
      };
      for (int64_t b = b0; b < b1; ++b) {
        const float* xs = block_of_x(b);
        if (!maxima(b, b + 1, xs)) {
          finite.store(false, std::memory_order_relaxed);
          return;
        }
        if (split)
          fold(fine_amax, fine, b * block / fine, std::min(fine_blocks, (b + 1) * block / fine));
        else if (ngroups)
          fold(amax, block, b, b + 1);
        if (ngroups) group_exponents_of(b * block / out.group_rows, std::min(ngroups, (b + 1) * block / out.group_rows));
        write(b, b + 1, xs);
      }
    });
    return finite;
  }
  for_row_chunks(nblocks, block * cols, nthreads, [&](int64_t b0, int64_t b1) {
    if (!maxima(b0, b1, x + b0 * block * cols)) finite.store(false, std::memory_order_relaxed);
  });
  if (!finite) return false;
  if (out.group_rows % block == 0)
    fold(amax, block, 0, nblocks);
  else
    fold(group_absmax(x, {1, rows, cols, Grouping::block, out.group_rows}, nthreads), out.group_rows, 0, ngroups);
  group_exponents_of(0, ngroups);
  for_row_chunks(nblocks, block * cols, nthreads,
                 [&](int64_t b0, int64_t b1) { write(b0, b1, x + b0 * block * cols); });
  return true;
}

bool quantize_padded(const float* x, const PaddedImage& im, int headroom, int16_t* out, int32_t* exponent,
                     int nthreads) {
  const int64_t count = im.images * im.rows * im.cols * im.channels;
  if (!compute_exponents(x, {1, count, 1, Grouping::tensor, 0}, headroom, exponent, nthreads)) return false;
  const QuantizeKernels& k = quantize_kernels(active_isa());
  const Scale scale = inverse_scale(exponent[0]);
  const int64_t hp = im.rows + 2 * im.pad_rows, wp = im.cols + 2 * im.pad_cols, oc = im.out_channels;
  const int64_t row_len = wp * oc, run = im.cols * im.channels, border = im.pad_cols * oc;
  for_row_chunks(im.images * hp, row_len, nthreads, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<int16_t> scratch;  // mantissas of rows, when channels are added
    for (int64_t r = r0, rows = 1; r < r1; r += rows) {
      int16_t* dst = out + r * row_len;
      const int64_t h = r % hp - im.pad_rows;
      rows = 1;
      if (h < 0 || h >= im.rows) {
        std::fill_n(dst, row_len, int16_t(0));
        continue;
      }
      const int64_t src = ((r / hp) * im.rows + h) * run;
      RoundingArgs args{float(max_mantissa(headroom)), Rounding::nearest, uint64_t(src), 0, 0};
      args.within_limit = clamp_never_acts(exponent[0], headroom);
      if (oc == im.channels) {
        std::fill_n(dst, border, int16_t(0));
        std::fill_n(dst + row_len - border, border, int16_t(0));
        k.run(x + src, dst + border, run, scale, args);
        continue;
      }
      // the image's rows up to its last or the chunk's, quantized by one call (a digits
      // image's rows are 8 floats), then widened into place
      rows = std::min(r1 - r, im.rows - h);
      int16_t* q = at_least(scratch, rows * run);
      k.run(x + src, q, rows * run, scale, args);
      for (int64_t i = 0; i < rows; ++i, dst += row_len) {
        std::fill_n(dst, border, int16_t(0));
        std::fill_n(dst + row_len - border, border, int16_t(0));
        copy_pixels(q + i * run, im.cols, im.channels, dst + border, oc);
      }
    }
  });
  return true;
}

}  // namespace dfp
