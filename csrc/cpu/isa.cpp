#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define DFP_CPUID 1
#endif
#include <cstdlib>
#include <stdexcept>

namespace dfp {
namespace {

#if defined(DFP_CPUID) && defined(DFP_X86_KERNELS)
bool os_saves_zmm() {
  // XCR0 bits 1,2 (SSE, AVX) and 5,6,7 (opmask, ZMM upper halves, ZMM16-31).
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;
}

bool os_saves_ymm() {
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0x6) == 0x6;
}
#endif

std::vector<Isa> detect() {
  std::vector<Isa> isas;
#if defined(DFP_CPUID) && defined(DFP_X86_KERNELS)
  unsigned a, b, c, d;
  bool osxsave = false, fma = false;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    osxsave = (c >> 27) & 1;
    fma = (c >> 12) & 1;
  }
  unsigned b7 = 0, c7 = 0;
  if (__get_cpuid_count(7, 0, &a, &b7, &c7, &d)) {
    const bool avx2 = (b7 >> 5) & 1;
    const bool avx512f = (b7 >> 16) & 1, avx512bw = (b7 >> 30) & 1;
    const bool vnni = (c7 >> 11) & 1, vl = (b7 >> 31) & 1;  // VL: the 12 x 8 tile's ymm vpdpwssd
    if (osxsave && os_saves_zmm() && avx512f && avx512bw) {
      if (vnni && vl) isas.push_back(Isa::avx512_vnni);
      isas.push_back(Isa::avx512bw);
    }
    if (osxsave && os_saves_ymm() && avx2 && fma) isas.push_back(Isa::avx2);
  }
#endif
  isas.push_back(Isa::scalar);
  return isas;
}

Isa from_name(const std::string& name) {
  for (Isa isa : supported_isas())
    if (name == isa_name(isa)) return isa;
  std::string known;
  for (Isa isa : supported_isas()) known += std::string(known.empty() ? "" : ", ") + isa_name(isa);
  throw std::invalid_argument("DFP_CPU_ISA='" + name + "' is not a path this CPU supports; choose one of: " +
                              known);
}

Isa initial_isa() {
  const char* forced = std::getenv("DFP_CPU_ISA");
  if (forced && *forced) return from_name(forced);
  return supported_isas().front();
}

Isa& current() {
  static Isa isa = initial_isa();
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_vnni: return "avx512_vnni";
    case Isa::avx512bw: return "avx512bw";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

std::vector<Isa> supported_isas() {
  static const std::vector<Isa> isas = detect();
  return isas;
}

Isa active_isa() { return current(); }

void set_isa(const std::string& name) { current() = from_name(name); }

}  // namespace dfp
