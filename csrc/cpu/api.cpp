#include "api.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "conv.h"
#include "gemm.h"
#include "quantize.h"
#include "scratch.h"

namespace dfp {
namespace {

// Packed operands are kept between calls: fresh multi-megabyte buffers would be paged
// in (and zeroed by the kernel) on every GEMM. One set per calling thread.
struct Workspace {
  RowsA a;
  Packed b;
  std::vector<int16_t> image;  // channel major, for TransposedPatches
  std::vector<float> result;   // dW^T of one group
};
Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

ConvShape group_shape(const ConvGeometry& g) {
  return {g.n, g.hp, g.wp, g.channels, g.channels / g.groups, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw};
}

bool is_pointwise(const ConvShape& s) { return s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1; }

// Whether grad_weight reads the patches transposed from a channel-major image (and packs
// dY whole) rather than gathering them per block. Gathering costs the most per product
// where dY has few channels: at 16 and 32 the transposed one was 1.13-1.29x faster; at
// 64 (8x8, batch 128) the backward went 8.2-9.0 -> 7.2-7.5 ms on one thread of an Intel
// Xeon, 4.8-5.3 -> 4.0-4.5 on two (both products at once: conv_backward); it had run
// as fast as gathering before dY came quantized into panels.
bool grad_weight_reads_transposed(const ConvShape& s, int64_t cout_g) {
  return !is_pointwise(s) && cout_g <= 64 && TransposedPatches::fits(s);
}

// dY's exponents (KB, cout) of one group: columns [g * cout_g, (g + 1) * cout_g).
std::vector<int32_t> group_exponents(const int32_t* ey, int64_t blocks, int64_t cout, int64_t g, int64_t cout_g) {
  std::vector<int32_t> e(blocks * cout_g);
  for (int64_t b = 0; b < blocks; ++b) std::copy_n(ey + b * cout + g * cout_g, cout_g, e.data() + b * cout_g);
  return e;
}

// grad_weight's K-blocks by the group of samples whose input exponents they take: the
// fewest whole samples that are whole K-blocks share them (InputExponents;
// dfp._ops.input_group_samples), so the exponent tables below hold a row per group, not
// per sample (a linear layer's groups are 32 samples: its 128 x 256 table of them, made
// into chain scales in every backward, had cost more than its products).
struct SampleGroups {
  int64_t size, count;            // samples per group, groups
  std::vector<int32_t> of_block;  // each K-block's group (that of its first pixel)
};
SampleGroups sample_groups(const ConvShape& s, const KLayout& kl) {
  const int64_t per_sample = std::max<int64_t>(s.oh() * s.ow(), 1);
  const int64_t size = kl.kblock / std::gcd(kl.kblock, per_sample);
  SampleGroups groups{size, (s.n + size - 1) / size, std::vector<int32_t>(kl.nblocks)};
  for (int64_t b = 0; b < kl.nblocks; ++b) groups.of_block[b] = int32_t(b * kl.kblock / per_sample / size);
  return groups;
}

// The image's exponents of group g's columns (kh, kw, ci) of the patch matrix, per
// group of samples: (groups, K), each its first sample's. The GEMM takes them per coarser
// blocks than its K-blocks (GemmOptions::b_block_of: the K-blocks' groups), not one per
// K-block (a 32x32 batch of 128 has 4096).
std::vector<int32_t> patch_column_exponents(InputExponents ex, const ConvShape& s, int64_t g,
                                            const SampleGroups& groups) {
  const int64_t k = s.k(), taps = s.kh * s.kw;
  std::vector<int32_t> e(groups.count * k);
  for (int64_t i = 0; i < groups.count; ++i)
    for (int64_t t = 0; t < taps; ++t)
      std::copy_n(ex.values + i * groups.size * s.channels + g * s.cg, s.cg, e.data() + i * k + t * s.cg);
  return e;
}

// The same as rows of the transposed patch matrix (in `order`): (K, groups), A's per
// group of samples (GemmOptions::a_block_of).
std::vector<int32_t> patch_row_exponents(InputExponents ex, const ConvShape& s, int64_t g, const SampleGroups& groups,
                                         const PatchRowOrder& order) {
  const int64_t taps = s.kh * s.kw, count = groups.count;
  std::vector<int32_t> e(s.k() * count);
  for (int64_t ci = 0; ci < s.cg; ++ci)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t i = 0; i < count; ++i)
        e[order.row(ci, t) * count + i] = ex.values[i * groups.size * s.channels + g * s.cg + ci];
  return e;
}

// Panels per task for `panels` column panels on `nthreads` threads, at most `most` a
// task: the size whose tasks, handed out in turn, end soonest, and of those the largest
// (every task reads all of dY again). About four tasks per thread left 5 panels in 5
// tasks on 2 threads, one thread doing 3.
int64_t balanced_task_size(int64_t panels, int64_t most, int nthreads) {
  int64_t best = 1, best_end = panels + 1;
  for (int64_t size = 1; size <= std::min(panels, most); ++size) {
    std::vector<int64_t> load(std::max(nthreads, 1), 0);
    for (int64_t left = panels; left > 0; left -= size)
      *std::min_element(load.begin(), load.end()) += std::min(size, left);
    const int64_t end = *std::max_element(load.begin(), load.end());
    if (end <= best_end) best = size, best_end = end;
  }
  return best;
}

// dW = (patches^T dY)^T: the patches read in place from a channel-major copy of the
// image (made here, unless the image comes so: ex.channel_major) and dY packed once,
// instead of gathering pixel pairs of patches for every block
// (two fifths of a 16-channel layer's dW). The same products in the same chains, and
// 2^ex 2^ey is the same scale: the same bits as dY^T patches.
void grad_weight_transposed(const int16_t* dy, int64_t cout, const int32_t* ey, const KLayout& kl, int hy,
                            const int16_t* x, const ConvShape& shape, int64_t groups, InputExponents ex, int hx,
                            float* dw, int64_t dy_panel_width, int nthreads, ChannelRange channels) {
  const int64_t k = shape.k(), cout_g = cout / groups, plane = shape.hp * shape.wp, taps = shape.kh * shape.kw;
  const MicroKernel& uk = micro_kernel(active_isa(), cout_g);
  // channels by four where the micro-kernel reads rows four at a time at one stride
  const PatchRowOrder order{shape.cg, taps, uk.mr % 4 == 0 && uk.mr > 4 ? kPatchChannelGroup : 1};
  // whole groups of channels: their rows are consecutive
  const int64_t c0 = std::min(channels.first, shape.cg), c1 = std::min(channels.last, shape.cg);
  if (c0 % kPatchChannelGroup || (c1 % kPatchChannelGroup && c1 < shape.cg))
    throw std::invalid_argument("conv_grad_weight_int16: a range of input channels must start and end at a multiple "
                                "of kPatchChannelGroup (or at the last channel)");
  const int64_t r0 = c0 * taps, r1 = c1 * taps;
  const bool one = !ex.per_sample;  // one exponent for the image: one row of them
  const std::vector<int32_t> uniform(one ? kl.nblocks : 0, ex.values[0]);
  const SampleGroups grouping = one ? SampleGroups{} : sample_groups(shape, kl);
  Workspace& ws = workspace();
  const int16_t* image = x;
  if (ex.channel_major && shape.sw != 1)
    throw std::invalid_argument("conv_grad_weight_int16: channel planes at a stride along w other than 1 "
                                "(grad_weight_reads_channel_major is false)");
  if (!ex.channel_major) {
    image = at_least(ws.image, shape.n * plane * shape.channels);
    if (shape.sw == 2)
      to_phase_planes(x, shape.n, shape.hp, shape.wp, shape.channels, ws.image.data(), nthreads);
    else
      to_channel_major(x, shape.n, plane, shape.channels, ws.image.data(), nthreads);
  }
  at_least(ws.result, k * cout_g);
  // Every block of rows reads all of packed dY, as long as the image: as few blocks per
  // thread as fit the cache block, not the default four (16 channels, 32x32, 2 threads:
  // 8.1 -> 7.5 ms, paired medians), and as many for every thread (32 channels: 288 rows
  // in blocks of 96 left one thread a block to itself while the other waited).
  const int64_t per_thread = (r1 - r0 + nthreads - 1) / nthreads;
  const int64_t blocks_per_thread = (per_thread + uk.mc - 1) / uk.mc;
  const int64_t block_rows = ((per_thread + blocks_per_thread - 1) / blocks_per_thread + uk.mr - 1) / uk.mr * uk.mr;
  for (int64_t g = 0; g < groups; ++g) {
    const TransposedPatches patches(image + g * shape.cg * plane, shape, kl.kpairs(), order);
    const PanelsB given(reinterpret_cast<const int32_t*>(dy), cout, dy_panel_width, kl.kpairs());
    if (!dy_panel_width) pack_b_int16(dy + g * cout_g, cout, 1, cout_g, kl, uk.nr, ws.b, nthreads);
    const BSource& b = dy_panel_width ? static_cast<const BSource&>(given) : ws.b;
    // one group's exponents: all of dY's where there is one group, else a copy of its columns
    const std::vector<int32_t> own =
        groups > 1 ? group_exponents(ey, kl.nblocks, cout, g, cout_g) : std::vector<int32_t>();
    const int32_t* eb = groups > 1 ? own.data() : ey;
    GemmOptions options{block_rows, 0, one};
    const std::vector<int32_t> per_group =
        one ? std::vector<int32_t>() : patch_row_exponents(ex, shape, g, grouping, order);
    if (!one) options.a_block_of = grouping.of_block.data(), options.a_blocks = grouping.count;
    gemm_packed(uk, RowRange(patches, r0, r1 - r0), b, kl, one ? uniform.data() : per_group.data() + r0 * grouping.count,
                eb, hx, hy, {ws.result.data() + r0 * cout_g, nullptr, cout_g}, nthreads, options);
    float* dw_g = dw + g * cout_g * k;
    for (int64_t j = 0; j < k; ++j) {  // dW's K over (kh, kw, ci), the product's rows in `order`
      if (j % shape.cg < c0 || j % shape.cg >= c1) continue;
      const float* row = ws.result.data() + order.row(j % shape.cg, j / shape.cg) * cout_g;
      for (int64_t o = 0; o < cout_g; ++o) dw_g[o * k + j] = row[o];
    }
  }
}

// A's exponents of group g where the image has one per image row and channel block: each
// output row's, (n * oh, KB), K-block (kh, kw, block) taking the row that kernel row
// reads; or where a group's channels are one block, K-block kh: a kernel row's taps read
// one image row.
std::vector<int32_t> output_row_exponents(const ImageExponents& ex, const ConvShape& s, int64_t channels, int64_t g,
                                          const KLayout& kl) {
  const int64_t per_tap = s.cg / ex.channel_block, image_blocks = channels / ex.channel_block;
  const int64_t oh = s.oh(), taps_per_block = kl.kblock / ex.channel_block;  // 1, or kw (one block per tap)
  // The sizes in locals, the K-blocks counted: the int32 stores would otherwise have the
  // compiler (no strict aliasing) read them again and divide for every block.
  const int64_t hp = s.hp, sh = s.sh, dh = s.dh, kh = s.kh, blocks_per_row = s.kw / taps_per_block;
  std::vector<int32_t> ea(s.n * oh * kl.nblocks);
  int32_t* out = ea.data();  // (n, oh) rows of kh * blocks_per_row * per_tap = nblocks
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t o = 0; o < oh; ++o)
      for (int64_t i = 0; i < kh; ++i) {
        const int32_t* row = ex.values + (n * hp + o * sh + i * dh) * image_blocks + g * per_tap;
        for (int64_t b = 0; b < blocks_per_row; ++b, out += per_tap) std::copy_n(row, per_tap, out);
      }
  return ea;
}

}  // namespace

