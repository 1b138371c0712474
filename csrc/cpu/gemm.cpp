// The portable macro-kernel: chains, scales, cache blocks, threads and the epilogue.
#include "gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "numerics.h"
#include "threads.h"

namespace dfp {
namespace {

// Consecutive chains grouped into K slices of at most kc K-pairs, as even as the chains
// allow: 288 K-pairs make two slices of 144, not 256 and a 32 that costs a pass over the
// accumulators for little work.
struct KSlice {
  int64_t first_chain, nchains, first_kpair;
};
std::vector<KSlice> k_slices(const std::vector<Chain>& chains, int kc) {
  int64_t total = 0;
  for (const Chain& c : chains) total += c.kpairs;
  const int64_t count = std::max<int64_t>(1, (total + kc - 1) / kc);
  const int64_t target = std::max<int64_t>(1, (total + count - 1) / count);
  std::vector<KSlice> slices;
  int64_t kpair = 0;
  for (size_t c = 0; c < chains.size(); ++c) {
    const int64_t length = kpair - (slices.empty() ? 0 : slices.back().first_kpair);
    if (slices.empty() || length + chains[c].kpairs > kc || length >= target)
      slices.push_back({int64_t(c), 0, kpair});
    ++slices.back().nchains;
    kpair += chains[c].kpairs;
  }
  return slices;
}

// Per-row (or column) reference exponent r = max over blocks, and the fp32 chain scales
// 2^(e - r), laid out [row][block] for A and [block][column] for B.
struct Scales {
  std::vector<int32_t> reference;  // r, applied in the epilogue
  std::vector<float> chain;        // empty when K is not blocked
  std::vector<uint8_t> ones;       // A's: whether each row's chain scales are all 1 (e = r)
};

// out[j] = 2^(e[j] - r[kStep * j]) (exponents <= 0; one reference for all, kStep 0, or
// one each), rounded as ldexp(1.0f, k) rounds: 0 below 2^-149, from their bits (a K-block
// of 32 pixels gives dY an exponent per 32 products). Returns whether all are 1.
template <int kStep>
bool chain_scales(const int32_t* __restrict e, const int32_t* __restrict r, int64_t n, float* __restrict out) {
  int32_t differ = 0;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = pow2f_any(e[j] - r[kStep * j]);
    differ |= e[j] ^ r[kStep * j];
  }
  return differ == 0;
}

// A's: e is [row][block] for `rows` rows of exponents, chain scales [row][block] (and
// rows of zeros up to padded_rows), in one pass over each row's after its maximum (a
// grad_weight's A has a row per tap and channel, a column per sample: passes over all of
// them for the maxima, the flags, the references spread out and the scales had cost 0.4 %
// of a ResNet-20 step).
Scales make_row_scales(const int32_t* e, int64_t rows, int64_t blocks, int64_t padded_rows) {
  Scales s;
  s.reference.resize(rows);
  for (int64_t i = 0; i < rows; ++i) s.reference[i] = *std::max_element(e + i * blocks, e + (i + 1) * blocks);
  if (blocks == 1) return s;
  s.ones.resize(rows);
  s.chain.resize(blocks * std::max(rows, padded_rows));  // zeros
  for (int64_t i = 0; i < rows; ++i)
    s.ones[i] = chain_scales<0>(e + i * blocks, &s.reference[i], blocks, s.chain.data() + i * blocks);
  return s;
}

// B's: e is [block][column] (blocks, n); chain scales [block][width] (width >= n, the
// columns past n 0), so that the micro-kernel may load a whole panel's.
Scales make_column_scales(const int32_t* e, int64_t n, int64_t blocks, int64_t width) {
  Scales s;
  s.reference.assign(e, e + n);
  for (int64_t b = 1; b < blocks; ++b)
    for (int64_t j = 0; j < n; ++j) s.reference[j] = std::max(s.reference[j], e[b * n + j]);
  if (blocks > 1) {
    s.chain.assign(blocks * width, 0.0f);
    for (int64_t b = 0; b < blocks; ++b) chain_scales<1>(e + b * n, s.reference.data(), n, s.chain.data() + b * width);
  }
  return s;
}

// Rows [i0, i0 + count) of A in groups of `group` rows, each group one row of exponents,
// the first row i0's (`row`): calls visit(first, end, exponent row) for each run of rows
// [first, end) in one group.
template <typename Visit>
void for_exponent_runs(int64_t i0, int64_t count, int64_t group, int64_t row, Visit visit) {
  int64_t row_end = (row + 1) * group;
  for (int64_t r = 0; r < count; ++row, row_end += group) {
    const int64_t end = std::min(count, row_end - i0);
    visit(r, end, row);
    r = end;
  }
}

// The chain scales of the tile at row i (mr rows, of M) for the micro-kernel, from A's
// (`blocks` per row of exponents, rows of A sharing a row of exponents in groups): each
// row its own (group 1, the table padded to whole tiles), one row for all (a tile inside
// one group: stride 0), or the rows copied into `tile` (mr * blocks; a tile across
// groups). One pointer and a stride, as the micro-kernel's registers allow (a pointer per
// row made it spill). None where every scale of the tile's rows is 1: its chains then add
// float(S) * 1 = float(S), the same bits without a product (a convolution's image rows
// mostly share their exponent with the rows above and below: 44-94 % of the output rows
// of ResNet-20's 3x3 layers). Rows past M are never stored, so their scales do not count.
struct TileScales {
  const float* scales;
  int64_t stride;
};
bool all_one(const float* v, int64_t n) {
  return std::all_of(v, v + n, [](float x) { return x == 1.0f; });
}
TileScales row_chain_scales(const Scales& a, int64_t blocks, int64_t group, int64_t i, int64_t first, int mr,
                            int64_t M, float* __restrict tile) {
  const float* chain = a.chain.data();
  int64_t last = first;  // the last real row's row of exponents
  for (int64_t next = (first + 1) * group; next < std::min(i + mr, M); next += group) ++last;
  if (std::all_of(a.ones.begin() + first, a.ones.begin() + last + 1, [](uint8_t one) { return one; })) return {};
  if (group == 1) return {chain + i * blocks, blocks};
  if (first == last) return {chain + first * blocks, 0};
  // rows past M (never stored) read M - 1's
  for_exponent_runs(i, mr, group, first, [&](int64_t r0, int64_t r1, int64_t row) {
    const float* __restrict src = chain + std::min(row, last) * blocks;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < blocks; ++b) tile[r * blocks + b] = src[b];
  });
  return {tile, blocks};
}

