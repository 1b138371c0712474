// The rate of dfp's wide micro-kernel alone: the most any GEMM can reach on this core.
#include <algorithm>
#include <chrono>
#include <vector>

#include "gemm.h"
#include "numerics.h"
#include "peak.h"

namespace dfp {

std::pair<std::string, double> micro_kernel_gmacs(int headroom, int64_t calls) {
  const MicroKernel& uk = micro_kernel(active_isa(), 1 << 20);
  // 256 K-pairs: A and B stay in L1 (a kernel's own K slice may not: AVX2's is 512)
  const int64_t kpairs = 256, pairs_per_chain = chain_length(headroom, headroom) / 2;
  // Mantissas of the largest magnitude the headroom allows: the chains are as long as
  // the contract lets them be, and no shorter.
  const int32_t m = max_mantissa(headroom), pair = int32_t(uint32_t(m) << 16 | uint32_t(m));
  std::vector<int32_t> a(uk.mr * kpairs, pair), b(kpairs * uk.nr, pair);
  std::vector<float> acc(uk.mr * uk.nr);
  std::vector<Chain> chains;
  for (int64_t q = 0; q < kpairs; q += pairs_per_chain)
    chains.push_back({int32_t(std::min(pairs_per_chain, kpairs - q)), 0, 0});
  const void* rows[kMaxMr];
  for (int r = 0; r < uk.mr; ++r) rows[r] = a.data() + r * kpairs;
  MicroKernelArgs args{};  // no offsets, no chain scales, the tile to acc
  args.a_rows = rows;
  args.b = b.data();
  args.chains = chains.data();
  args.nchains = int64_t(chains.size());
  args.acc = acc.data();
  args.ldacc = uk.nr;
  args.accumulate = true;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i) uk.run(args);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {uk.name, double(calls) * uk.mr * uk.nr * 2 * kpairs / s / 1e9};
}

}  // namespace dfp
