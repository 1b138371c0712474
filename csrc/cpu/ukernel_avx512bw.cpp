// gemm_s16s16s32 on AVX-512BW: vpmaddwd zmm + vpaddd. 6 x 32 tile: 12 int32 + 12 fp32
// accumulators + 2 B vectors + 1 A broadcast + 1 product = 28 zmm; 12 x 16 (N <= 16): 12 +
// 12 + 1 B + 1 A + 1 product = 27.
#include "avx512_vector.h"
#include "gemm.h"
#include "ukernel_impl.h"

namespace {

struct Avx512bw : Avx512Vector {
  static I dot_pairs(I acc, I a, I b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
};

}  // namespace

const dfp::MicroKernel dfp::gemm_s16s16s32_avx512bw_6x32 = {"gemm_s16s16s32_avx512bw_6x32", 6, 32, 256, 96, 256,
                                                             TileKernel<Avx512bw, 6, 2>::run};
const dfp::MicroKernel dfp::gemm_s16s16s32_avx512bw_12x16 = {"gemm_s16s16s32_avx512bw_12x16", 12, 16, 256, 96, 256,
                                                               TileKernel<Avx512bw, 12, 1>::run};
