"""Number formats of the training layers: DFP16 (with each product switchable to fp32)
and the floating-point formats it is compared with.

``resolve("dfp16")`` (or a DFPSpec, or a Format) gives the Format that
``dfp.functional.linear`` / ``conv2d`` and ``dfp.nn`` act on. Variants are made with
``dataclasses.replace``, e.g. ``replace(resolve("dfp16"), grad_weight="fp32")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .format import MAX_HEADROOM, ROUNDINGS, DFPSpec, Rounding

Product = Literal["dfp", "fp32", "bf16", "fp16"]
WeightExponent = Literal["tensor", "channel"]
GradInputExponent = Literal["tensor", "sample", "row"]
GRAD_INPUT_EXPONENTS = ("tensor", "sample", "row")  # the codes of the ops' grad_input_exponent
InputExponent = Literal["tensor", "row"]

_FLOAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Format:
    """How a linear or conv layer computes its three products.

    Attributes:
        name: a label ("dfp16", "bf16", ...); for display only.
        is_dfp: True for the DFP16 family: inputs, weights and output gradients are
            quantized to DFP16 and multiplied in int16 x int16 -> int32 wherever a
            product says "dfp"; master weights, bias and results stay float32.
        dtype: the float dtype a float format computes in; float32 for DFP formats
            (the dtype of their results and of every non-integer step).
        headroom: DFP16 headroom (bits left free at the top of the mantissa), 0..13.
        weight_exponent: "tensor" (one exponent per weight tensor, as in Das et al.) or
            "channel" (one per output channel in the forward product; in the
            grad_input product, whose reduction runs over output channels, one per
            block of ``chain_length`` output channels and input element, which the
            GEMM gets for free). Activations and gradients: see the fields below.
        grad_weight_block: where given (a positive even int), output gradients get one
            exponent per block of this many output pixels and per channel in the
            grad_weight product, whose reduction runs over pixels: each block is a K-block
            of that GEMM (MX-style). None: one exponent per tensor (Das et al.).
        grad_input_exponent: "tensor" (Das et al.), "sample" or "row": output gradients get
            one exponent per sample in the grad_input product (each row of that GEMM lies in
            one sample, so a row's exponent costs only its epilogue scale), or one per image
            row and block of output channels (the largest divisor of Cout/groups up to the
            int32 chain length: 32 at headroom 2), the K-blocks of that product's reduction
            over (tap, output channel); a weight with exponents per channel then has them
            per the same blocks.
        input_exponent: "tensor" (Das et al.) or "row": the layer's input gets one exponent
            per image row and block of channels in the forward (the largest divisor of C/groups
            up to the chain length; the K-blocks of the forward's reduction over (tap,
            channel)), and is quantized again for grad_weight with one per channel and group
            of samples whose output pixels are whole blocks of ``grad_weight_block`` (one
            sample where its pixels are a multiple of the block; a linear layer's: 32
            samples), which needs ``grad_weight_block``. Only where a kernel row of a
            group's channels fills an int32 chain (KW*C/groups >= 32 at headroom 2);
            narrower inputs (a first layer's 1-4 channels) keep one per tensor.
        grad_weight_rounding: rounding of output gradients in the grad_weight product, whose
            sums run over every pixel of the batch: rounding to nearest there leaves
            errors that add up coherently (the same small values round the same way), while
            those of "stochastic" and "dithered" rounding are unbiased. None: as
            ``grad_rounding``.
        grad_rounding: rounding of output gradients, a ``DFPSpec`` rounding ("nearest",
            "stochastic": its seed drawn from torch's generator, so ``torch.manual_seed``
            reproduces it; "dithered": no seed, see DFPSpec); the forward
            quantization always rounds to nearest.
        forward, grad_input, grad_weight: how each product is computed: "dfp" (the
            integer GEMM) or "fp32" (torch in float32) for DFP formats; a float
            format's name ("fp32", "bf16", "fp16") for all three of a float format.
    """

    name: str
    is_dfp: bool
    dtype: torch.dtype = torch.float32
    headroom: int = 2
    weight_exponent: WeightExponent = "tensor"
    grad_weight_block: int | None = None
    grad_input_exponent: GradInputExponent = "tensor"
    input_exponent: InputExponent = "tensor"
    grad_rounding: Rounding = "nearest"
    grad_weight_rounding: Rounding | None = None
    forward: Product = "dfp"
    grad_input: Product = "dfp"
    grad_weight: Product = "dfp"

    @property
    def rounding_in_grad_weight(self) -> Rounding:
        """The rounding of output gradients in grad_weight (``grad_weight_rounding`` or,
        where None, ``grad_rounding``)."""
        return self.grad_weight_rounding or self.grad_rounding

    def __post_init__(self) -> None:
        if self.dtype not in _FLOAT_NAMES:
            raise ValueError(f"Format.dtype must be one of {list(_FLOAT_NAMES)}, got {self.dtype}")
        if self.weight_exponent not in ("tensor", "channel"):
            raise ValueError(f"Format.weight_exponent must be 'tensor' or 'channel', got {self.weight_exponent!r}")
        if self.grad_rounding not in ROUNDINGS:
            raise ValueError(f"Format.grad_rounding must be one of {ROUNDINGS}, got {self.grad_rounding!r}")
        if self.grad_weight_rounding not in (None, *ROUNDINGS):
            raise ValueError(
                f"Format.grad_weight_rounding must be None or one of {ROUNDINGS}, got {self.grad_weight_rounding!r}"
            )
        block = self.grad_weight_block
        if block is not None and (type(block) is not int or block < 2 or block % 2):
            raise ValueError(f"Format.grad_weight_block must be None or an even int >= 2, got {block!r}")
        if self.grad_input_exponent not in GRAD_INPUT_EXPONENTS:
            raise ValueError(
                f"Format.grad_input_exponent must be one of {GRAD_INPUT_EXPONENTS}, got {self.grad_input_exponent!r}"
            )
        if self.input_exponent not in ("tensor", "row"):
            raise ValueError(f"Format.input_exponent must be 'tensor' or 'row', got {self.input_exponent!r}")
        if self.input_exponent == "row" and block is None:
            raise ValueError(
                "Format.input_exponent='row' needs grad_weight_block: grad_weight's input exponents follow "
                "groups of samples whose output pixels are whole blocks of it"
            )
        if type(self.headroom) is not int or not 0 <= self.headroom <= MAX_HEADROOM:  # a bool is no headroom
            raise ValueError(f"Format.headroom must be an int in 0..{MAX_HEADROOM}, got {self.headroom!r}")
        products = {"forward": self.forward, "grad_input": self.grad_input, "grad_weight": self.grad_weight}
        if self.is_dfp:
            if self.dtype != torch.float32:
                raise ValueError(f"a DFP format computes and returns float32, got dtype={self.dtype}")
            allowed = ("dfp", "fp32")
        else:
            allowed = (_FLOAT_NAMES[self.dtype],)
        for field, value in products.items():
            if value not in allowed:
                kind = "a DFP format" if self.is_dfp else f"the {allowed[0]} format"
                raise ValueError(f"Format.{field}={value!r}: {kind} computes each product as one of {allowed}")


# The default's output gradients get an exponent per 32 output pixels and channel in
# grad_weight (one int32 chain at headroom 2) and one per image row and block of output
# channels in grad_input: per tensor, grad_weight was up to 21 dB less accurate than bf16
# on ResNet-20's layers and grad_input as little as 7.7 dB more; per sample, a
# heavy-tailed gradient's grad_input stayed 9.8 dB above bf16, per image row 16.8. Its
# inputs get one per image row and channel block in the forward and per sample and
# channel in grad_weight: per tensor, heavy-tailed and outlier-channel inputs left the
# forward and grad_weight 5.6-7 dB above bf16, now every product is 15.7 dB above
# (AMD Zen 4; docs/fidelity.md).
DEFAULT_EXPONENTS = {"grad_weight_block": 32, "grad_input_exponent": "row", "input_exponent": "row"}

FORMATS: dict[str, Format] = {
    # dithered rounding in grad_weight: rounded to nearest, the small gradients of a
    # 32x32 layer's pixels round alike and their errors add up over the batch (a CIFAR-10
    # layer's grad_weight only 0.7 dB above bf16; dithered: 16 dB; docs/fidelity.md)
    "dfp16": Format("dfp16", is_dfp=True, grad_weight_rounding="dithered", **DEFAULT_EXPONENTS),
    "dfp16-sr": Format("dfp16-sr", is_dfp=True, grad_rounding="stochastic", **DEFAULT_EXPONENTS),
    "dfp16-tensor": Format("dfp16-tensor", is_dfp=True),
    **{
        name: Format(name, is_dfp=False, dtype=dtype, forward=name, grad_input=name, grad_weight=name)
        for dtype, name in _FLOAT_NAMES.items()
    },
}


def resolve(fmt: str | DFPSpec | Format) -> Format:
    """The Format named by ``fmt``.

    ``fmt`` is a Format (returned as is), a name from ``FORMATS`` ("dfp16": headroom 2,
    inputs with an exponent per image row and block of channels in the forward and per
    sample and channel in grad_weight, output gradients per 32 pixels and channel in
    grad_weight, rounded there with dithering, and per image row and block of channels in
    grad_input, rounded to nearest; "dfp16-sr": the same with stochastic rounding of
    gradients;
    "dfp16-tensor": one exponent per tensor everywhere, as in Das et al. 2018; "fp32",
    "bf16", "fp16"), or a DFPSpec: its headroom, its rounding for the gradients (the
    forward rounds to nearest), and ``axis=None`` for one weight exponent per tensor or
    ``axis=0`` for one per output channel.
    """
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, DFPSpec):
        return _from_spec(fmt)
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    raise ValueError(
        f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}, a dfp.DFPSpec or a dfp.formats.Format"
    )


def _from_spec(spec: DFPSpec) -> Format:
    if spec.block is not None or spec.axis not in (None, 0):
        raise ValueError(
            f"the layers take weight exponents per tensor (DFPSpec(axis=None)) or per output channel "
            f"(DFPSpec(axis=0)), got axis={spec.axis}, block={spec.block}"
        )
    weight_exponent = "tensor" if spec.axis is None else "channel"
    name = f"dfp16(headroom={spec.headroom}, weight={weight_exponent}, grad_rounding={spec.rounding})"
    return Format(
        name, is_dfp=True, headroom=spec.headroom, weight_exponent=weight_exponent, grad_rounding=spec.rounding
    )
