"""The DFP16 format: int16 mantissas sharing power-of-two exponents.

``value = mantissa * 2**exponent``. See ``docs/design.md`` for the exact rules that
every backend follows bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MAX_HEADROOM = 13

Rounding = Literal["nearest", "stochastic", "dithered"]
# The backends' rounding codes: a rounding's index here (csrc/cpu/numerics.h, Rounding).
ROUNDINGS: tuple[Rounding, ...] = ("nearest", "stochastic", "dithered")


@dataclass(frozen=True)
class DFPSpec:
    """How a tensor is quantized.

    Args:
        headroom: bits left unused at the top of the int16 mantissa (0..13). Mantissas
            lie in ``[-(2**(15-headroom) - 1), 2**(15-headroom) - 1]``; more headroom
            allows longer exact int32 chains in the GEMM at the cost of precision.
        axis: ``None`` for one exponent per tensor; otherwise the axis along which
            exponents vary (one per index, or one per block of ``block`` indices).
        block: with ``axis``, the number of consecutive elements along ``axis`` that
            share an exponent; ``None`` for one exponent per index ("per channel").
        rounding: ``"nearest"`` (half to even); ``"stochastic"`` (up with probability
            the fraction, from random bits of a seed drawn from torch's generator);
            ``"dithered"`` (the same rule, its bits a hash of the element's sign,
            significand and flat index: unbiased, yet with no seed, so no generator,
            and the same bits for the tensor scaled by a power of two).
    """

    headroom: int = 2
    axis: int | None = None
    block: int | None = None
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        if not _is_int(self.headroom) or not 0 <= self.headroom <= MAX_HEADROOM:
            raise ValueError(f"DFPSpec.headroom must be an int in 0..{MAX_HEADROOM}, got {self.headroom!r}")
        if self.axis is not None and not _is_int(self.axis):
            raise ValueError(f"DFPSpec.axis must be None or an int, got {self.axis!r}")
        if self.block is not None:
            if self.axis is None:
                raise ValueError("DFPSpec.block needs an axis: pass axis=<the axis the blocks run along>")
            if not _is_int(self.block) or self.block < 1:
                raise ValueError(f"DFPSpec.block must be a positive int, got {self.block!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"DFPSpec.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def group(self) -> Literal["tensor", "channel", "block"]:
        if self.axis is None:
            return "tensor"
        return "channel" if self.block is None else "block"


def _is_int(value: object) -> bool:
    """An int that is not a bool: ``True`` is an int to Python, but headroom=True is a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def mirrored(spec: DFPSpec) -> DFPSpec:
    """The spec for y in ``x @ y`` that matches ``spec`` for x: x's rows <-> y's columns."""
    axis = None if spec.axis is None else 1 - spec.axis % 2
    return DFPSpec(spec.headroom, axis, spec.block, spec.rounding)


@dataclass(frozen=True)
class DFPTensor:
    """A quantized tensor: ``mantissa`` (int16, the logical shape), ``exponent`` (int32,
    one entry per group, shaped to broadcast against ``mantissa`` for channel and block
    groups, 0-d per tensor) and the ``spec`` it was made with."""

    mantissa: torch.Tensor
    exponent: torch.Tensor
    spec: DFPSpec

    def __post_init__(self) -> None:
        # Types and dtypes only, which cost nothing: the kernels read int16 and int32 raw
        # memory, so any other dtype would give wrong numbers, not an error. Shapes and
        # ranges are checked where a GEMM consumes the tensor (``check_operand``).
        if not isinstance(self.spec, DFPSpec):
            raise TypeError(f"DFPTensor.spec must be a dfp.DFPSpec, got {type(self.spec).__name__}")
        for name, dtype in (("mantissa", torch.int16), ("exponent", torch.int32)):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"DFPTensor.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype != dtype:
                raise TypeError(
                    f"DFPTensor.{name} must be {dtype}, got {value.dtype}; make DFPTensors with dfp.quantize, "
                    f"or convert with .to({dtype}) after checking the values fit"
                )

    @property
    def shape(self) -> torch.Size:
        return self.mantissa.shape

    def expanded_exponent(self) -> torch.Tensor:
        """The exponent of every element, shaped like ``mantissa``."""
        e = self.exponent
        if self.spec.group == "block":
            axis = _normalize_axis(self.spec.axis, self.mantissa.dim())
            n = self.mantissa.shape[axis]
            e = e.repeat_interleave(self.spec.block, dim=axis).narrow(axis, 0, n)
        return e.expand(self.mantissa.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 values ``mantissa * 2**exponent`` (exact unless they leave the fp32 range)."""
        return (self.mantissa.to(torch.float64) * exact_pow2(self.expanded_exponent())).to(torch.float32)

    def t(self) -> DFPTensor:
        """The transpose of a 2-D DFPTensor (a view; exponents follow their axis)."""
        if self.mantissa.dim() != 2:
            raise ValueError(f"DFPTensor.t() needs a 2-D tensor, got shape {tuple(self.shape)}")
        spec = self.spec
        if spec.axis is not None:
            spec = DFPSpec(spec.headroom, 1 - _normalize_axis(spec.axis, 2), spec.block, spec.rounding)
        exponent = self.exponent.t() if self.exponent.dim() == 2 else self.exponent
        return DFPTensor(self.mantissa.t(), exponent, spec)


def zeros_exponent(headroom: int) -> int:
    """The exponent of a group of zeros (docs/design.md): that of the smallest positive
    float32, so it never dominates a maximum."""
    return -149 - (15 - headroom) + 1


def exact_pow2(k: torch.Tensor) -> torch.Tensor:
    """Exactly ``2**k`` as float64 for integer ``k`` in [-1022, 1023], built from its bits:
    torch.exp2 is not exact outside the float32 exponent range."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"DFPSpec.axis={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def canonical_view(shape: torch.Size, spec: DFPSpec) -> tuple[tuple[int, int, int], int, int]:
    """``(O, N, I)``, mode (0 tensor, 1 channel, 2 block) and block for the backends."""
    numel = 1
    for d in shape:
        numel *= d
    if spec.axis is None:
        return (1, numel, 1), 0, 0
    axis = _normalize_axis(spec.axis, len(shape))
    outer = 1
    for d in shape[:axis]:
        outer *= d
    inner = 1
    for d in shape[axis + 1 :]:
        inner *= d
    mode = 1 if spec.block is None else 2
    return (outer, shape[axis], inner), mode, spec.block or 0


def exponent_shape(shape: torch.Size, spec: DFPSpec) -> tuple[int, ...]:
    """The shape of the exponent tensor of a DFPTensor of ``shape`` (see DFPTensor)."""
    if spec.axis is None:
        return ()
    axis = _normalize_axis(spec.axis, len(shape))
    if spec.block is None:
        return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    return tuple(-(-d // spec.block) if i == axis else d for i, d in enumerate(shape))


# The GEMM scales by 2**(ea + eb) and 2**(e - max e) in float64, whose exponents reach
# +-1022; exponents within +-511 keep both exact on every backend. dfp.quantize makes
# exponents in -163..126.
EXPONENT_LIMIT = 511


def check_operand(t: DFPTensor, name: str) -> None:
    """Raise a clear error unless ``t`` (maybe built by hand) is what the kernels may read:
    an exponent tensor of the shape its spec gives (the kernels index it without bounds
    checks), on the mantissa's device, exponents within +-EXPONENT_LIMIT and mantissas
    within the headroom's symmetric range (the int32 chains are overflow-free only there).
    Costs one pass over the values, small beside the GEMM that reads them."""
    m, e, spec = t.mantissa, t.exponent, t.spec
    if e.device != m.device:
        raise ValueError(f"{name}.exponent is on {e.device} but {name}.mantissa on {m.device}; move both to one device")
    want = exponent_shape(m.shape, spec)
    if tuple(e.shape) != want and not (spec.group == "tensor" and e.numel() == 1):
        raise ValueError(
            f"{name}.exponent has shape {tuple(e.shape)}, but a DFPTensor of shape {tuple(m.shape)} with {spec} "
            f"needs {want}: one exponent per group, shaped as dfp.quantize makes them"
        )
    _check_range(
        e, EXPONENT_LIMIT, f"{name}.exponent", f"dfp's GEMM takes exponents in -{EXPONENT_LIMIT}..{EXPONENT_LIMIT} "
        "(dfp.quantize makes them in -163..126)",
    )  # fmt: skip
    limit = 2 ** (15 - spec.headroom) - 1
    _check_range(
        m, limit, f"{name}.mantissa", f"outside -{limit}..{limit}, the range of headroom {spec.headroom}; the int32 "
        "chains of the GEMM are exact only inside it. Quantize with dfp.quantize, or build the DFPTensor with the "
        "headroom its mantissas have",
    )  # fmt: skip


def _check_range(t: torch.Tensor, limit: int, what: str, why: str) -> None:
    """Raise ValueError(what holds values in low..high; why) unless every value of t lies in -limit..limit."""
    if t.numel():
        low, high = (int(v) for v in torch.aminmax(t))
        if low < -limit or high > limit:
            raise ValueError(f"{what} holds values in {low}..{high}; {why}")


def check_float_input(x: object, name: str) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a float32 CPU tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}; convert it with {name}.float()")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}; dfp's DFP16 kernels run on CPU and CUDA tensors")
    check_plain(x, name)
    return x


def check_plain(x: torch.Tensor, name: str) -> None:
    """Raise a clear error for a tensor of a torch.func transform (vmap, grad, jvp): the
    kernels read raw memory, which such tensors do not expose."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise NotImplementedError(
            f"{name} is a tensor inside torch.vmap or another torch.func transform, which dfp's kernels do not "
            "support; call the dfp op on the whole batch (or in a loop over its items) instead"
        )


def check_spec(spec: object) -> DFPSpec:
    """``spec``, or the default DFPSpec() for None; a clear error for anything else."""
    if spec is None:
        return DFPSpec()
    if not isinstance(spec, DFPSpec):
        hint = (
            f": {spec!r} names a layer format (dfp.formats); pass the DFPSpec to quantize with, e.g. "
            "dfp.DFPSpec() (headroom 2, one exponent per tensor, rounding to nearest)"
            if isinstance(spec, str)
            else ""
        )
        raise TypeError(f"spec must be a dfp.DFPSpec, got {type(spec).__name__} {spec!r}{hint}")
    return spec


def draw_seed(generator: torch.Generator | None) -> int:
    """A 64-bit seed from torch's generator: reproducible under torch.manual_seed."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator))


def quantize(x: torch.Tensor, spec: DFPSpec | None = None, *, generator: torch.Generator | None = None) -> DFPTensor:
    """Quantize float32 ``x`` to DFP16.

    Raises ``dfp.NonFiniteError`` if ``x`` holds NaN or Inf. Stochastic rounding draws
    its seed from ``generator`` (or torch's default generator), so ``torch.manual_seed``
    makes it reproducible, whatever the thread count.
    """
    spec = check_spec(spec)
    check_float_input(x, "x")
    if spec.axis is not None:
        _normalize_axis(spec.axis, x.dim())
    from . import _ops  # here: _ops imports this module

    seed = draw_seed(generator) if spec.rounding == "stochastic" else 0
    op = _ops.quantize_impl if _ops.plain_eager(x) else torch.ops.dfp.quantize
    mantissa, exponent = op(x, spec.headroom, spec.axis, spec.block, ROUNDINGS.index(spec.rounding), seed)
    return DFPTensor(mantissa, exponent, spec)
