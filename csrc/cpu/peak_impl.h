// Shared by the peak_*.cpp probes: time a register-only loop and turn it into GMAC/s;
// the AVX-512 ones also share its zmm loops (below).
#pragma once
#include <chrono>
#include <cstdint>

namespace dfp {
namespace peak_detail {

template <typename Body>
double gmacs(int64_t iterations, double macs_per_iteration, Body body) {
  const auto t0 = std::chrono::steady_clock::now();
  body(iterations);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(iterations) * macs_per_iteration / s / 1e9;
}

}  // namespace peak_detail
}  // namespace dfp

// 16 independent zmm accumulators (zmm0-15) cover latency x pipes of every AVX-512 core
// we know (FMA: 4 cycles x 2 pipes; vpdpwssd, vdpbf16ps: up to 6 cycles on Zen 4).
#define DFP_PEAK_ZERO16                                                                                   \
  "vpxord %%zmm0, %%zmm0, %%zmm0\n vpxord %%zmm1, %%zmm1, %%zmm1\n vpxord %%zmm2, %%zmm2, %%zmm2\n"       \
  "vpxord %%zmm3, %%zmm3, %%zmm3\n vpxord %%zmm4, %%zmm4, %%zmm4\n vpxord %%zmm5, %%zmm5, %%zmm5\n"       \
  "vpxord %%zmm6, %%zmm6, %%zmm6\n vpxord %%zmm7, %%zmm7, %%zmm7\n vpxord %%zmm8, %%zmm8, %%zmm8\n"       \
  "vpxord %%zmm9, %%zmm9, %%zmm9\n vpxord %%zmm10, %%zmm10, %%zmm10\n vpxord %%zmm11, %%zmm11, %%zmm11\n" \
  "vpxord %%zmm12, %%zmm12, %%zmm12\n vpxord %%zmm13, %%zmm13, %%zmm13\n"                                 \
  "vpxord %%zmm14, %%zmm14, %%zmm14\n vpxord %%zmm15, %%zmm15, %%zmm15\n"                                 \
  "vpxord %%zmm16, %%zmm16, %%zmm16\n vpxord %%zmm17, %%zmm17, %%zmm17\n"

// One instruction "OP zmm16, zmm17, zmmI" per accumulator I: 16 independent chains.
#define DFP_PEAK_OP(op, i) op " %%zmm16, %%zmm17, %%zmm" #i "\n"
#define DFP_PEAK_OP16(op)                                                                                    \
  DFP_PEAK_OP(op, 0) DFP_PEAK_OP(op, 1) DFP_PEAK_OP(op, 2) DFP_PEAK_OP(op, 3) DFP_PEAK_OP(op, 4)             \
  DFP_PEAK_OP(op, 5) DFP_PEAK_OP(op, 6) DFP_PEAK_OP(op, 7) DFP_PEAK_OP(op, 8) DFP_PEAK_OP(op, 9)             \
  DFP_PEAK_OP(op, 10) DFP_PEAK_OP(op, 11) DFP_PEAK_OP(op, 12) DFP_PEAK_OP(op, 13) DFP_PEAK_OP(op, 14)        \
  DFP_PEAK_OP(op, 15)

#define DFP_PEAK_CLOBBER16                                                                                  \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
      "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "cc"

// A register-only loop of 16 independent "OP zmm16, zmm17, zmmI" per iteration.
#define DFP_PEAK_LOOP16(op, n)                                                   \
  __asm__ volatile(DFP_PEAK_ZERO16 "1:\n" DFP_PEAK_OP16(op) "dec %0\n jnz 1b\n" \
                   : "+r"(n)                                                     \
                   :                                                             \
                   : DFP_PEAK_CLOBBER16)