bool quantize3d(const float* x, int64_t O, int64_t N, int64_t I, int mode, int64_t block, int headroom,
                int rounding, uint64_t seed, int16_t* mantissa, int32_t* exponent, int nthreads) {
  const QuantizeShape shape{O, N, I, Grouping(mode), block};
  if (!compute_exponents(x, shape, headroom, exponent, nthreads)) return false;
  quantize_with_exponents(x, shape, headroom, exponent, Rounding(rounding), seed, mantissa, nthreads);
  return true;
}

void gemm_int16(const int16_t* a, int64_t sam, int64_t sak, const int16_t* b, int64_t sbk, int64_t sbn,
                int64_t M, int64_t N, int64_t K, const int32_t* ea, const int32_t* eb, int64_t kblock,
                int headroom_a, int headroom_b, const float* bias, float* c, int nthreads) {
  const MicroKernel& uk = micro_kernel(active_isa(), N);
  const KLayout kl(K, kblock);
  RowsA& pa = workspace().a;
  Packed& pb = workspace().b;
  pack_a_int16(a, sam, sak, M, kl, uk.mr, pa, nthreads);
  pack_b_int16(b, sbk, sbn, N, kl, uk.nr, pb, nthreads);
  gemm_packed(uk, pa, pb, kl, ea, eb, headroom_a, headroom_b, {c, bias, N}, nthreads);
}

