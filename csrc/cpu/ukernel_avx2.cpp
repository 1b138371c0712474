// gemm_s16s16s32 on AVX2: vpmaddwd (two int16 products summed into int32) + vpaddd.
// 6 x 16 tile: 12 int32 accumulators + 2 B vectors + 1 A broadcast + 1 product = 16 ymm;
// the fp32 accumulators, touched once per chain, live in L1. Measured on Zen 3 (best of
// 5 runs, four shapes), 6 x 16 beat 3 x 16 (all accumulators in registers) by 5-18%.
// 12 x 8 (N <= 8: the 8-channel layers a pruned or half-width network keeps, which the
// 6 x 16 tile computed with half of its lanes zeros): 12 + 1 B + 1 A + 1 product = 15 ymm.
#include "avx2_vector.h"
#include "gemm.h"
#include "ukernel_impl.h"

namespace {

struct Avx2 : Avx2Vector {
  static I dot_pairs(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
};

}  // namespace

const dfp::MicroKernel dfp::gemm_s16s16s32_avx2_6x16 = {"gemm_s16s16s32_avx2_6x16", 6, 16, 256, 192, 256,
                                                         TileKernel<Avx2, 6, 2>::run};
const dfp::MicroKernel dfp::gemm_s16s16s32_avx2_12x8 = {"gemm_s16s16s32_avx2_12x8", 12, 8, 256, 192, 256,
                                                        TileKernel<Avx2, 12, 1>::run};
