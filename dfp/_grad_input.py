"""grad_input of the DFP16 convolution as stride-1 convolutions of the output gradient,
one per phase of the input (the sub-pixel split), each run by the forward's kernel.

Along one axis the forward is y[o] = sum over taps t of x[s*o + d*t] W[t] (padded
coordinates), so dx[u] = sum over s*o + d*t = u of dy[o] W[t]. The positions
u = s*v + r of one phase r (0 <= r < s) receive only from the taps t with
d*t = r (mod s), t_0 < t_1 < ..., through dy[v - c_0 - j*D] with c_0 = (d*t_0 - r)/s and
D = d / gcd(s, d): a stride-1 convolution, dilated by D, of a window of dy with those
taps flipped and the kernel's channel axes swapped. Every element of dx is one GEMM row
whose int32 chains run across taps and output channels, as in the forward: no
(pixels x K) gradient matrix and no col2im of fp32 partial sums. Stride 1 is one phase.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _conv_layout as layout
from . import _ops
from .backends import _buffers
from .format import DFPTensor, zeros_exponent


class _Phase(NamedTuple):
    """One phase along one axis."""

    taps: range  # the kernel taps that reach it (every step-th from the first)
    dilation: int  # D
    window: tuple[int, int]  # the range of dy that its convolution reads; may reach past dy's edges
    first: int  # its first position in dx (unpadded)


def _phases(size: int, kernel: int, stride: int, padding: int, dilation: int) -> list[_Phase]:
    """The phases along an axis of an input of ``size`` that hold at least one position."""
    phases = []
    for r in range(stride):
        v0, v1 = -((r - padding) // stride), (padding + size - 1 - r) // stride  # first and last v in dx
        if v1 < v0:
            continue
        step, d = stride // math.gcd(stride, dilation), dilation // math.gcd(stride, dilation)
        first_tap = next((t for t in range(step) if (dilation * t - r) % stride == 0), kernel)
        taps = range(first_tap, kernel, step)
        c0 = (dilation * first_tap - r) // stride if taps else 0
        window = (v0 - c0 - (len(taps) - 1) * d, v1 - c0 + 1)
        phases.append(_Phase(taps, d, window, stride * v0 + r - padding))
    return phases


def grad_input(
    dy: torch.Tensor, dy_exponent: torch.Tensor, wq: DFPTensor, input_shape, stride, padding, dilation
) -> torch.Tensor:
    """dX (N, H, W, C) float32 of a convolution with symmetric zero ``padding``: ``dy`` int16
    (N, OH, OW, Cout) with exponents ``dy_exponent``, 0-d, one per sample (N,) or one
    per image row and block of Cout/B channels (N, OH, B), whose blocks are then the
    K-blocks (and ``wq``'s blocks, where it has them); ``wq`` the weight quantized for the
    reduction over output channels, mantissa (G, Cout/G, KH, KW, C/G) (``dfp.autograd``)."""
    n, c, h, w = input_shape
    groups, cout_g, kh, kw, _ = wq.mantissa.shape
    block = wq.spec.block
    if block is not None and cout_g % block:  # a K-block must not straddle taps: pad Cout/G with zeros
        wq, dy, cout_g = _pad_output_channels(wq, dy, groups, -(-cout_g // block) * block)
    rows = _phases(h, kh, stride[0], padding[0], dilation[0])
    cols = _phases(w, kw, stride[1], padding[1], dilation[1])
    if len(rows) == len(cols) == 1 and rows[0].taps and cols[0].taps:  # stride 1: dx is the one phase
        return _phase(dy, dy_exponent, wq, rows[0], cols[0])
    dx = _empty((n, h, w, c), dy.device)
    if not all(p.taps for p in rows + cols):  # a phase no tap reaches (a 1x1 kernel at stride 2): zeros
        dx.zero_()
    for row in rows:
        for col in cols:
            if row.taps and col.taps:
                dx[:, row.first :: stride[0], col.first :: stride[1]] = _phase(dy, dy_exponent, wq, row, col)
    return dx


def _phase(dy, dy_exponent, wq: DFPTensor, row: _Phase, col: _Phase) -> torch.Tensor:
    """The convolution that gives one phase of dx, (N, rows, columns, C)."""
    groups, cout_g, _, _, cin_g = wq.mantissa.shape
    taps = len(row.taps) * len(col.taps)
    select = (slice(None), slice(None), _slice(row.taps), _slice(col.taps))
    kernel = _flipped(wq.mantissa[select])  # (G, Cout/G, taps_h, taps_w, C/G)
    w = kernel.permute(0, 2, 3, 1, 4).reshape(groups, taps * cout_g, cin_g)  # K ordered (tap, output channel)
    row_blocks = dy_exponent.dim() == 3 and dy_exponent.shape[2] > 0  # (none: no output channels, K = 0)
    if wq.spec.block is None and row_blocks:  # K-blocks of dy's channel blocks, the weight's one exponent in each
        kblock = dy.shape[3] // dy_exponent.shape[2]
        kblock *= len(col.taps) if kblock == cout_g else 1  # a kernel row of taps reads one row of dy
        ew = wq.exponent.reshape(1, 1, 1).expand(groups, w.shape[1] // kblock, cin_g)
    elif wq.spec.block is None:
        ew, kblock = wq.exponent.reshape(1, 1, 1).expand(groups, 1, cin_g), w.shape[1]
    else:
        exponents = _flipped(wq.exponent[select])  # (G, blocks, taps_h, taps_w, C/G)
        blocks = taps * exponents.shape[1]
        ew, kblock = exponents.permute(0, 2, 3, 1, 4).reshape(groups, blocks, cin_g), wq.spec.block
    h = wq.spec.headroom
    if row_blocks:  # the window's rows past dy's edges are zeros: a group of zeros' exponent
        dy_exponent = layout.window_rows(dy_exponent, row.window, zeros_exponent(h))
    return _ops.conv_gemm_impl(
        layout.window(dy, row.window, col.window), dy_exponent, h, w, ew.contiguous(), h, kblock,
        [len(row.taps), len(col.taps)], [1, 1], [row.dilation, col.dilation], None,
    )  # fmt: skip


def _empty(shape, device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor; on the CPU one of the compiled layers' reused
    buffers: a fresh 8 MB dx came as new pages, and the kernel's zeroing of them on the
    first write made a stride-2 layer's phase copies 20x as slow in a training step."""
    if device.type == "cpu":
        return _buffers.empty(shape, torch.float32)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _slice(taps: range) -> slice:
    return slice(taps.start, taps.stop, taps.step)


def _flipped(t: torch.Tensor) -> torch.Tensor:
    """t with its tap axes (2, 3) reversed; flip copies even a single tap (a linear
    layer's whole weight), so those are left alone."""
    axes = [a for a in (2, 3) if t.shape[a] > 1]
    return t.flip(axes) if axes else t


def _pad_output_channels(wq: DFPTensor, dy: torch.Tensor, groups: int, cout_g: int):
    """wq and dy with each group's output channels padded with zeros to ``cout_g``."""
    pad = cout_g - wq.mantissa.shape[1]
    mantissa = F.pad(wq.mantissa, (0, 0, 0, 0, 0, 0, 0, pad))
    n, oh, ow, _ = dy.shape
    dy = F.pad(dy.reshape(n, oh, ow, groups, -1), (0, pad)).reshape(n, oh, ow, groups * cout_g)
    return DFPTensor(mantissa, wq.exponent, wq.spec), dy, cout_g