// C = fp32(acc * 2^(ra[m / group] + rb[n])) (+ bias), rows sharing their exponents in
// groups of `group` (all of them: rows of uniform exponents), plus the offset of the
// row's image where given (RowOffsets). The product of the exact acc and a power of two is
// rounded once, whether in fp32 or in double then to fp32; so fp32 is used whenever every
// 2^ra, 2^rb and 2^(ra + rb) is an fp32 number (always, in practice).
class Epilogue {
 public:
  Epilogue(const std::vector<int32_t>& ra, int64_t group, RowOffsets offsets, const std::vector<int32_t>& rb,
           GemmOutput out)
      : ra_(ra), group_(group), offsets_(offsets), rb_(rb), out_(out), ncols_(int64_t(rb.size())) {
    auto [ra_min, ra_max] = range(ra);
    if (offsets.values) {  // bounds of every row's sum, which is all the test needs
      const auto [lo, hi] = std::minmax_element(offsets.values, offsets.values + offsets.count);
      ra_min += *lo, ra_max += *hi;
    }
    const auto [rb_min, rb_max] = range(rb);
    in_fp32_ = ra_min >= kMin && rb_min >= kMin && ra_max <= kMax && rb_max <= kMax && ra_min + rb_min >= kMin &&
               ra_max + rb_max <= kMax;
    col_scale_.resize(ncols_);
    for (int64_t j = 0; j < ncols_; ++j) col_scale_[j] = in_fp32_ ? pow2f_any(rb[j]) : 0.0f;
  }

