"""dfp: 16-bit dynamic fixed point (DFP16) training kernels for PyTorch.

Importing dfp never needs the compiled core nor initialises CUDA; an op that needs the
core says so when it is called.
"""

from . import cuda, formats, functional, nn, ops
from ._errors import BackendUnavailableError, NonFiniteError
from .allocator import keep_freed_memory
from .backends._buffers import empty_cache
from .backends.cpu import cpu_isa
from .format import DFPSpec, DFPTensor, quantize
from .nn import convert, revert
from .ops import matmul

__all__ = [
    "BackendUnavailableError",
    "DFPSpec",
    "DFPTensor",
    "NonFiniteError",
    "convert",
    "cpu_isa",
    "cuda",
    "empty_cache",
    "formats",
    "functional",
    "keep_freed_memory",
    "matmul",
    "nn",
    "ops",
    "quantize",
    "revert",
]
