"""The DFP16 convolution as registered custom ops with fake kernels and an autograd
formula, so ``torch.compile(fullgraph=True)`` traces it and ``opcheck`` passes.

A linear layer is the 1x1 case (``dfp.functional.linear``). Ops:

    dfp::conv2d                   forward; also returns the quantized, zero-padded input
                                  (int16, channels last) that grad_weight reuses
    dfp::quantize_channels_last   output gradient -> int16 (N, OH, OW, Cout), once for
                                  both backward products
    dfp::conv2d_grad_input        dX: stride-1 convolutions of dY with the flipped,
                                  transposed kernel, one per phase of the input
                                  (``dfp._grad_input``); W quantized for a reduction
                                  over Cout
    dfp::conv2d_grad_weight       dW = dY^T patches(X)

Eager calls on ordinary tensors run ``EagerConv2d`` instead: the same bodies and formula
without torch.library's dispatch (``dfp._ops.plain_eager``).

Every product runs in int16 x int16 -> int32 chains (``dfp::conv_gemm``,
``dfp::conv_grad_weight_gemm``; the compiled backend gathers patches per
cache block, never an im2col matrix) unless the format switches it to fp32 (then torch
computes it from the float tensors). Exponents of the input and the output gradient are
per tensor or finer (``conv2d_impl``, ``quantize_grad_output``; docs/design.md). The
weight has one per tensor, or with ``weight_channel`` one per output
channel in the forward and, in grad_input, whose reduction runs over output channels,
one per block of min(chain_length, Cout/G) output channels (and input element), which
the GEMM gets for free. A NaN/Inf in an operand makes the
whole result NaN: its shared exponent is undefined. Double backward is not supported.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _conv_layout as layout
from . import _ops, backends
from ._batch_statistics import hand_over, wanted, worth_handing_over
from ._grad_input import grad_input
from ._norm_gradient import Pending
from ._patches import output_size
from .format import ROUNDINGS, DFPSpec, DFPTensor
from .formats import GRAD_INPUT_EXPONENTS
from .reference import chain_length

_STOCHASTIC = ROUNDINGS.index("stochastic")


def _to_nchw(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W) in the requested memory format, with the strides a
    fresh tensor of that format has (also in size-1 dimensions, which ``contiguous``
    leaves as they are: DDP's gradient buckets compare strides)."""
    shape, strides, same_order = _nchw_layout(tuple(y.shape), y.stride(), channels_last)
    if same_order:  # a view (only size-1 strides differ where it is not y itself: a linear layer's)
        return y.as_strided(shape, strides)
    return torch.empty_strided(shape, strides, dtype=y.dtype, device=y.device).copy_(y.permute(0, 3, 1, 2))


