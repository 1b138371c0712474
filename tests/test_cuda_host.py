"""dfp.cuda's host code on any machine: the conv layers' fused CUDA ops (dfp/cuda/layout.py,
quantize3d_marked) and the tensor-core GEMM's launches (split K's included) with their
kernels stood in for by the reference's arithmetic on the CPU, against the generic path
and the reference GEMM. What this checks is the Python side (the
launch arguments, shapes, padding, the order that lets a kernel read the final NaN flag,
the marking); the kernels themselves are checked bit for bit on a GPU (tests/test_cuda.py)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from helpers import PATCH_ROW_CASES, int16_operand, on_reference, wide_range

import dfp
import dfp.cuda.ops as cuda_ops
from dfp import DFPSpec, _ops, backends, reference
from dfp import _conv_layout as layout
from dfp._errors import NonFiniteError
from dfp._patches import output_size
from dfp.cuda import gemm as cuda_gemm
from dfp.cuda import layout as cuda_layout
from dfp.cuda import quantize as cuda_quantize
from dfp.format import exact_pow2

NONFINITE_BITS = 0x7F800000


def _seed(low: int, high: int) -> int:
    return ((high & 0xFFFFFFFF) << 32) | (low & 0xFFFFFFFF)


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32) & 0x7FFFFFFF


def _exponents(amax, groups, headroom, exponent, nonfinite):
    bits = amax.to(torch.int64) & 0xFFFFFFFF
    bad = bits >= NONFINITE_BITS
    finite = torch.where(bad, 0, bits).to(torch.int32).view(torch.float32)
    exponent.copy_(torch.where(bad, 0, reference.group_exponents(finite, headroom)))
    if bad.any():
        nonfinite.fill_(1)


def _quantize_grouped(x, n, h, w, c, top, left, oh, ow, oc, tile_rows, tile_cols, group_columns, exponent, headroom,
                      rounding, seed_low, seed_high, nonfinite, out):  # fmt: skip
    image = torch.zeros(n, oh, ow, oc, dtype=torch.int16)
    if not nonfinite[0]:
        r, col = torch.arange(n * h * w)[:, None], torch.arange(c)[None, :]
        e = exponent.reshape(-1)[(r // tile_rows) * group_columns + col // tile_cols]
        q = reference.round_to_exponents(x.reshape(-1, c), e, headroom, rounding, _seed(seed_low, seed_high))
        image[:, top : top + h, left : left + w, :c] = q.view(n, h, w, c)
    out.copy_(image.view(out.shape))


def _window(x, n, h, w, c, r0, c0, oh, ow, oc, out):
    image = torch.zeros(n, oh, ow, oc, dtype=torch.int16)
    rows, columns = slice(max(0, -r0), max(0, min(oh, h - r0))), slice(max(0, -c0), max(0, min(ow, w - c0)))
    image[:, rows, columns, :c] = x[:, rows.start + r0 : rows.stop + r0, columns.start + c0 : columns.stop + c0]
    out.copy_(image)


def _amax_tensor(x, count, vec4, amax):
    assert not vec4 or count % 4 == 0
    amax[0] = _abs_bits(x).max()


def _amax_channel(x, o, n, i, rows_per_block, vec4, amax):
    assert not vec4 or i % 4 == 0
    amax.copy_(_abs_bits(x).view(o, n, i).amax(dim=(0, 2)))


def _quantize(x, count, mode, n, i, block, exponent, headroom, rounding, seed_low, seed_high, vec4, nonfinite, out):
    assert not vec4 or (count % 4 == 0 and (mode == 0 or i % 4 == 0))
    if nonfinite[0]:
        out.zero_()
        return
    x3 = x.reshape(-1, n, i)
    e = exponent.reshape((1, 1, 1) if mode == 0 else (1, n, 1))
    q = reference.round_to_exponents(
        x3.contiguous(), e.expand(x3.shape), headroom, rounding, _seed(seed_low, seed_high)
    )
    out.copy_(q.view(out.shape))


def _quantize_blocks(x, o, n, i, block, headroom, rounding, seed_low, seed_high, mantissa, exponent, nonfinite):
    try:
        q, e = reference.quantize3d(x.contiguous(), 2, block, headroom, rounding, _seed(seed_low, seed_high))
    except NonFiniteError:
        nonfinite.fill_(1)
        return
    mantissa.copy_(q.view(mantissa.shape))
    exponent.copy_(e.reshape(-1))


def _quantize_blocks_vec4(x, o, n, block, lanes, headroom, rounding, seed_low, seed_high, mantissa, exponent,
                          nonfinite):  # fmt: skip
    assert n % 4 == 0 and block % 4 == 0 and lanes in (1, 2, 4, 8, 16, 32)
    _quantize_blocks(x, o, n, 1, block, headroom, rounding, seed_low, seed_high, mantissa, exponent, nonfinite)


def _patch_row_exponents(ex, hp, blocks, g, per_group, oh, ow, kh, row_blocks, sh, dh, rows, out):
    column = torch.arange(out.shape[1])
    b, tap = column % per_group, column // per_group // row_blocks
    pixel_row = torch.arange(rows)[:, None] // ow
    out.copy_(ex.reshape(-1)[((pixel_row // oh) * hp + (pixel_row % oh) * sh + tap * dh) * blocks + g * per_group + b])


def _gemm_scales(e, lines, blocks, line_stride, block_stride, r, s, s_line_stride, s_block_stride):
    lines_of_e = e.as_strided((lines, blocks), (line_stride, block_stride))
    r.copy_(lines_of_e.amax(dim=1))
    s.as_strided((lines, blocks), (s_line_stride, s_block_stride)).copy_(exact_pow2(lines_of_e - r[:, None]).float())


def _epilogue(acc, ra, rb, bias, has_bias):
    v = (acc.double() * exact_pow2(ra[:, None] + rb[None, :])).float()
    return v + bias if has_bias else v


def _add_chain(acc, chain_sum, sa, sb, blk):
    """acc + float32(S) * (sa * sb), each step in fp32 (torch's float32 ops round to nearest)."""
    return acc + chain_sum.float() * (sa[:, blk : blk + 1] * sb[blk : blk + 1, :])


def _gathered(data, rows, columns) -> torch.Tensor:
    """The matrix an operand's offset tables describe (DFP_GATHER, DFP_MMA_GATHER)."""
    return data.view(-1)[rows.long()[:, None] + columns.long()[None, :]]


def _assert_runs_of_8(data, rows, columns) -> None:
    """DFP_MMA_VEC8's promise for gathered operands: every row offset and every 8th column
    offset a multiple of 8, the 7 after it following, the data 16-byte aligned."""
    runs = columns.long().view(-1, 8)
    assert data.data_ptr() % 16 == 0 and bool((rows % 8 == 0).all()) and bool((runs[:, 0] % 8 == 0).all())
    assert torch.equal(runs - runs[:, :1], torch.arange(8).expand_as(runs))


def _gemm_mma(a, lda, bt, ldb, m, n, table, tile_count, *rest, defines):
    rest, tables = rest[:-4], rest[-4:]  # a_rows, a_ks, b_rows, b_ks: read with DFP_MMA_GATHER only
    if defines["DFP_MMA_GATHER"]:
        if defines["DFP_MMA_VEC8"]:
            _assert_runs_of_8(a, *tables[:2])
            _assert_runs_of_8(bt, *tables[2:])
        a, bt = _gathered(a, *tables[:2]), _gathered(bt, *tables[2:])
    tiles = table.view(-1, 4)[:tile_count].tolist()
    slices = [(a[:m, k0 : k0 + length], bt[:n, k0 : k0 + length]) for k0, length, _, _ in tiles]
    _chain_sums_to_out(slices, m, n, table, tile_count, *rest, defines=defines)


def _gemm_int16(a, a_row_stride, a_k_stride, b, b_k_stride, b_col_stride, m, n, k, kblock, chain, sa, sb, kb, ra, rb,
                bias, has_bias, out, a_rows, a_ks, b_ks, b_columns, *, defines):  # fmt: skip
    """The CUDA-core kernel: chains end at a K-block's end or every ``chain`` products of it."""
    if defines.get("DFP_GATHER"):
        a, b = _gathered(a, a_rows, a_ks), _gathered(b, b_ks, b_columns)
    else:
        a, b = a.as_strided((m, k), (a_row_stride, a_k_stride)), b.as_strided((k, n), (b_k_stride, b_col_stride))
    acc = torch.zeros(m, n)
    for blk, k0 in enumerate(range(0, k, kblock)):
        for c0 in range(k0, min(k0 + kblock, k), chain):
            c1 = min(c0 + chain, k0 + kblock, k)
            acc = _add_chain(acc, (a[:, c0:c1].long() @ b[c0:c1].long()).int(), sa.view(m, kb), sb.view(kb, n), blk)
    out.copy_(_epilogue(acc, ra, rb, bias, has_bias))


def _split_limbs(x, rows, ld_row, ld_k, table, tile_count, high, low):
    assert (ld_row, ld_k) == x.stride()
    for t, (k0, length, _, _) in enumerate(table.view(-1, 4)[:tile_count].tolist()):
        v = x[:, k0 : k0 + length].int()
        h = (v + 128) >> 8  # the balanced split: v = 256 h + l, both in [-128, 127]
        high[:, 32 * t : 32 * t + 32] = torch.nn.functional.pad(h, (0, 32 - length))
        low[:, 32 * t : 32 * t + 32] = torch.nn.functional.pad(v - 256 * h, (0, 32 - length))


def _gemm_mma_pipelined(a_high, a_low, b_high, b_low, m, n, table, tile_count, *rest, defines):
    a = (256 * a_high.int() + a_low.int()).view(m, tile_count, 32)
    bt = (256 * b_high.int() + b_low.int()).view(n, tile_count, 32)
    slices = [(a[:, t], bt[:, t]) for t in range(tile_count)]  # whole tiles: the planes pad them with zeros
    _chain_sums_to_out(slices, m, n, table, tile_count, *rest, defines=defines)


def _chain_sums_to_out(slices, m, n, table, tile_count, sa, sb, kb, ra, rb, bias, has_bias, out, splits, chain_base,
                       chain_sums, *, defines):  # fmt: skip
    """The tensor-core kernels' chains, with (A, Bt) of every k tile given."""
    tiles = table.view(-1, 4)[:tile_count].tolist()
    sums_only = defines["DFP_MMA_CHAIN_SUMS"]
    ranges = zip(splits[:-1].tolist(), splits[1:].tolist()) if sums_only else [(0, tile_count)]
    acc = torch.zeros(m, n)
    for first, stop in ranges:
        running = torch.zeros(m, n, dtype=torch.int64)
        for (_, _, end, blk), (a_tile, bt_tile) in zip(tiles[first:stop], slices[first:stop], strict=True):
            running += a_tile.long() @ bt_tile.long().t()
            if end:
                if sums_only:
                    chain_sums[end - 1 - chain_base] = running.int()
                else:
                    acc = _add_chain(acc, running.int(), sa, sb, blk)
                running.zero_()
    if not sums_only:
        out.copy_(_epilogue(acc, ra, rb, bias, has_bias))


def _gemm_add_chains(sums, count, chain_blocks, m, n, sa, sb, kb, ra, rb, bias, has_bias, first, last, acc, out):
    total = torch.zeros(m, n) if first else acc.clone()
    for c in range(count):
        total = _add_chain(total, sums[c], sa, sb, int(chain_blocks[c]))
    (out if last else acc).copy_(_epilogue(total, ra, rb, bias, has_bias) if last else total)


KERNELS = {
    "dfp_exponents": _exponents, "dfp_quantize_grouped": _quantize_grouped, "dfp_window": _window,
    "dfp_amax_tensor": _amax_tensor, "dfp_amax_channel": _amax_channel, "dfp_quantize": _quantize,
    "dfp_quantize_blocks": _quantize_blocks, "dfp_quantize_blocks_vec4": _quantize_blocks_vec4,
    "dfp_patch_row_exponents": _patch_row_exponents,
    "dfp_gemm_scales": _gemm_scales, "dfp_gemm_add_chains": _gemm_add_chains, "dfp_split_limbs": _split_limbs,
}  # fmt: skip


@contextlib.contextmanager
def cuda_on_cpu():
    """Inside: CPU tensors go to dfp.cuda.ops, whose kernels run as KERNELS says."""

    def kernel(file, name, device, **defines):
        if name in ("dfp_gemm_mma", "dfp_gemm_mma_pipelined", "dfp_gemm_int16"):
            run = {"dfp_gemm_mma": _gemm_mma, "dfp_gemm_mma_pipelined": _gemm_mma_pipelined}.get(name, _gemm_int16)
            return lambda grid, block, args: run(*args, defines=defines)
        return lambda grid, block, args: KERNELS[name](*args)

    with pytest.MonkeyPatch.context() as patch:
        for module in (cuda_layout, cuda_quantize, cuda_gemm):
            patch.setattr(module, "kernel", kernel)
        patch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
        patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        patch.setattr(torch.cuda, "current_device", lambda: 0)
        patch.setattr(torch.cuda, "current_stream", lambda device=None: None)
        patch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
        patch.setattr(
            torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=4)
        )
        patch.setattr(backends, "active", lambda device=None: cuda_ops)
        yield


