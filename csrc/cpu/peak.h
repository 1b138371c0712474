// Register-only throughput probes (GMAC/s of one core) for the benchmark report.
#pragma once
#include <cstdint>

namespace dfp {

// int16 multiply-adds per second with vpmaddwd + vpaddd (16 per instruction pair).
double peak_int16_gmacs_avx2(int64_t iterations);
// fp32 multiply-adds per second with vfmadd231ps ymm (8 per instruction).
double peak_fp32_gmacs_avx2(int64_t iterations);

}  // namespace dfp