bool matmul_float(const float* x, const float* y, int64_t M, int64_t N, int64_t K, int headroom,
                  MatmulGrouping grouping, int64_t block, int rounding, uint64_t seed_x, uint64_t seed_y,
                  const float* bias, float* c, int nthreads) {
  // x and y as (O, N, I) views whose exponents come out as (M, KB) and (KB, N).
  QuantizeShape xs{1, M * K, 1, Grouping::tensor, 0}, ys{1, K * N, 1, Grouping::tensor, 0};
  int64_t kblock = std::max<int64_t>(K, 1);
  if (grouping == MatmulGrouping::rows) {
    xs = {1, M, K, Grouping::channel, 0};
    ys = {K, N, 1, Grouping::channel, 0};
  } else if (grouping == MatmulGrouping::k_blocks) {
    xs = {M, K, 1, Grouping::block, block};
    ys = {1, K, N, Grouping::block, block};
    kblock = block;
  }
  std::vector<int32_t> ex(xs.groups()), ey(ys.groups());
  if (!compute_exponents(x, xs, headroom, ex.data(), nthreads)) return false;
  if (!compute_exponents(y, ys, headroom, ey.data(), nthreads)) return false;
  const KLayout kl(K, kblock);
  // Per tensor, every row (column) shares the one exponent.
  if (grouping == MatmulGrouping::tensor) {
    ex.assign(M, ex[0]);
    ey.assign(N, ey[0]);
  }
  const MicroKernel& uk = micro_kernel(active_isa(), N);
  RowsA& pa = workspace().a;
  Packed& pb = workspace().b;
  pack_a_float(x, M, kl, ex.data(), headroom, {Rounding(rounding), seed_x}, uk.mr, pa, nthreads);
  pack_b_float(y, N, kl, ey.data(), headroom, {Rounding(rounding), seed_y}, uk.nr, pb, nthreads);
  gemm_packed(uk, pa, pb, kl, ex.data(), ey.data(), headroom, headroom, {c, bias, N}, nthreads);
  return true;
}

