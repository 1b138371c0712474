"""The one op registry: every dfp op is declared here once, as a torch.library custom
op with a fake kernel (so torch.compile can trace it), and runs on the backend chosen
by ``dfp.backends.active()``."""

from __future__ import annotations

import torch

from . import backends
from ._gemm_layout import gemm_layout
from ._patches import im2col, output_size
from .format import DFPSpec, DFPTensor, canonical_view, exponent_shape, mirrored


@torch.library.custom_op("dfp::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, headroom: int, axis: int | None, block: int | None, stochastic: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = DFPSpec(headroom, axis, block)
    (o, n, i), mode, blk = canonical_view(x.shape, spec)
    x3 = x.contiguous().view(o, n, i)
    mantissa, exponent = backends.active().quantize3d(x3, mode, blk, headroom, stochastic, seed)
    return mantissa.view(x.shape), exponent.reshape(exponent_shape(x.shape, spec))


@quantize.register_fake
def _(x, headroom, axis, block, stochastic, seed):
    spec = DFPSpec(headroom, axis, block)
    return x.new_empty(x.shape, dtype=torch.int16), x.new_empty(exponent_shape(x.shape, spec), dtype=torch.int32)


@torch.library.custom_op("dfp::gemm", mutates_args=())
def gemm(
    a: torch.Tensor,
    ea: torch.Tensor,
    ha: int,
    b: torch.Tensor,
    eb: torch.Tensor,
    hb: int,
    kblock: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return backends.active().gemm(a, ea, ha, b, eb, hb, kblock, bias)


@gemm.register_fake
def _(a, ea, ha, b, eb, hb, kblock, bias):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dfp::matmul", mutates_args=())
def matmul(
    x: torch.Tensor,
    y: torch.Tensor,
    headroom: int,
    axis: int | None,
    block: int | None,
    stochastic: bool,
    seed_x: int,
    seed_y: int,
) -> torch.Tensor:
    backend = backends.active()
    fused = getattr(backend, "matmul", None)
    if fused is not None:
        return fused(x, y, headroom, axis, block, stochastic, seed_x, seed_y)
    if x.shape[1] == 0:
        return x.new_zeros((x.shape[0], y.shape[1]))
    spec_x = DFPSpec(headroom, axis, block)
    spec_y = mirrored(spec_x)
    xq = DFPTensor(*quantize(x, headroom, spec_x.axis, block, stochastic, seed_x), spec_x)
    yq = DFPTensor(*quantize(y, headroom, spec_y.axis, block, stochastic, seed_y), spec_y)
    ea, eb, kblock = gemm_layout(xq, yq, ("x", "y"))
    return gemm(xq.mantissa, ea, headroom, yq.mantissa, eb, headroom, kblock, None)


@matmul.register_fake
def _(x, y, headroom, axis, block, stochastic, seed_x, seed_y):
    return x.new_empty((x.shape[0], y.shape[1]))


def _conv_output(x: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> tuple[int, int]:
    """(OH, OW) of a convolution over the padded image x (N, Hp, Wp, C)."""
    return tuple(output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))


@torch.library.custom_op("dfp::conv_gemm", mutates_args=())
def conv_gemm(
    x: torch.Tensor,
    ex: torch.Tensor,
    hx: int,
    w: torch.Tensor,
    ew: torch.Tensor,
    hw: int,
    kblock: int,
    kernel: list[int],
    stride: list[int],
    dilation: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Per group g: y[..., g] = patches_g(x) @ w[g] (+ bias), float32 (N, OH, OW, G*Nout).

    x: contiguous int16 (N, Hp, Wp, C), zero-padded, exponent ex (0-d int32); w: int16
    (G, K, Nout), K = KH*KW*C/G over (kh, kw, ci); ew: int32 (G, KB, Nout), KB =
    ceil(K / kblock); bias: float32 (G*Nout,) or None. The result is the GEMM of the
    materialised patch matrix (``dfp._patches.im2col``), bit for bit.
    """
    groups, k, nout = w.shape
    if k == 0:  # no exponents to read
        y = x.new_zeros((x.shape[0], *_conv_output(x, kernel, stride, dilation), groups * nout), dtype=torch.float32)
        return y if bias is None else y + bias
    fused = getattr(backends.active(), "conv_gemm", None) if x.device.type == "cpu" else None
    if fused is not None:
        return fused(x, ex, hx, w, ew, hw, kblock, kernel, stride, dilation, bias)
    cols = im2col(x, tuple(kernel), tuple(stride), tuple(dilation), groups)
    ea = ex.reshape(1, 1).expand(cols.shape[1], ew.shape[1]).contiguous()
    outputs = [
        gemm(cols[g], ea, hx, w[g], ew[g], hw, kblock, None if bias is None else bias[g * nout : (g + 1) * nout])
        for g in range(groups)
    ]
    return torch.cat(outputs, dim=1).view(x.shape[0], *_conv_output(x, kernel, stride, dilation), groups * nout)


@conv_gemm.register_fake
def _(x, ex, hx, w, ew, hw, kblock, kernel, stride, dilation, bias):
    return x.new_empty((x.shape[0], *_conv_output(x, kernel, stride, dilation), w.shape[0] * w.shape[2]),
                       dtype=torch.float32)  # fmt: skip


@torch.library.custom_op("dfp::conv_grad_weight_gemm", mutates_args=())
def conv_grad_weight_gemm(
    dy: torch.Tensor,
    ey: torch.Tensor,
    hy: int,
    x: torch.Tensor,
    ex: torch.Tensor,
    hx: int,
    kernel: list[int],
    stride: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Per group g: dw[g rows] = dy[..., g]^T @ patches_g(x), float32 (Cout, K).

    dy: contiguous int16 (N, OH, OW, Cout), exponent ey (0-d); x as in ``conv_gemm``.
    The reduction runs over the N*OH*OW output pixels.
    """
    fused = getattr(backends.active(), "conv_grad_weight_gemm", None) if dy.device.type == "cpu" else None
    if fused is not None:
        return fused(dy, ey, hy, x, ex, hx, kernel, stride, dilation, groups)
    cols = im2col(x, tuple(kernel), tuple(stride), tuple(dilation), groups)
    dy2 = dy.reshape(-1, dy.shape[-1])
    pixels, cout = dy2.shape
    cout_g, k = cout // groups, cols.shape[2]
    if pixels == 0:
        return dy.new_zeros((cout, k), dtype=torch.float32)
    ea = ey.reshape(1, 1).expand(cout_g, 1).contiguous()
    eb = ex.reshape(1, 1).expand(1, k).contiguous()
    grads = [
        gemm(dy2[:, g * cout_g : (g + 1) * cout_g].t(), ea, hy, cols[g], eb, hx, pixels, None) for g in range(groups)
    ]
    return torch.cat(grads)


@conv_grad_weight_gemm.register_fake
def _(dy, ey, hy, x, ex, hx, kernel, stride, dilation, groups):
    return dy.new_empty((dy.shape[-1], kernel[0] * kernel[1] * x.shape[-1] // groups), dtype=torch.float32)
