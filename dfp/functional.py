"""Autograd-aware ``linear`` and ``conv2d`` in any Format (see ``dfp.formats``), with the
semantics and shapes of ``torch.nn.functional``.

DFP formats quantize input, weight and output gradient to DFP16 and compute the
forward, grad_input and grad_weight products with the integer GEMM through the
registered ops of ``dfp.autograd``; everything else (master weights, bias, the bias
gradient) stays float32. Float formats cast input, weight and bias to their dtype, run
torch, and cast the result back to the input's dtype.

Autocast: these functions compute in their format's precision whatever
``torch.autocast`` says (they switch it off inside). DFP formats return float32;
float formats return the input's dtype.

Non-finite values: in a DFP format a NaN or Inf in the input, the weight or the output
gradient never raises; it makes every result that depends on it NaN (all of it, since
the tensor's shared exponent is undefined), so ``torch.amp.GradScaler`` skips the step.
Double backward is not supported (a clear error when tried).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _conv_layout as layout
from . import _ops
from . import autograd as _autograd  # also registers torch.ops.dfp.conv2d
from .format import ROUNDINGS, DFPSpec
from .formats import GRAD_INPUT_EXPONENTS, Format, resolve

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

FormatLike = str | DFPSpec | Format
IntPair = int | tuple[int, int]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: FormatLike = "dfp16"
) -> torch.Tensor:
    """``x @ weight.T + bias`` in format ``fmt``.

    x: (*, in_features), any number of leading dimensions (also none); weight:
    (out_features, in_features); bias: (out_features,) or None. Returns
    (*, out_features): float32 for DFP formats, x's dtype for float formats.
    """
    f = resolve(fmt)
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x's last dimension must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}"
        )
    out_features, in_features = weight.shape
    _check_bias(bias, out_features, "linear")
    if not f.is_dfp:
        return _in_float_format(F.linear, f, x, weight, bias)
    # a linear layer is a 1x1 convolution over the rows of x, which are already channels last
    rows = x.reshape(math.prod(x.shape[:-1]), in_features, 1, 1)
    y = _dfp_conv2d(rows, weight.reshape(out_features, in_features, 1, 1), bias, (1, 1), (0, 0), (1, 1), 1, f, False)
    return y.view(*x.shape[:-1], out_features)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    fmt: FormatLike = "dfp16",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """2-D convolution in format ``fmt``, as ``torch.nn.Conv2d`` computes it.

    x: (N, C, H, W) or unbatched (C, H, W), NCHW or channels-last; weight:
    (Cout, C/groups, KH, KW); bias: (Cout,) or None. stride, dilation: int or pair;
    padding: int, pair, "same" or "valid"; padding_mode: "zeros", "reflect",
    "replicate" or "circular". Returns (N, Cout, OH, OW) (or (Cout, OH, OW)) in x's
    memory format: float32 for DFP formats, x's dtype for float formats.

    Zero padding is applied to the quantized int16 input; the other modes pad the
    float input first (as torch.nn.Conv2d does), as does the extra row/column of an
    asymmetric "same" padding.
    """
    f = resolve(fmt)
    _check_conv2d_arguments(x, weight, bias, groups, padding_mode)
    stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    channels_last = layout.is_channels_last(x) or layout.is_channels_last(weight)  # torch's rule
    kernel = tuple(weight.shape[2:])
    x, zeros = _pad(x, _padding(padding, kernel, stride, dilation), padding_mode)
    for axis, size, k, p, d in zip("HW", x.shape[2:], kernel, zeros, dilation):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(
                f"conv2d: the padded input ({size + 2 * p} along {axis}) is smaller than the dilated kernel "
                f"({d * (k - 1) + 1})"
            )
    if f.is_dfp:
        y = _dfp_conv2d(x, weight, bias, stride, zeros, dilation, groups, f, channels_last)
    else:
        y = _in_float_format(F.conv2d, f, x, weight, bias, stride, zeros, dilation, groups)
        y = y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return y.squeeze(0) if unbatched else y


def _check_conv2d_arguments(x, weight, bias, groups, padding_mode) -> None:
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"conv2d: weight must be 4-D (Cout, C/groups, KH, KW), got shape {tuple(weight.shape)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"conv2d: x must be (N, C, H, W) or unbatched (C, H, W), got shape {tuple(x.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"conv2d: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int, got {groups!r}")
    cout, cin_g = weight.shape[:2]
    if cin_g * groups != x.shape[-3]:
        raise ValueError(
            f"conv2d: x has {x.shape[-3]} channels but weight {tuple(weight.shape)} with groups={groups} "
            f"expects {cin_g * groups}"
        )
    if cout % groups:
        raise ValueError(f"conv2d: out_channels={cout} must be divisible by groups={groups}")
    _check_bias(bias, cout, "conv2d")


def _pad(x: torch.Tensor, padding, padding_mode: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """x with the padding that the op does not do itself, and the symmetric zero padding
    (ph, pw) left to the op (which pads the quantized int16 input)."""
    (top, bottom), (left, right) = padding
    if padding_mode != "zeros":
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), mode=padding_mode)
        return x, (0, 0)
    if (bottom, right) != (top, left):  # an odd "same" total: torch puts the extra row/column at the bottom/right
        x = F.pad(x, (0, right - left, 0, bottom - top))
    return x, (top, left)


def _dfp_conv2d(x, weight, bias, stride, padding, dilation, groups, f: Format, channels_last: bool) -> torch.Tensor:
    """The registered DFP16 convolution on float32 views of the tensors (a no-op for
    float32; exact for bf16 and fp16 inputs)."""
    _check_device(x, "x")
    _check_device(weight, "weight")
    tensors = (x.float(), weight.float(), None if bias is None else bias.float())
    need_weight_grad = torch.is_grad_enabled() and weight.requires_grad  # else grad_weight's input is not made
    if _ops.plain_eager(x, weight):
        config = (tuple(stride), tuple(padding), tuple(dilation), groups, *_cached_op_switches(f))
        return _autograd.EagerConv2d.apply(*tensors, (*config, channels_last, need_weight_grad))
    geometry = (list(stride), list(padding), list(dilation), groups)
    y, _, _ = torch.ops.dfp.conv2d(*tensors, *geometry, *_op_switches(f), channels_last, need_weight_grad)
    return y


def _op_switches(f: Format) -> tuple:
    """``dfp::conv2d``'s arguments from headroom to input_rows."""
    return (
        f.headroom, f.weight_exponent == "channel", f.forward == "dfp", f.grad_input == "dfp",
        f.grad_weight == "dfp", ROUNDINGS.index(f.grad_rounding), ROUNDINGS.index(f.rounding_in_grad_weight),
        f.grad_weight_block or 0, GRAD_INPUT_EXPONENTS.index(f.grad_input_exponent), f.input_exponent == "row",
    )  # fmt: skip


