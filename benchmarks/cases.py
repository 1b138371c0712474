"""What is benchmarked, shared by the pytest-benchmark suites and report.py: shapes and
the contenders (zero-argument callables on prepared inputs)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

import dfp
from dfp.format import mirrored

SQUARE_SIZES = (256, 512, 1024, 2048)
# im2col GEMMs (M, K, N) = (batch*H*W, Cin*3*3, Cout) of 3x3 convolutions in a small
# CIFAR ResNet: few output channels against a long M, so they stress packing and edges.
CNN_SHAPES = ((8192, 576, 64), (2048, 1152, 128), (512, 2304, 256))
GEMM_SHAPES = tuple((s, s, s) for s in SQUARE_SIZES) + CNN_SHAPES

GEMM_CONTENDERS = ("dfp gemm", "dfp matmul", "torch fp32", "torch bf16")

# 16M elements: far larger than the caches, so quantization runs at memory speed as it
# would on real activations.
QUANT_SHAPE = (4096, 4096)
# Groupings as used for a GEMM operand (M, K): one exponent per tensor, per row, or per
# block of 32 along K (the contiguous axis).
QUANT_GROUPS = {"tensor": {}, "channel": {"axis": 0}, "block32": {"axis": 1, "block": 32}}
ROUNDINGS = ("nearest", "stochastic")


def gemm_ops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def gemm_contenders(
    m: int, k: int, n: int, headroom: int = 2, names: Iterable[str] = GEMM_CONTENDERS
) -> dict[str, Callable[[], torch.Tensor]]:
    """``x @ y`` for fp32 x (m, k), y (k, n), by each contender in ``names``.

    Operand preparation (dfp quantization, the bf16 cast) is done here, outside the
    timed call, except for "dfp matmul", whose point is to include quantization.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    y = torch.randn(k, n, generator=gen)
    spec = dfp.DFPSpec(headroom)
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        if name == "dfp gemm":
            a, b = dfp.quantize(x, spec), dfp.quantize(y, mirrored(spec))
            fns[name] = lambda a=a, b=b: dfp.ops.gemm(a, b)
        elif name == "dfp matmul":
            fns[name] = lambda: dfp.matmul(x, y, spec)
        elif name == "torch fp32":
            fns[name] = lambda: torch.mm(x, y)
        elif name == "torch bf16":
            xb, yb = x.bfloat16(), y.bfloat16()
            fns[name] = lambda xb=xb, yb=yb: torch.mm(xb, yb)
        else:
            raise ValueError(f"unknown GEMM contender {name!r}; choose from {GEMM_CONTENDERS}")
    return fns


def quant_input(shape: tuple[int, int] = QUANT_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def quant_spec(group: str, rounding: str, headroom: int = 2) -> dfp.DFPSpec:
    return dfp.DFPSpec(headroom, rounding=rounding, **QUANT_GROUPS[group])


def naive_quantize(x: torch.Tensor, spec: dfp.DFPSpec) -> torch.Tensor:
    """The baseline: the plain torch chain a user would write for the same grouping
    (amax, power-of-two scale, round, clamp, cast), one pass over memory per op.

    Only the 2-D groupings of QUANT_GROUPS; blocks need the axis length divisible by
    the block."""
    if spec.group == "tensor":
        amax = x.abs().amax()
    elif spec.group == "channel":
        amax = x.abs().amax(dim=1 - spec.axis, keepdim=True)
    else:
        x = x.view(x.shape[0], -1, spec.block)
        amax = x.abs().amax(dim=-1, keepdim=True)
    _, e = torch.frexp(amax)  # amax = f * 2**e, f in [0.5, 1)
    v = x * torch.ldexp(torch.ones_like(amax), (15 - spec.headroom) - e)
    v = (v + torch.rand_like(v)).floor() if spec.rounding == "stochastic" else v.round()
    limit = 2 ** (15 - spec.headroom) - 1
    return v.clamp(-limit, limit).to(torch.int16)


def quant_contenders(x: torch.Tensor, spec: dfp.DFPSpec) -> dict[str, Callable[[], object]]:
    return {"dfp": lambda: dfp.quantize(x, spec), "naive torch": lambda: naive_quantize(x, spec)}
