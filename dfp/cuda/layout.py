"""The conv layers' quantizations and windows on CUDA tensors: the fused ops of the backend
contract (``dfp/backends/cpu.py``: ``quantize_input``, ``quantize_gradient``, ``window``;
and ``patch_row_exponents``, the generic forward's exponent matrix),
so that a layer's quantization takes a few launches and no host sync where the generic
path of ``dfp._conv_layout`` takes dozens of torch ops and several syncs; the same bits.
NaN/Inf is marked as the generic path marks it (zero mantissas, every exponent
``NONFINITE``), by the launches themselves: the quantizing kernels read the flag that the
exponents' launches set.

Group maxima come from torch's max-|x| reduction (``torch.linalg.vector_norm``, ord=inf:
exact, NaN and Inf carried into the maximum), exponents and mantissas from
``csrc/cuda/quantize.cu`` (``dfp_exponents``, ``dfp_quantize_grouped``, ``dfp_window``),
which write padded outputs whole, borders included."""

from __future__ import annotations

import torch

from ..format import ROUNDINGS, zeros_exponent
from . import quantize
from .loader import blocks_for, kernel

_FILE = "quantize.cu"
_THREADS = 256
_NEAREST = ROUNDINGS.index("nearest")


def _max_abs(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=dim)


def _exponents(amax: torch.Tensor, headroom: int, nonfinite: torch.Tensor) -> torch.Tensor:
    """int32 exponents of groups with float32 maxima ``amax`` (any shape), ``nonfinite`` set
    where one is NaN or Inf. A maximum's bits are its |x| bits: NaN's sign bit, if set,
    still reads as non-finite."""
    bits = amax.contiguous().view(torch.int32)
    exponent, _ = quantize._exponents(bits.reshape(-1), headroom, nonfinite)
    return exponent.view(amax.shape)


def _grouped(x, out_shape, offset, tiles, exponent, headroom, rounding, seed, nonfinite) -> torch.Tensor:
    """``dfp_quantize_grouped``: x (N, H, W, C) into a new int16 image ``out_shape`` at
    ``offset`` (top, left); tiles (tile_rows, tile_cols, group_columns) name each
    element's exponent; all zeros where the flag ``nonfinite`` is set."""
    n, h, w, c = x.shape
    out = torch.empty(out_shape, dtype=torch.int16, device=x.device)
    quantize._check_size(max(out.numel(), x.numel()))
    seed &= 2**64 - 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    kernel(_FILE, "dfp_quantize_grouped", x.device)(
        (blocks_for(out.numel(), _THREADS, 16 * sms), 1, 1), (_THREADS, 1, 1),
        [x, n, h, w, c, *offset, *out_shape[1:], *tiles, exponent, headroom, rounding,
         quantize._as_int32(seed & quantize._U32), quantize._as_int32(seed >> 32), nonfinite, out],
    )  # fmt: skip
    return out