  // Whether C = acc * (row_scale(i) * col_scale(j)) + bias, in fp32 (the micro-kernel
  // can write whole tiles itself).
  bool in_fp32() const { return in_fp32_; }
  int32_t row_exponent(int64_t i) const {
    return ra_[i / group_] + (offsets_.values ? offsets_.values[i / offsets_.rows] : 0);
  }
  float row_scale(int64_t i) const { return pow2f_any(row_exponent(i)); }
  // row_scale(i0 + r) for r < count (rows of A, all < M), one per run of rows that share
  // their exponent row and image, with one division per kind of group, not one per row.
  void row_scales(int64_t i0, int64_t count, float* __restrict out) const {
    const int32_t* ra = ra_.data();
    const int32_t* image_offsets = offsets_.values;
    const int64_t per_image = image_offsets ? offsets_.rows : INT64_MAX;
    int64_t image = i0 / per_image, image_end = image_offsets ? (image + 1) * per_image - i0 : count;
    for_exponent_runs(i0, count, group_, i0 / group_, [&](int64_t r0, int64_t r1, int64_t row) {
      for (int64_t r = r0; r < r1;) {
        if (r == image_end) ++image, image_end += per_image;
        const int64_t end = std::min(r1, image_end);
        std::fill(out + r, out + end, pow2f_any(ra[row] + (image_offsets ? image_offsets[image] : 0)));
        r = end;
      }
    });
  }
  // row_scales for rows in a RowOrder, from their precomputed exponent rows and images
  // (made again only where they change: most rows share the row before's).
  void row_scales(const RowOrder& order, int64_t i0, int64_t count, float* __restrict out) const {
    const int64_t* exponent_row = order.exponent_row.data() + i0;
    const int64_t* image = order.image.data() + i0;
    for (int64_t r = 0; r < count; ++r)
      out[r] = r && exponent_row[r] == exponent_row[r - 1] && image[r] == image[r - 1]
                   ? out[r - 1]
                   : pow2f_any(ra_[exponent_row[r]] + (offsets_.values ? offsets_.values[image[r]] : 0));
  }
  const float* col_scale(int64_t j) const { return col_scale_.data() + j; }
  const float* bias(int64_t j) const { return out_.bias ? out_.bias + j : nullptr; }

  // Rows i0.. of C, or where `order` is given, rows order[0..] (a RowOrder's).
  void apply(const float* acc, int64_t ldacc, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
             const int64_t* order = nullptr) const {
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = acc + i * ldacc;
      const int64_t row = order ? order[i] : i0 + i;
      float* dst = out_.row(row) + j0;
      if (in_fp32_) {
        const float rs = row_scale(row);
        const float* cs = col_scale_.data() + j0;
        for (int64_t j = 0; j < cols; ++j) dst[j] = src[j] * (rs * cs[j]);
      } else {
        const int32_t ra = row_exponent(row);
        for (int64_t j = 0; j < cols; ++j) dst[j] = float(std::ldexp(double(src[j]), ra + rb_[j0 + j]));
      }
      if (out_.bias)
        for (int64_t j = 0; j < cols; ++j) dst[j] += out_.bias[j0 + j];
    }
  }

 private:
  static constexpr int32_t kMin = -149, kMax = 127;  // 2^k is an fp32 number
  static std::pair<int32_t, int32_t> range(const std::vector<int32_t>& v) {
    if (v.empty()) return {0, 0};
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return {*lo, *hi};
  }
  const std::vector<int32_t>& ra_;
  int64_t group_;
  RowOffsets offsets_;
  const std::vector<int32_t>& rb_;
  GemmOutput out_;
  int64_t ncols_;
  bool in_fp32_;
  std::vector<float> col_scale_;
};

// The skipped chains of each tile of a block of rows in a RowOrder (tiles of one kind
// point into order.skips; tiles of mixed kinds skip what all of their rows skip, into
// `mixed`); null for a tile that skips none.
void tile_skips(const RowOrder& order, int64_t i0, int64_t mpanels, int mr, int64_t M, std::vector<uint8_t>& mixed,
                const uint8_t** out) {
  const int64_t n = order.nchains;
  mixed.resize(mpanels * n);
  for (int64_t ip = 0; ip < mpanels; ++ip) {
    const int64_t i = i0 + ip * mr, valid = std::min<int64_t>(mr, M - i);
    const uint8_t* kind = order.kind.data() + i;
    const uint8_t* first = order.skips.data() + kind[0] * n;
    if (std::all_of(kind, kind + valid, [&](uint8_t k) { return k == kind[0]; })) {
      out[ip] = std::any_of(first, first + n, [](uint8_t skip) { return skip; }) ? first : nullptr;
      continue;
    }
    uint8_t* both = mixed.data() + ip * n;
    std::copy_n(first, n, both);
    for (int64_t r = 1; r < valid; ++r)
      for (int64_t c = 0; c < n; ++c) both[c] &= order.skips[kind[r] * n + c];
    out[ip] = std::any_of(both, both + n, [](uint8_t skip) { return skip; }) ? both : nullptr;
  }
}

