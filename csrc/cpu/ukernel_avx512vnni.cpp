// gemm_s16s16s32 on AVX-512 VNNI: vpdpwssd does the int16 pair product and the int32 add
// in one instruction. 6 x 32 tile: 12 int32 + 12 fp32 accumulators + 2 B + 1 A = 27 zmm;
// 12 x 16 (N <= 16): 12 + 12 + 1 B + 1 A. A is broadcast by its own instruction: with
// vpdpwssd's embedded broadcast ({1to16}) the 12 x 16 loop ran at half the speed on an
// AMD Zen 4 (a loop in L1: 45-50 against 103-117 GMAC/s). 12 x 8 (N <= 8): the same in
// ymm (AVX-512VL): 12 + 12 + 1 B + 1 A of its 32 registers.
#include "avx2_vector.h"
#include "avx512_vector.h"
#include "gemm.h"
#include "ukernel_impl.h"

namespace {

struct Avx512Vnni : Avx512Vector {
  static I dot_pairs(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
};

// ymm vectors (AVX-512VL) for products of at most 8 columns (the 8-channel layers a
// pruned network keeps), which the 12 x 16 tile computed with half of its lanes zeros.
struct Vnni256 : Avx2Vector {
  static I dot_pairs(I acc, I a, I b) { return _mm256_dpwssd_epi32(acc, a, b); }
};

}  // namespace

const dfp::MicroKernel dfp::gemm_s16s16s32_avx512vnni_6x32 = {"gemm_s16s16s32_avx512vnni_6x32", 6, 32, 256, 96, 256,
                                                               TileKernel<Avx512Vnni, 6, 2>::run};
const dfp::MicroKernel dfp::gemm_s16s16s32_avx512vnni_12x16 = {"gemm_s16s16s32_avx512vnni_12x16", 12, 16, 256, 96, 256,
                                                               TileKernel<Avx512Vnni, 12, 1>::run};
const dfp::MicroKernel dfp::gemm_s16s16s32_avx512vnni_12x8 = {"gemm_s16s16s32_avx512vnni_12x8", 12, 8, 256, 96, 256,
                                                              TileKernel<Vnni256, 12, 1>::run};
