#include "layer.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "batch_norm.h"
#include "grad_input.h"
#include "layer_parts.h"
#include "quantize.h"
#include "scratch.h"
#include "threads.h"

namespace dfp {
namespace {

// The backward's int16 copies of dY, kept by the calling thread from call to call, as
// the forward keeps its image: fresh ones of megabytes were paged in (and zeroed by the
// kernel) on every call, by both threads at once in the parallel passes, which then
// waited on each other's page faults.
struct BackwardBuffers {
  std::vector<int16_t> dy_blocks, dy_groups, dy_window;
};

// grad_weight's layer: the padded image as is, dw's strides (those of the weight).
ConvLayer grad_weight_layer(const ConvLayer& l) {
  ConvLayer unpadded = l;
  const ConvGeometry g = l.padded();
  unpadded.h = g.hp, unpadded.w = g.wp, unpadded.ph = unpadded.pw = 0;
  return unpadded;
}
BackwardBuffers& backward_buffers() {
  thread_local BackwardBuffers b;
  return b;
}

// The first image of each piece of a batch, and n last: pieces of `chunk` images (whole
// groups of `samples`), handed to the threads as they come free, and on several threads
// smaller towards the end (a share of what is left, down to a quarter of a chunk or an
// equal share of a small batch), so that the threads finish close together. The
// forward's equal shares fixed in advance, and the backward's equal pieces, left one
// thread waiting for the other, whose core the host had slowed.
std::vector<int64_t> piece_starts(int64_t n, int64_t chunk, int64_t samples, int64_t threads) {
  const auto whole_groups = [&](int64_t images) { return (images + samples - 1) / samples * samples; };
  const int64_t least = std::min((chunk + 3) / 4, (n + threads - 1) / threads);
  std::vector<int64_t> starts{0};
  for (int64_t n0 = 0; n0 < n;) {
    const int64_t share = threads > 1 ? (n - n0 + 2 * threads - 1) / (2 * threads) : chunk;
    const int64_t size = std::min(chunk, whole_groups(std::max(share, least)));
    starts.push_back(n0 = std::min(n, n0 + size));
  }
  return starts;
}

// Whether grad_weight's image came from finite values.
bool finite_input(InputExponents ex, const ConvLayer& l) {
  return !any_nonfinite(ex.values, ex.per_sample ? l.n * l.channels : 1);
}

}  // namespace

bool conv_forward(const float* x, const float* weight, const float* bias, const ConvLayer& l,
                  InputGrouping grouping, int16_t* x_padded, int32_t* x_exponent, float* y, double* y_mean,
                  double* y_variance, int nthreads) {
  // B of each group: (K, cout / groups), K over (kh, kw, ci) of the padded channels
  // (zeros in an added one, which neither moves a maximum nor adds to a sum).
  const int64_t cg = l.c / l.groups, cgp = l.channels / l.groups, k = l.kh * l.kw * cgp, cout_g = l.cout / l.groups;
  const bool in_place = weight_is_rows(l);
  std::unique_ptr<float[]> gathered(in_place ? nullptr : new float[l.cout * k]);
  const float* rows = in_place ? weight : gathered.get();  // (cout, K)
  const Strides s(l);
  if (!in_place) {
    for_row_chunks(l.cout, k, nthreads, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t i = 0; i < l.kh; ++i)
          for (int64_t j = 0; j < l.kw; ++j) {
            float* tap = gathered.get() + o * k + (i * l.kw + j) * cgp;
            copy_strided(weight + s.at(o, 0, i, j), s.ci, tap, 1, cg);
            std::fill(tap + cg, tap + cgp, 0.0f);
          }
    });
  }
  const QuantizeShape shape = l.weight_per_channel ? QuantizeShape{1, l.cout, k, Grouping::channel, 0}
                                                   : QuantizeShape{1, l.cout * k, 1, Grouping::tensor, 0};
  std::unique_ptr<int16_t[]> w(new int16_t[l.cout * k]);
  std::vector<int32_t> ew(l.cout);  // (groups, 1, cout / groups): one K-block
  if (!quantize_gathered(rows, shape, l.headroom, w.get(), ew.data(), nthreads)) return false;
  if (!l.weight_per_channel) std::fill(ew.begin(), ew.end(), ew[0]);
  const PaddedImage image{l.n, l.h, l.w, l.c, l.ph, l.pw, l.channels};
  const ZeroBorder padding{l.ph, l.ph, l.pw, l.pw};  // the quantized image's zeros
  if (!grouping.row_block) {
    if (!quantize_padded(x, image, l.headroom, x_padded, x_exponent, nthreads)) return false;
    conv_gemm_int16(x_padded, l.padded(), {x_exponent, 1}, l.headroom, w.get(), cout_g * k, 1, k, cout_g,
                    ew.data(), std::max<int64_t>(k, 1), l.headroom, bias, y, nthreads, {}, nullptr, false, padding);
    if (y_mean) batch_norm_statistics(y, l.n, l.shape().oh() * l.shape().ow(), l.cout, y_mean, y_variance, nthreads);
    return true;
  }
  // Per image row and channel block: K-blocks of those blocks (a kernel row of taps where
  // a group's channels are one block), the weight's exponents the same along them.
  const ConvGeometry padded = l.padded();
  const int64_t kblock = grouping.row_block == cgp ? l.kw * cgp : grouping.row_block;
  // A few images at a time, quantized and multiplied by one thread: the forward's int16
  // rows are read back from its cache, not written to memory and read from there (4.7 MB
  // each way for a 16-channel 32x32 forward at batch 128). No exponent spans images.
  const int64_t image_size = padded.hp * padded.wp * l.channels, row_blocks = l.channels / grouping.row_block;
  const int64_t samples = std::max<int64_t>(grouping.group_samples, 1);
  // Each piece reads all of the packed weight: where that is larger than a piece (a
  // 4096 x 4096 linear layer's 32 MB against 32 of its 8 KB rows), pieces as large as it,
  // so that the weight is not read from memory more often than the rows would be.
  const int64_t piece_bytes = std::max<int64_t>(kPieceBytes, 2 * l.cout * k);
  const int64_t fit = std::max<int64_t>(piece_bytes / (2 * image_size), 1);
  const int64_t chunk = (fit + samples - 1) / samples * samples;  // whole groups of samples
  const int64_t pixels = l.shape().oh() * l.shape().ow();
  const MomentBlocks moments(pixels, l.cout);
  std::vector<float> block_mean(y_mean ? l.n * moments.per_image * l.cout : 0), block_m2(block_mean.size());
  // The weight packed once for all pieces, kept: a fresh buffer would be paged in every
  // call. A reference, so that the pieces' threads read this thread's.
  thread_local std::vector<Packed> kept_w;
  std::vector<Packed>& packed_w = kept_w;
  pack_conv_weight(padded, w.get(), cout_g * k, 1, k, cout_g, kblock, packed_w, nthreads);
  // Images [n0, n0 + count) on `threads` threads.
  const auto images = [&](int64_t n0, int64_t count, int threads) {
    thread_local std::vector<int16_t> x_rows;  // kept: fresh buffers would be paged in every call
    thread_local std::vector<int32_t> e_rows;
    PaddedImage part = image;
    part.images = count;
    int16_t* rows = at_least(x_rows, count * image_size);
    int32_t* e = at_least(e_rows, count * padded.hp * row_blocks);
    const InputQuantization out{rows,
                                e,
                                grouping.row_block,
                                x_padded ? x_padded + n0 * image_size : nullptr,
                                x_exponent ? x_exponent + n0 * l.channels : nullptr,
                                grouping.group_samples,
                                grouping.channel_major};
    if (!quantize_input(x + n0 * l.h * l.w * l.c, part, l.headroom, out, threads)) return false;
    ConvGeometry geometry = padded;
    geometry.n = count;
    conv_gemm_int16(rows, geometry, {e, count * padded.hp * row_blocks, grouping.row_block}, l.headroom, w.get(),
                    cout_g * k, 1, k, cout_g, ew.data(), kblock, l.headroom, bias, y + n0 * pixels * l.cout, threads,
                    {}, &packed_w, true, padding);
    const int64_t at = n0 * moments.per_image * l.cout;
    if (y_mean) block_moments(y, n0, count, l.cout, moments, block_mean.data() + at, block_m2.data() + at);
    return true;
  };
  const auto statistics = [&] {
    if (y_mean) join_block_moments(block_mean.data(), block_m2.data(), l.n, l.cout, moments, y_mean, y_variance);
    return true;
  };
  const int64_t groups = (l.n + samples - 1) / samples, threads = std::min<int64_t>(nthreads, groups);
  // The batch in one piece on all threads where the weight set its size: pieces on
  // threads of their own would each read all of it.
  if (chunk >= l.n && (threads <= 1 || piece_bytes > kPieceBytes)) return images(0, l.n, nthreads) && statistics();
  const std::vector<int64_t> starts = piece_starts(l.n, chunk, samples, threads);
  std::atomic<bool> finite{true};
  parallel_for(int64_t(starts.size()) - 1, int(threads), [&](int64_t p) {
    if (finite.load(std::memory_order_relaxed) && !images(starts[p], starts[p + 1] - starts[p], 1))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite && statistics();
}

namespace {

// Where grad_input's window only pads dy (the usual padding, at most the kernel's reach),
// dy's rows can be quantized straight into it: their places in the window.
BorderedRows padded_rows_of(const ConvLayer& l) {
  if (l.sh != 1 || l.sw != 1) return {};  // a window per phase
  const Window window = stride_one_window(l);
  const int64_t oh = l.shape().oh(), ow = l.shape().ow();
  if (window.r0 > 0 || window.c0 > 0 || window.r1 < oh || window.c1 < ow) return {};
  return {oh, ow, -window.r0, -window.c0, window.r1 - window.r0, window.c1 - window.c0};
}

}  // namespace

bool conv_grad_input(const int16_t* dy, ImageExponents ey, const float* weight, int64_t block,
                     const ConvLayer& l, float* dx, int nthreads) {
  GradInput product(l);
  if (!product.prepare(ey, weight, block, nthreads)) return false;
  product.run(dy, dx, nthreads);
  return true;
}

bool conv_grad_weight(const int16_t* dy, const int32_t* ey, int64_t ey_count, int64_t kblock,
                      const int16_t* x_padded, InputExponents ex, const ConvLayer& l, float* dw, int64_t dy_panel_width,
                      int nthreads, ChannelRange channels) {
  if (!finite_input(ex, l) || any_nonfinite(ey, ey_count)) return false;
  const ConvGeometry g = l.padded();
  const int64_t oh = l.shape().oh(), ow = l.shape().ow();
  const int64_t cg = l.c / l.groups, cgp = l.channels / l.groups, k = l.kh * l.kw * cgp;
  // per tensor: one block of all pixels, its exponent in every column
  const bool one = ey_count == 1;
  const std::vector<int32_t> columns(one ? l.cout : 0, ey[0]);
  // (cout, K), K over (kh, kw, ci) of the padded channels; every element written by the product
  const bool in_place = weight_is_rows(l);
  std::unique_ptr<float[]> rows(in_place ? nullptr : new float[l.cout * k]);
  conv_grad_weight_int16(dy, l.cout, one ? columns.data() : ey, one ? l.n * oh * ow : kblock, l.headroom, x_padded,
                         g, ex, l.headroom, in_place ? dw : rows.get(), dy_panel_width, nthreads, channels);
  const Strides s(l);
  const int64_t c0 = std::min(channels.first, cg), c1 = std::min(channels.last, cg);
  if (!in_place && c1 > c0) {
    for_row_chunks(l.cout, k, nthreads, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t i = 0; i < l.kh; ++i)
          for (int64_t j = 0; j < l.kw; ++j)
            copy_strided(rows.get() + o * k + (i * l.kw + j) * cgp + c0, 1, dw + s.at(o, c0, i, j), s.ci, c1 - c0);
    });
  }
  return true;
}

