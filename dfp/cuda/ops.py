"""The CUDA backend of dfp's registered ops (``dfp/_ops.py``): ``quantize3d`` and
``gemm``, and for the training layers ``quantize3d_marked`` (NaN/Inf marked, no host
sync), ``quantize_input``, ``quantize_gradient``, ``window`` and ``patch_row_exponents``,
with the signatures of ``dfp/backends/cpu.py``, and ``patches`` (a convolution's patches
read in place); ``dfp.backends.active`` picks it for CUDA tensors, and the ops' generic
paths (matmul, the convolutions) run on top.
Kernels are compiled when an op first runs on a GPU."""

from __future__ import annotations

from . import loader
from .gemm import gemm
from .layout import patch_row_exponents, quantize_gradient, quantize_input, window
from .patches import patches
from .quantize import quantize3d, quantize3d_marked

__all__ = [
    "ensure_available", "gemm", "patch_row_exponents", "patches", "quantize3d", "quantize3d_marked",
    "quantize_gradient", "quantize_input", "window",
]  # fmt: skip


def ensure_available() -> None:
    """A clear error unless a CUDA device and a run-time compiler are here."""
    loader.ensure_cuda()
    loader.compilers()
