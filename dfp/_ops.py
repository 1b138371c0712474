"""The one op registry: every dfp op is declared here once, as a torch.library custom
op with a fake kernel (so torch.compile can trace it), and runs on the backend chosen
by ``dfp.backends.active()``.

Each op's body is also a plain function, ``<op>_impl``: dfp's own ops call those
inside their bodies, since a nested call through torch's dispatcher costs about 0.1 ms
(measured), more than a small layer's quantization itself. Everything else calls the
ops (``torch.ops.dfp.*``), except where ``plain_eager`` holds: eager calls on ordinary
tensors (the layers, ``dfp.quantize``, ``dfp.ops.gemm``, ``dfp.matmul``) run the bodies too."""

from __future__ import annotations

import math

import torch

from . import backends
from ._gemm_layout import gemm_layout
from ._patches import im2col, output_size
from .format import DFPSpec, DFPTensor, canonical_view, exponent_shape, mirrored


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Eager code on ordinary tensors, where an op's body may run without torch.library's
    dispatch; tracing (torch.compile, export) and tensor subclasses (fake tensors) need
    the registered ops."""
    return not torch.compiler.is_compiling() and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def quantize_impl(
    x: torch.Tensor, headroom: int, axis: int | None, block: int | None, rounding: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounding``: a code of ``dfp.format.ROUNDINGS``; ``seed``: stochastic rounding's."""
    return quantize_with(backends.active(x.device).quantize3d, x, headroom, axis, block, rounding, seed)


def quantize_with(quantize3d, x, headroom, axis, block, rounding, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_impl`` by a backend's ``quantize3d`` or a function of its signature."""
    spec = DFPSpec(headroom, axis, block)
    (o, n, i), mode, blk = canonical_view(x.shape, spec)
    mantissa, exponent = quantize3d(x.contiguous().view(o, n, i), mode, blk, headroom, rounding, seed)
    return mantissa.view(x.shape), exponent.reshape(exponent_shape(x.shape, spec))


quantize = torch.library.custom_op("dfp::quantize", mutates_args=())(quantize_impl)


@quantize.register_fake
def _(x, headroom, axis, block, rounding, seed):
    spec = DFPSpec(headroom, axis, block)
    return x.new_empty(x.shape, dtype=torch.int16), x.new_empty(exponent_shape(x.shape, spec), dtype=torch.int32)


def gemm_impl(
    a: torch.Tensor,
    ea: torch.Tensor,
    ha: int,
    b: torch.Tensor,
    eb: torch.Tensor,
    hb: int,
    kblock: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    _check_gemm(a, ea, b, eb, kblock, bias)
    return backends.active(a.device).gemm(a, ea, ha, b, eb, hb, kblock, bias)


def _check_gemm(a, ea, b, eb, kblock, bias) -> None:
    """The dtypes and shapes the backends rely on (the compiled one reads raw memory, so
    a wrong one would read out of bounds, not fail); attribute checks only, no data pass."""
    if a.dtype != torch.int16 or b.dtype != torch.int16 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a and b must be int16 (M, K) and (K, N), got {a.dtype} of shape {tuple(a.shape)} and "
                         f"{b.dtype} of shape {tuple(b.shape)}")  # fmt: skip
    (m, k), n = a.shape, b.shape[1]
    blocks = -(-k // kblock) if kblock > 0 else -1
    shapes_ok = k == 0 or (ea.shape == (m, blocks) and eb.shape == (blocks, n))  # K = 0 reads no exponent
    if ea.dtype != torch.int32 or eb.dtype != torch.int32 or not shapes_ok:
        raise ValueError(f"ea and eb must be int32 (M, KB) and (KB, N) with KB = ceil(K / kblock) = ({m}, {blocks}) "
                         f"and ({blocks}, {n}), kblock >= 1; got {ea.dtype} {tuple(ea.shape)}, {eb.dtype} "
                         f"{tuple(eb.shape)}, kblock={kblock}")  # fmt: skip
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,)):
        raise ValueError(f"bias must be float32 ({n},), got {bias.dtype} of shape {tuple(bias.shape)}")


