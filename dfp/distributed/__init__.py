"""Training on several processes: DistributedDataParallel set-up for torchrun and a DDP
communication hook that sends gradients as DFP16 (int16 mantissas, one exponent per bucket
agreed across ranks), half the bytes of fp32.

``import dfp`` does not import this package; use ``import dfp.distributed``.
"""

from .compress import dfp16_all_reduce_mean, dfp16_compress_hook
from .context import COMPRESSIONS, Context, all_reduce_mean, setup, teardown, wrap

__all__ = [
    "COMPRESSIONS",
    "Context",
    "all_reduce_mean",
    "dfp16_all_reduce_mean",
    "dfp16_compress_hook",
    "setup",
    "teardown",
    "wrap",
]
