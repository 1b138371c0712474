// Register-only peak of bf16 vdpbf16ps on zmm (32 bf16 products summed into 16 fp32
// lanes per instruction). Called only when cpuid reports AVX512_BF16 (peak_probes.cpp).
#include "peak.h"
#include "peak_impl.h"

namespace dfp {

double peak_bf16_gmacs_avx512bf16(int64_t iterations) {
  return peak_detail::gmacs(iterations, 16 * 32, [](int64_t n) { DFP_PEAK_LOOP16("vdpbf16ps", n); });
}

}  // namespace dfp
