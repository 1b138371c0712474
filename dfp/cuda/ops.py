"""The CUDA implementations of dfp's registered ops (``dfp/_ops.py``), and this module as
a backend (``quantize3d``, ``gemm``, ``matmul`` with the signatures of
``dfp/backends/cpu.py``).

``register()`` adds them to torch's dispatcher for CUDA tensors
(``torch.library.register_kernel``); it does not initialise CUDA, and kernels are
compiled only when an op first runs on a GPU.
"""

from __future__ import annotations

import torch

from .. import _ops
from .._gemm_layout import gemm_layout
from ..format import DFPSpec, DFPTensor, canonical_view, exponent_shape, mirrored
from . import loader
from .gemm import gemm
from .quantize import quantize3d

__all__ = ["ensure_available", "gemm", "matmul", "quantize", "quantize3d", "register"]


def ensure_available() -> None:
    """A clear error unless a CUDA device and a run-time compiler are here."""
    loader.ensure_cuda()
    loader.compilers()


def quantize(
    x: torch.Tensor, headroom: int, axis: int | None, block: int | None, stochastic: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dfp::quantize`` on a CUDA tensor: int16 mantissas shaped like ``x`` and int32
    exponents shaped as ``dfp.format.exponent_shape`` says."""
    spec = DFPSpec(headroom, axis, block)
    (o, n, i), mode, blk = canonical_view(x.shape, spec)
    mantissa, exponent = quantize3d(x.contiguous().view(o, n, i), mode, blk, headroom, stochastic, seed)
    return mantissa.view(x.shape), exponent.reshape(exponent_shape(x.shape, spec))


def matmul(
    x: torch.Tensor,
    y: torch.Tensor,
    headroom: int,
    axis: int | None,
    block: int | None,
    stochastic: bool,
    seed_x: int,
    seed_y: int,
) -> torch.Tensor:
    """``dfp::matmul`` on CUDA tensors: quantize x (spec) and y (the mirrored spec), then the
    GEMM; float32 (M, N), the bits of quantize + gemm on any backend."""
    if x.shape[1] == 0:
        return x.new_zeros((x.shape[0], y.shape[1]))
    spec_x = DFPSpec(headroom, axis, block)
    spec_y = mirrored(spec_x)
    xq = DFPTensor(*quantize(x, headroom, spec_x.axis, block, stochastic, seed_x), spec_x)
    yq = DFPTensor(*quantize(y, headroom, spec_y.axis, block, stochastic, seed_y), spec_y)
    ea, eb, kblock = gemm_layout(xq, yq, ("x", "y"))
    return gemm(xq.mantissa, ea, headroom, yq.mantissa, eb, headroom, kblock, None)


_REGISTERED = False


def register() -> None:
    """Make ``torch.ops.dfp.quantize``, ``gemm`` and ``matmul`` run these kernels on CUDA
    tensors (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _ops.quantize.register_kernel("cuda")(quantize)
    _ops.gemm.register_kernel("cuda")(gemm)
    _ops.matmul.register_kernel("cuda")(matmul)
    _REGISTERED = True