void pack_conv_weight(const ConvGeometry& geometry, const int16_t* w, int64_t swg, int64_t swk, int64_t swn,
                      int64_t nout, int64_t kblock, std::vector<Packed>& packed, int nthreads) {
  const KLayout kl(group_shape(geometry).k(), kblock);
  packed.resize(geometry.groups);
  for (int64_t g = 0; g < geometry.groups; ++g)
    pack_b_int16(w + g * swg, swk, swn, nout, kl, micro_kernel(active_isa(), nout).nr, packed[g], nthreads);
}

void conv_gemm_int16(const int16_t* x, const ConvGeometry& geometry, ImageExponents ex, int hx, const int16_t* w,
                     int64_t swg, int64_t swk, int64_t swn, int64_t nout, const int32_t* ew, int64_t kblock, int hw,
                     const float* bias, float* y, int nthreads, const OutputGrid& grid,
                     const std::vector<Packed>* packed_weight, bool ew_one_row, ZeroBorder zeros) {
  const MicroKernel& uk = micro_kernel(active_isa(), nout);
  const ConvShape shape = group_shape(geometry);
  const KLayout kl(shape.k(), kblock);
  const bool per_row = ex.channel_block > 0;
  // Per tensor or per image: one row of exponents, the image's (its first one), and where
  // each image has its own, the rest as an offset per row (every patch lies in one
  // image), which moves no chain scale.
  std::vector<int32_t> ea(per_row ? 0 : kl.nblocks, ex.values[0]);
  std::vector<int32_t> image_offsets;
  for (int64_t image = 0; !per_row && image < ex.count && ex.count > 1; ++image)
    image_offsets.push_back(ex.values[image] - ex.values[0]);
  // A pointwise convolution's patches are the image's rows: read them in place.
  const bool pointwise = is_pointwise(shape);
  // Every task gathers its own block of patches, so all columns go in one task when
  // they fit (the fp32 tile then spans them all).
  GemmOptions options{0, pointwise ? 0 : std::min<int64_t>((nout + uk.nr - 1) / uk.nr * uk.nr, 512), !per_row};
  if (!image_offsets.empty())
    options.row_offsets = {image_offsets.data(), std::max<int64_t>(shape.oh() * shape.ow(), 1), ex.count};
  if (per_row) options.a_rows_per_exponent = shape.ow();  // an output row's pixels share its exponents
  const std::vector<int32_t> first_row(ew_one_row ? kl.nblocks : 0, 0);
  if (ew_one_row) options.b_block_of = first_row.data(), options.b_blocks = 1;
  const int64_t ew_rows = ew_one_row ? 1 : kl.nblocks;
  // The output pixels grouped by the chains that read only the zero border, where that
  // skips enough (the calling thread's buffers, kept: the forward's pieces call often).
  const PaddingOrder* reordered =
      !pointwise && !grid.line && PatchRows::reads_in_place(x, shape, kl) &&
              (zeros.top || zeros.bottom || zeros.left || zeros.right)
          ? padding_order(shape, zeros, kl, chain_length(hx, hw) / 2,
                          options.uniform_a ? shape.pixels() : options.a_rows_per_exponent)
          : nullptr;
  if (reordered) options.row_order = &reordered->order;
  Workspace& ws = workspace();
  for (int64_t g = 0; g < geometry.groups; ++g) {
    const int16_t* image = x + g * shape.cg;
    if (per_row) ea = output_row_exponents(ex, shape, geometry.channels, g, kl);
    const PatchRows patches(image, shape, kl, reordered ? reordered->origin.data() : nullptr);
    if (pointwise) pack_a_int16(image, geometry.channels, 1, shape.pixels(), kl, uk.mr, ws.a, nthreads);
    if (!packed_weight) pack_b_int16(w + g * swg, swk, swn, nout, kl, uk.nr, ws.b, nthreads);
    const GemmOutput out{y + g * nout, bias ? bias + g * nout : nullptr, geometry.groups * nout, grid};
    const ASource& a = pointwise ? static_cast<const ASource&>(ws.a) : patches;
    const Packed& b = packed_weight ? (*packed_weight)[g] : ws.b;
    gemm_packed(uk, a, b, kl, ea.data(), ew + g * ew_rows * nout, hx, hw, out, nthreads, options);
  }
}

