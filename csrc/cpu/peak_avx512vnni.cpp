// Register-only peak of int16 vpdpwssd on zmm (32 multiply-adds per instruction). Called
// only when cpuid reports AVX-512 VNNI (peak_probes.cpp).
#include "peak.h"
#include "peak_impl.h"

namespace dfp {

double peak_int16_gmacs_avx512vnni(int64_t iterations) {
  return peak_detail::gmacs(iterations, 16 * 32, [](int64_t n) { DFP_PEAK_LOOP16("vpdpwssd", n); });
}

}  // namespace dfp
