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

// K slices of 512 K-pairs, not 256: a 64-channel 3x3 layer's 288 K-pairs in one slice,
// its fp32 sums not written out and read back between two (Zen 3, in turns, both orders:
// a 64-channel 8x8 layer's forward 1.04-1.07x, its backward 1.01-1.04x; whole ResNet-20
// and ResNet-18-CIFAR steps, build against build, 0.99-1.01x).
const dfp::MicroKernel dfp::gemm_s16s16s32_avx2_6x16 = {"gemm_s16s16s32_avx2_6x16", 6, 16, 512, 192, 256,
                                                         TileKernel<Avx2, 6, 2>::run};
const dfp::MicroKernel dfp::gemm_s16s16s32_avx2_12x8 = {"gemm_s16s16s32_avx2_12x8", 12, 8, 256, 192, 256,
                                                        TileKernel<Avx2, 12, 1>::run};
