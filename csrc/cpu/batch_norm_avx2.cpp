// The batch norm's loops, vectorized for AVX2 (batch_norm_rows.h).
#include "batch_norm_rows.h"

namespace dfp {

const BatchNormKernels batch_norm_avx2 = batch_norm_here();

}  // namespace dfp
