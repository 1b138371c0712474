// Which register peaks this CPU can be probed for, decided from cpuid at run time: each
// probe lives in a file compiled with its own ISA flags (peak_avx2.cpp, peak_avx512*.cpp)
// and is called only when the CPU and the OS support its instructions.
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
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

#ifdef DFP_AMX_PROBES
// AMX int8 and bf16 tiles: cpuid (7, 0) EDX bits 22 (bf16), 24 (tiles), 25 (int8); the
// OS saving tile state (XCR0 bits 17, 18); and, on Linux, this process's permission to
// use it, which must be asked for (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA) before
// the first tile instruction; oneDNN asks the same where it runs on AMX.
bool cpu_has_amx() {
#if defined(DFP_X86_KERNELS) && (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
  unsigned a, b, c, d;
  constexpr unsigned kBf16 = 1u << 22, kTile = 1u << 24, kInt8 = 1u << 25;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & (kBf16 | kTile | kInt8)) != (kBf16 | kTile | kInt8))
    return false;
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return ((lo >> 17) & 3) == 3 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}
#endif

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
#ifdef DFP_AMX_PROBES  // built where the compiler knows AMX (setup.py)
  if (cpu_has_amx()) {  // a tile instruction does 16-64 times a zmm one's work
    peaks.emplace_back("int8 tdpbssd amx", peak_int8_gmacs_amx(iterations / 16));
    peaks.emplace_back("bf16 tdpbf16ps amx", peak_bf16_gmacs_amx(iterations / 16));
  }
#endif
#else
  (void)iterations;
#endif
  return peaks;
}

}  // namespace dfp