gemm = torch.library.custom_op("dfp::gemm", mutates_args=())(gemm_impl)


@gemm.register_fake
def _(a, ea, ha, b, eb, hb, kblock, bias):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


def matmul_impl(
    x: torch.Tensor,
    y: torch.Tensor,
    headroom: int,
    axis: int | None,
    block: int | None,
    rounding: int,
    seed_x: int,
    seed_y: int,
) -> torch.Tensor:
    fused = getattr(backends.active(x.device), "matmul", None)
    if fused is not None:
        return fused(x, y, headroom, axis, block, rounding, seed_x, seed_y)
    if x.shape[1] == 0:
        return x.new_zeros((x.shape[0], y.shape[1]))
    spec_x = DFPSpec(headroom, axis, block)
    spec_y = mirrored(spec_x)
    xq = DFPTensor(*quantize_impl(x, headroom, spec_x.axis, block, rounding, seed_x), spec_x)
    yq = DFPTensor(*quantize_impl(y, headroom, spec_y.axis, block, rounding, seed_y), spec_y)
    ea, eb, kblock = gemm_layout(xq, yq, ("x", "y"))
    return gemm_impl(xq.mantissa, ea, headroom, yq.mantissa, eb, headroom, kblock, None)


matmul = torch.library.custom_op("dfp::matmul", mutates_args=())(matmul_impl)


@matmul.register_fake
def _(x, y, headroom, axis, block, rounding, seed_x, seed_y):
    return x.new_empty((x.shape[0], y.shape[1]))


def _conv_output(x: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int]) -> tuple[int, int]:
    """(OH, OW) of a convolution over the padded image x (N, Hp, Wp, C)."""
    return tuple(output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))


def _check_image(x: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int], groups: int) -> None:
    """The checks the compiled backend relies on (it reads raw memory)."""
    if x.dtype != torch.int16 or x.dim() != 4:
        raise ValueError(f"x must be int16 (N, Hp, Wp, C), got {x.dtype} of shape {tuple(x.shape)}")
    if len(kernel) != 2 or len(stride) != 2 or len(dilation) != 2 or min(*kernel, *stride, *dilation) < 1:
        raise ValueError(
            f"kernel, stride and dilation must be two positive ints each, got {kernel}, {stride}, {dilation}"
        )
    if groups < 1 or x.shape[3] % groups:
        raise ValueError(f"groups={groups} must be positive and divide the {x.shape[3]} channels of x")
    if min(_conv_output(x, kernel, stride, dilation)) < 1:
        raise ValueError(f"the {kernel} kernel (dilation {dilation}) does not fit in the padded image {tuple(x.shape)}")