def quantize_input(x, headroom, padding, channels, row_block, group_samples, for_weight=True):
    """Contiguous float32 x (N, H, W, C) -> the forward's padded mantissas (N, Hp, Wp,
    channels) with exponents per image row and block of ``row_block`` channels
    (N, Hp, channels / row_block), and grad_weight's with exponents per group of
    ``group_samples`` samples and channel, written for each sample (N, channels), or
    None, None where not ``for_weight``. NaN/Inf gives zero mantissas and every exponent
    ``NONFINITE``, with no host sync."""
    from .._conv_layout import window_rows

    n, h, w, c = x.shape
    (ph, pw) = padding
    padded = (n, h + 2 * ph, w + 2 * pw, channels)
    if channels != c:  # a padding channel (odd C): zeros, in the maxima too
        x = torch.nn.functional.pad(x, (0, channels - c))
    blocks = channels // row_block
    nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    # Every exponent before any mantissa: the mantissas' launches see the final flag.
    e_rows = _exponents(_max_abs(x.view(n, h, w, blocks, row_block), (2, 4)), headroom, nonfinite)
    if for_weight:
        groups = -(-n // group_samples)
        sample_max = _max_abs(x.view(n, h * w, channels), (1,))
        if groups * group_samples != n:  # the last group's missing samples: zeros
            sample_max = torch.nn.functional.pad(sample_max, (0, 0, 0, groups * group_samples - n))
        e_groups = _exponents(sample_max.view(groups, group_samples, channels).amax(1), headroom, nonfinite)
    q_rows = _grouped(x, padded, padding, (w, row_block, blocks), e_rows, headroom, _NEAREST, 0, nonfinite)
    e_rows = window_rows(e_rows, (-ph, h + ph), zeros_exponent(headroom))
    if not for_weight:
        quantize.mark_nonfinite(nonfinite, [], [e_rows])
        return q_rows, e_rows, None, None
    q_channels = _grouped(x, padded, padding, (group_samples * h * w, 1, channels), e_groups, headroom, _NEAREST, 0,
                          nonfinite)  # fmt: skip
    e_channels = e_groups.repeat_interleave(group_samples, dim=0)[:n]
    quantize.mark_nonfinite(nonfinite, [], [e_rows, e_channels])
    return q_rows, e_rows, q_channels, e_channels


def _tile_exponents(x: torch.Tensor, rows: int, cols: int, headroom: int, nonfinite: torch.Tensor) -> torch.Tensor:
    """Exponents (ceil(R / rows), C / cols) of the tiles of ``rows`` x ``cols`` of the matrix x (R, C)."""
    r, c = x.shape
    tiles = -(-r // rows)
    whole = x if r % rows == 0 else torch.nn.functional.pad(x, (0, 0, 0, tiles * rows - r))  # zero rows
    return _exponents(_max_abs(whole.view(tiles, rows, c // cols, cols), (1, 3)), headroom, nonfinite)


def quantize_gradient(x, headroom, block, group_rows, rounding, seed, group_cols=0):
    """Contiguous float32 x (rows, cols) per block of ``block`` rows and column (none
    where 0) and per group of ``group_rows`` rows (none where 0) and ``group_cols``
    columns (0: all); ``rounding``: (blocks', groups') codes, one ``seed``. Returns
    ((mantissa, exponent (blocks, cols)) or None, (mantissa, exponent (groups, cols /
    group_cols) or (groups,)) or None). NaN/Inf gives zero mantissas and every exponent
    ``NONFINITE``, with no host sync."""
    rows, cols = x.shape
    nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    width = group_cols or cols
    # Every exponent before any mantissa: the mantissas' launches see the final flag.
    e_blocks = _tile_exponents(x, block, 1, headroom, nonfinite) if block else None
    e_groups = _tile_exponents(x, group_rows, width, headroom, nonfinite) if group_rows else None
    image = x.view(1, rows, 1, cols)
    blocks = groups = None
    if block:
        q = _grouped(image, image.shape, (0, 0), (block, 1, cols), e_blocks, headroom, rounding[0], seed, nonfinite)
        blocks = (q.view(rows, cols), e_blocks)
    if group_rows:
        q = _grouped(image, image.shape, (0, 0), (group_rows, width, cols // width), e_groups, headroom, rounding[1],
                     seed, nonfinite)  # fmt: skip
        groups = (q.view(rows, cols), e_groups if group_cols else e_groups.view(-1))
    quantize.mark_nonfinite(nonfinite, [], [e for e in (e_blocks, e_groups) if e is not None])
    return blocks, groups


def window(x, rows, columns, channels):
    """Rows [r0, r1), columns [c0, c1) of the int16 image x (N, H, W, C) with ``channels``
    channels, zeros past its edges: one launch, each element written once."""
    x = x.contiguous()
    n, h, w, c = x.shape
    (r0, r1), (c0, c1) = rows, columns
    out = torch.empty((n, r1 - r0, c1 - c0, channels), dtype=torch.int16, device=x.device)
    quantize._check_size(max(out.numel(), x.numel()))
    if out.numel():
        kernel(_FILE, "dfp_window", x.device)(
            (blocks_for(out.numel(), _THREADS), 1, 1), (_THREADS, 1, 1),
            [x, n, h, w, c, r0, c0, r1 - r0, c1 - c0, channels, out],
        )  # fmt: skip
    return out


def patch_row_exponents(ex, g, groups, kernel_size, stride, dilation, rows, taps_per_block) -> torch.Tensor:
    """``dfp._ops._patch_row_exponents`` (the forward's exponent of each patch and K-block,
    from the input's per image row and channel block) in one launch."""
    n, hp, blocks = ex.shape
    oh = (hp - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    per_group, row_blocks = blocks // groups, kernel_size[1] // taps_per_block
    out = torch.empty((rows, kernel_size[0] * row_blocks * per_group), dtype=torch.int32, device=ex.device)
    quantize._check_size(max(out.numel(), ex.numel()))
    if out.numel():
        kernel("exponents.cu", "dfp_patch_row_exponents", ex.device)(
            (blocks_for(out.numel(), _THREADS), 1, 1), (_THREADS, 1, 1),
            [ex.contiguous(), hp, blocks, g, per_group, oh, rows // max(n * oh, 1), kernel_size[0], row_blocks,
             stride[0], dilation[0], rows, out],
        )  # fmt: skip
    return out
