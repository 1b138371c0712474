// Packing into K-pair panels, from int16 mantissas or (fused with quantization) from
// float32. Rows are first produced contiguously, then interleaved into the panels.
#include <algorithm>
#include <cstring>

#include "gemm.h"
#include "numerics.h"
#include "quantize_kernels.h"
#include "scratch.h"
#include "threads.h"

namespace dfp {
namespace {

// Packs A as rows of 2 * kpairs int16 into out.owned: make_row(m, block, dst) writes
// the values of row m in K-block `block` to dst; the odd slot that pads a block, and
// the rows that pad M to a multiple of mr, are zeroed here.
template <typename MakeRow>
void pack_a(int64_t m, const KLayout& kl, int mr, RowsA& out, int nthreads, MakeRow make_row) {
  const int64_t padded = (m + mr - 1) / mr * mr, kp = kl.kpairs();
  out.nrows = m, out.kpairs = kp, out.data = at_least(out.owned, padded * kp), out.stride = kp, out.full_rows = padded;
  const int64_t rows_per_task = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(2 * kp, 1));
  parallel_for((padded + rows_per_task - 1) / rows_per_task, nthreads, [&](int64_t t) {
    for (int64_t i = t * rows_per_task; i < std::min(padded, (t + 1) * rows_per_task); ++i) {
      int32_t* row = out.owned.data() + i * kp;
      if (i >= m) {
        std::fill(row, row + kp, 0);
        continue;
      }
      for (int64_t b = 0; b < kl.nblocks; ++b) {
        int16_t* dst = reinterpret_cast<int16_t*>(row + b * kl.pairs_per_block);
        const int64_t len = std::min(kl.kblock, kl.k - b * kl.kblock);
        std::fill(dst + len, dst + 2 * kl.pairs_per_block, int16_t(0));
        make_row(i, b, dst);
      }
    }
  });
}

// Packs B: row(k, scratch) returns row k's N values, either where they lie or written
// into scratch (N int16). Rows past the end of a K-block are zero.
template <typename Row>
void pack_b(int64_t n, const KLayout& kl, int nr, Packed& out, int nthreads, Row row) {
  out.allocate(n, nr, kl.kpairs(), (n + nr - 1) / nr * nr);
  const int64_t full_panels = n / nr, kp = kl.kpairs();
  const int64_t pairs_per_task = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n, 1));
  parallel_for((kp + pairs_per_task - 1) / pairs_per_task, nthreads, [&](int64_t t) {
    std::vector<int16_t> zeros(n, 0), even_scratch(n), odd_scratch(n);
    const int64_t q0 = t * pairs_per_task;
    int64_t block = q0 / kl.pairs_per_block, j = (q0 % kl.pairs_per_block) * 2;  // then stepped: no division per pair
    for (int64_t q = q0; q < std::min(kp, q0 + pairs_per_task); ++q) {
      const int64_t k = block * kl.kblock + j, block_end = std::min(kl.k, (block + 1) * kl.kblock);
      if ((j += 2) == 2 * kl.pairs_per_block) j = 0, ++block;
      const int16_t* even = k < block_end ? row(k, even_scratch.data()) : zeros.data();
      const int16_t* odd = k + 1 < block_end ? row(k + 1, odd_scratch.data()) : zeros.data();
      for (int64_t p = 0; p < full_panels; ++p) interleave(out.panel(p) + q * nr, even + p * nr, odd + p * nr, nr);
      if (full_panels * nr < n) {  // the last panel, padded with zero columns
        int32_t* dst = out.panel(full_panels) + q * nr;
        for (int c = 0; c < nr; ++c) {
          const int64_t col = full_panels * nr + c;
          dst[c] = col < n ? pair(even[col], odd[col]) : 0;
        }
      }
    }
  });
}

RoundingArgs rounding_args(int headroom, SeededRounding r, int64_t index0) {
  return {float(max_mantissa(headroom)), r.how, uint64_t(index0), uint32_t(r.seed), uint32_t(r.seed >> 32)};
}

}  // namespace

KLayout::KLayout(int64_t k_, int64_t kblock_)
    : k(k_), kblock(kblock_), nblocks((k_ + kblock_ - 1) / kblock_), pairs_per_block((kblock_ + 1) / 2) {}

void Packed::allocate(int64_t rows_, int64_t width_, int64_t kpairs_, int64_t padded_rows) {
  rows = rows_, width = width_, kpairs = kpairs_;
  at_least(data, padded_rows * kpairs);  // the packers write every element, padding included
}

