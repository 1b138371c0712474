"""Public integer GEMM API on DFPTensors and fp32 tensors."""

from __future__ import annotations

import torch

from . import _ops, backends  # _ops also registers torch.ops.dfp.*
from ._gemm_layout import gemm_layout, matmul_grouping
from .format import ROUNDINGS, DFPSpec, DFPTensor, check_float_input, check_operand, check_plain, check_spec, draw_seed


def _check_backend(device: torch.device) -> None:
    """Resolve the backend before entering torch's dispatcher: a bad DFP_BACKEND or
    DFP_CPU_ISA then fails with a short traceback instead of one through torch.library."""
    if not torch.compiler.is_compiling():
        backends.active(device)


def _refuse_grad(op: str, hint: str, **tensors: torch.Tensor | None) -> None:
    """No autograd formula is registered for ``op``: refuse inputs that require grad now,
    rather than return a tensor whose ``.backward()`` fails later."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if needing:
        raise RuntimeError(
            f"{op} has no backward, and {' and '.join(needing)} require{'s' if len(needing) == 1 else ''} grad: "
            f"{hint}, or call it on detached tensors or under torch.no_grad()"
        )


def gemm(a: DFPTensor, b: DFPTensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` in int16 x int16 -> int32 chains, float32 out, shaped like ``torch.mm``.

    a: (M, K), b: (K, N) DFPTensors (transposed views allowed, e.g. ``w.t()``);
    bias: float32 (N,) or None. Exponents may be per tensor, per row of a / column of b,
    or per block along K.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, DFPTensor):
            raise TypeError(f"{name} must be a DFPTensor (from dfp.quantize), got {type(t).__name__}")
        if t.mantissa.dim() != 2:
            raise ValueError(f"{name} must be a 2-D DFPTensor, got shape {tuple(t.shape)}; reshape before quantizing")
        check_plain(t.mantissa, name)
        check_operand(t, name)
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"a is {m}x{k} and b is {k2}x{n}: the inner dimensions must match")
    if b.mantissa.device != a.mantissa.device:
        raise ValueError(f"a is on {a.mantissa.device} and b on {b.mantissa.device}; move both to one device")
    if bias is not None:
        check_float_input(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        _refuse_grad("dfp.ops.gemm", "for a trainable bias use dfp.functional.linear", bias=bias)
    ea, eb, kblock = gemm_layout(a, b)  # validates the exponent layouts, also for K = 0
    if k == 0:
        out = torch.zeros(m, n, device=a.mantissa.device)
        return out + bias if bias is not None else out
    _check_backend(a.mantissa.device)
    # eager on plain tensors: the op's body itself, without torch.library's dispatch (0.05-0.07 ms)
    tensors = (a.mantissa, ea, b.mantissa, eb) + ((bias,) if bias is not None else ())
    op = _ops.gemm_impl if _ops.plain_eager(*tensors) else torch.ops.dfp.gemm
    return op(a.mantissa, ea, a.spec.headroom, b.mantissa, eb, b.spec.headroom, kblock, bias)


def matmul(
    x: torch.Tensor, y: torch.Tensor, spec: DFPSpec | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """fp32 ``x @ y`` with both operands quantized to DFP16 and multiplied in integers.

    x: (M, K), y: (K, N) float32. ``spec`` describes x; y gets the mirrored spec (an
    exponent per row of x goes with one per column of y; blocks along K on both).
    """
    spec = check_spec(spec)
    check_float_input(x, "x")
    check_float_input(y, "y")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"matmul takes 2-D x and y, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[0]:
        raise ValueError(f"x is {tuple(x.shape)} and y is {tuple(y.shape)}: the inner dimensions must match")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} and y on {y.device}; move both to one device")
    matmul_grouping(spec.axis, spec.block)
    _refuse_grad("dfp.matmul", "to train through x @ y use dfp.functional.linear(x, y.t()) (x @ y, DFP16 forward "
                 "and backward)", x=x, y=y)  # fmt: skip
    _check_backend(x.device)
    stochastic = spec.rounding == "stochastic"
    seed_x = draw_seed(generator) if stochastic else 0
    seed_y = draw_seed(generator) if stochastic else 0
    rounding = ROUNDINGS.index(spec.rounding)
    op = _ops.matmul_impl if _ops.plain_eager(x, y) else torch.ops.dfp.matmul
    return op(x, y, spec.headroom, spec.axis, spec.block, rounding, seed_x, seed_y)