bool conv_backward(const float* dy, const float* weight, const int16_t* x_padded, InputExponents x_exponent,
                   const ConvLayer& l, const GradientRounding& r, float* dx, float* dw, int nthreads,
                   const NormInputGradient* dy_made) {
  const int64_t oh = l.shape().oh(), ow = l.shape().ow();
  if (dw && !finite_input(x_exponent, l)) return false;
  const int64_t pixels = l.n * oh * ow, size = pixels * l.cout;
  const int64_t blocks = dw ? (pixels + r.dy_block - 1) / r.dy_block : 0;
  const bool rows = r.input_groups == InputGroups::row;
  const int64_t group_rows = rows ? ow : r.input_groups == InputGroups::sample ? oh * ow : pixels;
  const int64_t groups = pixels / group_rows * (rows ? l.cout / r.row_block : 1);
  BackwardBuffers& buffers = backward_buffers();
  // grad_weight's dy straight into the K-pair panels that product reads, where it packs
  // dy whole (4 MB packed per 16-channel 32x32 backward at batch 128)
  // (the K-layout of conv_grad_weight's: blocks of dy_block pixels, even)
  const ConvLayer weight_layer = grad_weight_layer(l);
  const int64_t panel_width = dw && r.dy_block % 2 == 0 ? grad_weight_panel_width(weight_layer.padded(), l.cout) : 0;
  const PairPanels panels{panel_width, panel_width ? KLayout(pixels, r.dy_block).kpairs() : 0};
  int16_t* q_blocks = dw ? at_least(buffers.dy_blocks, std::max(size, 2 * panels.kpairs * l.cout)) : nullptr;
  // grad_input's dy quantized into its zero-padded window where that only pads (the
  // window's copy of a 16-channel 32x32 layer's dy moved 8.6 MB per call), else as is
  const BorderedRows bordered = dx ? padded_rows_of(l) : BorderedRows{};
  int16_t* q_groups = nullptr;
  if (bordered.given()) {
    q_groups = at_least(buffers.dy_window, l.n * bordered.out_height * bordered.out_width * l.cout);
    zero_window_border(l.n, oh, ow, stride_one_window(l), q_groups, nthreads);
  } else if (dx) {
    q_groups = at_least(buffers.dy_groups, size);
  }
  std::vector<int32_t> e_blocks(dw ? blocks * l.cout : 0), e_groups(dx ? groups : 0);
  const GradientQuantization out{q_blocks, e_blocks.data(), r.dy_block,         r.dy_block_rounding,
                                 q_groups, e_groups.data(), group_rows,         r.input_rounding,
                                 rows ? r.row_block : 0,    bordered,          panels,
                                 dy_made};
  if (!quantize_gradient(dy, pixels, l.cout, l.headroom, r.seed, out, nthreads)) return false;
  const ImageExponents ey{e_groups.data(), groups, rows ? r.row_block : 0};
  GradInput grad_input(l);
  if (dx && !grad_input.prepare(ey, weight, r.weight_block, nthreads)) return false;
  const auto weight_gradient = [&](int threads, ChannelRange channels = {}) {
    return !dw || conv_grad_weight(q_blocks, e_blocks.data(), blocks * l.cout, r.dy_block, x_padded, x_exponent,
                                   weight_layer, dw, panel_width, threads, channels);
  };
  // Both products in one parallel region where grad_weight reads the image as channel
  // planes (at most 64 channels, stride 1, one group): grad_weight first, in one part of
  // its input channels per thread, then grad_input a few images at a time on whichever
  // thread is free. Run one after the other, each product waited for its slowest thread;
  // with grad_weight whole on one thread and grad_input on the other, grad_input's thread
  // waited for grad_weight's, the longer product on an AMD Zen 4 (a quarter of a
  // 16-channel backward's CPU time on two threads; perf; more threads are not measured).
  const bool together = bordered.given() && dw && nthreads > 1 && l.groups == 1 &&
                        grad_weight_reads_channel_major(weight_layer.padded(), l.cout);
  if (!together) {
    if (dx && bordered.given())
      grad_input.images(q_groups, 0, l.n, dx, nthreads);
    else if (dx)
      grad_input.run(q_groups, dx, nthreads);
    return weight_gradient(nthreads);
  }
  // one part where the image is not yet planes: each part would transpose all of it;
  // parts of whole groups of kPatchChannelGroup channels
  const int64_t channel_groups = (weight_layer.channels + kPatchChannelGroup - 1) / kPatchChannelGroup;
  const int64_t parts = x_exponent.channel_major ? std::min<int64_t>(nthreads, channel_groups) : 1;
  const std::vector<int64_t> starts = piece_starts(l.n, grad_input.images_per_piece(), 1, nthreads);
  std::atomic<bool> finite{true};
  parallel_for(parts + int64_t(starts.size()) - 1, nthreads, [&](int64_t task) {
    if (task < parts) {
      const ChannelRange part{channel_groups * task / parts * kPatchChannelGroup,
                              channel_groups * (task + 1) / parts * kPatchChannelGroup};
      if (!weight_gradient(1, part)) finite.store(false, std::memory_order_relaxed);
      return;
    }
    const int64_t piece = task - parts;
    grad_input.images(q_groups, starts[piece], starts[piece + 1] - starts[piece], dx, 1);
  });
  return finite;
}

}  // namespace dfp
