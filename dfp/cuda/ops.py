"""The CUDA backend of dfp's registered ops (``dfp/_ops.py``): ``quantize3d`` and
``gemm`` with the signatures of ``dfp/backends/cpu.py``; ``dfp.backends.active`` picks
it for CUDA tensors, and the ops' generic paths (matmul, the convolutions' im2col) run
on top. Kernels are compiled when an op first runs on a GPU."""

from __future__ import annotations

from . import loader
from .gemm import gemm
from .quantize import quantize3d

__all__ = ["ensure_available", "gemm", "quantize3d"]


def ensure_available() -> None:
    """A clear error unless a CUDA device and a run-time compiler are here."""
    loader.ensure_cuda()
    loader.compilers()