def _same(fn, *args) -> bool:
    """Whether fn(*args) gives the same tensors (None where None) through dfp.cuda.ops's host
    code as through the generic path on the reference backend."""
    want = on_reference(fn, *args)
    with cuda_on_cpu():
        got = fn(*args)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    return all((g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "NaN"])
@pytest.mark.parametrize(
    ("shape", "padding", "channels", "row_block", "group_samples", "for_weight"),
    [((4, 16, 8, 8), (1, 1), 16, 16, 1, True), ((5, 32, 6, 7), (1, 2), 32, 16, 3, True),
     ((2, 64, 4, 5), (0, 0), 64, 32, 1, False), ((3, 15, 5, 4), (1, 1), 16, 16, 2, True)],
)  # fmt: skip
def test_quantize_input(shape, padding, channels, row_block, group_samples, for_weight, nonfinite):
    n, c, h, w = shape
    t = wide_range((n, h, w, c)).permute(0, 3, 1, 2)  # channels-last
    if nonfinite:
        t[1, 2, 3, 1] = float("nan")
    assert _same(layout.quantize_input, t, 2, padding, channels, row_block, group_samples, for_weight)


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "Inf"])
@pytest.mark.parametrize(
    ("shape", "block", "groups", "channel_block", "rounding"),
    [((4, 16, 8, 8), 64, "row", 16, (2, 0)), ((3, 32, 5, 6), 64, "sample", 0, (1, 1)),
     ((2, 64, 4, 5), 32, "tensor", 0, (2, 2)), ((3, 64, 4, 5), 0, "row", 32, (0, 1)), ((2, 16, 3, 3), 64, None, 0, (2, 0))],
)  # fmt: skip
def test_quantize_gradient(shape, block, groups, channel_block, rounding, nonfinite):
    n, c, h, w = shape
    t = wide_range((n, h, w, c)).permute(0, 3, 1, 2)
    if nonfinite:
        t[0, 1, 2, 2] = float("inf")
    assert _same(layout.quantize_gradient, t, 2, block, groups, rounding, 1234567890123, channel_block)


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "NaN"])
@pytest.mark.parametrize(("axis", "block"), [(None, None), (0, None), (1, 8)], ids=["tensor", "channel", "block"])
def test_weights_are_marked_without_raising(axis, block, nonfinite):
    """quantize3d_marked: the weights' quantization (per tensor, per output channel, per
    block of output channels) marks NaN/Inf as the generic path's caught error does."""
    w = wide_range((2, 16, 3, 3, 5))  # (groups, Cout/groups, Cin/groups, KH, KW), as grad_input groups it
    if nonfinite:
        w[1, 3, 0, 2, 4] = float("nan")
    assert _same(_quantized_weight, w, DFPSpec(2, axis, block))


