#include "grad_input.h"

#include <algorithm>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>

#include "layer_parts.h"
#include "quantize.h"
#include "scratch.h"
#include "threads.h"

namespace dfp {
namespace {

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

}  // namespace

Window stride_one_window(const ConvLayer& l) {
  return {l.ph - l.dh * (l.kh - 1), l.ph + l.h, l.pw - l.dw * (l.kw - 1), l.pw + l.w, l.cout};
}

GradInput::GradInput(const ConvLayer& l) : l_(l) {}

std::vector<GradInput::Axis> GradInput::axes(int64_t size, int64_t kernel, int64_t stride, int64_t padding,
                                             int64_t dilation) {
  // Along an axis u = stride * v + r (padded) receives from tap t through dy[o] where
  // stride * o + dilation * t = u: the taps with dilation * t = r (mod stride).
  std::vector<Axis> phases;
  const int64_t gcd = std::gcd(stride, dilation), step = stride / gcd, d = dilation / gcd;
  for (int64_t r = 0; r < stride; ++r) {
    const int64_t v0 = -floor_div(r - padding, stride), v1 = floor_div(padding + size - 1 - r, stride);
    if (v1 < v0) continue;  // no position of dx in this phase
    int64_t first_tap = kernel;
    for (int64_t t = 0; t < step && first_tap == kernel; ++t)
      if ((dilation * t - r) % stride == 0) first_tap = t;
    const int64_t taps = first_tap < kernel ? (kernel - first_tap + step - 1) / step : 0;
    const int64_t c0 = taps ? (dilation * first_tap - r) / stride : 0;  // exact
    // (a phase without taps is never multiplied: its window is not used)
    phases.push_back({stride * v0 + r - padding, v1 - v0 + 1, first_tap, step, taps, d,
                      v0 - c0 - std::max<int64_t>(taps - 1, 0) * d, v1 - c0 + 1});
  }
  return phases;
}

bool GradInput::prepare(ImageExponents ey, const float* weight, int64_t block, int nthreads) {
  const ConvLayer& l = l_;
  if (any_nonfinite(ey.values, ey.count)) return false;
  // The whole kernel as (groups, taps, cout / groups, c / groups), the taps flipped, so
  // that per block its exponents come out as (groups, taps, blocks, c / groups).
  const int64_t cg = l.c / l.groups, cout_g = l.cout / l.groups, taps = l.kh * l.kw;
  const int64_t size = l.groups * taps * cout_g * cg;
  const bool in_place = weight_is_rows(l);
  std::unique_ptr<float[]> gathered(in_place ? nullptr : new float[size]);  // every element written
  const float* rows = in_place ? weight : gathered.get();
  const Strides s(l);
  if (!in_place) {
    for_row_chunks(l.groups * taps, cout_g * cg, nthreads, [&](int64_t gt0, int64_t gt1) {
      for (int64_t gt = gt0; gt < gt1; ++gt) {
        const int64_t g = gt / taps, t = gt % taps, i = l.kh - 1 - t / l.kw, j = l.kw - 1 - t % l.kw;
        for (int64_t o = 0; o < cout_g; ++o)
          copy_strided(weight + s.at(g * cout_g + o, 0, i, j), s.ci, gathered.get() + (gt * cout_g + o) * cg, 1, cg);
      }
    });
  }
  const bool blocks = l.weight_per_channel;
  if (blocks && (block <= 0 || cout_g % block))
    throw std::invalid_argument("conv_grad_input: the weight's block of output channels (" + std::to_string(block) +
                                ") must divide cout / groups (" + std::to_string(cout_g) + ")");
  const QuantizeShape shape = blocks ? QuantizeShape{l.groups * taps, cout_g, cg, Grouping::block, block}
                                     : QuantizeShape{1, size, 1, Grouping::tensor, 0};
  std::vector<int16_t> w(size);
  std::vector<int32_t> ew(blocks ? l.groups * taps * (cout_g / block) * cg : 1);
  if (!quantize_gathered(rows, shape, l.headroom, w.data(), ew.data(), nthreads)) return false;
  ey_ = ey;
  phases_.clear(), uncovered_ = false;
  const std::vector<Axis> row_axes = axes(l.h, l.kh, l.sh, l.ph, l.dh), col_axes = axes(l.w, l.kw, l.sw, l.pw, l.dw);
  const bool one_phase = row_axes.size() == 1 && col_axes.size() == 1;  // no other phase needs w
  for (const Axis& r : row_axes)
    for (const Axis& c : col_axes) {
      if (r.taps && c.taps)
        phases_.push_back(phase(r, c, w, one_phase, ew, blocks ? block : 0));
      else
        uncovered_ = true;
    }
  return true;
}

GradInput::Phase GradInput::phase(const Axis& rows, const Axis& cols, std::vector<int16_t>& w, bool take_w,
                                  const std::vector<int32_t>& ew, int64_t block) const {
  const ConvLayer& l = l_;
  const int64_t cg = l.c / l.groups, cout_g = l.cout / l.groups, taps = l.kh * l.kw, phase_taps = rows.taps * cols.taps;
  const int64_t k = phase_taps * cout_g, per_tap = block ? cout_g / block * cg : 0;
  // A phase of all taps from the first, one apart (stride 1), holds them in the whole
  // kernel's order: w as it is, taken rather than copied where no other phase needs it
  // (a 4096 x 4096 linear layer's is 32 MB).
  const bool taken = take_w && rows.first_tap == 0 && cols.first_tap == 0 && rows.step == 1 && cols.step == 1 &&
                     rows.taps == l.kh && cols.taps == l.kw;
  Phase p{rows, cols, {}, {}, block, {}};
  if (taken)
    p.w = std::move(w);
  else
    p.w.resize(l.groups * k * cg);
  // Tap (a, b) of the phase is the kernel's (i, j), the phase's taps flipped; the whole
  // kernel's rows hold tap (kh - 1 - i, kw - 1 - j) (flipped too).
  if (block) p.ew.resize(l.groups * phase_taps * per_tap);
  for (int64_t g = 0; g < l.groups; ++g)
    for (int64_t a = 0; a < rows.taps; ++a)
      for (int64_t b = 0; b < cols.taps; ++b) {
        const int64_t i = rows.first_tap + rows.step * (rows.taps - 1 - a);
        const int64_t j = cols.first_tap + cols.step * (cols.taps - 1 - b);
        const int64_t from = g * taps + (l.kh - 1 - i) * l.kw + (l.kw - 1 - j), to = g * phase_taps + a * cols.taps + b;
        if (!taken) std::copy_n(w.data() + from * cout_g * cg, cout_g * cg, p.w.data() + to * cout_g * cg);
        std::copy_n(ew.data() + from * per_tap, per_tap, p.ew.data() + to * per_tap);
      }
  if (!block) {
    // K-blocks: dy's channel blocks, each in one tap, a kernel row of taps where a
    // group's channels are one block (its taps read one row of dy); or all of K. The
    // weight's one exponent in each: one row for all (conv_gemm_int16's ew_one_row).
    const int64_t row_kblock = ey_.channel_block == cout_g ? cols.taps * cout_g : ey_.channel_block;
    p.kblock = ey_.channel_block ? row_kblock : std::max<int64_t>(k, 1);
    p.ew.assign(l.groups * cg, ew[0]);
  }
  if (ey_.channel_block) {  // per row of the window; those past dy's edges a group of zeros'
    const int64_t oh = l.shape().oh(), per_row = l.cout / ey_.channel_block;
    p.row_exponents.assign(l.n * rows.window() * per_row, group_exponent(0, l.headroom));
    for (int64_t n = 0; n < l.n; ++n)
      for (int64_t r = std::max<int64_t>(rows.window0, 0); r < std::min(rows.window1, oh); ++r)
        std::copy_n(ey_.values + (n * oh + r) * per_row, per_row,
                    p.row_exponents.data() + (n * rows.window() + r - rows.window0) * per_row);
  }
  return p;
}

void GradInput::multiply(const Phase& p, const int16_t* window, int64_t n0, int64_t count, float* dx,
                         int nthreads) const {
  const ConvLayer& l = l_;
  const int64_t cg = l.c / l.groups, k = p.rows.taps * p.cols.taps * (l.cout / l.groups);
  const int64_t window_size = p.rows.window() * p.cols.window() * l.cout;
  ImageExponents ey = ey_;  // the images' own
  if (ey_.channel_block) {
    const int64_t per_image = int64_t(p.row_exponents.size()) / l.n;
    ey.values = p.row_exponents.data() + n0 * per_image, ey.count = count * per_image;
  } else if (ey_.count > 1) {
    ey.values += n0, ey.count = count;
  }
  const ConvGeometry geometry{count,       p.rows.window(), p.cols.window(), l.cout, l.groups, p.rows.taps,
                              p.cols.taps, 1,               1,               p.rows.dilation, p.cols.dilation};
  // At stride 1 the phase is all of dx; else every stride-th pixel of every stride-th row.
  const OutputGrid grid = l.sh == 1 && l.sw == 1
                              ? OutputGrid{}
                              : OutputGrid{p.cols.count, p.rows.count, l.sw * l.c, l.sh * l.w * l.c, l.h * l.w * l.c};
  float* out = dx + n0 * l.h * l.w * l.c + (p.rows.first * l.w + p.cols.first) * l.c;
  // the window's zeros past dy's edges
  const int64_t oh = l.shape().oh(), ow = l.shape().ow();
  const ZeroBorder zeros{std::max<int64_t>(-p.rows.window0, 0), std::max<int64_t>(p.rows.window1 - oh, 0),
                         std::max<int64_t>(-p.cols.window0, 0), std::max<int64_t>(p.cols.window1 - ow, 0)};
  conv_gemm_int16(window + n0 * window_size, geometry, ey, l.headroom, p.w.data(), k * cg, cg, 1, cg, p.ew.data(),
                  p.kblock, l.headroom, nullptr, out, nthreads, grid, nullptr, !l.weight_per_channel, zeros);
}

void GradInput::run(const int16_t* dy, float* dx, int nthreads) const {
  const ConvLayer& l = l_;
  const int64_t oh = l.shape().oh(), ow = l.shape().ow();
  if (uncovered_)
    for_row_chunks(l.n * l.h, l.w * l.c, nthreads, [&](int64_t r0, int64_t r1) {
      std::fill(dx + r0 * l.w * l.c, dx + r1 * l.w * l.c, 0.0f);
    });
  thread_local std::vector<int16_t> copy;  // kept: a fresh buffer would be paged in every call
  for (const Phase& p : phases_) {
    const Window window{p.rows.window0, p.rows.window1, p.cols.window0, p.cols.window1, l.cout};
    const bool whole = window.r0 == 0 && window.c0 == 0 && window.r1 == oh && window.c1 == ow;
    int16_t* padded = whole ? nullptr : at_least(copy, l.n * p.rows.window() * p.cols.window() * l.cout);
    if (!whole) copy_window(dy, l.n, oh, ow, l.cout, window, padded, nthreads);
    multiply(p, whole ? dy : padded, 0, l.n, dx, nthreads);
  }
}

void GradInput::images(const int16_t* window_dy, int64_t n0, int64_t count, float* dx, int nthreads) const {
  multiply(phases_.front(), window_dy, n0, count, dx, nthreads);
}

int64_t GradInput::images_per_piece() const {
  const Phase& p = phases_.front();
  return std::max<int64_t>(kPieceBytes / (2 * p.rows.window() * p.cols.window() * l_.cout), 1);
}

}  // namespace dfp