// row_chain_scales for a tile of rows in a RowOrder, whose exponent rows are listed.
TileScales ordered_row_chain_scales(const Scales& a, int64_t blocks, const int64_t* exponent_row, int64_t valid,
                                    int mr, float* __restrict tile) {
  if (std::all_of(exponent_row, exponent_row + valid, [&](int64_t e) { return a.ones[e]; })) return {};
  if (std::all_of(exponent_row, exponent_row + valid, [&](int64_t e) { return e == exponent_row[0]; }))
    return {a.chain.data() + exponent_row[0] * blocks, 0};
  for (int64_t r = 0; r < mr; ++r)  // rows past M (never stored) read the last real row's
    std::copy_n(a.chain.data() + exponent_row[std::min<int64_t>(r, valid - 1)] * blocks, blocks, tile + r * blocks);
  return {tile, blocks};
}

}  // namespace

std::vector<Chain> make_chains(const KLayout& kl, int pairs, const int32_t* a_block_of, const int32_t* b_block_of) {
  std::vector<Chain> chains;
  for (int64_t b = 0; b < kl.nblocks; ++b)
    for (int64_t p = 0; p < kl.pairs_per_block; p += pairs)
      chains.push_back({int32_t(std::min<int64_t>(pairs, kl.pairs_per_block - p)),
                        a_block_of ? a_block_of[b] : int32_t(b), b_block_of ? b_block_of[b] : int32_t(b)});
  return chains;
}

const MicroKernel& micro_kernel(Isa isa, int64_t columns) {
  const bool narrow = columns <= 16;
  switch (isa) {
#ifdef DFP_X86_KERNELS
    case Isa::avx512_vnni:
      if (columns <= 8) return gemm_s16s16s32_avx512vnni_12x8;
      return narrow ? gemm_s16s16s32_avx512vnni_12x16 : gemm_s16s16s32_avx512vnni_6x32;
    case Isa::avx512bw: return narrow ? gemm_s16s16s32_avx512bw_12x16 : gemm_s16s16s32_avx512bw_6x32;
    case Isa::avx2: return columns <= 8 ? gemm_s16s16s32_avx2_12x8 : gemm_s16s16s32_avx2_6x16;
#endif
    default: return gemm_s16s16s32_scalar_4x8;
  }
}