def _quantized_weight(w: torch.Tensor, spec: DFPSpec) -> tuple[torch.Tensor, torch.Tensor]:
    q = layout.quantize_channels_last(w, spec)
    return q.mantissa, q.exponent


def test_window():
    x = int16_operand((2, 5, 6, 3), 2)
    for rows, columns, channels in [((-1, 6), (-2, 7), 4), ((1, 4), (0, 6), 3), ((-2, 8), (-1, 7), 3)]:
        assert _same(layout.window, x, rows, columns, channels)


@pytest.mark.parametrize(
    ("ex_shape", "groups", "kernel", "stride", "dilation", "taps_per_block", "ow"), PATCH_ROW_CASES
)
def test_patch_row_exponents(ex_shape, groups, kernel, stride, dilation, taps_per_block, ow):
    ex = torch.randint(-50, 0, ex_shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    rows = ex_shape[0] * ((ex_shape[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1) * ow
    for g in range(groups):
        want = _ops._patch_row_exponents(ex, g, groups, kernel, stride, dilation, rows, taps_per_block)
        with cuda_on_cpu():
            got = cuda_ops.patch_row_exponents(ex, g, groups, kernel, stride, dilation, rows, taps_per_block)
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("shape", "sums_bytes"),
    [((16, 8192, 144, 2, 2, 64), None),  # a weight gradient: split K, one part
     ((20, 3000, 24, 3, 3, 700), None),  # chains of 128, K-block tails
     ((16, 4096, 40, 2, 2, 256), 16 * 40 * 4 * 20),  # in parts, the fp32 sums carried over
     ((300, 96, 40, 2, 2, 32), None)],  # outputs enough to run whole
    ids=["split", "chains of 128", "parts", "whole"],
)  # fmt: skip
@pytest.mark.parametrize("feed", ["pipelined", "registers"])
def test_tensor_core_gemm(shape, sums_bytes, feed, monkeypatch):
    """The tensor-core GEMM's launches (both feeds: the pipelined one's limb planes too),
    split K's plan, parts and chain offsets included."""
    m, k, n, ha, hb, kblock = shape
    if sums_bytes is not None:
        monkeypatch.setattr(cuda_gemm, "CHAIN_SUMS_BYTES", sums_bytes)
    a, b = int16_operand((m, k), ha, 1), int16_operand((k, n), hb, 2)
    g = torch.Generator().manual_seed(3)
    ea = torch.randint(-40, 10, (m, -(-k // kblock)), generator=g, dtype=torch.int32)
    eb = torch.randint(-40, 10, (-(-k // kblock), n), generator=g, dtype=torch.int32)
    plan = cuda_gemm.split_k_plan(k, kblock, reference.chain_length(ha, hb), -(-m // 128) * -(-n // 128), 132, m * n,
                                  cuda_gemm.CHAIN_SUMS_BYTES)  # fmt: skip
    assert (plan is None) == (m == 300) and (plan is not None and len(plan) > 1) == (sums_bytes is not None)
    monkeypatch.setenv("DFP_CUDA_GEMM", "mma")
    monkeypatch.setenv("DFP_CUDA_MMA_FEED", feed)
    assert _same(_ops.gemm_impl, a, ea, ha, b, eb, hb, kblock, torch.randn(n, generator=g))


@pytest.mark.parametrize(
    ("shape", "block", "aligned", "want"),
    [((5, 128), 32, True, ("dfp_quantize_blocks_vec4", 4)), ((3, 100), 4, True, ("dfp_quantize_blocks_vec4", 1)),
     ((4, 60), 12, True, ("dfp_quantize_blocks_vec4", 4)), ((3, 128), 64, True, ("dfp_quantize_blocks_vec4", 4)),
     ((2, 600), 256, True, ("dfp_quantize_blocks_vec4", 16)), ((2, 2600), 1024, True, ("dfp_quantize_blocks_vec4", 32)),
     ((5, 99), 32, True, ("dfp_quantize_blocks",)), ((5, 128), 32, False, ("dfp_quantize_blocks",)),
     ((4, 120), 30, True, ("dfp_quantize_blocks",))],
)  # fmt: skip
def test_blocks_along_the_last_axis_take_the_float4_kernel_where_they_can(shape, block, aligned, want):
    """Blocks along the last axis in whole, aligned float4s (row length and block multiples of
    4, x 16-byte aligned) go to dfp_quantize_blocks_vec4, with 4 quads per lane and at least 4
    lanes per group of 4 quads or more; the others to dfp_quantize_blocks."""
    x = wide_range(shape)
    if not aligned:
        x = torch.empty(x.numel() + 1)[1:].view(shape).copy_(x)
        assert x.data_ptr() % 16 != 0
    launched = []

    def recorded(file, name, device, **defines):
        run = KERNELS[name]
        return lambda grid, threads, args: (launched.append((name, args)), run(*args))

    with cuda_on_cpu(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_quantize, "kernel", recorded)
        got = cuda_quantize.quantize3d(x.view(*shape, 1), 2, block, 2, 1, 77)
    want_m, want_e = reference.quantize3d(x.view(*shape, 1), 2, block, 2, 1, 77)
    assert torch.equal(got[0], want_m) and torch.equal(got[1], want_e)
    ((name, args),) = launched
    assert (name, *args[4:5]) == want if name == "dfp_quantize_blocks_vec4" else (name,) == want


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset view"])
@pytest.mark.parametrize(("shape", "axis"), [((64, 33), None), ((63, 33), None), ((6, 7, 44), 1), ((6, 7, 45), 1)])
def test_per_tensor_and_channel_launches_read_float4_where_they_can(shape, axis, aligned):
    """dfp_amax_tensor, dfp_amax_channel and dfp_quantize take vec4 = 1 exactly where the
    count (per tensor) or the inner size (per channel) is a multiple of 4 and x is aligned."""
    x = wide_range(shape)
    if not aligned:
        x = torch.empty(x.numel() + 1)[1:].view(shape).copy_(x)
    vec4 = {}

    def recorded(file, name, device, **defines):
        run = KERNELS[name]
        at = {"dfp_amax_tensor": 2, "dfp_amax_channel": 5, "dfp_quantize": 11}.get(name)
        return lambda grid, threads, args: (at is None or vec4.setdefault(name, args[at]), run(*args))

    args = (2, axis, None, 0, 5)
    want = on_reference(torch.ops.dfp.quantize, x, *args)
    with cuda_on_cpu(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_quantize, "kernel", recorded)
        got = torch.ops.dfp.quantize(x, *args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    inner = shape[-1] if axis is not None else x.numel()
    expected = int(aligned and inner % 4 == 0)
    amax = "dfp_amax_tensor" if axis is None else "dfp_amax_channel"
    assert vec4 == {amax: expected, "dfp_quantize": expected}


# (N, Hp, Wp, C, groups, kernel, stride, dilation, Nout per group, input exponents, kblock)
CONVS = {
    "per tensor, groups": (2, 9, 11, 6, 2, (2, 3), (1, 2), (2, 1), 7, "tensor", None),
    "rows, one block per kernel row": (2, 10, 10, 16, 1, (3, 3), (1, 1), (1, 1), 12, "row", 48),
    "rows, blocks of 8, strided": (2, 8, 9, 16, 1, (3, 3), (2, 2), (1, 1), 5, "row", 8),
    "a weight gradient that splits K": (4, 18, 18, 8, 1, (3, 3), (1, 1), (1, 1), 8, "tensor", None),
}


def _conv_operands(case, seed=0):
    """Arguments of dfp::conv_gemm and dfp::conv_grad_weight_gemm, the default format's
    exponents where ``case`` says "row": per image row and channel block in the forward,
    per pair of samples and channel in grad_weight."""
    n, hp, wp, c, groups, kernel, stride, dilation, nout, exponents, kblock = case
    k = kernel[0] * kernel[1] * c // groups
    kblock = kblock or k
    g = torch.Generator().manual_seed(seed)
    x = int16_operand((n, hp, wp, c), 2, seed)
    w = int16_operand((groups, nout, k), 2, seed + 1).transpose(1, 2)
    ew = torch.randint(-30, -5, (groups, -(-k // kblock), nout), generator=g, dtype=torch.int32)
    if exponents == "row":
        ex = torch.randint(-20, -5, (n, hp, c // min(c // groups, kblock)), generator=g, dtype=torch.int32)
    else:
        ex = torch.tensor(-13, dtype=torch.int32)
    bias = torch.randn(groups * nout, generator=g)
    forward = (x, ex, 2, w, ew, 2, kblock, list(kernel), list(stride), list(dilation), bias)
    oh, ow = (output_size(size, kernel[a], stride[a], 0, dilation[a]) for a, size in enumerate((hp, wp)))
    dy = int16_operand((n, oh, ow, groups * nout), 2, seed + 3)
    pixels, pixel_block = n * oh * ow, 2 * oh * ow
    ey = torch.randint(-20, -5, (-(-pixels // pixel_block), groups * nout), generator=g, dtype=torch.int32)
    ex_weight = torch.randint(-20, -5, (n, c), generator=g, dtype=torch.int32).repeat_interleave(2, dim=0)[:n]
    weight = (dy, ey, 2, x, ex_weight, 2, list(kernel), list(stride), list(dilation), groups, pixel_block)
    return forward, weight


@pytest.mark.parametrize("path", ["mma", "int16"])
@pytest.mark.parametrize("name", CONVS)
def test_implicit_convolutions(name, path, monkeypatch):
    """Both convolution GEMMs with their patches read in place (DFP_CUDA_CONV=implicit): the
    gathered kernels' launches (offset tables, the 16-byte loads' promise, split K)."""
    forward, weight = _conv_operands(CONVS[name])
    monkeypatch.setenv("DFP_CUDA_CONV", "implicit")
    monkeypatch.setenv("DFP_CUDA_GEMM", path)
    launched = []
    with cuda_on_cpu():
        record = cuda_gemm.kernel
        monkeypatch.setattr(
            cuda_gemm, "kernel", lambda *args, **defines: launched.append(defines) or record(*args, **defines)
        )
        got = [_ops.conv_gemm_impl(*forward), _ops.conv_grad_weight_gemm_impl(*weight)]
    want = [on_reference(_ops.conv_gemm_impl, *forward), on_reference(_ops.conv_grad_weight_gemm_impl, *weight)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    gathered = [d for d in launched if d.get("DFP_GATHER") or d.get("DFP_MMA_GATHER")]
    assert len(gathered) == 2 * forward[3].shape[0]  # every group's forward and weight gradient
    if path == "mma":
        assert any(d["DFP_MMA_VEC8"] for d in gathered) == (forward[0].shape[3] % 8 == 0)
        if name == "a weight gradient that splits K":
            assert any(d["DFP_MMA_CHAIN_SUMS"] for d in gathered)


@pytest.mark.parametrize("stride", [1, 2])
def test_implicit_conv_layer(stride, monkeypatch):
    """A default-format layer's three products with patches read in place: the forward,
    grad_input's phases (forward convolutions of dY's windows) and grad_weight."""
    monkeypatch.setenv("DFP_CUDA_CONV", "implicit")
    torch.manual_seed(0)
    conv = dfp.nn.Conv2d(16, 16, 3, stride=stride, padding=1, bias=False, fmt="dfp16")
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 9 // stride + stride - 1, 9 // stride + stride - 1)

    def train_step():
        inp = x.clone().requires_grad_()
        y = conv(inp)
        y.backward(grad)
        dw, conv.weight.grad = conv.weight.grad, None
        return y.detach(), inp.grad, dw

    want = on_reference(train_step)
    launched = []
    with cuda_on_cpu():
        record = cuda_gemm.kernel
        monkeypatch.setattr(
            cuda_gemm, "kernel", lambda *args, **defines: launched.append(defines) or record(*args, **defines)
        )
        got = train_step()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    gemms = [d for d in launched if "DFP_MMA_GATHER" in d]
    assert len(gemms) == 2 + stride**2 and all(d["DFP_MMA_GATHER"] for d in gemms)  # every phase of grad_input
