// Which CPU instruction-set path runs, chosen once at run time from cpuid.
#pragma once
#include <string>
#include <vector>

namespace dfp {

enum class Isa { scalar, avx2, avx512bw, avx512_vnni };

const char* isa_name(Isa isa);
// Paths this CPU can run, fastest first; "scalar" is always last.
std::vector<Isa> supported_isas();
// The active path: DFP_CPU_ISA if set (validated), otherwise the fastest supported.
Isa active_isa();
// Force a path by name; throws std::invalid_argument naming the available ones.
void set_isa(const std::string& name);

}  // namespace dfp
