// Register-only throughput probes (GMAC/s of one core) for the benchmark report.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dfp {

// int16 multiply-adds per second with vpmaddwd + vpaddd (16 per instruction pair).
double peak_int16_gmacs_avx2(int64_t iterations);
// fp32 multiply-adds per second with vfmadd231ps ymm (8 per instruction).
double peak_fp32_gmacs_avx2(int64_t iterations);
// fp32 vfmadd231ps zmm (16 per instruction) and int16 vpmaddwd + vpaddd zmm (32 per pair).
double peak_fp32_gmacs_avx512(int64_t iterations);
double peak_int16_gmacs_avx512bw(int64_t iterations);
// int16 vpdpwssd zmm (32 per instruction).
double peak_int16_gmacs_avx512vnni(int64_t iterations);
// bf16 vdpbf16ps zmm (32 per instruction).
double peak_bf16_gmacs_avx512bf16(int64_t iterations);
// AMX tiles: int8 tdpbssd (16 x 16 x 64 per instruction), bf16 tdpbf16ps (16 x 16 x 32).
double peak_int8_gmacs_amx(int64_t iterations);
double peak_bf16_gmacs_amx(int64_t iterations);

// (path, GMAC/s of one core) for every probe this CPU supports (cpuid, at run time), each
// run for ``iterations`` loops of 8 to 16 instructions; empty off x86.
std::vector<std::pair<std::string, double>> peak_probes(int64_t iterations);

// (name, GMAC/s) of the active path's micro-kernel for wide products, run `calls` times
// on one tile whose A rows and B panel stay in L1, in chains as long as `headroom` allows
// (kernel_probe.cpp): the bound of every GEMM on this core, below the register peak by
// the chains' conversions and the loads of A and B.
std::pair<std::string, double> micro_kernel_gmacs(int headroom, int64_t calls);

}  // namespace dfp
