"""What is benchmarked, shared by the pytest-benchmark suites and report.py: shapes and
the contenders (zero-argument callables on prepared inputs)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable

import torch

import benchmarks
import dfp
from dfp.format import mirrored

SQUARE_SIZES = (256, 512, 1024, 2048)
# im2col GEMMs (M, K, N) = (batch*H*W, Cin*3*3, Cout) of 3x3 convolutions in a small
# CIFAR ResNet: few output channels against a long M, so they stress packing and edges.
CNN_SHAPES = ((8192, 576, 64), (2048, 1152, 128), (512, 2304, 256))
GEMM_SHAPES = tuple((s, s, s) for s in SQUARE_SIZES) + CNN_SHAPES

# "numpy fp32": numpy's own BLAS (OpenBLAS in numpy's wheels), an fp32 GEMM that is not
# vendor-gated: torch's fp32 mm is MKL, which runs far below the fp32 peak on AMD cores.
GEMM_CONTENDERS = ("dfp gemm", "dfp matmul", "torch fp32", "numpy fp32", "torch bf16")
if importlib.util.find_spec("numpy") is None:
    GEMM_CONTENDERS = tuple(c for c in GEMM_CONTENDERS if c != "numpy fp32")

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
        elif name == "numpy fp32":
            xn, yn, set_threads = x.numpy(), y.numpy(), numpy_blas_threads()

            def numpy_mm(xn=xn, yn=yn, set_threads=set_threads):
                set_threads(torch.get_num_threads())  # the thread count torch runs at, as for every contender
                return xn @ yn

            fns[name] = numpy_mm
        elif name == "torch bf16":
            xb, yb = x.bfloat16(), y.bfloat16()
            fns[name] = lambda xb=xb, yb=yb: torch.mm(xb, yb)
        else:
            raise ValueError(f"unknown GEMM contender {name!r}; choose from {GEMM_CONTENDERS}")
    return fns


def _numpy_blas_pools() -> list:
    """threadpoolctl's handles on the BLAS libraries numpy loaded ([] without threadpoolctl)."""
    try:
        import numpy
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    numpy.ones(2) @ numpy.ones(2)  # loads numpy's BLAS, if it is loaded lazily
    return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]


def numpy_blas_threads() -> Callable[[int], None]:
    """A setter of numpy's BLAS thread count (through threadpoolctl; a no-op without it),
    which calls into the library only when the count changes."""
    pools, current = _numpy_blas_pools(), [None]

    def set_threads(n: int) -> None:
        if n != current[0]:
            for pool in pools:
                pool.set_num_threads(n)
            current[0] = n

    return set_threads


def numpy_blas() -> str:
    """Which BLAS numpy's fp32 GEMM runs: library, version, the kernel it chose for this
    core, and the environment variables that force a kernel."""
    try:
        import numpy
    except ImportError:
        return "numpy not installed (not timed)"

    pools = _numpy_blas_pools()
    if not pools:
        return f"numpy {numpy.__version__}, BLAS unknown (no threadpoolctl), threads not controlled"
    info = ", ".join(
        f"{p.internal_api} {p.version} (kernel {getattr(p, 'architecture', None) or 'unknown'})" for p in pools
    )
    forced = [f"{v}={os.environ[v]}" for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    spin = (
        f"threads spin 2^{os.environ['OPENBLAS_THREAD_TIMEOUT']} cycles after a call"
        if benchmarks.OPENBLAS_SPIN_SET_IN_TIME
        else "numpy loaded before benchmarks set OPENBLAS_THREAD_TIMEOUT: its threads spin ~0.1 s after each call, "
        "into the next contender's time"
    )
    return f"numpy {numpy.__version__} with {info}, {spin}" + (
        f"; {', '.join(forced)} set: that forces the kernel" if forced else ""
    )


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