def conv_gemm_impl(
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

    x: contiguous int16 (N, Hp, Wp, C), zero-padded, exponents ex int32: 0-d, (N,) (one
    per image, every patch lying in one image) or (N, Hp, B) (one per image row and block
    of C/B channels, dividing C/G; K-blocks are then those blocks, ``kblock`` = C/B, or
    where a group's channels are one block, a kernel row of them, ``kblock`` = KW*C/G:
    its taps read one image row); w: int16
    (G, K, Nout), K = KH*KW*C/G over (kh, kw, ci); ew: int32 (G, KB, Nout), KB =
    ceil(K / kblock); bias: float32 (G*Nout,) or None. The result is the GEMM of the
    materialised patch matrix (``dfp._patches.im2col``), bit for bit.
    """
    groups, k, nout = w.shape
    _check_image(x, kernel, stride, dilation, groups)
    if w.dtype != torch.int16 or k != kernel[0] * kernel[1] * x.shape[3] // groups:
        raise ValueError(f"w must be int16 (G, KH*KW*C/G, Nout) = ({groups}, {kernel[0] * kernel[1] * x.shape[3] // groups}, "
                         f"Nout), got {w.dtype} of shape {tuple(w.shape)}")  # fmt: skip
    if bias is not None and bias.shape != (groups * nout,):
        raise ValueError(f"bias must have shape ({groups * nout},), got {tuple(bias.shape)}")
    if k == 0:  # no exponents to read
        y = x.new_zeros((x.shape[0], *_conv_output(x, kernel, stride, dilation), groups * nout), dtype=torch.float32)
        return y if bias is None else y + bias
    if kblock < 1 or ew.shape != (groups, -(-k // kblock), nout):
        raise ValueError(f"ew must have shape (G, ceil(K / kblock), Nout) = ({groups}, {-(-k // max(kblock, 1))}, "
                         f"{nout}) with kblock >= 1, got {tuple(ew.shape)} and kblock={kblock}")  # fmt: skip
    _check_image_exponents(ex, x, groups, kblock, kernel[1])
    if ex.numel() == 0:  # no images: nothing is read
        ex = ex.new_zeros(())
    fused = getattr(backends.active(x.device), "conv_gemm", None)
    if fused is not None:
        return fused(x, ex, hx, w, ew, hw, kblock, kernel, stride, dilation, bias)
    cols = _patches(x, kernel, stride, dilation, groups)
    ea = _patch_exponents(x, ex, kblock, kernel, stride, dilation, groups, ew.shape[1])
    outputs = [
        gemm_impl(
            cols[g], ea[g], hx, w[g], ew[g], hw, kblock, None if bias is None else bias[g * nout : (g + 1) * nout]
        )
        for g in range(groups)
    ]
    y = outputs[0] if groups == 1 else torch.cat(outputs, dim=1)
    return y.view(x.shape[0], *_conv_output(x, kernel, stride, dilation), groups * nout)


def _patches(x: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int], groups: int):
    """Each group's patch matrix of x, indexed by group: the backend's own (``patches``: read
    in place on CUDA) or ``dfp._patches.im2col``'s."""
    make = getattr(backends.active(x.device), "patches", im2col)
    return make(x, tuple(kernel), tuple(stride), tuple(dilation), groups)


def _patch_exponents(x, ex, kblock, kernel, stride, dilation, groups, blocks) -> list[torch.Tensor]:
    """The exponents ea (rows, KB) of each group's patch matrix in ``conv_gemm``, from the
    image's ex (checked there), ``blocks`` = KB."""
    rows = x.shape[0] * math.prod(_conv_output(x, kernel, stride, dilation))
    if ex.dim() == 3:
        taps_per_block = kblock // (x.shape[3] // ex.shape[2])
        patch_rows = getattr(backends.active(x.device), "patch_row_exponents", _patch_row_exponents)
        return [patch_rows(ex, g, groups, kernel, stride, dilation, rows, taps_per_block) for g in range(groups)]
    return [_row_exponents(ex, rows).expand(rows, blocks).contiguous()] * groups


def _check_image_exponents(ex: torch.Tensor, x: torch.Tensor, groups: int, kblock: int, kw: int) -> None:
    n, hp, _, c = x.shape
    per_row = ex.dim() == 3 and ex.shape[:2] == (n, hp) and ex.shape[2] > 0 and c % ex.shape[2] == 0
    if ex.dtype != torch.int32 or not (ex.shape in ((), (n,)) or per_row):
        raise ValueError(f"ex must be int32 of shape () (per tensor), ({n},) (one per image) or ({n}, {hp}, B) (one "
                         f"per image row and block of C/B channels), got {ex.dtype} of shape {tuple(ex.shape)}")  # fmt: skip
    block, cg = (c // ex.shape[2], c // groups) if per_row else (0, 0)
    if per_row and (cg % block or kblock not in (block, kw * cg if block == cg else block)):
        raise ValueError(f"ex of shape {tuple(ex.shape)} gives blocks of {block} of the {c} channels: they must divide "
                         f"the {cg} channels of a group, and kblock must be that block (or where it is a group's "
                         f"channels, a kernel row of {kw} taps of it, {kw * cg}), got kblock={kblock}")  # fmt: skip


def _patch_row_exponents(ex, g, groups, kernel, stride, dilation, rows, taps_per_block) -> torch.Tensor:
    """(rows, KB) int32: the exponents of group g's patch matrix where the image has one
    per row and channel block, ex (N, Hp, B): K-block (kh, kw, block) of output pixel
    (n, oh, ow) takes ex[n, oh * sh + kh * dh, block]; with ``taps_per_block`` = KW
    (a group's channels in one block), K-block kh does."""
    n, hp, blocks = ex.shape
    oh = output_size(hp, kernel[0], stride[0], 0, dilation[0])
    per_group = blocks // groups
    taps = torch.arange(kernel[0], device=ex.device).view(1, -1) * dilation[0]
    image_rows = torch.arange(oh, device=ex.device).view(oh, 1) * stride[0] + taps
    e = ex[:, image_rows, g * per_group : (g + 1) * per_group]  # (N, OH, KH, blocks of the group)
    e = e.unsqueeze(3).expand(n, oh, kernel[0], kernel[1] // taps_per_block, per_group).reshape(n, oh, 1, -1)
    return e.expand(n, oh, rows // max(n * oh, 1), e.shape[-1]).reshape(rows, -1).contiguous()


def _row_exponents(ex: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, 1): the image's exponent, or each image's for its rows (patches) in order."""
    return ex.reshape(1, 1) if ex.dim() == 0 else ex.repeat_interleave(rows // ex.numel()).view(rows, 1)


conv_gemm = torch.library.custom_op("dfp::conv_gemm", mutates_args=())(conv_gemm_impl)


@conv_gemm.register_fake
def _(x, ex, hx, w, ew, hw, kblock, kernel, stride, dilation, bias):
    return x.new_empty((x.shape[0], *_conv_output(x, kernel, stride, dilation), w.shape[0] * w.shape[2]),
                       dtype=torch.float32)  # fmt: skip


def conv_grad_weight_gemm_impl(
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
    kblock: int = 0,
) -> torch.Tensor:
    """Per group g: dw[g rows] = dy[..., g]^T @ patches_g(x), float32 (Cout, K).

    dy: contiguous int16 (N, OH, OW, Cout) with exponents ey: 0-d (per tensor), or
    (ceil(P / kblock), Cout), one per block of ``kblock`` consecutive output pixels (of the
    P = N*OH*OW in (n, oh, ow) order; kblock even) and channel; x (N, Hp, Wp, C) as in
    ``conv_gemm``, with exponents ex: 0-d, or (N, C), one per sample and channel, a K-block
    taking those of the sample of its first pixel (the samples of a K-block must share
    theirs: ``input_group_samples``). The reduction runs over the P output pixels, its
    K-blocks being dy's blocks.
    """
    _check_image(x, kernel, stride, dilation, groups)
    cout, k = dy.shape[-1], kernel[0] * kernel[1] * x.shape[3] // groups
    if dy.dtype != torch.int16 or dy.shape != (x.shape[0], *_conv_output(x, kernel, stride, dilation), cout):
        raise ValueError(f"dy must be int16 (N, OH, OW, Cout) with (N, OH, OW) = ({x.shape[0]}, "
                         f"{', '.join(map(str, _conv_output(x, kernel, stride, dilation)))}), got {dy.dtype} "
                         f"of shape {tuple(dy.shape)}")  # fmt: skip
    if cout % groups:
        raise ValueError(f"groups={groups} must divide the {cout} channels of dy")
    if dy.numel() == 0 or k == 0:  # no products: the sum is empty
        return dy.new_zeros((cout, k), dtype=torch.float32)
    pixels = dy.numel() // cout
    ey, kblock = _pixel_block_exponents(ey, kblock, pixels, cout)
    check_input_exponents(ex, x, kblock, pixels // max(x.shape[0], 1))
    fused = getattr(backends.active(dy.device), "conv_grad_weight_gemm", None)
    if fused is not None:
        return fused(dy, ey, hy, x, ex, hx, kernel, stride, dilation, groups, kblock)
    cols = _patches(x, kernel, stride, dilation, groups)
    dy2 = dy.reshape(-1, cout)
    cout_g = cout // groups
    eb = _grad_weight_patch_exponents(x, ex, ey.shape[0], kblock, kernel, groups, pixels // x.shape[0])
    grads = [
        gemm_impl(dy2[:, g * cout_g : (g + 1) * cout_g].t(), ey[:, g * cout_g : (g + 1) * cout_g].t().contiguous(),
                  hy, cols[g], eb[g], hx, kblock, None)
        for g in range(groups)
    ]  # fmt: skip
    return grads[0] if groups == 1 else torch.cat(grads)


def _grad_weight_patch_exponents(x, ex, blocks, kblock, kernel, groups, sample_pixels) -> list[torch.Tensor]:
    """The exponents eb (KB, K) of each group's patch matrix in ``conv_grad_weight_gemm``:
    ``blocks`` = KB K-blocks of ``kblock`` output pixels, ``sample_pixels`` = OH*OW; ex as
    checked there."""
    cg, k = x.shape[3] // groups, kernel[0] * kernel[1] * x.shape[3] // groups
    if not ex.dim():
        return [ex.reshape(1, 1).expand(blocks, k).contiguous()] * groups
    # K-block b takes the exponents of the sample of its first pixel; column (tap, ci) ci's
    e = ex[torch.arange(blocks, device=ex.device) * kblock // sample_pixels]
    return [e[:, g * cg : (g + 1) * cg].repeat(1, kernel[0] * kernel[1]) for g in range(groups)]


def input_group_samples(kblock: int, pixels: int) -> int:
    """Samples per group of grad_weight's input exponents: the fewest whole samples of
    ``pixels`` output pixels each that are whole K-blocks of ``kblock`` pixels."""
    return kblock // math.gcd(kblock, max(pixels, 1))


def check_input_exponents(ex: torch.Tensor, x: torch.Tensor, kblock: int, pixels: int) -> None:
    """x's exponents in grad_weight: 0-d, or (N, C) shared by the samples of each K-block
    of ``kblock`` of the ``pixels`` output pixels per sample."""
    if ex.dim() == 0 and ex.dtype == torch.int32:
        return
    shape = (x.shape[0], x.shape[3])
    if ex.dtype != torch.int32 or tuple(ex.shape) != shape:
        raise ValueError(f"ex must be a 0-d int32 exponent or int32 (N, C) = {shape}, one per sample and channel, "
                         f"got {ex.dtype} of shape {tuple(ex.shape)}")  # fmt: skip
    samples = input_group_samples(kblock, pixels)
    # On a GPU reading the answer would stall the host, which the training ops never do: the
    # layers make these exponents so themselves (quantize_input), and direct calls there are
    # taken as given.
    if (
        samples > 1
        and ex.device.type != "cuda"
        and not torch.equal(ex, ex[::samples].repeat_interleave(samples, dim=0)[: shape[0]])
    ):
        raise ValueError(f"the output pixels of a sample are no whole K-blocks of {kblock} (a sample has {pixels}): "
                         f"ex must be the same for each group of {samples} consecutive samples")  # fmt: skip


def _pixel_block_exponents(ey: torch.Tensor, kblock: int, pixels: int, cout: int) -> tuple[torch.Tensor, int]:
    """dy's exponents as (KB, Cout) int32 and the block length: a 0-d (per tensor) ``ey``
    is one block of all ``pixels``."""
    if ey.dim() == 0:
        return ey.reshape(1, 1).expand(1, cout), pixels
    blocks = -(-pixels // kblock) if kblock > 0 else 0
    if ey.dtype != torch.int32 or kblock < 1 or ey.shape != (blocks, cout) or (blocks > 1 and kblock % 2):
        raise ValueError(
            f"ey must be a 0-d int32 exponent or int32 (ceil(pixels / kblock), Cout) = ({blocks}, {cout}) with an "
            f"even kblock >= 1 (or one block), got {ey.dtype} of shape {tuple(ey.shape)} and kblock={kblock}"
        )
    return ey, kblock


conv_grad_weight_gemm = torch.library.custom_op("dfp::conv_grad_weight_gemm", mutates_args=())(
    conv_grad_weight_gemm_impl
)


@conv_grad_weight_gemm.register_fake
def _(dy, ey, hy, x, ex, hx, kernel, stride, dilation, groups, kblock=0):
    return dy.new_empty((dy.shape[-1], kernel[0] * kernel[1] * x.shape[-1] // groups), dtype=torch.float32)
