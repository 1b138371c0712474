// Register-only peaks of the 512-bit paths every AVX-512 (F + BW) core has: fp32 FMA on
// zmm and int16 vpmaddwd + vpaddd on zmm. Called only when cpuid reports AVX-512 BW and
// the OS saves zmm state (peak_probes.cpp). Inline assembly: a compiler would fold the
// repeated, unused arithmetic away.
#include "peak.h"
#include "peak_impl.h"

namespace dfp {

double peak_fp32_gmacs_avx512(int64_t iterations) {
  return peak_detail::gmacs(iterations, 16 * 16, [](int64_t n) { DFP_PEAK_LOOP16("vfmadd231ps", n); });
}

double peak_int16_gmacs_avx512bw(int64_t iterations) {
  // 16 pairs: vpmaddwd into one of 8 temporaries (zmm18-25), vpaddd into an accumulator.
#define DFP_PAIR(i, t) "vpmaddwd %%zmm16, %%zmm17, %%zmm" #t "\n vpaddd %%zmm" #t ", %%zmm" #i ", %%zmm" #i "\n"
  return peak_detail::gmacs(iterations, 16 * 32, [](int64_t n) {
    __asm__ volatile(DFP_PEAK_ZERO16
                     "1:\n" DFP_PAIR(0, 18) DFP_PAIR(1, 19) DFP_PAIR(2, 20) DFP_PAIR(3, 21) DFP_PAIR(4, 22)
                         DFP_PAIR(5, 23) DFP_PAIR(6, 24) DFP_PAIR(7, 25) DFP_PAIR(8, 18) DFP_PAIR(9, 19)
                             DFP_PAIR(10, 20) DFP_PAIR(11, 21) DFP_PAIR(12, 22) DFP_PAIR(13, 23) DFP_PAIR(14, 24)
                                 DFP_PAIR(15, 25) "dec %0\n jnz 1b\n"
                     : "+r"(n)
                     :
                     : DFP_PEAK_CLOBBER16, "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25");
  });
#undef DFP_PAIR
}

}  // namespace dfp