void pack_a_int16(const int16_t* a, int64_t sm, int64_t sk, int64_t m, const KLayout& kl, int mr, RowsA& out,
                  int nthreads) {
  const bool rows_are_pairs = sk == 1 && sm % 2 == 0 && reinterpret_cast<uintptr_t>(a) % 4 == 0 &&
                              kl.k % 2 == 0 && (kl.nblocks == 1 || kl.kblock % 2 == 0);
  if (rows_are_pairs) {
    const int64_t kp = kl.kpairs(), full = m / mr * mr;
    out.nrows = m, out.kpairs = kp, out.full_rows = full, out.stride = sm / 2;
    out.data = reinterpret_cast<const int32_t*>(a);
    out.tail.assign(full < m ? mr * kp : 0, 0);
    for (int64_t i = full; i < m; ++i) std::memcpy(out.tail.data() + (i - full) * kp, a + i * sm, kl.k * sizeof(int16_t));
    return;
  }
  pack_a(m, kl, mr, out, nthreads, [&](int64_t i, int64_t b, int16_t* dst) {
    const int64_t k0 = b * kl.kblock, len = std::min(kl.kblock, kl.k - k0);
    const int16_t* src = a + i * sm + k0 * sk;
    if (sk == 1)
      std::memcpy(dst, src, len * sizeof(int16_t));
    else
      for (int64_t j = 0; j < len; ++j) dst[j] = src[j * sk];
  });
}

namespace {

// B with unit K stride (a transposed row-major matrix, as a layer's weight is): a packed
// K-pair is one 4-byte load from a column of B, so packing is a transpose of int32s.
// Needs every pair inside one K-block (one block, or blocks of even length). A few
// K-pairs of all the panel's columns at a time, so that the stores fill whole lines
// (a column at a time, each store went to another line: a 4096 x 4096 weight took 22 ms
// to pack on an AMD Zen 3).
void pack_b_columns(const int16_t* b, int64_t sn, int64_t n, const KLayout& kl, int nr, Packed& out, int nthreads) {
  constexpr int64_t kPairsAtOnce = 16;
  const int64_t kp = kl.kpairs(), full_pairs = kl.k / 2, pairs = (kl.k + 1) / 2, panels = (n + nr - 1) / nr;
  out.allocate(n, nr, kp, panels * nr);
  parallel_for(panels, nthreads, [&](int64_t p) {
    int32_t* panel = out.panel(p);
    const int columns = int(std::min<int64_t>(nr, n - p * nr));
    for (int64_t q0 = 0; q0 < full_pairs; q0 += kPairsAtOnce) {
      const int64_t q1 = std::min(full_pairs, q0 + kPairsAtOnce);
      for (int c = 0; c < columns; ++c) {
        const int16_t* src = b + (p * nr + c) * sn;
        for (int64_t q = q0; q < q1; ++q) {
          int32_t pair_bits;
          std::memcpy(&pair_bits, src + 2 * q, 4);
          panel[q * nr + c] = pair_bits;
        }
      }
    }
    for (int c = 0; c < columns; ++c)  // odd K
      if (full_pairs < pairs) panel[full_pairs * nr + c] = pair(b[(p * nr + c) * sn + 2 * full_pairs], 0);
    for (int64_t q = 0; q < kp; ++q)  // the columns past n, and the last K-block's padding
      for (int c = q < pairs ? columns : 0; c < nr; ++c) panel[q * nr + c] = 0;
  });
}

}  // namespace

void pack_b_int16(const int16_t* b, int64_t sk, int64_t sn, int64_t n, const KLayout& kl, int nr, Packed& out,
                  int nthreads) {
  if (sk == 1 && sn != 1 && (kl.nblocks == 1 || kl.kblock % 2 == 0)) return pack_b_columns(b, sn, n, kl, nr, out, nthreads);
  pack_b(n, kl, nr, out, nthreads, [&](int64_t k, int16_t* scratch) -> const int16_t* {
    const int16_t* src = b + k * sk;
    if (sn == 1) return src;
    for (int64_t j = 0; j < n; ++j) scratch[j] = src[j * sn];
    return scratch;
  });
}

void pack_a_float(const float* x, int64_t m, const KLayout& kl, const int32_t* ea, int headroom, SeededRounding r,
                  int mr, RowsA& out, int nthreads) {
  const QuantizeKernels& qk = quantize_kernels(active_isa());
  pack_a(m, kl, mr, out, nthreads, [&](int64_t i, int64_t b, int16_t* dst) {
    const int64_t k0 = b * kl.kblock, len = std::min(kl.kblock, kl.k - k0), at = i * kl.k + k0;
    qk.run(x + at, dst, len, inverse_scale(ea[i * kl.nblocks + b]), rounding_args(headroom, r, at));
  });
}

void pack_b_float(const float* y, int64_t n, const KLayout& kl, const int32_t* eb, int headroom, SeededRounding r,
                  int nr, Packed& out, int nthreads) {
  const QuantizeKernels& qk = quantize_kernels(active_isa());
  std::vector<float> first(kl.nblocks * n), second(kl.nblocks * n);
  for (int64_t g = 0; g < kl.nblocks * n; ++g) {
    const Scale s = inverse_scale(eb[g]);
    first[g] = s.first, second[g] = s.second;
  }
  pack_b(n, kl, nr, out, nthreads, [&](int64_t k, int16_t* scratch) -> const int16_t* {
    const int64_t g = (k / kl.kblock) * n;
    qk.run_scaled(y + k * n, scratch, n, first.data() + g, second.data() + g, rounding_args(headroom, r, k * n));
    return scratch;
  });
}

}  // namespace dfp
