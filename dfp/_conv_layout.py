"""Tensor plumbing of the DFP16 convolution: quantization into channels-last int16,
zero padding, and windows of a channels-last image (zeros past its edges). The input
is quantized once; padding copies int16, never float32.
"""

from __future__ import annotations

import torch

from . import _ops, backends, reference
from ._errors import NonFiniteError
from .format import ROUNDINGS, DFPSpec, DFPTensor, exponent_shape, zeros_exponent

# Exponent that marks a quantized tensor whose source held NaN or Inf: real exponents
# lie within a few hundred of zero, so it never collides with one.
NONFINITE = torch.iinfo(torch.int32).max


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-d ``t`` is laid out channels-last as torch's convolutions see it: a
    convolution's output is channels-last when its input or weight is. Where both layouts
    describe its memory (one channel, e.g. a grayscale batch or a first layer's weight),
    the stride of the channel axis says which was meant: torch.nn.Module.to(
    memory_format=torch.channels_last) makes it 1."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    return not t.is_contiguous() or (t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1)


def _to_channels_last(ndim: int) -> tuple[int, ...]:
    """Permutation (..., C, H, W) -> (..., H, W, C)."""
    return (*range(ndim - 3), ndim - 2, ndim - 1, ndim - 3)


def quantize_channels_last(t: torch.Tensor, spec: DFPSpec, seed: int = 0) -> DFPTensor:
    """float32 ``t`` (..., C, H, W) as a DFPTensor with mantissa (..., H, W, C) (a view,
    possibly strided). ``spec.axis`` may name a leading dimension only.

    Quantizes whichever layout of ``t`` is contiguous, so a channels-last tensor needs
    no float32 copy; otherwise the int16 mantissa is permuted. NaN/Inf in ``t`` gives
    zero mantissas with every exponent ``NONFINITE`` (see ``is_nonfinite``).
    """
    if t.dim() == 4 and spec == DFPSpec(spec.headroom):  # per tensor, nearest: the fused path, if any, unpadded
        fused = _quantize_padded_fused(t, spec.headroom, (0, 0), t.shape[1])
        if fused is not None:
            return DFPTensor(*fused, spec)
    return _quantize_channels_last_unfused(t, spec, seed)


def _quantize_channels_last_unfused(t: torch.Tensor, spec: DFPSpec, seed: int = 0) -> DFPTensor:
    """``quantize_channels_last`` by the backend's generic quantization."""
    perm = _to_channels_last(t.dim())
    permuted = t.permute(perm)
    source = permuted if permuted.is_contiguous() else t
    rounding = ROUNDINGS.index(spec.rounding)
    backend = backends.active(source.device)
    # quantize3d_marked, where the backend has it, marks NaN/Inf as the except clause does, without a host sync
    quantize3d = getattr(backend, "quantize3d_marked", backend.quantize3d)
    try:
        mantissa, exponent = _ops.quantize_with(
            quantize3d, source, spec.headroom, spec.axis, spec.block, rounding, seed
        )
    except NonFiniteError:
        mantissa = source.new_zeros(source.shape, dtype=torch.int16)
        exponent = source.new_full(exponent_shape(source.shape, spec), NONFINITE, dtype=torch.int32)
    if source is t:
        mantissa = mantissa.permute(perm)
        exponent = exponent.permute(perm) if exponent.dim() else exponent
    return DFPTensor(mantissa, exponent, spec)


def quantize_gradient(
    t: torch.Tensor,
    headroom: int,
    block: int,
    input_groups: str | None,
    rounding: tuple[int, int],
    seed: int = 0,
    channel_block: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """An output gradient, float32 ``t`` (N, C, H, W), for both backward products,
    mantissas (N, H, W, C) contiguous:
    - for grad_weight where ``block`` > 0: one exponent per run of ``block`` consecutive
      pixels (in (n, h, w) order) and channel, exponent (ceil(N*H*W / block), C);
    - for grad_input where ``input_groups`` is not None: one exponent per tensor, 0-d
      ("tensor"), per sample (N,) ("sample"), or per image row and block of
      ``channel_block`` channels (N, H, C / channel_block) ("row").
    ``rounding``: how each (grad_weight's, grad_input's) rounds, as codes of
    ``dfp.format.ROUNDINGS``, stochastic rounding from the one ``seed``. Each has the
    bits of quantizing the (N*H*W, C) pixel matrix that way on its own (``block``:
    ``DFPSpec(headroom, axis=0, block=block)``; per sample or row: its rows in groups of
    H*W or W, and columns in blocks), each element's random bits from its index in that
    matrix; the backend may read t twice in all for both.
    Outputs not asked for are None. NaN/Inf in ``t`` gives zero mantissas with every
    exponent ``NONFINITE`` (see ``is_nonfinite``)."""
    n, c, h, w = t.shape
    if input_groups == "row" and (channel_block < 1 or c % channel_block):
        raise ValueError(f"per image row, channel_block must divide the {c} channels, got {channel_block}")
    pixels = t.permute(0, 2, 3, 1).contiguous().view(n * h * w, c)  # no copy where t is channels-last
    group_rows = {None: 0, "tensor": n * h * w, "sample": h * w, "row": w}[input_groups]
    group_cols = channel_block if input_groups == "row" else 0
    block_exponents = (-(-n * h * w // max(block, 1)), c)
    group_exponents = {None: None, "tensor": (), "sample": (n,), "row": (n, h, c // max(channel_block, 1))}
    group_exponents = group_exponents[input_groups]
    if pixels.numel() == 0:  # nothing to read; an empty group has the exponent of a group of zeros
        zeros = pixels.new_zeros((n, h, w, c), dtype=torch.int16)
        empty = zeros_exponent(headroom)
        blocks = (zeros, pixels.new_full(block_exponents, empty, dtype=torch.int32)) if block else None
        groups = (zeros.clone(), pixels.new_full(group_exponents or (), empty, dtype=torch.int32))
        return (*(blocks or (None, None)), *(groups if input_groups else (None, None)))
    fused = getattr(backends.active(t.device), "quantize_gradient", None)
    try:
        if fused is not None:
            blocks, groups = fused(pixels, headroom, block, group_rows, rounding, seed, group_cols)
        else:
            blocks = _ops.quantize_impl(pixels, headroom, 0, block, rounding[0], seed) if block else None
            groups = _quantize_groups(pixels, headroom, group_rows, group_cols, rounding[1], seed)
    except NonFiniteError:
        zeros = pixels.new_zeros(pixels.shape, dtype=torch.int16)
        blocks = (zeros, pixels.new_full(block_exponents, NONFINITE, dtype=torch.int32)) if block else None
        groups = (zeros.clone(), pixels.new_full(group_exponents, NONFINITE, dtype=torch.int32)) if group_rows else None
    q_blocks, e_blocks = (blocks[0].view(n, h, w, c), blocks[1]) if blocks else (None, None)
    if groups is None:
        return q_blocks, e_blocks, None, None
    return q_blocks, e_blocks, groups[0].view(n, h, w, c), groups[1].reshape(group_exponents)


def _quantize_groups(pixels: torch.Tensor, headroom: int, rows: int, cols: int, rounding: int, seed: int):
    """(mantissa, exponent) of the pixel matrix (P, C) per group of ``rows`` rows (none
    where 0) and ``cols`` columns (0: all), by the backend's generic quantization, or
    where the groups split the columns, by the reference's steps in torch ops on the
    matrix's device (a group is no block of memory then, and the random bits follow the
    element's index in the matrix)."""
    if not rows:
        return None
    if not cols:
        q, e = _ops.quantize_impl(pixels.view(-1, rows * pixels.shape[1]), headroom, 0, None, rounding, seed)
        return q, e.view(-1)
    p, c = pixels.shape
    amax = pixels.abs().view(p // rows, rows, c // cols, cols).amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise NonFiniteError("the output gradient holds NaN or Inf")
    e = reference.group_exponents(amax, headroom)
    expanded = e.view(p // rows, 1, c // cols, 1).expand(p // rows, rows, c // cols, cols).reshape(p, c)
    return reference.round_to_exponents(pixels, expanded, headroom, rounding, seed), e


def quantize_padded(
    t: torch.Tensor, headroom: int, padding: tuple[int, int], channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``t`` (N, C, H, W) quantized per tensor (nearest) and zero-padded:
    ``zero_pad(quantize_channels_last(t).mantissa, padding, channels)`` and the 0-d
    exponent, in one pass where the backend fuses them (a channels-last ``t``)."""
    fused = _quantize_padded_fused(t, headroom, padding, channels)
    if fused is not None:
        return fused
    q = _quantize_channels_last_unfused(t, DFPSpec(headroom))
    return zero_pad(q.mantissa, padding, channels), q.exponent


def quantize_input(
    t: torch.Tensor,
    headroom: int,
    padding: tuple[int, int],
    channels: int,
    row_block: int,
    group_samples: int,
    for_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A layer's float32 input ``t`` (N, C, H, W) for its two products, each zero-padded
    as ``quantize_padded`` pads it (to ``channels`` >= C), rounded to nearest:
    - the forward's, one exponent per image row and block of ``row_block`` channels
      (dividing ``channels``), exponents (N, Hp, channels / row_block), rows of padding
      those of a group of zeros;
    - grad_weight's, one per group of ``group_samples`` consecutive samples and channel,
      exponents (N, channels): the group's for each of its samples.
    Returns (forward mantissa, its exponents, grad_weight's mantissa, its exponents), the
    last two None where not ``for_weight`` (no weight gradient is asked). One
    read of t per group of samples where the backend fuses it (a channels-last ``t``);
    NaN/Inf in ``t`` gives zero mantissas with every exponent ``NONFINITE``."""
    n, c, h, w = t.shape
    (ph, pw) = padding
    padded = (n, h + 2 * ph, w + 2 * pw, channels)
    groups, blocks = -(-n // group_samples), channels // row_block
    fused = getattr(backends.active(t.device), "quantize_input", None)
    pixels = t.permute(0, 2, 3, 1)  # (N, H, W, C)
    try:
        if fused is not None and pixels.is_contiguous() and t.numel() > 0:
            return fused(pixels, headroom, padding, channels, row_block, group_samples, for_weight)
        x = torch.nn.functional.pad(pixels.contiguous(), (0, channels - c))  # (N, H, W, channels)
        if not torch.isfinite(x).all():
            raise NonFiniteError("the input holds NaN or Inf")
        a = x.abs()
        row_max = a.view(n, h, w, blocks, row_block).amax(dim=(2, 4)) if w else a.new_zeros((n, h, blocks))
        e_rows = reference.group_exponents(row_max, headroom)
        per_pixel = e_rows.view(n, h, 1, blocks, 1).expand(n, h, w, blocks, row_block).reshape(x.shape)
        q_rows = reference.round_to_exponents(x, per_pixel, headroom, ROUNDINGS.index("nearest"), 0)
        e_rows = window_rows(e_rows, (-ph, h + ph), zeros_exponent(headroom))
        if not for_weight:
            return zero_pad(q_rows, padding), e_rows, None, None
        samples = torch.nn.functional.pad(a.amax(dim=(1, 2)) if h * w else a.new_zeros((n, channels)),
                                          (0, 0, 0, groups * group_samples - n))  # fmt: skip
        e_channels = reference.group_exponents(samples.view(groups, group_samples, channels).amax(1), headroom)
        e_channels = e_channels.repeat_interleave(group_samples, dim=0)[:n]
        q_channels = reference.round_to_exponents(x, e_channels.view(n, 1, 1, channels), headroom,
                                                  ROUNDINGS.index("nearest"), 0)  # fmt: skip
    except NonFiniteError:
        zeros = t.new_zeros(padded, dtype=torch.int16)
        e_rows = t.new_full((n, padded[1], blocks), NONFINITE, dtype=torch.int32)
        if not for_weight:
            return zeros, e_rows, None, None
        return zeros, e_rows, zeros.clone(), t.new_full((n, channels), NONFINITE, dtype=torch.int32)
    return zero_pad(q_rows, padding), e_rows, zero_pad(q_channels, padding), e_channels


def _quantize_padded_fused(
    t: torch.Tensor, headroom: int, padding: tuple[int, int], channels: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``quantize_padded`` by the backend in one pass, or None where it has no such path
    or ``t`` is not channels-last."""
    fused = getattr(backends.active(t.device), "quantize_padded", None)
    permuted = t.permute(_to_channels_last(4))
    if fused is None or not permuted.is_contiguous():
        return None
    try:
        return fused(permuted, headroom, padding, channels)
    except NonFiniteError:
        n, h, w, _ = permuted.shape
        shape = (n, h + 2 * padding[0], w + 2 * padding[1], channels)
        return t.new_zeros(shape, dtype=torch.int16), t.new_full((), NONFINITE, dtype=torch.int32)


def is_nonfinite(*exponents: torch.Tensor) -> bool:
    """Whether any of the quantized tensors with these exponents came from a source
    holding NaN or Inf."""
    # NONFINITE is the largest int32, so a maximum finds it: one call, not (e == x).any()'s three
    return any(e.numel() > 0 and int(e.max()) == NONFINITE for e in exponents)


def nonfinite(*exponents: torch.Tensor) -> bool | torch.Tensor:
    """``is_nonfinite`` where reading the answer is free (the CPU); on a GPU, where it would
    stall the host until every launch so far has run, the answer as a 0-d bool tensor on
    the device, for ``nan_where`` to apply after the product is launched."""
    device = next((e.device for e in exponents), None)
    if device is None or device.type != "cuda":
        return is_nonfinite(*exponents)
    maxima = [e.max() for e in exponents if e.numel() > 0]
    return torch.stack(maxima).max() == NONFINITE if maxima else False


def nan_where(result: torch.Tensor, flag: bool | torch.Tensor) -> torch.Tensor:
    """``result``, or NaN everywhere where the device flag from ``nonfinite`` is set (a
    product of mantissas marked NaN/Inf is no number); ``result`` itself for False."""
    return result.masked_fill(flag, float("nan")) if isinstance(flag, torch.Tensor) else result


def zero_pad(x: torch.Tensor, padding: tuple[int, int], channels: int | None = None) -> torch.Tensor:
    """(N, H, W, C) -> contiguous (N, H + 2*ph, W + 2*pw, channels), zeros around (and in
    the channels past C)."""
    (ph, pw), (h, w) = padding, x.shape[1:3]
    return window(x, (-ph, h + ph), (-pw, w + pw), channels)


def window_rows(e: torch.Tensor, rows: tuple[int, int], fill: int) -> torch.Tensor:
    """Rows [r0, r1) of per-row exponents e (N, H, B), contiguous; ``fill`` where they
    reach past e's edges."""
    (r0, r1), h = rows, e.shape[1]
    out = e.new_full((e.shape[0], r1 - r0, e.shape[2]), fill)
    top, bottom = max(0, -r0), max(0, min(r1, h) - r0)
    out[:, top:bottom] = e[:, r0 + top : r0 + bottom]
    return out


def window(
    x: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int], channels: int | None = None
) -> torch.Tensor:
    """Rows [r0, r1) and columns [c0, c1) of x (N, H, W, C), with ``channels`` >= C
    channels (default C), contiguous; where they reach past x's edges, zeros."""
    n, h, w, c = x.shape
    (r0, r1), (c0, c1), channels = rows, columns, channels or c
    if (r0, r1, c0, c1, channels) == (0, h, 0, w, c):
        return x.contiguous()
    fused = getattr(backends.active(x.device), "window", None)
    if fused is not None and x.dtype == torch.int16:
        return fused(x, (r0, r1), (c0, c1), channels)
    out = x.new_empty(n, r1 - r0, c1 - c0, channels)
    top, left = max(0, -r0), max(0, -c0)  # x's part of out: rows [top, bottom), columns [left, right)
    bottom, right = max(top, min(r1, h) - r0), max(left, min(c1, w) - c0)
    # Only the border is zeroed: the interior is written once, by the copy.
    out[:, :top].zero_()
    out[:, bottom:].zero_()
    out[:, top:bottom, :left].zero_()
    out[:, top:bottom, right:].zero_()
    out[:, top:bottom, left:right, c:].zero_()
    out[:, top:bottom, left:right, :c] = x[:, r0 + top : r0 + bottom, c0 + left : c0 + right]
    return out