# Made once per format for eager calls (a small layer's step read them on every call);
# traced code computes them, as Dynamo would trace through the cache anyway.
_cached_op_switches = functools.lru_cache(maxsize=64)(_op_switches)


def _in_float_format(op, f: Format, x, weight, bias, *args) -> torch.Tensor:
    """``op`` in f.dtype with autocast off (so the format decides the precision); the
    result in x's dtype. Autograd casts the gradients back to the master weights' dtype."""
    dtype = f.dtype
    with torch.autocast(x.device.type, enabled=False):
        try:
            y = op(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), *args)
        except (RuntimeError, NotImplementedError) as err:
            if "Half" not in str(err) and "BFloat16" not in str(err):
                raise
            raise RuntimeError(
                f"{op.__name__} in format {f.name!r} ({dtype}) is not supported on {x.device} by torch "
                f"{torch.__version__}: {err}. Choose another format (e.g. 'fp32' or 'dfp16') or a newer torch."
            ) from err
    return y.to(x.dtype)


def _check_tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; dfp's DFP16 layers run on CPU and CUDA tensors")


def _check_bias(bias: torch.Tensor | None, channels: int, op: str) -> None:
    if bias is None:
        return
    _check_tensor(bias, "bias")
    if tuple(bias.shape) != (channels,):  # a tuple: torch.Size == tuple runs symbolic-shape code
        raise ValueError(f"{op}: bias must have shape ({channels},), got {tuple(bias.shape)}")


def _pair(value: IntPair, name: str, minimum: int, alternatives: str = "") -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"conv2d: {name} must be an int >= {minimum}, a pair of them{alternatives}, got {value!r}")
    return pair


def _padding(padding: IntPair | str, kernel, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) padding of the input."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("conv2d: padding='same' is not supported for strided convolutions (as in torch)")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    ph, pw = _pair(padding, "padding", 0, alternatives=", 'same' or 'valid'")
    return (ph, ph), (pw, pw)
