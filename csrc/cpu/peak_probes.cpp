// Which register peaks this CPU can be probed for, decided from cpuid at run time: each
// probe lives in a file compiled with its own ISA flags (peak_avx2.cpp, peak_avx512*.cpp)
// and is called only when the CPU and the OS support its instructions.
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "isa.h"
#include "peak.h"

namespace dfp {
namespace {

bool has_isa(Isa isa) {
  for (Isa supported : supported_isas())
    if (supported == isa) return true;
  return false;
}

bool cpu_has_avx512_bf16() {
#if defined(DFP_X86_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  unsigned a, b, c, d;
  // CPUID.(EAX=7, ECX=1):EAX bit 5; zmm state support comes with the avx512bw path.
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1) && has_isa(Isa::avx512bw);
#else
  return false;
#endif
}

}  // namespace

std::vector<std::pair<std::string, double>> peak_probes(int64_t iterations) {
  std::vector<std::pair<std::string, double>> peaks;
#ifdef DFP_X86_KERNELS
  if (has_isa(Isa::avx2)) {
    peaks.emplace_back("fp32 vfmadd231ps ymm", peak_fp32_gmacs_avx2(iterations));
    peaks.emplace_back("int16 vpmaddwd+vpaddd ymm", peak_int16_gmacs_avx2(iterations));
  }
  if (has_isa(Isa::avx512bw)) {
    peaks.emplace_back("fp32 vfmadd231ps zmm", peak_fp32_gmacs_avx512(iterations));
    peaks.emplace_back("int16 vpmaddwd+vpaddd zmm", peak_int16_gmacs_avx512bw(iterations));
  }
  if (has_isa(Isa::avx512_vnni)) peaks.emplace_back("int16 vpdpwssd zmm", peak_int16_gmacs_avx512vnni(iterations));
  if (cpu_has_avx512_bf16()) peaks.emplace_back("bf16 vdpbf16ps zmm", peak_bf16_gmacs_avx512bf16(iterations));
#else
  (void)iterations;
#endif
  return peaks;
}

}  // namespace dfp
