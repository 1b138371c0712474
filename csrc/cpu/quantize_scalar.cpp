// Portable quantization kernels: the semantics, one element at a time.
#include <algorithm>

#include "quantize_kernels.h"

namespace dfp {
namespace {

uint32_t absmax(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, abs_bits(x[i]));
  return m;
}

void absmax_into(const float* x, uint32_t* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], abs_bits(x[i]));
}

void run(const float* x, int16_t* q, int64_t n, Scale s, const RoundingArgs& r) {
  for (int64_t i = 0; i < n; ++i) q[i] = quantize_one(x[i], s, r.limit, r.rounding, r.index0 + i, r.k0, r.k1);
}

void run_scaled(const float* x, int16_t* q, int64_t n, const float* first, const float* second,
                const RoundingArgs& r) {
  for (int64_t i = 0; i < n; ++i)
    q[i] = quantize_one(x[i], {first[i], second[i]}, r.limit, r.rounding, r.index0 + i, r.k0, r.k1);
}

}  // namespace

const QuantizeKernels quantize_scalar = {absmax, absmax_into, run, run_scaled, absmax_blocks_of<absmax>,
                                            run_blocks_of<run>, absmax_rows_of<absmax_into>,
                                            run_rows_of<run_scaled>, nullptr};

}  // namespace dfp
