"""The one op registry: every dfp op is declared here once, as a torch.library custom
op with a fake kernel (so torch.compile can trace it), and runs on the backend chosen
by ``dfp.backends.active()``."""

from __future__ import annotations

import torch

from . import backends
from ._gemm_layout import gemm_layout
from .format import DFPSpec, DFPTensor, canonical_view, exponent_shape, mirrored


@torch.library.custom_op("dfp::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, headroom: int, axis: int | None, block: int | None, stochastic: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = DFPSpec(headroom, axis, block)
    (o, n, i), mode, blk = canonical_view(x.shape, spec)
    x3 = x.contiguous().view(o, n, i)
    mantissa, exponent = backends.active().quantize3d(x3, mode, blk, headroom, stochastic, seed)
    return mantissa.view(x.shape), exponent.reshape(exponent_shape(x.shape, spec))


@quantize.register_fake
def _(x, headroom, axis, block, stochastic, seed):
    spec = DFPSpec(headroom, axis, block)
    return x.new_empty(x.shape, dtype=torch.int16), x.new_empty(exponent_shape(x.shape, spec), dtype=torch.int32)


@torch.library.custom_op("dfp::gemm", mutates_args=())
def gemm(
    a: torch.Tensor,
    ea: torch.Tensor,
    ha: int,
    b: torch.Tensor,
    eb: torch.Tensor,
    hb: int,
    kblock: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return backends.active().gemm(a, ea, ha, b, eb, hb, kblock, bias)


@gemm.register_fake
def _(a, ea, ha, b, eb, hb, kblock, bias):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dfp::matmul", mutates_args=())
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
    backend = backends.active()
    fused = getattr(backend, "matmul", None)
    if fused is not None:
        return fused(x, y, headroom, axis, block, stochastic, seed_x, seed_y)
    if x.shape[1] == 0:
        return x.new_zeros((x.shape[0], y.shape[1]))
    spec_x = DFPSpec(headroom, axis, block)
    spec_y = mirrored(spec_x)
    xq = DFPTensor(*quantize(x, headroom, spec_x.axis, block, stochastic, seed_x), spec_x)
    yq = DFPTensor(*quantize(y, headroom, spec_y.axis, block, stochastic, seed_y), spec_y)
    ea, eb, kblock = gemm_layout(xq, yq, ("x", "y"))
    return gemm(xq.mantissa, ea, headroom, yq.mantissa, eb, headroom, kblock, None)


@matmul.register_fake
def _(x, y, headroom, axis, block, stochastic, seed_x, seed_y):
    return x.new_empty((x.shape[0], y.shape[1]))