@functools.lru_cache(maxsize=1024)
def _nchw_layout(shape, strides, channels_last: bool) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """``_to_nchw``'s (shape, strides, whether y's memory order is already theirs)."""
    n, h, w, c = shape
    permuted = (strides[0], strides[3], strides[1], strides[2])
    wanted = (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    same_order = all(size == 1 or a == b for size, a, b in zip((n, c, h, w), permuted, wanted, strict=True))
    return (n, c, h, w), wanted, same_order


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialised float32 tensor on ``like``'s device (for the fake kernels)."""
    return torch.empty(shape, dtype=torch.float32, device=like.device, memory_format=_memory_format(channels_last))


def _nan(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A float32 tensor of NaN on ``like``'s device."""
    return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device).contiguous(
        memory_format=_memory_format(channels_last)
    )


def _grad_input_weights(
    weight: torch.Tensor, groups: int, headroom: int, weight_channel: bool, rows: bool = False
) -> DFPTensor:
    """The float32 weight (Cout, Cg, KH, KW) quantized for dX = dY W: mantissa
    (G, Cout/G, KH, KW, Cg). The reduction runs over output channels, so
    ``weight_channel`` gives an exponent per block of ``spec.block`` output channels
    (``_grad_input_block``; ``rows``: dY has exponents per image row and block) and per
    (kh, kw, ci), blocks never straddling groups: exponent (G, blocks, KH, KW, Cg).
    Otherwise one per tensor, as in the forward."""
    cout_g = weight.shape[0] // groups
    if not weight_channel:  # the 4-d weight's mantissa (Cout, KH, KW, Cg), grouped: one pass on the fused path
        q = layout.quantize_channels_last(weight, DFPSpec(headroom))
        return DFPTensor(q.mantissa.reshape(groups, cout_g, *q.mantissa.shape[1:]), q.exponent, q.spec)
    grouped = weight.view(groups, cout_g, *weight.shape[1:])
    return layout.quantize_channels_last(grouped, DFPSpec(headroom, 1, _grad_input_block(cout_g, headroom, rows)))


@functools.lru_cache(maxsize=256)  # asked in every backward; a small layer's step felt the divisor search
def _grad_input_block(cout_g: int, headroom: int, rows: bool = False) -> int:
    """Output channels per K-block of grad_input's reduction over (tap, output channel),
    where the weight (``weight_channel``) or dY (``rows``: per image row and block) has
    exponents per block: as many as an int32 chain sums, at most a group's; with dY's
    row blocks, the largest divisor of Cout/G up to that (dY's blocks need no zero
    channels then)."""
    most = min(chain_length(headroom, headroom), max(cout_g, 1))
    return max(b for b in range(1, most + 1) if cout_g % b == 0) if rows else most


def _input_rows_fill_chains(kw: int, cg: int, headroom: int) -> bool:
    """Whether the input gets exponents per image row (``Format.input_exponent = "row"``):
    where the forward's K-blocks, a kernel row of a group's channels at the most, hold an
    int32 chain. Narrower inputs (a first layer's 1-4 channels, depthwise and 1x1 layers
    of under 32 channels) keep one exponent per tensor: their chains would be cut to the
    K-blocks, 3 K-pairs for 1 channel and 3x3 (a digits layer's forward 2.2x its time)."""
    return kw * cg >= chain_length(headroom, headroom)


def _grad_input_in_one_call(cout_g: int, block: int) -> bool:
    """Whether the backend's one-call grad_input takes a layer: weight blocks (``block``
    > 0) that need no zero output channels to fill the last."""
    return block == 0 or cout_g % block == 0


def conv2d_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    headroom: int,
    weight_channel: bool,
    forward_dfp: bool,
    grad_input_dfp: bool,
    grad_weight_dfp: bool,
    grad_rounding: int,
    grad_weight_rounding: int,
    grad_weight_block: int,
    grad_input_exponent: int,
    input_rows: bool,
    channels_last: bool,
    need_weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = conv2d(x, weight) + bias, float32 (N, Cout, OH, OW) in channels-last memory
    format when ``channels_last``; plus the quantized input that grad_weight reads,
    zero-padded to (N, H + 2*ph, W + 2*pw, C') int16, and its int32 exponents: 0-d, or
    with ``input_rows`` where ``_input_rows_fill_chains`` (N, C'), one per group of
    ``_ops.input_group_samples`` samples and channel, written for each sample (the forward
    then multiplies x quantized per image row and block of ``_grad_input_block(C'/groups)``
    channels, ``layout.quantize_input``). C' = C, or C + 1
    where C is odd and groups is 1: with an even count the K-pairs (ci, ci + 1) of the
    patches lie inside taps and are read in place, not gathered element by element
    (3 -> 16 channels, 32x32: about 2x faster); the zero channel adds nothing to a sum
    but moves the chains' borders.

    x: float32 (N, C, H, W), any strides; weight: float32 (Cout, C/groups, KH, KW);
    bias: float32 (Cout,) or None; padding is symmetric zeros. The input is quantized
    even when the forward runs in fp32, for a DFP16 grad_weight. The grad_* arguments only
    steer the backward (see ``_setup_context``): ``grad_rounding`` and
    ``grad_weight_rounding`` (codes of ``dfp.format.ROUNDINGS``) round the output
    gradient in grad_input and in grad_weight; ``grad_weight_block`` > 0 gives the output
    gradient one exponent per block of that many output pixels and channel in grad_weight
    (0: one per tensor); ``grad_input_exponent`` (a code of ``dfp.formats.GRAD_INPUT_EXPONENTS``)
    groups it in grad_input: per tensor, sample, or image row and channel block.
    ``need_weight_grad`` False (no weight gradient can be asked: no grad mode, a frozen
    weight) returns empty tensors in place of the quantized input, which then is not made
    for grad_weight where the forward does not read the same copy.
    """
    if forward_dfp:
        switches = (headroom, weight_channel, grad_weight_block, input_rows, need_weight_grad)
        fused = _forward_in_one_call(backends.active(x.device), x, weight, bias, stride, padding, dilation, groups,
                                     *switches)  # fmt: skip
        if fused is not None:  # else NaN/Inf: the steps below
            return _one_call_output(fused, x, channels_last, need_weight_grad)
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh = output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = output_size(w, kw, stride[1], padding[1], dilation[1])
    channels, input_groups = _input_layout(c, groups, kw, headroom, input_rows, grad_weight_block, oh * ow)
    input_rows = input_groups != (0, 0)
    x_padded = x_exponent = None  # made only for a product that reads them
    if input_rows and (forward_dfp or need_weight_grad):
        x_rows, e_rows, x_padded, x_exponent = layout.quantize_input(x, headroom, tuple(padding), channels,
                                                                     *input_groups, need_weight_grad)  # fmt: skip
        relayout = getattr(backends.active(x.device), "kept_input", None)
        if need_weight_grad and relayout is not None:  # as the one-call forward keeps it
            x_padded = relayout(x_padded, tuple(weight.shape), tuple(stride), tuple(dilation), groups)
    elif forward_dfp or need_weight_grad:
        x_padded, x_exponent = layout.quantize_padded(x, headroom, tuple(padding), channels)
        x_rows, e_rows = x_padded, x_exponent
    x_padded, x_exponent = _kept_input(x, x_padded, x_exponent, need_weight_grad)
    if not forward_dfp:
        with torch.autocast(x.device.type, enabled=False):
            y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return y.contiguous(memory_format=_memory_format(channels_last)), x_padded, x_exponent
    wq = layout.quantize_channels_last(weight, DFPSpec(headroom, axis=0 if weight_channel else None))
    nonfinite = layout.nonfinite(e_rows, wq.exponent)
    if nonfinite is True:
        return _nan((n, cout, oh, ow), x, channels_last), x_padded, x_exponent
    cout_g, cg = cout // groups, channels // groups
    extra = channels - c
    w_taps = torch.nn.functional.pad(wq.mantissa, (0, extra)) if extra else wq.mantissa  # (Cout, KH, KW, C'/G)
    w_cols = w_taps.reshape(groups, cout_g, kh * kw * cg).transpose(1, 2)  # (G, K, Cout/G)
    k = w_cols.shape[1]
    # K-blocks: x's row blocks (a kernel row of taps where a group's channels are one), or all of K
    row_block = input_groups[0]
    kblock = (kw * cg if row_block == cg else row_block) if row_block else max(k, 1)
    ew = wq.exponent.reshape(groups, 1, cout_g) if wq.exponent.dim() > 0 else wq.exponent.reshape(1, 1, 1)
    ew = ew.expand(groups, -(-k // kblock), cout_g).contiguous()
    y = _ops.conv_gemm_impl(x_rows, e_rows, headroom, w_cols, ew, headroom, kblock, [kh, kw], stride, dilation, bias)
    return _to_nchw(layout.nan_where(y, nonfinite), channels_last), x_padded, x_exponent


@functools.lru_cache(maxsize=1024)
def _input_layout(
    c: int, groups: int, kw: int, headroom: int, input_rows: bool, grad_weight_block: int, pixels: int
) -> tuple[int, tuple[int, int]]:
    """The quantized input's channels C' and exponent groups (row_block, group_samples),
    (0, 0) for one exponent, as ``conv2d_impl`` says; ``pixels``: output pixels per sample."""
    channels = _padded_channels(c, groups)
    if not (input_rows and _input_rows_fill_chains(kw, channels // groups, headroom)):
        return channels, (0, 0)
    row_block = _grad_input_block(channels // groups, headroom, rows=True)
    return channels, (row_block, _ops.input_group_samples(grad_weight_block, pixels))


def _forward_in_one_call(backend, x, weight, bias, stride, padding, dilation, groups, *switches):
    """The layer's forward in one call of ``backend`` where it has one (``forward_plan``)
    and takes the layer (float32, channels-last x, consistent shapes): (y (N, OH, OW,
    Cout), x_padded, exponent), or None where it does not, or NaN/Inf is met.
    switches: (headroom, weight_channel, grad_weight_block, input_rows, need_weight_grad)."""
    plan = _forward_plan(backend, tuple(x.shape), x.stride(), x.dtype, tuple(weight.shape), weight.stride(),
                         weight.dtype, _bias_fits(bias, weight), tuple(stride), tuple(padding), tuple(dilation),
                         groups, *switches)  # fmt: skip
    return plan and plan(x, weight, bias)


def _bias_fits(bias: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the one-call paths can read ``bias`` as raw memory: None, or float32 (Cout,) contiguous."""
    return bias is None or (
        bias.dtype == torch.float32 and tuple(bias.shape) == (weight.shape[0],) and bias.is_contiguous()
    )


@functools.lru_cache(maxsize=1024)
def _forward_plan(backend, x_shape, x_strides, x_dtype, weight_shape, weight_strides, weight_dtype, bias_fits, stride,
                  padding, dilation, groups, headroom, weight_channel, grad_weight_block, input_rows,
                  need_weight_grad):  # fmt: skip
    """``_forward_in_one_call``'s plan from the backend for tensors of these shapes,
    strides and dtypes (made once: a small layer's step spent more time working out the
    core's arguments than computing), or None."""
    planner = getattr(backend, "forward_plan", None)
    (_, c, h, w), (_, _, kh, kw) = x_shape, weight_shape
    oh, ow = (output_size(*args) for args in zip((h, w), (kh, kw), stride, padding, dilation))
    channels_last = torch.empty_strided(x_shape, x_strides, device="meta").permute(0, 2, 3, 1).is_contiguous()
    if not (
        planner is not None
        and x_dtype == weight_dtype == torch.float32
        and bias_fits
        and channels_last
        and _fits_one_call(x_shape, weight_shape, groups, oh, ow)
    ):
        return None
    channels, input_groups = _input_layout(c, groups, kw, headroom, input_rows, grad_weight_block, oh * ow)
    geometry = (stride, padding, dilation, groups)
    return planner(x_shape, weight_shape, weight_strides, geometry, headroom, weight_channel, channels, input_groups,
                   need_weight_grad)  # fmt: skip


def _one_call_output(fused, x: torch.Tensor, channels_last: bool, need_weight_grad: bool):
    """``dfp::conv2d``'s outputs from the one-call forward's."""
    y, x_padded, x_exponent, _statistics = fused
    return _to_nchw(y, channels_last), *_kept_input(x, x_padded, x_exponent, need_weight_grad)


def _kept_input(x: torch.Tensor, x_padded, x_exponent, need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized input and its exponents as ``dfp::conv2d`` returns them: empty
    tensors where no weight gradient can be asked."""
    if need_weight_grad:
        return x_padded, x_exponent
    return x.new_empty(0, dtype=torch.int16), x.new_empty(0, dtype=torch.int32)


def _fits_one_call(input_shape, weight_shape, groups: int, oh: int, ow: int) -> bool:
    """Whether a layer of this input shape and weight shape is non-empty and consistent,
    so that the backend's one-call path may read its tensors as raw memory; anything else
    takes the steps, which say what is wrong."""
    cout, cin_g = weight_shape[:2]
    return (
        len(weight_shape) == len(input_shape) == 4
        and math.prod(weight_shape) > 0
        and math.prod(input_shape) > 0
        and cin_g * groups == input_shape[1]
        and cout % groups == 0
        and min(oh, ow) > 0
    )


def _kept_as_planes(device, kept_shape, weight_shape, stride, dilation, groups) -> bool:
    """Whether the backend keeps grad_weight's padded input with exponents per sample as
    channel planes (``dfp.backends.cpu.kept_input_channel_major``): its strides, the same
    whichever way the forward ran."""
    rule = getattr(backends.active(device), "kept_input_channel_major", None)
    if rule is None:
        return False
    # the batch does not decide it (traced with dynamic shapes, a batch size is symbolic)
    kept = (1, *(int(size) for size in kept_shape[1:]))
    return rule(kept, tuple(int(size) for size in weight_shape), tuple(stride), tuple(dilation), groups)


def _padded_channels(channels: int, groups: int) -> int:
    return channels + channels % 2 if groups == 1 else channels


conv2d = torch.library.custom_op("dfp::conv2d", mutates_args=())(conv2d_impl)


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, headroom, *switches):
    input_rows, channels_last = switches[8:10]  # (weight_channel, ..., grad_input_exponent) do not shape it
    need_weight_grad = switches[10] if len(switches) > 10 else True
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh = output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = output_size(w, kw, stride[1], padding[1], dilation[1])
    y = _empty((n, cout, oh, ow), x, channels_last)
    if not need_weight_grad:
        return y, *_kept_input(x, None, None, False)
    channels = _padded_channels(c, groups)
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    input_rows = input_rows and _input_rows_fill_chains(kw, channels // groups, headroom)
    if input_rows and _kept_as_planes(x.device, (n, hp, wp, channels), weight.shape, stride, dilation, groups):
        x_padded = x.new_empty((n, channels, hp, wp), dtype=torch.int16).permute(0, 2, 3, 1)
    else:
        x_padded = x.new_empty((n, hp, wp, channels), dtype=torch.int16)
    return y, x_padded, x.new_empty((n, channels) if input_rows else (), dtype=torch.int32)


def quantize_channels_last_impl(
    t: torch.Tensor, headroom: int, rounding: int, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (N, C, H, W) -> int16 mantissas (N, H, W, C), contiguous, and the 0-d
    int32 exponent (``NONFINITE`` if ``t`` holds NaN/Inf). ``rounding``: a code of
    ``dfp.format.ROUNDINGS``; ``seed``: int64 0-d tensor, stochastic rounding's (a
    tensor, so the backward can draw it from torch's generator while traced)."""
    spec = DFPSpec(headroom, rounding=ROUNDINGS[rounding])
    q = layout.quantize_channels_last(t, spec, int(seed))
    return q.mantissa.contiguous(), q.exponent


quantize_channels_last = torch.library.custom_op("dfp::quantize_channels_last", mutates_args=())(
    quantize_channels_last_impl
)


@quantize_channels_last.register_fake
def _(t, headroom, rounding, seed):
    n, c, h, w = t.shape
    return t.new_empty((n, h, w, c), dtype=torch.int16), t.new_empty((), dtype=torch.int32)


def conv2d_grad_input_impl(
    grad_q: torch.Tensor,
    grad_exponent: torch.Tensor,
    weight: torch.Tensor,
    input_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    headroom: int,
    weight_channel: bool,
    channels_last: bool,
) -> torch.Tensor:
    """dX (N, C, H, W) float32 from the quantized output gradient ``grad_q`` int16
    (N, OH, OW, Cout) with exponents ``grad_exponent``: 0-d, one per sample (N,), or one
    per image row and block of ``_grad_input_block(Cout/groups, headroom, rows=True)``
    channels (N, OH, blocks); and the float32 weight (Cout, C/groups, KH, KW), quantized
    here (see ``_grad_input_weights``)."""
    layer = getattr(backends.active(grad_q.device), "conv2d_grad_input", None)
    n, _, h, w = input_shape
    cout, _, kh, kw = weight.shape
    rows = grad_exponent.dim() == 3
    block = _grad_input_block(cout // groups, headroom, rows) if weight_channel else 0
    oh, ow = (output_size(*a) for a in zip((h, w), (kh, kw), stride, padding, dilation))
    _check_row_exponents(grad_exponent, n, oh, cout, groups, headroom)
    if (
        layer is not None
        and _grad_input_in_one_call(cout // groups, block)
        and weight.dtype == torch.float32
        and _fits_one_call(input_shape, weight.shape, groups, oh, ow)
        and grad_q.dtype == torch.int16
        and grad_q.is_contiguous()
        and tuple(grad_q.shape) == (n, oh, ow, cout)
        and grad_exponent.dtype == torch.int32
        and (grad_exponent.numel() in (1, n) or rows)
    ):
        grad = layer(grad_q, grad_exponent, weight, input_shape, stride, padding, dilation, groups, headroom,
                     weight_channel, block)  # fmt: skip
        if grad is not None:  # else NaN/Inf: the steps below
            return _to_nchw(grad, channels_last)
    wq = _grad_input_weights(weight, groups, headroom, weight_channel, rows)
    nonfinite = layout.nonfinite(grad_exponent, wq.exponent)
    if nonfinite is True:
        return _nan(input_shape, grad_q, channels_last)
    grad = grad_input(grad_q, grad_exponent, wq, input_shape, stride, padding, dilation)
    return _to_nchw(layout.nan_where(grad, nonfinite), channels_last)


def _check_row_exponents(grad_exponent: torch.Tensor, n: int, oh: int, cout: int, groups: int, headroom: int) -> None:
    """Exponents per image row must come in the blocks of channels grad_input reads."""
    if grad_exponent.dim() != 3:
        return
    block = _grad_input_block(cout // groups, headroom, rows=True)
    if tuple(grad_exponent.shape) != (n, oh, cout // block):
        raise ValueError(
            f"grad_exponent per image row must have shape (N, OH, Cout / {block}) = ({n}, {oh}, {cout // block}) "
            f"(blocks of {block} output channels), got {tuple(grad_exponent.shape)}"
        )


conv2d_grad_input = torch.library.custom_op("dfp::conv2d_grad_input", mutates_args=())(conv2d_grad_input_impl)


@conv2d_grad_input.register_fake
def _(grad_q, grad_exponent, weight, input_shape, *config):
    return _empty(input_shape, weight, config[-1])


def quantize_grad_output_impl(
    t: torch.Tensor,
    headroom: int,
    block: int,
    input_exponent: int,
    block_rounding: int,
    input_rounding: int,
    seed: torch.Tensor,
    channel_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (N, C, H, W) -> (int16 mantissas (N, H, W, C) and int32 exponents) for
    grad_weight, one exponent per block of ``block`` output pixels and channel
    (ceil(N*H*W / block), C), the K-blocks of its reduction over pixels; and for
    grad_input, per tensor (0-d; ``input_exponent`` 1), per sample ((N,); 2) or per image
    row and block of ``channel_block`` channels ((N, H, C / channel_block); 3). An
    output not asked for (``block`` 0, ``input_exponent`` 0) is an empty (0,) mantissa
    and a 0-d exponent. Each rounds its own way (``*_rounding``), from the one ``seed``
    (as in ``quantize_channels_last``). Reads ``t`` twice in all where the backend can;
    ``NONFINITE`` exponents if ``t`` holds NaN/Inf."""
    groups = (None, *GRAD_INPUT_EXPONENTS)[input_exponent]
    rounding = (block_rounding, input_rounding)
    outputs = layout.quantize_gradient(t, headroom, block, groups, rounding, int(seed), channel_block)

    def none():
        return t.new_empty((0,), dtype=torch.int16), t.new_zeros((), dtype=torch.int32)

    q_blocks, e_blocks = outputs[:2] if block else none()
    q_input, e_input = outputs[2:] if input_exponent else none()
    return q_blocks, e_blocks, q_input, e_input


quantize_grad_output = torch.library.custom_op("dfp::quantize_grad_output", mutates_args=())(quantize_grad_output_impl)


@quantize_grad_output.register_fake
def _(t, headroom, block, input_exponent, block_rounding, input_rounding, seed, channel_block=0):
    n, c, h, w = t.shape

    def mantissa(asked: bool) -> torch.Tensor:
        return t.new_empty((n, h, w, c) if asked else (0,), dtype=torch.int16)

    e_blocks = t.new_empty((-(-(n * h * w) // block), c) if block else (), dtype=torch.int32)
    e_shape = {2: (n,), 3: (n, h, c // max(channel_block, 1))}.get(input_exponent, ())
    e_input = t.new_empty(e_shape, dtype=torch.int32)
    return mantissa(block > 0), e_blocks, mantissa(input_exponent > 0), e_input


def conv2d_grad_weight_impl(
    grad_q: torch.Tensor,
    grad_exponent: torch.Tensor,
    input_q: torch.Tensor,
    input_exponent: torch.Tensor,
    weight_shape: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
    headroom: int,
    grad_block: int,
    channels_last: bool,
) -> torch.Tensor:
    """dW (Cout, C/groups, KH, KW) float32 = dY^T im2col(X): ``grad_q`` int16
    (N, OH, OW, Cout) with a 0-d exponent (``grad_block`` 0) or one per block of
    ``grad_block`` output pixels and channel (``quantize_grad_output``); ``input_q`` the
    zero-padded int16 input (N, Hp, Wp, C') from ``dfp::conv2d``, with its exponents (0-d,
    or per group of samples and channel); the reduction runs over N*OH*OW. The columns of
    a padding channel (C' > C) are dropped."""
    cout, cin_g, kh, kw = weight_shape
    if input_exponent.dim():  # the samples of a K-block must share them (the compiled call reads the first's)
        pixels = grad_q.shape[1] * grad_q.shape[2]
        _ops.check_input_exponents(input_exponent, input_q, grad_block or grad_q.shape[0] * pixels, pixels)
    layer = getattr(backends.active(grad_q.device), "conv2d_grad_weight", None)
    if layer is not None and _fits_grad_weight(grad_q, grad_exponent, input_q, input_exponent, weight_shape, stride,
                                               dilation, groups, grad_block):  # fmt: skip
        grad = layer(grad_q, grad_exponent, input_q, input_exponent, weight_shape, stride, dilation, groups, headroom,
                     grad_block, channels_last)  # fmt: skip
        if grad is not None:  # else NaN/Inf: the steps below
            return grad
    nonfinite = layout.nonfinite(grad_exponent, input_exponent)
    if nonfinite is True:
        return _nan(weight_shape, grad_q, channels_last)
    grad = _ops.conv_grad_weight_gemm_impl(
        grad_q, grad_exponent, headroom, input_q, input_exponent, headroom, [kh, kw], stride, dilation, groups,
        grad_block,
    )  # fmt: skip
    grad = layout.nan_where(grad, nonfinite)
    return _to_nchw(grad.view(cout, kh, kw, input_q.shape[3] // groups)[..., :cin_g], channels_last)


def _fits_grad_weight(grad_q, grad_exponent, input_q, input_exponent, weight_shape, stride, dilation, groups, block):
    """``_fits_one_call`` for grad_weight's operands: int16 and int32, contiguous, of
    consistent shapes (dy's exponents per tensor or per block of ``block`` pixels; x's per
    tensor or per sample and channel)."""
    n, hp, wp, channels = input_q.shape
    cout, cin_g, kh, kw = weight_shape
    oh, ow = (output_size(*a) for a in zip((hp, wp), (kh, kw), stride, (0, 0), dilation))
    pixels = n * oh * ow
    blocks = -(-pixels // block) if block > 0 else 0
    # tuples, not torch.Size: its == with a tuple goes through symbolic-shape code (~3 us)
    per_block = tuple(grad_exponent.shape) == (blocks, cout) and (blocks == 1 or block % 2 == 0)
    input_exponents_fit = input_exponent.dim() == 0 or tuple(input_exponent.shape) == (n, channels)
    return (
        min(n, oh, ow, cout, cin_g, kh, kw) > 0
        and input_q.dtype == grad_q.dtype == torch.int16
        and input_exponent.dtype == grad_exponent.dtype == torch.int32
        and all(t.is_contiguous() for t in (grad_q, grad_exponent, input_q))
        and tuple(grad_q.shape) == (n, oh, ow, cout)
        and input_exponent.is_contiguous()
        and input_exponents_fit
        and (grad_exponent.dim() == 0 or per_block)
        and cout % groups == 0
        and channels in (cin_g * groups, cin_g * groups + 1)
        and channels % groups == 0
    )


conv2d_grad_weight = torch.library.custom_op("dfp::conv2d_grad_weight", mutates_args=())(conv2d_grad_weight_impl)


@conv2d_grad_weight.register_fake
def _(grad_q, grad_exponent, input_q, input_exponent, weight_shape, *config):
    return _empty(weight_shape, grad_q, config[-1])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, stride, padding, dilation, groups, headroom, weight_channel = inputs[:9]
    grad_weight_dfp, channels_last = inputs[11], inputs[17]
    _, x_padded, x_exponent = output
    need_weight_grad = ctx.needs_input_grad[1]
    ctx.input_kept = inputs[18:] != (False,)  # need_weight_grad, where passed
    # Keep the int16 input for a DFP16 grad_weight, the float input only for an fp32 one;
    # the weight is the master weight, alive anyway, so it costs nothing to keep.
    keep_q = need_weight_grad and grad_weight_dfp
    keep_x = need_weight_grad and not grad_weight_dfp
    ctx.save_for_backward(x if keep_x else None, weight, x_padded if keep_q else None, x_exponent if keep_q else None)
    ctx.input_shape = list(x.shape)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.config = (headroom, weight_channel, *inputs[10:17])  # the backward's switches, as conv2d_impl takes them
    ctx.channels_last = (channels_last, layout.is_channels_last(weight))


class _BackwardCalls(NamedTuple):
    """What the backward calls: the registered ops (traceable) or their bodies (eager)."""

    quantize: Callable
    quantize_both: Callable
    grad_input: Callable
    grad_weight: Callable
    whole: Callable | None  # all of it at once where it can (``_whole_backward``), else None
    no_seed: Callable  # the seed where nothing draws: a tensor where traced (tracing keeps it), else 0


def _whole_backward(ctx, grad_y, weight, x_padded, x_exponent, seed, made=None):
    """(grad_x, grad_w), each None where not asked, from one call of the backend where
    the eager forward planned one (``_eager_plan``): the bits of the steps in
    ``_backward``. None otherwise. made: grad_y (None) unwritten, as the batch norm behind
    the layer handed it over (``dfp._norm_gradient``)."""
    plan = ctx.plan
    if plan.backward is None:
        return None
    if made is None and (grad_y.dtype != torch.float32 or tuple(grad_y.shape) != plan.grad_y_shape):
        return None
    grads = plan.backward(grad_y, weight, x_padded, x_exponent, int(seed), made)
    if grads is None:  # NaN/Inf
        return None
    return None if grads[0] is None else _to_nchw(grads[0], ctx.channels_last[0]), grads[1]


_TRACEABLE = _BackwardCalls(
    quantize_channels_last,
    quantize_grad_output,
    conv2d_grad_input,
    conv2d_grad_weight,
    None,
    lambda: torch.zeros((), dtype=torch.int64),
)
_EAGER = _BackwardCalls(
    quantize_channels_last_impl,
    quantize_grad_output_impl,
    conv2d_grad_input_impl,
    conv2d_grad_weight_impl,
    _whole_backward,
    lambda: 0,
)


def _backward(ctx, grad_y, calls: _BackwardCalls, made=None):
    """made: grad_y (then None) unwritten, as the batch norm behind the layer handed it
    over, for the one-call backward; written where the steps run."""
    if torch.is_grad_enabled():  # create_graph=True: the backward ops have no derivative
        raise RuntimeError("dfp layers do not support double backward (create_graph=True through a dfp linear/conv2d)")
    _, weight, x_padded, x_exponent = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    _, grad_input_dfp, grad_weight_dfp, rounding, weight_rounding, *_ = ctx.config[1:]
    if need_weight and grad_weight_dfp and not ctx.input_kept:
        raise ValueError(
            "dfp::conv2d ran with need_weight_grad=False, so it cannot give the weight's gradient; pass True"
        )
    grad_x = grad_w = grad_b = None
    # autocast off (its context manager costs more than a small layer's grad_input)
    device = (grad_y if made is None else made.tensors[0]).device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        if (need_input and grad_input_dfp) or (need_weight and grad_weight_dfp):
            # drawn here, from torch's generator, as a tensor so that tracing keeps it
            draws = _STOCHASTIC in (rounding, weight_rounding)
            seed = torch.randint(-(2**63), 2**63 - 1, ()) if draws else calls.no_seed()
            whole = calls.whole and calls.whole(ctx, grad_y, weight, x_padded, x_exponent, seed, made)
            if not whole and made is not None:
                grad_y = made.written()
            grad_x, grad_w = whole or _products(ctx, grad_y, calls, seed)
        else:  # every asked product in fp32
            grad_x, grad_w = _products(ctx, made.written() if made is not None else grad_y, calls, None)
        if need_bias:
            grad_b = grad_y.sum(dim=(0, 2, 3))
    return grad_x, grad_w, grad_b, *([None] * 16)


def _products(ctx, grad_y, calls: _BackwardCalls, seed):
    """(grad_x, grad_w), each None where not asked, step by step; ``seed`` draws the
    stochastic rounding (None where no product is in DFP16)."""
    x, weight, x_padded, x_exponent = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[:2]
    stride, _, dilation, groups = ctx.conv
    (
        headroom,
        weight_channel,
        grad_input_dfp,
        grad_weight_dfp,
        rounding,
        weight_rounding,
        weight_block,
        input_groups,
        _input_rows,
    ) = ctx.config
    input_last, weight_last = ctx.channels_last
    grad_x = grad_w = None
    dfp_input, dfp_weight = need_input and grad_input_dfp, need_weight and grad_weight_dfp
    # grad_weight's reduction runs over pixels: runs of them get exponents there; the
    # quantization for grad_input rides along where dY is read anyway
    fused_weight = dfp_weight and weight_block > 0
    fused_input = dfp_input and (input_groups > 0 or fused_weight)
    if fused_weight or fused_input:
        block, input_exponent = weight_block if fused_weight else 0, input_groups + 1 if fused_input else 0
        rows = GRAD_INPUT_EXPONENTS[input_groups] == "row"
        # int(): traced with dynamic shapes, a channel count is a SymInt, which the cache cannot hash
        row_block = _grad_input_block(int(grad_y.shape[1]) // groups, headroom, rows=True) if rows else 0
        grad_wq, grad_we, grad_q, grad_e = calls.quantize_both(
            grad_y, headroom, block, input_exponent, weight_rounding, rounding, seed, row_block
        )
    if dfp_input and not fused_input:
        grad_q, grad_e = calls.quantize(grad_y, headroom, rounding, seed)
    if dfp_weight and not fused_weight:  # per tensor: the same as grad_input's where it rounds alike
        same = dfp_input and not fused_input and weight_rounding == rounding
        grad_wq, grad_we = (grad_q, grad_e) if same else calls.quantize(grad_y, headroom, weight_rounding, seed)
    if dfp_input:
        config = (headroom, weight_channel, input_last)
        grad_x = calls.grad_input(grad_q, grad_e, weight, ctx.input_shape, *ctx.conv, *config)
    elif need_input:
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_y, *ctx.conv)
    if dfp_weight:
        geometry = (list(weight.shape), stride, dilation, groups, headroom, weight_block, weight_last)
        grad_w = calls.grad_weight(grad_wq, grad_we, x_padded, x_exponent, *geometry)
    elif need_weight:
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, *ctx.conv)
    return grad_x, grad_w


def _backward_traceable(ctx, grad_y, _grad_x_padded, _grad_x_exponent):
    return _backward(ctx, grad_y, _TRACEABLE)


conv2d.register_autograd(_backward_traceable, setup_context=_setup_context)


class EagerConv2d(torch.autograd.Function):
    """``dfp::conv2d`` and its autograd formula on the ops' bodies: the same bits and
    gradients, returning y only; its arguments are x, weight, bias and ``dfp::conv2d``'s
    others as one tuple (stride, padding and dilation as tuples), which is also the key of
    the plan made once per layer shape and format (``_eager_plan``). Eager code uses it
    because torch.library's dispatch and argument handling cost about 0.3 ms per layer
    step (measured on a small layer: 1.25 -> 0.92 ms); traced code keeps the registered ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        ctx.plan = plan = _eager_plan(backends.active(x.device), tuple(x.shape), x.stride(), x.dtype,
                                      tuple(weight.shape), weight.stride(), weight.dtype, _bias_fits(bias, weight),
                                      config, ctx.needs_input_grad[:2])  # fmt: skip
        inputs = (x, weight, bias, *config)
        channels_last, need_weight_grad = config[14], config[15] if len(config) > 15 else True
        # y's batch statistics for a batch norm behind it, where the layer trains and one takes them
        statistics = (
            channels_last and need_weight_grad and worth_handing_over(math.prod(plan.grad_y_shape)) and wanted()
        )
        fused = plan.forward and plan.forward(x, weight, bias, statistics)
        ctx.norm_gradient = None
        if fused is None:  # no one-call forward, or NaN/Inf: the steps
            output = conv2d_impl(*inputs)
        else:
            output = _one_call_output(fused, x, channels_last, need_weight_grad)
            if fused[3]:
                # where the one-call backward can take the norm's input gradient unwritten
                ctx.norm_gradient = Pending() if plan.backward and bias is None else None
                hand_over(output[0], *fused[3], ctx.norm_gradient)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_y):
        made = None
        if ctx.norm_gradient is not None:
            made, grad_y = ctx.norm_gradient.take(grad_y)
        return *_backward(ctx, grad_y, _EAGER, made)[:3], None


class _EagerPlan(NamedTuple):
    """An eager layer's one-call forward and backward from its backend (each None where
    the backend has none or does not take the layer: the steps then), and the output
    gradient's shape the backward expects."""

    forward: Callable | None  # (x, weight, bias) -> (y (N, OH, OW, Cout), x_padded, exponent) or None
    backward: Callable | None  # (dy, weight, x_padded, ex, seed) -> (dx (N, H, W, C) or None, dW or None) or None
    grad_y_shape: tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def _eager_plan(backend, x_shape, x_strides, x_dtype, weight_shape, weight_strides, weight_dtype, bias_fits, config,
                needs) -> _EagerPlan:  # fmt: skip
    """``EagerConv2d``'s plan for tensors of these shapes, strides and dtypes; config:
    ``dfp::conv2d``'s arguments from stride on (pairs as tuples); needs: whether x and the
    weight need gradients. The backward in one call: every asked gradient in DFP16,
    grad_weight's dY in pixel blocks, dW's strides the weight's."""
    stride, padding, dilation, groups, headroom, weight_channel, forward_dfp, input_dfp, weight_dfp = config[:9]
    rounding, weight_rounding, dy_block, input_groups, input_rows, _channels_last = config[9:15]
    need_weight_grad = config[15] if len(config) > 15 else True
    (n, c, h, w), (cout, _, kh, kw) = x_shape, weight_shape
    oh, ow = (output_size(*a) for a in zip((h, w), (kh, kw), stride, padding, dilation))
    forward = forward_dfp and _forward_plan(backend, x_shape, x_strides, x_dtype, weight_shape, weight_strides,
                                            weight_dtype, bias_fits, stride, padding, dilation, groups, headroom,
                                            weight_channel, dy_block, input_rows, need_weight_grad)  # fmt: skip
    need_input, need_weight = needs
    rows = GRAD_INPUT_EXPONENTS[input_groups] == "row"
    weight_block = _grad_input_block(cout // groups, headroom, rows) if weight_channel else 0
    row_block = _grad_input_block(cout // groups, headroom, rows=True) if rows else 0
    planner = getattr(backend, "backward_plan", None)
    backward = None
    if (
        planner is not None
        and (need_input or need_weight)
        and (not need_input or (input_dfp and _grad_input_in_one_call(cout // groups, weight_block)))
        and (not need_weight or (weight_dfp and dy_block > 0))
        and weight_dtype == torch.float32
        and _fits_one_call(x_shape, weight_shape, groups, oh, ow)
    ):
        channels = _input_layout(c, groups, kw, headroom, input_rows, dy_block, oh * ow)[0] if need_weight else c
        weight_last = layout.is_channels_last(torch.empty_strided(weight_shape, weight_strides, device="meta"))
        backward = planner(x_shape, weight_shape, weight_strides, (stride, padding, dilation, groups), channels, headroom,
                           weight_channel, (weight_block, dy_block, row_block),
                           (input_groups, weight_rounding, rounding), needs, weight_last)  # fmt: skip
    return _EagerPlan(forward or None, backward, (n, cout, oh, ow))
