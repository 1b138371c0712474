"""The convolution GEMMs on every backend and CPU path (dfp::conv_gemm,
dfp::conv_grad_weight_gemm): the compiled backend reads patches in the image (even
channel counts; for dW, transposed patches where the output width is even) or gathers
them per cache block, and must give the bits of the GEMM on the materialised patch
matrix (im2col) exactly; and the forward's input, quantized into its padded image."""

from __future__ import annotations

import pytest
import torch
from helpers import int16_operand, on_reference
from torch.library import opcheck

import dfp
from dfp import DFPSpec, _ops
from dfp import _conv_layout as layout
from dfp._patches import output_size

# (N, Hp, Wp, C, groups, kernel, stride, dilation, Nout per group, K-block)
CASES = {
    "3x3": (2, 10, 9, 16, 1, (3, 3), (1, 1), (1, 1), 20, None),
    # an even output width at stride 1 along w: dW reads the transposed patches in place
    "3x3-even-width": (2, 10, 10, 16, 1, (3, 3), (1, 1), (1, 1), 20, None),
    "odd-channels-even-width": (1, 8, 8, 3, 1, (3, 3), (1, 1), (1, 1), 5, None),
    # at most 16 output channels: dW's 12-row tiles, its rows ordered by groups of four
    # input channels (the last group two)
    "narrow-output-even-width": (2, 10, 10, 10, 1, (3, 3), (1, 1), (1, 1), 16, None),
    "depthwise-even-width": (2, 8, 10, 6, 6, (3, 3), (2, 1), (1, 1), 2, None),
    "odd-channels-strided": (1, 7, 7, 3, 1, (3, 3), (2, 2), (1, 1), 5, None),
    # stride 2 along w, an even output and padded width: dW reads the image's rows split
    # into their even and odd columns
    "strided-even-width": (2, 10, 10, 6, 1, (3, 3), (2, 2), (1, 1), 12, None),
    "strided-dilated-even-width": (1, 9, 12, 4, 1, (2, 3), (1, 2), (2, 2), 7, None),
    "1x1-strided-even-width": (2, 8, 8, 6, 1, (1, 1), (2, 2), (1, 1), 5, None),
    "groups-dilated": (3, 8, 11, 6, 2, (2, 3), (1, 2), (2, 1), 7, None),
    "even-groups-strided-dilated": (2, 9, 10, 8, 2, (3, 3), (2, 1), (1, 2), 6, None),
    "kblock-even": (2, 9, 9, 8, 1, (3, 3), (1, 1), (1, 1), 9, 4),
    "kblock-odd-depthwise": (2, 9, 9, 9, 3, (3, 1), (1, 1), (1, 1), 4, 3),
    "batch-0": (0, 5, 5, 4, 1, (3, 3), (1, 1), (1, 1), 4, None),
    "1x1": (2, 4, 4, 10, 1, (1, 1), (1, 1), (1, 1), 3, None),
    "many-slices": (1, 20, 20, 96, 1, (3, 3), (1, 1), (1, 1), 40, None),
}


