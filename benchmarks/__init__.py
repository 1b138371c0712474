"""dfp's benchmarks: ``python -m benchmarks.report`` and the pytest-benchmark suites."""

import os
import sys

# numpy's OpenBLAS threads spin for 2^28 cycles (about 0.1 s) after each call before they
# sleep, taking a core from whichever contender is timed next: on 2 threads dfp's GEMM
# at 256^3 ran 23x slower right after numpy's (Intel Xeon, 2026-12-04) and torch's bf16
# mm slower than on one thread. 2^17 cycles (about 50 us) still covers the gap between
# back-to-back calls of one sample. OpenBLAS reads this when it loads (torch imports
# numpy), hence here, before anything imports torch.
OPENBLAS_SPIN_SET_IN_TIME = "numpy" not in sys.modules
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "17")
