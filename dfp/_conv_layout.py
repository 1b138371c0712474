"""Tensor plumbing of the DFP16 convolution: quantization into channels-last int16,
zero padding, and col2im, the adjoint of im2col (``dfp._patches``) for the strided
grad_input. The input is quantized once; padding copies int16, never float32.
"""

from __future__ import annotations

import torch

from . import _ops
from ._errors import NonFiniteError
from ._patches import output_size
from .format import DFPSpec, DFPTensor, exponent_shape

# Exponent that marks a quantized tensor whose source held NaN or Inf: real exponents
# lie within a few hundred of zero, so it never collides with one.
NONFINITE = torch.iinfo(torch.int32).max


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
    perm = _to_channels_last(t.dim())
    permuted = t.permute(perm)
    source = permuted if permuted.is_contiguous() else t
    stochastic = spec.rounding == "stochastic"
    try:
        mantissa, exponent = _ops.quantize_impl(source, spec.headroom, spec.axis, spec.block, stochastic, seed)
    except NonFiniteError:
        mantissa = source.new_zeros(source.shape, dtype=torch.int16)
        exponent = source.new_full(exponent_shape(source.shape, spec), NONFINITE, dtype=torch.int32)
    if source is t:
        mantissa = mantissa.permute(perm)
        exponent = exponent.permute(perm) if exponent.dim() else exponent
    return DFPTensor(mantissa, exponent, spec)


def is_nonfinite(*tensors: DFPTensor) -> bool:
    """Whether any of the tensors was quantized from a source holding NaN or Inf."""
    # a 0-d exponent (per tensor, the common case) is read directly: one call, not three
    return any(
        (int(t.exponent) == NONFINITE) if t.exponent.dim() == 0 else bool((t.exponent == NONFINITE).any())
        for t in tensors
    )


def zero_pad(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """(N, H, W, C) -> contiguous (N, H + 2*ph, W + 2*pw, C), zeros around."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x.contiguous()
    n, h, w, c = x.shape
    out = x.new_empty(n, h + 2 * ph, w + 2 * pw, c)
    # Only the border is zeroed: the interior is written once, by the copy.
    out[:, :ph].zero_()
    out[:, ph + h :].zero_()
    out[:, ph : ph + h, :pw].zero_()
    out[:, ph : ph + h, pw + w :].zero_()
    out[:, ph : ph + h, pw : pw + w] = x
    return out


def col2im(
    cols: torch.Tensor,
    padded_shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The adjoint of ``im2col``: patch gradients (G, N*OH*OW, KH*KW*C/G) summed into
    the padded input's gradient (N, Hp, Wp, C). One strided add per kernel tap, each
    elementwise, so the result does not depend on the thread count."""
    n, hp, wp, c = padded_shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = output_size(hp, kh, sh, 0, dh), output_size(wp, kw, sw, 0, dw)
    groups = cols.shape[0]
    taps = cols.view(groups, n, oh, ow, kh, kw, c // groups).permute(1, 2, 3, 4, 5, 0, 6)
    if (kh, kw, sh, sw) == (1, 1, 1, 1):  # every input pixel is exactly one patch
        return taps.reshape(n, hp, wp, c)
    out = cols.new_zeros(n, hp, wp, groups, c // groups)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
            columns = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            out[:, rows, columns] += taps[:, :, :, i, j]
    return out.view(n, hp, wp, c)