void conv_grad_weight_int16(const int16_t* dy, int64_t cout, const int32_t* ey, int64_t kblock, int hy,
                            const int16_t* x, const ConvGeometry& geometry, InputExponents ex, int hx, float* dw,
                            int64_t dy_panel_width, int nthreads, ChannelRange channels) {
  const ConvShape shape = group_shape(geometry);
  const int64_t pixels = shape.pixels(), k = shape.k(), cout_g = cout / geometry.groups;
  const MicroKernel& uk = micro_kernel(active_isa(), k);
  const KLayout kl(pixels, std::max<int64_t>(kblock, 1));
  if (grad_weight_reads_transposed(shape, cout_g)) {
    grad_weight_transposed(dy, cout, ey, kl, hy, x, shape, geometry.groups, ex, hx, dw, dy_panel_width, nthreads,
                           channels);
    return;
  }
  if (!channels.all())
    throw std::invalid_argument("conv_grad_weight_int16: a range of input channels where grad_weight gathers patches "
                                "(grad_weight_reads_channel_major is false): ask for all of them");
  if (ex.channel_major)
    throw std::invalid_argument("conv_grad_weight_int16: an image of channel planes where grad_weight gathers "
                                "patches from channels last (grad_weight_reads_channel_major is false)");
  const bool one = !ex.per_sample;  // one exponent for the image: one column of them
  const std::vector<int32_t> uniform(one ? kl.nblocks : 0, ex.values[0]);
  // Few rows and a long reduction: the columns split into tasks (each reads all of dY).
  const int64_t panels = (k + uk.nr - 1) / uk.nr;
  const int64_t per_task = balanced_task_size(panels, std::max<int64_t>(uk.nc / uk.nr, 1), nthreads);
  const GemmOptions gathered{0, per_task * uk.nr, false, one};
  // Every task gathers its own block of patches; a pointwise convolution's patches are
  // the image's rows, packed once instead.
  const bool pointwise = is_pointwise(shape);
  Workspace& ws = workspace();
  const SampleGroups grouping = one ? SampleGroups{} : sample_groups(shape, kl);
  GemmOptions options = pointwise ? GemmOptions{0, 0, false, one} : gathered;
  if (!one) options.b_block_of = grouping.of_block.data(), options.b_blocks = grouping.count;  // per group of samples
  for (int64_t g = 0; g < geometry.groups; ++g) {
    const int16_t* image = x + g * shape.cg;
    pack_transposed(dy + g * cout_g, pixels, cout, cout_g, kl.kpairs(), uk.mr, ws.a, nthreads);
    // A's exponents [row][block]: the group's columns of dY's (KB, cout), transposed
    std::vector<int32_t> ea(cout_g * kl.nblocks);
    for (int64_t b = 0; b < kl.nblocks; ++b)
      for (int64_t o = 0; o < cout_g; ++o) ea[o * kl.nblocks + b] = ey[b * cout + g * cout_g + o];
    const std::vector<int32_t> per_group =
        one ? std::vector<int32_t>() : patch_column_exponents(ex, shape, g, grouping);
    const int32_t* eb = one ? uniform.data() : per_group.data();
    const PatchColumns patches(image, shape, uk.nr);
    if (pointwise) pack_b_int16(image, geometry.channels, 1, k, kl, uk.nr, ws.b, nthreads);
    const BSource& b = pointwise ? static_cast<const BSource&>(ws.b) : patches;
    gemm_packed(uk, ws.a, b, kl, ea.data(), eb, hy, hx, {dw + g * cout_g * k, nullptr, k}, nthreads, options);
  }
}

bool grad_weight_reads_channel_major(const ConvGeometry& geometry, int64_t cout) {
  // at stride 2 the planes are in phases (to_phase_planes), which it makes itself
  return geometry.sw == 1 && grad_weight_reads_transposed(group_shape(geometry), cout / geometry.groups);
}

int64_t grad_weight_panel_width(const ConvGeometry& geometry, int64_t cout) {
  const int nr = micro_kernel(active_isa(), cout).nr;
  const bool whole = geometry.groups == 1 && cout % nr == 0;
  return whole && grad_weight_reads_transposed(group_shape(geometry), cout) ? nr : 0;
}

}  // namespace dfp