def _operands(case, seed=0):
    n, hp, wp, c, groups, kernel, stride, dilation, nout, kblock = case
    k = kernel[0] * kernel[1] * c // groups
    kblock = kblock or max(k, 1)
    x = int16_operand((n, hp, wp, c), 2, seed)
    w = int16_operand((groups, nout, k), 2, seed + 1).transpose(1, 2)  # strided, as the layers pass it
    g = torch.Generator().manual_seed(seed + 2)
    ew = torch.randint(-30, -5, (groups, -(-k // kblock), nout), generator=g, dtype=torch.int32)
    ex = torch.tensor(-13, dtype=torch.int32)
    bias = torch.randn(groups * nout, generator=g)
    return x, ex, w, ew, kblock, list(kernel), list(stride), list(dilation), bias


@pytest.mark.parametrize("name", CASES)
def test_conv_gemm_equals_gemm_on_im2col(backend, name):
    x, ex, w, ew, kblock, kernel, stride, dilation, bias = _operands(CASES[name])
    args = (x, ex, 2, w, ew, 2, kblock, kernel, stride, dilation, bias)
    got = torch.ops.dfp.conv_gemm(*args)
    want = on_reference(torch.ops.dfp.conv_gemm, *args)
    oh, ow = (output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))
    assert got.shape == (x.shape[0], oh, ow, w.shape[0] * w.shape[2])
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", CASES)
def test_conv_grad_weight_gemm_equals_gemm_on_im2col(backend, name):
    x, ex, w, _, _, kernel, stride, dilation, _ = _operands(CASES[name])
    groups = CASES[name][4]
    oh, ow = (output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))
    dy = int16_operand((x.shape[0], oh, ow, groups * w.shape[2]), 2, 7)
    ey = torch.tensor(-9, dtype=torch.int32)
    args = (dy, ey, 2, x, ex, 2, kernel, stride, dilation, groups)
    got = torch.ops.dfp.conv_grad_weight_gemm(*args)
    want = on_reference(torch.ops.dfp.conv_grad_weight_gemm, *args)
    assert got.shape == (dy.shape[-1], w.shape[1])
    assert torch.equal(got, want)


@pytest.mark.parametrize("kblock", [2, 6, 32])
@pytest.mark.parametrize("name", CASES)
def test_conv_grad_weight_gemm_with_pixel_blocks_equals_gemm_on_im2col(backend, name, kblock):
    """dy with an exponent per block of output pixels and channel (the K-blocks of the
    reduction; 6 and 32 leave a shorter last block in most cases), spread over 40
    binades: the compiled layouts (gathered, transposed, pointwise) give the reference's
    bits."""
    x, ex, w, _, _, kernel, stride, dilation, _ = _operands(CASES[name])
    groups = CASES[name][4]
    oh, ow = (output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))
    dy = int16_operand((x.shape[0], oh, ow, groups * w.shape[2]), 2, 7)
    g = torch.Generator().manual_seed(8)
    blocks = -(-(dy.numel() // dy.shape[-1]) // kblock)
    ey = torch.randint(-40, 0, (blocks, dy.shape[-1]), generator=g, dtype=torch.int32)
    args = (dy, ey, 2, x, ex, 2, kernel, stride, dilation, groups, kblock)
    got = torch.ops.dfp.conv_grad_weight_gemm(*args)
    assert torch.equal(got, on_reference(torch.ops.dfp.conv_grad_weight_gemm, *args))


@pytest.mark.parametrize("kblock", [2, 32])
@pytest.mark.parametrize(
    "name",
    [
        "3x3",
        "3x3-even-width",
        "narrow-output-even-width",
        "odd-channels-strided",
        "strided-even-width",
        "groups-dilated",
        "1x1",
    ],
)
def test_conv_grad_weight_gemm_with_input_exponents_per_sample_and_channel(backend, name, kblock):
    """x with an exponent per sample and channel, 60 binades apart, beside dY's pixel
    blocks: a K-block takes the exponents of the sample of its first pixel, on every
    compiled layout as on the reference; where blocks straddle samples they must share
    theirs (else a clear error)."""
    x, _, w, _, _, kernel, stride, dilation, _ = _operands(CASES[name])
    groups = CASES[name][4]
    oh, ow = (output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))
    dy = int16_operand((x.shape[0], oh, ow, groups * w.shape[2]), 2, 7)
    g = torch.Generator().manual_seed(9)
    ey = torch.randint(
        -40, 0, (-(-(dy.numel() // dy.shape[-1]) // kblock), dy.shape[-1]), generator=g, dtype=torch.int32
    )
    samples = _ops.input_group_samples(kblock, oh * ow)
    ex = torch.randint(-60, 0, (x.shape[0], x.shape[3]), generator=g, dtype=torch.int32)
    shared = ex[::samples].repeat_interleave(samples, dim=0)[: x.shape[0]]
    args = (dy, ey, 2, x, shared, 2, kernel, stride, dilation, groups, kblock)
    got = torch.ops.dfp.conv_grad_weight_gemm(*args)
    assert torch.equal(got, on_reference(torch.ops.dfp.conv_grad_weight_gemm, *args))
    if samples > 1 and x.shape[0] > 1:
        with pytest.raises(ValueError, match="must be the same for each group of"):
            torch.ops.dfp.conv_grad_weight_gemm(dy, ey, 2, x, ex, 2, kernel, stride, dilation, groups, kblock)
    with pytest.raises(ValueError, match=r"ex must be a 0-d int32 exponent or int32 \(N, C\)"):
        torch.ops.dfp.conv_grad_weight_gemm(dy, ey, 2, x, ex[:, :1], 2, kernel, stride, dilation, groups, kblock)


def test_conv_grad_weight_gemm_with_all_max_pixel_blocks_is_exact(backend):
    """Every mantissa at +max or -max in blocks of 32 pixels (one chain each): the int32
    chains cannot overflow (a naive int32 sum of the 128 products would), and with one
    exponent everywhere the result is the integer sum, rounded once to fp32 (4 equal
    chains), times 2^(ex + ey)."""
    x = torch.full((2, 10, 10, 16), 8191, dtype=torch.int16)
    x[1] = -8191
    dy = torch.full((2, 8, 8, 4), -8191, dtype=torch.int16)
    ey = torch.full((4, 4), -20, dtype=torch.int32)
    ex = torch.tensor(-10, dtype=torch.int32)
    got = torch.ops.dfp.conv_grad_weight_gemm(dy, ey, 2, x, ex, 2, [3, 3], [1, 1], [1, 1], 1, 32)
    assert torch.equal(got, torch.zeros_like(got))  # the two images cancel
    dy[1] = 8191  # now they add: 128 products of 8191^2 per weight, 4 chains of 32
    got = torch.ops.dfp.conv_grad_weight_gemm(dy, ey, 2, x, ex, 2, [3, 3], [1, 1], [1, 1], 1, 32)
    assert torch.equal(got, torch.full_like(got, -(8191 * 8191 * 128) * 2.0**-30))


@pytest.mark.parametrize("ex,ey", [(-100, -60), (90, 40)])
def test_conv_gemms_with_extreme_exponents_round_once(backend, ex, ey):
    """Every row of a convolution's patches has the input's exponent; with scales beyond
    the fp32 range, results are subnormal or Inf exactly as the double-precision
    epilogue gives them, in the forward and in dW (both of its layouts)."""
    for name in ("3x3", "3x3-even-width"):
        x, _, w, _, _, kernel, stride, dilation, _ = _operands(CASES[name])
        x_exponent, other = torch.tensor(ex, dtype=torch.int32), torch.tensor(ey, dtype=torch.int32)
        ew = torch.full((1, 1, w.shape[2]), ey, dtype=torch.int32)
        oh, ow = (output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))
        dy = int16_operand((x.shape[0], oh, ow, 8), 2, 7)
        for op, args in (
            (torch.ops.dfp.conv_gemm, (x, x_exponent, 2, w, ew, 2, w.shape[1], kernel, stride, dilation, None)),
            (torch.ops.dfp.conv_grad_weight_gemm, (dy, other, 2, x, x_exponent, 2, kernel, stride, dilation, 1)),
        ):
            got = op(*args)
            assert torch.equal(got, on_reference(op, *args))
            beyond = torch.isinf(got) if ex > 0 else (got != 0) & (got.abs() < 2**-126)
            assert beyond.any()


def test_conv_gemms_worst_case_values_do_not_overflow(backend):
    """All mantissas at +max over a long K, where a naive int32 sum would overflow: the
    chains keep every product; the result equals the reference and the exact sum to
    fp32 accuracy."""
    n, c, nout = 2, 256, 8
    m = 2**13 - 1
    x = torch.full((n, 10, 10, c), m, dtype=torch.int16)
    w = torch.full((1, 9 * c, nout), m, dtype=torch.int16)
    zero = torch.zeros((), dtype=torch.int32)
    ew = torch.zeros((1, 1, nout), dtype=torch.int32)
    forward = (x, zero, 2, w, ew, 2, 9 * c, [3, 3], [1, 1], [1, 1], None)
    dy = torch.full((n, 8, 8, nout), m, dtype=torch.int16)
    weight = (dy, zero, 2, x, zero, 2, [3, 3], [1, 1], [1, 1], 1)
    for op, args, terms in (
        (torch.ops.dfp.conv_gemm, forward, 9 * c),
        (torch.ops.dfp.conv_grad_weight_gemm, weight, n * 64),
    ):
        got = op(*args)
        assert torch.equal(got, on_reference(op, *args))
        exact = terms * m * m
        assert exact > 2**31 - 1
        assert torch.allclose(got.double(), torch.full_like(got, exact, dtype=torch.float64), rtol=2e-7, atol=0)


@pytest.mark.parametrize("name", ["3x3", "groups-dilated", "kblock-odd-depthwise"])
def test_opcheck_conv_gemms(name):
    x, ex, w, ew, kblock, kernel, stride, dilation, bias = _operands(CASES[name])
    opcheck(torch.ops.dfp.conv_gemm.default, (x, ex, 2, w, ew, 2, kblock, kernel, stride, dilation, bias))
    groups = CASES[name][4]
    oh, ow = (output_size(x.shape[1 + a], kernel[a], stride[a], 0, dilation[a]) for a in range(2))
    dy = int16_operand((x.shape[0], oh, ow, groups * w.shape[2]), 2, 7)
    ey = torch.tensor(-9, dtype=torch.int32)
    opcheck(torch.ops.dfp.conv_grad_weight_gemm.default, (dy, ey, 2, x, ex, 2, kernel, stride, dilation, groups))


@pytest.mark.parametrize("channels", [16, 3])
def test_input_quantized_into_the_padded_image_as_quantized_then_padded(backend, channels):
    """The forward's input goes straight into its zero-padded int16 image on the compiled
    backend (channels-last input): the bits of quantizing, then padding; an odd channel
    count gets a zero channel."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn((2, channels, 5, 6), generator=g) * 3).contiguous(memory_format=torch.channels_last)
    out_channels = channels + channels % 2
    got, exponent = layout.quantize_padded(x, 2, (1, 2), out_channels)
    q = on_reference(layout.quantize_channels_last, x, DFPSpec(2))
    assert torch.equal(got, layout.zero_pad(q.mantissa, (1, 2), out_channels))
    assert torch.equal(exponent, q.exponent)


@pytest.mark.parametrize("channels, groups", [(16, 1), (3, 1), (6, 2), (64, 1)])
@pytest.mark.parametrize("samples", [1, 2, 4])
def test_input_quantized_per_row_for_the_forward_and_per_sample_and_channel_for_grad_weight(
    backend, channels, groups, samples
):
    """The compiled backend's one read per group of samples gives the generic steps' bits
    (the reference's rounding on the reference backend): rows of padding and a row of
    zeros the zero group's exponent, a huge element its row block's and its channel's
    range, 3 samples in groups of 2 or 4 (the last one short); rounded to nearest, each
    row block's bits are those of quantizing it alone. Without grad_weight's copy (no
    weight gradient asked) the forward's is the same. NaN makes every exponent NONFINITE,
    with or without it."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn((3, channels, 5, 6), generator=g) * torch.exp2(
        torch.randint(-30, 30, (3, 1, 5, 1), generator=g).float()
    )
    t[0, :, 2] = 0.0
    t[2, channels - 1, 3, 4] = 1e30
    t = t.contiguous(memory_format=torch.channels_last)
    out_channels = channels + channels % 2 if groups == 1 else channels
    row_block = dfp.autograd._grad_input_block(out_channels // groups, 2, rows=True)
    args = (t, 2, (1, 2), out_channels, row_block, samples)
    got, want = layout.quantize_input(*args), on_reference(layout.quantize_input, *args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    q_rows, e_rows, q_channels, e_channels = got
    assert q_rows.shape == q_channels.shape == (3, 7, 10, out_channels)
    assert e_rows.shape == (3, 7, out_channels // row_block) and e_channels.shape == (3, out_channels)
    assert (e_rows[:, 0] == -149 - 13 + 1).all() and (e_rows[0, 3] == -149 - 13 + 1).all()
    assert torch.equal(e_channels, e_channels[::samples].repeat_interleave(samples, dim=0)[:3])
    real = min(row_block, channels)  # 3 channels: a block of 4 with the zero one
    alone = t[1, :real, 4].t().contiguous()  # sample 1's image row 4 (padded row 5), first block
    q, e = _ops.quantize_impl(alone, 2, None, None, 0, 0)
    assert torch.equal(q_rows[1, 5, 2:8, :real], q) and int(e) == e_rows[1, 5, 0]
    forward_only = layout.quantize_input(*args, for_weight=False)
    assert torch.equal(forward_only[0], q_rows) and torch.equal(forward_only[1], e_rows)
    assert forward_only[2:] == (None, None)
    t[1, 0, 0, 0] = float("nan")
    for for_weight in (True, False):
        quantized = layout.quantize_input(*args, for_weight=for_weight)
        for q, e in zip(*[iter(quantized[: 4 if for_weight else 2])] * 2):
            assert (e == layout.NONFINITE).all() and not q.any()


@pytest.mark.parametrize("channels", [64, 40, 33])
def test_input_of_a_linear_layer_quantized_per_sample_block(backend, channels):
    """A linear layer's input (N, C, 1, 1), one pixel per sample: its row blocks are runs
    of channels (the compiled backend's own path), grad_weight's groups 32 samples (the
    last one short); the generic steps' bits, with and without grad_weight's copy."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn((70, channels, 1, 1), generator=g) * torch.exp2(
        torch.randint(-40, 40, (70, channels, 1, 1), generator=g).float()
    )
    t[3] = 0.0
    t = t.contiguous(memory_format=torch.channels_last)
    out_channels = channels + channels % 2
    row_block = dfp.autograd._grad_input_block(out_channels, 2, rows=True)
    args = (t, 2, (0, 0), out_channels, row_block, 32)
    for for_weight in (True, False):
        got = layout.quantize_input(*args, for_weight=for_weight)
        want = on_reference(layout.quantize_input, *args, for_weight=for_weight)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[1].shape == (70, 1, out_channels // row_block) and out_channels // row_block > 1


@pytest.mark.parametrize(
    "rows,columns,channels",
    [
        ((-1, 6), (-2, 8), 4),  # zero padding all around
        ((1, 4), (2, 5), 4),  # inside
        ((-3, 2), (3, 9), 4),  # past the top and the right edge
        ((5, 7), (-4, -1), 4),  # wholly outside
        ((-1, 6), (-1, 7), 6),  # added channels
        ((0, 5), (0, 6), 5),  # only added channels
    ],
)
def test_window_as_the_generic_copy(backend, rows, columns, channels):
    """A window of an int16 image (grad_input's padded dY; the forward's padding where it
    is not fused): the compiled backend's one-pass copy against the generic one."""
    x = int16_operand((2, 5, 6, 4), 2, 3)
    got = layout.window(x, rows, columns, channels)
    assert got.shape == (2, rows[1] - rows[0], columns[1] - columns[0], channels)
    assert torch.equal(got, on_reference(layout.window, x, rows, columns, channels))
    assert torch.equal(layout.window(x[:0], rows, columns, channels), got[:0])


@pytest.mark.parametrize("channels", [6, 8, 24, 32])  # 8, 24, 32: whole vectors of channels, the compiled fast paths
@pytest.mark.parametrize("rounding", [0, 1, 2])  # codes of dfp.format.ROUNDINGS
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_quantized_as_the_pixel_matrix_per_block_sample_and_tensor(backend, channels_last, rounding, channels):
    """quantize_gradient gives the bits of quantizing the (N*H*W, C) pixel matrix with
    DFPSpec(axis=0, block), per sample and per tensor on the reference backend (reading
    it twice for two of them on the compiled one): a block of zeros included (the zero
    group's exponent), a block whose one huge element takes the whole range, and runs of
    4 pixels that straddle samples (35 pixels each); NaN makes every exponent NONFINITE."""
    g = torch.Generator().manual_seed(3)
    shape = (2, channels, 5, 7)
    t = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, (2, channels, 1, 1), generator=g).float())
    t[0, :, 0, :] = 0.0  # pixels 0-6: the first block of 4 is zeros
    t[1, 2, 3, 4] = 1e30
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t
    pixels = t.permute(0, 2, 3, 1).reshape(-1, channels)
    other = (rounding + 1) % 3  # grad_input's rounding, another one
    want_blocks = on_reference(_ops.quantize_impl, pixels, 2, 0, 4, rounding, 11)
    want_tensor = on_reference(_ops.quantize_impl, pixels, 2, None, None, other, 11)
    want_samples = on_reference(_ops.quantize_impl, pixels.reshape(2, -1), 2, 0, None, other, 11)
    for groups, (q, e) in (("tensor", want_tensor), ("sample", want_samples)):
        q_blocks, e_blocks, q_input, e_input = layout.quantize_gradient(t, 2, 4, groups, (rounding, other), seed=11)
        assert torch.equal(q_blocks.reshape(-1, channels), want_blocks[0]) and torch.equal(e_blocks, want_blocks[1])
        assert torch.equal(q_input.reshape(q.shape), q) and torch.equal(e_input, e.reshape(e_input.shape))
    assert (e_blocks[0] == -149 - 13 + 1).all()
    assert layout.quantize_gradient(t, 2, 4, None, (rounding, 0), seed=11)[2:] == (None, None)
    q_blocks, e_blocks, q_input, e_input = layout.quantize_gradient(t, 2, 0, "sample", (0, other), seed=11)
    assert (q_blocks, e_blocks) == (None, None) and torch.equal(e_input, want_samples[1].view(2))
    t[0, 0, 0, 0] = float("nan")
    for groups in ("sample", "row"):
        q_blocks, e_blocks, q_input, e_input = layout.quantize_gradient(t, 2, 4, groups, (rounding, rounding), 0, 2)
        assert (e_blocks == layout.NONFINITE).all() and (e_input == layout.NONFINITE).all()
        assert not q_blocks.any() and not q_input.any()


@pytest.mark.parametrize("width", [7, 2])
@pytest.mark.parametrize("channels", [6, 8, 24, 32])
@pytest.mark.parametrize("rounding", [0, 1, 2])  # codes of dfp.format.ROUNDINGS
def test_gradient_quantized_per_image_row_and_channel_block(backend, rounding, channels, width):
    """grad_input's output gradient per image row and block of channels: the bits of
    the reference (each element's random bits from its index in the pixel matrix), with
    grad_weight's blocks of 4 pixels beside it, straddling rows (7 pixels each) or made
    of two (2 pixels each); rounded to nearest, each group's bits are those of
    quantizing it alone (a row of zeros included: the zero group's exponent)."""
    g = torch.Generator().manual_seed(5)
    shape, block = (2, channels, 5, width), channels // 2
    t = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, (2, 1, 5, 1), generator=g).float())
    t[0, :, 1] = 0.0
    t = t.contiguous(memory_format=torch.channels_last)
    args = (t, 2, 4, "row", (rounding, rounding), 11, block)
    got, want = layout.quantize_gradient(*args), on_reference(layout.quantize_gradient, *args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[3].shape == (2, 5, 2) and (got[3][0, 1] == -149 - 13 + 1).all()
    if rounding == 0:
        for n, row, b in ((0, 0, 0), (1, 4, 1), (0, 1, 1)):
            alone = t[n, b * block : (b + 1) * block, row].t().contiguous()  # (width, block)
            q, e = _ops.quantize_impl(alone, 2, None, None, 0, 0)
            assert torch.equal(got[2][n, row, :, b * block : (b + 1) * block], q) and int(e) == got[3][n, row, b]


@pytest.mark.parametrize("rounding", [0, 1, 2])  # codes of dfp.format.ROUNDINGS
def test_the_layer_quantizations_clamp_at_the_top_of_the_fp32_range(backend, rounding):
    """Only where a group's largest |x| lies at the top of fp32's range can rounding reach
    past the largest mantissa (group_exponent cannot add its one there), and only there
    do the compiled kernels clamp: the forward's input (per tensor, per row and per
    sample and channel) and the output gradient (grad_weight's blocks, grad_input's rows)
    give the reference's bits, 2^13 - 1 at most, with the top's groups beside others."""
    g = torch.Generator().manual_seed(6)
    t = torch.randn((2, 16, 4, 5), generator=g)
    t[0, 3, 1, 2] = torch.finfo(torch.float32).max
    t[1, 5, 2, 1] = -3.4e38
    t = t.contiguous(memory_format=torch.channels_last)
    padded, exponent = layout.quantize_padded(t, 2, (1, 1), 16)
    q = on_reference(layout.quantize_channels_last, t, DFPSpec(2))
    assert torch.equal(padded, layout.zero_pad(q.mantissa, (1, 1), 16)) and torch.equal(exponent, q.exponent)
    args = (t, 2, (1, 1), 16, 8, 1)
    got, want = layout.quantize_input(*args), on_reference(layout.quantize_input, *args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    args = (t, 2, 4, "row", (rounding, rounding), 11, 8)
    got_dy, want_dy = layout.quantize_gradient(*args), on_reference(layout.quantize_gradient, *args)
    assert all(torch.equal(a, b) for a, b in zip(got_dy, want_dy, strict=True))
    for mantissas in (padded, got[0], got[2], got_dy[0], got_dy[2]):
        assert int(mantissas.abs().max()) == 2**13 - 1


@pytest.mark.parametrize("name", CASES)
def test_conv_gemm_with_an_exponent_per_image_equals_gemm_on_im2col(backend, name):
    """An exponent per image (grad_input's output gradient per sample), 30 binades apart:
    each row of patches has its image's, in the compiled kernel's epilogue as in the
    reference's materialised exponents."""
    x, _, w, ew, kblock, kernel, stride, dilation, bias = _operands(CASES[name])
    g = torch.Generator().manual_seed(9)
    ex = torch.randint(-40, -10, (x.shape[0],), generator=g, dtype=torch.int32)
    args = (x, ex, 2, w, ew, 2, kblock, kernel, stride, dilation, bias)
    assert torch.equal(torch.ops.dfp.conv_gemm(*args), on_reference(torch.ops.dfp.conv_gemm, *args))


def _channel_block(channels_per_group: int) -> int:
    """The largest divisor of a group's channels up to 8: several blocks per tap where the
    channels allow."""
    return max(b for b in range(1, 9) if channels_per_group % b == 0)


@pytest.mark.parametrize("kernel_rows", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_conv_gemm_with_an_exponent_per_image_row_and_channel_block_equals_gemm_on_im2col(backend, name, kernel_rows):
    """Exponents per image row and channel block (grad_input's output gradient, row by
    row), 30 binades apart and some of a row of zeros (-161: its chains vanish against
    the others): the compiled kernel's chain scales per row group give the reference's
    bits on the materialised patch exponents; K-blocks of one tap and channel block, or
    (``kernel_rows``: a group's channels in one block) of a kernel row of taps."""
    x, _, w, _, _, kernel, stride, dilation, bias = _operands(CASES[name])
    n, hp, _, c = x.shape
    groups, k, nout = w.shape
    block = c // groups if kernel_rows else _channel_block(c // groups)
    kblock = kernel[1] * block if kernel_rows else block
    g = torch.Generator().manual_seed(11)
    ex = torch.randint(-40, -10, (n, hp, c // block), generator=g, dtype=torch.int32)
    ex[:, ::3, ::2] = -161
    ew = torch.randint(-30, -5, (groups, k // kblock, nout), generator=g, dtype=torch.int32)
    args = (x, ex, 2, w, ew, 2, kblock, kernel, stride, dilation, bias)
    assert torch.equal(torch.ops.dfp.conv_gemm(*args), on_reference(torch.ops.dfp.conv_gemm, *args))


@pytest.mark.parametrize("weight_blocks", [False, True])
@pytest.mark.parametrize("name", ["3x3", "3x3-even-width", "many-slices", "groups-dilated"])
def test_conv_gemm_with_mostly_shared_row_exponents_equals_gemm_on_im2col(backend, name, weight_blocks):
    """Image rows that mostly share one exponent, as a layer's activations do: the compiled
    GEMM leaves the chain scales out of tiles whose scales are all 1 and keeps them in the
    tiles that read a row of another exponent (or of the zero group's); both give the reference's bits
    (with the weight's exponents per K-block too, ``weight_blocks``, or one for all)."""
    x, _, w, _, _, kernel, stride, dilation, bias = _operands(CASES[name])
    n, hp, _, c = x.shape
    groups, k, nout = w.shape
    kblock = kernel[1] * c // groups  # a kernel row of taps
    ex = torch.full((n, hp, groups), -20, dtype=torch.int32)  # a block per group
    ex[:, 4] = -23  # the tiles that read image row 4 scale its chains by 2^-3
    ex[:, 0] = -161  # the zero group's exponent, as padding rows have
    g = torch.Generator().manual_seed(12)
    ew = torch.randint(-30, -5, (groups, 1 if not weight_blocks else k // kblock, nout), generator=g, dtype=torch.int32)
    ew = ew.expand(-1, k // kblock, -1).contiguous()
    args = (x, ex, 2, w, ew, 2, kblock, kernel, stride, dilation, bias)
    assert torch.equal(torch.ops.dfp.conv_gemm(*args), on_reference(torch.ops.dfp.conv_gemm, *args))


def test_conv_gemm_rejects_row_exponents_whose_blocks_straddle_taps():
    x, _, w, _, _, kernel, stride, dilation, _ = _operands(CASES["3x3"])
    ex = torch.zeros((x.shape[0], x.shape[1], 2), dtype=torch.int32)  # blocks of 8 of the 16 channels
    ew = torch.zeros((1, 9, w.shape[2]), dtype=torch.int32)  # K-blocks of 16: one per tap
    with pytest.raises(ValueError, match="kblock must be that block"):  # not a kernel row either: two blocks per tap
        _ops.conv_gemm_impl(x, ex, 2, w, ew, 2, 16, kernel, stride, dilation, None)
    with pytest.raises(ValueError, match=r"one per image row and block of C/B channels"):
        _ops.conv_gemm_impl(x, ex[:, :3], 2, w, ew, 2, 16, kernel, stride, dilation, None)