void gemm_packed(const MicroKernel& uk, const ASource& a, const BSource& b, const KLayout& kl, const int32_t* ea,
                 const int32_t* eb, int headroom_a, int headroom_b, GemmOutput out, int nthreads,
                 GemmOptions options) {
  const int64_t M = a.rows(), N = b.cols(), KB = kl.nblocks;
  const int64_t KA = options.a_block_of ? options.a_blocks : KB;   // columns of A's exponents
  const int64_t KBB = options.b_block_of ? options.b_blocks : KB;  // rows of B's
  const int64_t n_padded = (N + uk.nr - 1) / uk.nr * uk.nr;
  // A's scales are [exponent row][block], rows of A sharing an exponent row in groups;
  // B's are [block][n] (row stride 1).
  const int64_t group = std::max<int64_t>(options.uniform_a ? M : options.a_rows_per_exponent, 1);
  const int64_t exponent_rows = (M + group - 1) / group;
  // a row of exponents per row of A: the micro-kernel reads whole tiles' in place
  const Scales sa = make_row_scales(ea, exponent_rows, KA, group == 1 ? (M + uk.mr - 1) / uk.mr * uk.mr : 0);
  // B's chain scales as [block][column], padded to whole panels so the micro-kernel may
  // load nr at once; where the columns share their exponents, one panel's width per block
  // (the micro-kernel then reads the same nr scales for every panel).
  const int64_t b_scale_width = options.uniform_b ? uk.nr : n_padded;
  Scales sb;
  if (options.uniform_b) {
    const Scales column = make_row_scales(eb, std::min<int64_t>(N, 1), KBB, 0);  // one column, as a row
    sb.reference.assign(N, column.reference.empty() ? 0 : column.reference[0]);
    sb.chain.resize(column.chain.size() * b_scale_width);
    for (size_t blk = 0; blk < column.chain.size(); ++blk)
      std::fill_n(sb.chain.data() + blk * b_scale_width, b_scale_width, column.chain[blk]);
  } else {
    sb = make_column_scales(eb, N, KBB, b_scale_width);
  }
  // A side whose chain scales are all 1 (one exponent along K: a convolution's image) is
  // not multiplied at all. Only real rows and columns count (the padding is 0).
  const bool row_scales = KA > 1 && !std::all_of(sa.ones.begin(), sa.ones.end(), [](uint8_t one) { return one; });
  bool col_scales = false;
  for (int64_t blk = 0; blk < KBB && KBB > 1 && !col_scales; ++blk)
    col_scales = !all_one(sb.chain.data() + blk * b_scale_width, options.uniform_b ? 1 : N);
  const std::vector<Chain> chains =
      make_chains(kl, chain_length(headroom_a, headroom_b) / 2, options.a_block_of, options.b_block_of);
  const RowOrder* order = options.row_order;
  if (order && (order->nchains != int64_t(chains.size()) || int64_t(order->row.size()) != M || out.grid.line))
    throw std::invalid_argument("gemm_packed: a row order for other chains or rows, or with an output grid");
  const std::vector<KSlice> slices = k_slices(chains, uk.kc);

  // Rows with exponents of their own in the epilogue: where A's differ, or are offset per row.
  const bool row_references = exponent_rows > 1 || options.row_offsets.values;
  const Epilogue epilogue(sa.reference, group, options.row_offsets, sb.reference, out);
  const auto whole = [](int64_t size, int64_t fallback, int64_t unit) {
    return ((size ? size : fallback) + unit - 1) / unit * unit;
  };
  // Small problems run on one thread: waking a second costs more than it saves.
  const int threads = double(M) * N * kl.k < 4e6 ? 1 : nthreads;
  const int64_t nc = whole(options.nc, uk.nc, uk.nr), col_blocks = (N + nc - 1) / nc;
  int64_t mc = whole(options.mc, uk.mc, uk.mr);
  // Too few blocks to share out evenly (256 rows make a block of 192 and one of 64):
  // about four per thread, of equal height, unless the caller chose the blocks (a
  // gathered B source is gathered again for every block of rows).
  if (threads > 1 && options.mc == 0 && options.nc == 0) {
    const int64_t wanted = (4 * threads + col_blocks - 1) / col_blocks;
    if ((M + mc - 1) / mc < wanted) mc = whole((M + wanted - 1) / wanted, 0, uk.mr);
  }
  const int64_t row_blocks = (M + mc - 1) / mc;
  // Every row's scale, where all rows share their exponents: made once, not per tile.
  float uniform_row_scale[kMaxMr];
  if (!row_references && M > 0) std::fill_n(uniform_row_scale, kMaxMr, epilogue.row_scale(0));
  parallel_for(row_blocks * col_blocks, threads, [&](int64_t task) {
    const int64_t i0 = (task / col_blocks) * mc, j0 = (task % col_blocks) * nc;
    const int64_t mlen = std::min(mc, M - i0), nlen = std::min(nc, N - j0);
    const int64_t mpanels = (mlen + uk.mr - 1) / uk.mr, npanels = (nlen + uk.nr - 1) / uk.nr;
    thread_local std::vector<float> acc;
    thread_local AScratch a_scratch;
    thread_local std::vector<int32_t> b_scratch;
    // each tile's chain scales, made once for all its K slices and column panels
    thread_local std::vector<TileScales> tiles;
    thread_local std::vector<float> tile_scales;
    tiles.resize(mpanels);
    if (row_scales) tile_scales.resize(mpanels * uk.mr * KA);
    // The buffers by pointer in the loops: each use of a thread_local there called
    // __tls_get_addr.
    TileScales* const tile_at = tiles.data();
    float* const tile_scales_at = tile_scales.data();
    // each tile's first row of exponents counted along, not divided out (a 64-bit
    // division costs tens of cycles, and there are tens of thousands of tiles per GEMM)
    for (int64_t ip = 0, first = i0 / group, next = (first + 1) * group; ip < mpanels && row_scales; ++ip) {
      const int64_t i = i0 + ip * uk.mr;
      if (order) {
        tile_at[ip] = ordered_row_chain_scales(sa, KA, order->exponent_row.data() + i, std::min<int64_t>(uk.mr, M - i),
                                               uk.mr, tile_scales_at + ip * uk.mr * KA);
        continue;
      }
      for (; next <= i; next += group) ++first;
      tile_at[ip] = row_chain_scales(sa, KA, group, i, first, uk.mr, M, tile_scales_at + ip * uk.mr * KA);
    }
    // and the chains each tile skips, where the rows are in an order that groups them
    thread_local std::vector<const uint8_t*> skips;
    thread_local std::vector<uint8_t> mixed_skips;
    if (order) skips.resize(mpanels), tile_skips(*order, i0, mpanels, uk.mr, M, mixed_skips, skips.data());
    const uint8_t* const* const skip_at = skips.data();
    // and the rows' epilogue scales where the micro-kernel writes C (one division per block
    // of rows, not per tile)
    thread_local std::vector<float> out_row_scales;
    if (row_references && epilogue.in_fp32()) {
      out_row_scales.resize(mpanels * uk.mr);
      if (order)
        epilogue.row_scales(*order, i0, mlen, out_row_scales.data());
      else
        epilogue.row_scales(i0, mlen, out_row_scales.data());
    }
    // and the rows of C where they lie on a grid (two divisions per row of each tile took a
    // tenth of the set-up's time in a ResNet-20 step)
    thread_local std::vector<float*> out_grid_rows;
    if (out.grid.line) {
      out_grid_rows.resize(mlen);
      out.grid_rows(i0, mlen, out_grid_rows.data());
    }
    const int64_t ldacc = npanels * uk.nr;
    acc.resize(mpanels * uk.mr * ldacc);
    if (slices.empty()) std::fill(acc.begin(), acc.end(), 0.0f);  // K = 0
    float* const acc_at = acc.data();
    const float* const out_scale_at = out_row_scales.data();
    float* const* const grid_row_at = out_grid_rows.data();
    for (size_t s = 0; s < slices.size(); ++s) {
      const int64_t kp0 = slices[s].first_kpair;
      const int64_t len = (s + 1 < slices.size() ? slices[s + 1].first_kpair : kl.kpairs()) - kp0;
      const ABlock ab = a.block(i0, mpanels * uk.mr, kp0, len, a_scratch);
      const BBlock bb = b.block(j0, npanels * uk.nr, kp0, len, b_scratch);
      const bool last = s + 1 == slices.size();
      for (int64_t jp = 0; jp < npanels; ++jp) {
        const int64_t j = j0 + jp * uk.nr;
        // the fields every tile of the column panel shares, set once: set per tile, each
        // read through the task's captures, they cost a fifth of the set-up's own time in
        // a ResNet-20 step
        MicroKernelArgs args;
        args.a_offsets = ab.offsets;
        args.b = bb.data + jp * bb.panel_stride;
        args.chains = chains.data() + slices[s].first_chain;
        args.nchains = slices[s].nchains;
        args.col_scale = col_scales ? sb.chain.data() + (options.uniform_b ? 0 : j) : nullptr;
        args.col_scale_stride = b_scale_width;
        args.ldacc = ldacc;
        args.accumulate = s > 0;
        args.ldc = out.ldc;
        args.out_col_scale = epilogue.col_scale(j);
        args.bias = epilogue.bias(j);
        const bool writes_c = last && epilogue.in_fp32() && j + uk.nr <= N;
        for (int64_t ip = 0; ip < mpanels; ++ip) {
          const int64_t i = i0 + ip * uk.mr;
          const void* rows[kMaxMr];
          if (!ab.rows)
            for (int r = 0; r < uk.mr; ++r) rows[r] = ab.row(ip * uk.mr + r);
          args.a_rows = ab.rows ? ab.rows + ip * uk.mr : rows;
          args.row_scale = row_scales ? tile_at[ip].scales : nullptr;  // none where all are 1
          args.row_scale_stride = row_scales ? tile_at[ip].stride : 0;
          args.acc = acc_at + ip * uk.mr * ldacc + jp * uk.nr;
          args.skip = order && skip_at[ip] ? skip_at[ip] + slices[s].first_chain : nullptr;
          float* out_rows[kMaxMr];
          args.out = nullptr, args.out_rows = nullptr;
          if (writes_c && i + uk.mr <= M) {
            if (order || out.grid.line) {  // a pointer per row
              for (int r = 0; r < uk.mr; ++r)
                out_rows[r] = (order ? out.c + order->row[i + r] * out.ldc : grid_row_at[ip * uk.mr + r]) + j;
              args.out = out_rows[0];
              args.out_rows = out_rows;
            } else {
              args.out = out.row(i) + j;
            }
            args.out_row_scale = row_references ? out_scale_at + ip * uk.mr : uniform_row_scale;
          }
          uk.run(args);
          if (last && !args.out)
            epilogue.apply(args.acc, ldacc, i, std::min<int64_t>(uk.mr, M - i), j, std::min<int64_t>(uk.nr, N - j),
                           order ? order->row.data() + i : nullptr);
        }
      }
    }
    if (slices.empty()) epilogue.apply(acc.data(), ldacc, i0, mlen, j0, nlen, order ? order->row.data() + i0 : nullptr);
  });
}

}  // namespace dfp
