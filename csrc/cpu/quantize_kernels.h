// Per-ISA building blocks of quantization: contiguous runs, no temporaries.
#pragma once
#include <cstdint>

#include "isa.h"
#include "numerics.h"

namespace dfp {

struct RoundingArgs {
  float limit;          // the largest mantissa, as float
  bool stochastic;
  uint64_t index0;      // flat index of the run's first element (stochastic rounding)
  uint32_t k0, k1;      // the seed's halves
};

struct QuantizeKernels {
  // max over the run of the bit pattern of |x|: >= kNonFiniteBits means NaN/Inf
  uint32_t (*absmax)(const float* x, int64_t n);
  // acc[i] = max(acc[i], bits of |x[i]|)
  void (*absmax_into)(const float* x, uint32_t* acc, int64_t n);
  // q[i] = quantize(x[i] * s.first * s.second)
  void (*run)(const float* x, int16_t* q, int64_t n, Scale s, const RoundingArgs& r);
  // the same with a scale per element: first[i], second[i]
  void (*run_scaled)(const float* x, int16_t* q, int64_t n, const float* first, const float* second,
                     const RoundingArgs& r);
};

extern const QuantizeKernels quantize_scalar;
extern const QuantizeKernels quantize_avx2;

inline const QuantizeKernels& quantize_kernels(Isa isa) {
#ifdef DFP_X86_KERNELS
  if (isa != Isa::scalar) return quantize_avx2;
#endif
  return quantize_scalar;
}

}  // namespace dfp
