// The batch norm's loops, vectorized for AVX-512 (F and BW) (batch_norm_rows.h).
#include "batch_norm_rows.h"

namespace dfp {

const BatchNormKernels batch_norm_avx512bw = batch_norm_here();

}  // namespace dfp
