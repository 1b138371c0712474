// Integer GEMM C = A B on DFP16 mantissas (docs/design.md), BLIS-shaped: B is packed
// into K-pair (VNNI-2) panels, A into rows of K-pairs, a portable macro-kernel walks
// cache blocks, and one micro-kernel per ISA multiplies a register tile.
//
// A is not interleaved into panels as BLIS does: the micro-kernel broadcasts one K-pair
// of A per row, which it can read from plain rows as cheaply, and rows are what the
// quantizer writes at full SIMD speed. Interleaving took half to nine tenths of the
// GEMM's own time on the CNN shape M = 8192, K = 576, N = 64 (measured, one thread).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "api.h"
#include "isa.h"
#include "quantize.h"

namespace dfp {

// A run of consecutive K-pairs whose int32 sum cannot overflow, inside one K-block;
// a_block, b_block: the column of A's and the row of B's chain scales it takes (its
// K-block, unless a side's exponents are per coarser blocks: GemmOptions::a_block_of).
struct Chain {
  int32_t kpairs;
  int32_t a_block, b_block;
};

// The K-pair at p, which need not be 4-byte aligned (patches read in place).
inline int32_t load_pair(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

struct MicroKernelArgs {
  // A's mr rows of K-pairs (two int16 each, 4 bytes). K-pair q of the slice lies at byte
  // 4q from a_rows[r], the rows given at the slice's first K-pair; or, where offsets are
  // given, at byte a_offsets[q] from a_rows[r], at any even address (a convolution's
  // patches read in the image).
  const void* const* a_rows;
  const int64_t* a_offsets;
  const int32_t* b;  // B panel: [kpair][nr]
  const Chain* chains;
  int64_t nchains;
  // Chain scales, each side null when K is not blocked or all of its scales are 1.
  const float* row_scale;  // [r * row_scale_stride + a_block]
  int64_t row_scale_stride;
  const float* col_scale;  // [b_block * col_scale_stride + c]
  int64_t col_scale_stride;
  float* acc;  // fp32 tile, mr x nr, row stride ldacc
  int64_t ldacc;
  bool accumulate;  // add to acc (a later K slice) or overwrite it (the first)
  // Where given (the last K slice of a whole tile), the tile goes to C instead of acc, as
  // the epilogue would write it: acc * (out_row_scale[r] * out_col_scale[c]) + bias[c].
  float* out = nullptr;  // row r at out + r * ldc, or at out_rows[r] where given
  int64_t ldc = 0;
  float* const* out_rows = nullptr;
  const float* out_row_scale = nullptr;  // [mr]
  const float* out_col_scale = nullptr;  // [nr]
  const float* bias = nullptr;           // [nr], or null for none
  // Where given, chain c is skipped where skip[c] (its sums would be zeros: the tile's
  // rows read only a convolution's padding there; see RowOrder).
  const uint8_t* skip = nullptr;
};

constexpr int kMaxMr = 12;  // the most rows a micro-kernel's tile has

struct MicroKernel {
  const char* name;
  int mr, nr;      // register tile
  int kc, mc, nc;  // cache blocks: kc K-pairs, mc rows, nc columns
  void (*run)(const MicroKernelArgs&);
};

extern const MicroKernel gemm_s16s16s32_scalar_4x8;
extern const MicroKernel gemm_s16s16s32_avx2_6x16;
extern const MicroKernel gemm_s16s16s32_avx2_12x8;
extern const MicroKernel gemm_s16s16s32_avx512bw_6x32;
extern const MicroKernel gemm_s16s16s32_avx512vnni_6x32;
extern const MicroKernel gemm_s16s16s32_avx512bw_12x16;
extern const MicroKernel gemm_s16s16s32_avx512vnni_12x16;
extern const MicroKernel gemm_s16s16s32_avx512vnni_12x8;
// The micro-kernel for a product of `columns` columns (N) on isa: on AVX-512, a tile one
// vector wide (12 x 16) where the 6 x 32 one would compute zeros in half of its columns
// (16-channel layers: forward, grad_input and grad_weight all have N = 16), and with
// VNNI one of 12 x 8 in ymm for N <= 8. The tile changes no bits: chains, their order
// and the epilogue are the same.
const MicroKernel& micro_kernel(Isa isa, int64_t columns);

// How K is laid out in the packed panels: each K-block is padded to whole K-pairs so a
// pair never spans two exponents.
struct KLayout {
  int64_t k, kblock, nblocks, pairs_per_block;
  KLayout(int64_t k, int64_t kblock);
  int64_t kpairs() const { return nblocks * pairs_per_block; }
};

// Where the macro-kernel reads A and B, one cache block at a time: from memory laid
// out beforehand (RowsA, Packed), from the image itself or gathered per block into a
// thread's scratch buffer (convolution patches, csrc/cpu/conv.cpp), which keeps an
// im2col matrix out of memory.
//
// A block: rows [i0, i0 + rows) of A at K-pairs [kp0, kp0 + len); rows past M read as
// zeros (or as copies of a valid row: the macro-kernel never stores them). Row i0 + r
// lies at row(r), its K-pairs consecutive, or where `offsets` says (MicroKernelArgs).
struct ABlock {
  const int32_t* data;
  int64_t stride;
  const int32_t* tail;  // rows r >= tail_row
  int64_t tail_stride, tail_row;
  const void* const* rows = nullptr;  // where given, row r lies at rows[r]
  const int64_t* offsets = nullptr;
  const void* row(int64_t r) const {
    if (rows) return rows[r];
    return r < tail_row ? data + r * stride : tail + (r - tail_row) * tail_stride;
  }
};
// A thread's buffers for the A blocks it is handed.
struct AScratch {
  std::vector<int32_t> patches;
  std::vector<const void*> rows;
  // Row pointers that stay the same along K (TransposedPatches'), kept from one K slice
  // of a block of rows to the next: those of rows [first, first + rows.size()) of the
  // source numbered `source` (a number no other source takes).
  struct KeptRows {
    std::vector<const void*> rows;
    uint64_t source = 0;
    int64_t first = -1;
  } kept;
};
class ASource {
 public:
  virtual ~ASource() = default;
  virtual int64_t rows() const = 0;
  // rows is a multiple of the micro-kernel's mr; scratch is the calling thread's own.
  virtual ABlock block(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const = 0;
};

// Rows [first, first + count) of another source, as a product of their own.
struct RowRange : ASource {
  const ASource& a;
  int64_t first, count;
  RowRange(const ASource& a_, int64_t first_, int64_t count_) : a(a_), first(first_), count(count_) {}
  int64_t rows() const override { return count; }
  ABlock block(int64_t i0, int64_t rows, int64_t kp0, int64_t len, AScratch& scratch) const override {
    return a.block(first + i0, rows, kp0, len, scratch);
  }
};

// B block: columns [j0, j0 + cols) at K-pairs [kp0, kp0 + len) as panels of nr columns,
// [kpair][nr] each; panel p at data + p * panel_stride. Columns past N read as zeros.
struct BBlock {
  const int32_t* data;
  int64_t panel_stride;
};
class BSource {
 public:
  virtual ~BSource() = default;
  virtual int64_t cols() const = 0;
  virtual BBlock block(int64_t j0, int64_t cols, int64_t kp0, int64_t len, std::vector<int32_t>& scratch) const = 0;
};

// B packed: `cols` columns in panels of `width` (nr); data is [panel][kpair][width].
struct Packed : BSource {
  int64_t rows = 0, width = 0, kpairs = 0;
  std::vector<int32_t> data;
  void allocate(int64_t rows, int64_t width, int64_t kpairs, int64_t padded_rows);
  const int32_t* panel(int64_t p) const { return data.data() + p * width * kpairs; }
  int32_t* panel(int64_t p) { return data.data() + p * width * kpairs; }
  int64_t cols() const override { return rows; }
  BBlock block(int64_t j0, int64_t, int64_t kp0, int64_t, std::vector<int32_t>&) const override {
    return {panel(j0 / width) + kp0 * width, width * kpairs};
  }
};

// B laid out as Packed's data by its producer (quantize_gradient's PairPanels), read
// where it lies.
struct PanelsB : BSource {
  const int32_t* data;
  int64_t columns, width, kpairs;
  PanelsB(const int32_t* data_, int64_t columns_, int64_t width_, int64_t kpairs_)
      : data(data_), columns(columns_), width(width_), kpairs(kpairs_) {}
  int64_t cols() const override { return columns; }
  BBlock block(int64_t j0, int64_t, int64_t kp0, int64_t, std::vector<int32_t>&) const override {
    return {data + (j0 / width * kpairs + kp0) * width, width * kpairs};
  }
};

// A as rows of K-pairs. Whole panels of mr rows are read where they lie (the caller's
// int16 matrix when its rows are already K-pairs, else `owned`); the last, partial
// panel comes from `tail`, padded with zero rows.
struct RowsA : ASource {
  int64_t nrows = 0, kpairs = 0;
  const int32_t* data = nullptr;  // row i < full_rows at data + i * stride
  int64_t stride = 0, full_rows = 0;
  std::vector<int32_t> owned, tail;
  int64_t rows() const override { return nrows; }
  ABlock block(int64_t i0, int64_t, int64_t kp0, int64_t, AScratch&) const override {
    return {data + i0 * stride + kp0, stride, tail.data() + kp0, kpairs, full_rows - i0};
  }
};

// Packing from int16 mantissas with arbitrary strides (transposed views included).
// Uses a in place when its rows already are K-pairs (unit K stride, even row stride,
// no padding inside K); copies otherwise.
void pack_a_int16(const int16_t* a, int64_t sm, int64_t sk, int64_t m, const KLayout& kl, int mr, RowsA& out,
                  int nthreads);
void pack_b_int16(const int16_t* b, int64_t sk, int64_t sn, int64_t n, const KLayout& kl, int nr, Packed& out,
                  int nthreads);

// Quantization fused into packing: x (M, K) and y (K, N) row-major float32, exponents
// ea (M, KB) and eb (KB, N) already computed (compute_exponents).
struct SeededRounding {
  Rounding how;
  uint64_t seed;  // stochastic rounding's
};
void pack_a_float(const float* x, int64_t m, const KLayout& kl, const int32_t* ea, int headroom, SeededRounding r,
                  int mr, RowsA& out, int nthreads);
void pack_b_float(const float* y, int64_t n, const KLayout& kl, const int32_t* eb, int headroom, SeededRounding r,
                  int nr, Packed& out, int nthreads);

struct GemmOutput {
  float* c;           // (M, N), rows ldc apart, or on `grid`
  const float* bias;  // (N,) or null
  int64_t ldc;
  OutputGrid grid = {};
  float* row(int64_t i) const {
    if (!grid.line) return c + i * ldc;
    const int64_t line = i / grid.line;
    return c + line / grid.lines * grid.image_stride + line % grid.lines * grid.line_stride +
           i % grid.line * grid.pixel_stride;
  }
  // row(i + r) for r < n where the rows lie on a grid (grid.line > 0), walked from row i:
  // two divisions, not two per row.
  void grid_rows(int64_t i, int64_t n, float** out) const {
    int64_t pixel = i % grid.line, line = i / grid.line, image = line / grid.lines, in_image = line % grid.lines;
    for (int64_t r = 0; r < n; ++r) {
      out[r] = c + image * grid.image_stride + in_image * grid.line_stride + pixel * grid.pixel_stride;
      if (++pixel < grid.line) continue;
      pixel = 0;
      if (++in_image == grid.lines) in_image = 0, ++image;
    }
  }
};

// The rows of a product visited in another order, grouped by which of their chains read
// only zeros (a convolution's output pixels by the padding their patches reach), so that
// a tile's rows share those chains and the micro-kernel skips them. A skipped chain
// would add float(0) times its scale to the fp32 sum, which is never -0, so skipping
// changes no bit. Row i of the product is row `row[i]` of A and C, with its exponents'
// row and image precomputed (row[i] / a_rows_per_exponent and row[i] / row_offsets.rows:
// divisions per row cost as much as a narrow layer's row of products).
struct RowOrder {
  std::vector<int64_t> row, exponent_row, image;
  std::vector<uint8_t> kind;   // per row of the product: its row of `skips`
  std::vector<uint8_t> skips;  // [kind][chain]: 1 where that kind's rows hold zeros only
  int64_t nchains = 0;
};

// The chains of a K layout: at most `pairs` K-pairs each, restarting at every K-block;
// the scales of K-block b in A's column a_block_of[b] and B's row b_block_of[b] where
// given (GemmOptions).
std::vector<Chain> make_chains(const KLayout& kl, int pairs, const int32_t* a_block_of = nullptr,
                               const int32_t* b_block_of = nullptr);

// mc, nc: cache blocks in rows of A and columns of B (zero: the micro-kernel's own;
// rounded up to whole micro-panels); they change no bits. uniform_a: every row of A has
// the same exponents, so ea is one row (KB,) and the scales are made once, not per row;
// uniform_b likewise for the columns of B (eb is one column (KB,)). a_rows_per_exponent:
// rows m of A take the exponents of row m / a_rows_per_exponent of ea (a convolution's
// image with exponents per image row: its output pixels share them a row at a time).
// row_offsets: where given, values[m / rows] is added to every exponent of row m of A,
// as if ea[m, b] + values[m / rows]: constant along K, they change no chain scale, only
// the row's scale in the epilogue (a convolution's image with an exponent per sample:
// one value per image, `rows` its output pixels). a_block_of: where given, A's exponents
// are per coarser blocks than K's, ea (rows, a_blocks), K-block b taking A's column
// a_block_of[b] (grad_weight's input, per sample: a K-block of pixels lies in one);
// b_block_of likewise for B, eb (b_blocks, N). row_order: where given, row i of the
// product is the order's row[i] of A (the A source gives its rows in the same order) and C.
struct RowOffsets {
  const int32_t* values = nullptr;  // count of them
  int64_t rows = 1, count = 0;
};
struct GemmOptions {
  int64_t mc = 0, nc = 0;
  bool uniform_a = false;
  bool uniform_b = false;
  RowOffsets row_offsets = {};
  int64_t a_rows_per_exponent = 1;
  const int32_t* a_block_of = nullptr;
  int64_t a_blocks = 0;
  const int32_t* b_block_of = nullptr;
  int64_t b_blocks = 0;
  const RowOrder* row_order = nullptr;
};

// C = A B; ea (ceil(M / options.a_rows_per_exponent), KB or options.a_blocks), eb
// (KB or options.b_blocks, N) are the exponents; uk the micro-kernel whose mr and nr A
// and B were laid out for (micro_kernel(isa, N)).
void gemm_packed(const MicroKernel& uk, const ASource& a, const BSource& b, const KLayout& kl, const int32_t* ea,
                 const int32_t* eb, int headroom_a, int headroom_b, GemmOutput out, int nthreads,
                 GemmOptions options = {});

}  // namespace dfp
