"""The registered DFP16 layer ops (dfp.autograd): opcheck on every op, torch.compile
without graph breaks, what each product quantizes and what the backward keeps,
stochastic rounding seeded from torch's generator, and GradScaler skipping on inf."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch.library import opcheck

import dfp
from dfp import DFPSpec
from dfp import functional as DF
from dfp._ops import input_group_samples
from dfp.formats import resolve


def _gaussian(shape, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# dfp::conv2d arguments after (x, weight, bias): stride, padding, dilation, groups,
# headroom, weight_channel, forward_dfp, grad_input_dfp, grad_weight_dfp,
# grad_rounding, grad_weight_rounding, grad_weight_block, grad_input_exponent, input_rows, channels_last
# (need_weight_grad, last, left at its default True)
CONV_CONFIGS = {
    "groups-bias": (
        (2, 4, 6, 6),
        (6, 2, 3, 3),
        True,
        ([1, 2], [1, 0], [1, 1], 2, 2, False, True, True, True, False, False, 0, False, False, False),
    ),
    "channel-sr-channels-last": (
        (2, 4, 6, 5),
        (6, 4, 3, 3),
        False,
        ([2, 1], [1, 1], [1, 2], 1, 3, True, True, True, True, True, True, 4, True, False, True),
    ),
    "fp32-products": (
        (2, 4, 5, 5),
        (4, 4, 3, 3),
        True,
        ([1, 1], [1, 1], [1, 1], 1, 2, False, False, False, True, False, True, 2, True, False, False),
    ),
    "linear-batch-0": (
        (0, 8, 1, 1),
        (3, 8, 1, 1),
        True,
        ([1, 1], [0, 0], [1, 1], 1, 2, True, True, True, True, False, True, 32, True, True, False),
    ),
    "input-rows-groups-channels-last": (
        (3, 24, 6, 5),
        (4, 12, 3, 3),
        True,
        ([1, 2], [1, 1], [1, 1], 2, 2, False, True, True, True, 2, 2, 4, 2, True, True),
    ),
    "input-rows-linear": (
        (5, 40, 1, 1),
        (3, 40, 1, 1),
        False,
        ([1, 1], [0, 0], [1, 1], 1, 2, True, True, True, True, 0, 2, 2, 1, True, False),
    ),
    "input-rows-channel-planes": (  # grad_weight's input kept as channel planes on the CPU backend
        (2, 16, 6, 6),
        (16, 16, 3, 3),
        False,
        ([1, 1], [1, 1], [1, 1], 1, 2, False, True, True, True, 0, 2, 4, 2, True, True),
    ),
}


@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_opcheck_conv2d(config):
    x_shape, w_shape, has_bias, rest = CONV_CONFIGS[config]
    x = _gaussian(x_shape, 0).requires_grad_()
    if rest[-1]:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w = _gaussian(w_shape, 1).requires_grad_()
    b = _gaussian(w_shape[:1], 2).requires_grad_() if has_bias else None
    opcheck(torch.ops.dfp.conv2d.default, (x, w, b, *rest))


@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_without_a_weight_gradient_the_forward_is_the_same_and_keeps_no_input(config):
    """need_weight_grad=False (no grad mode, a frozen weight): the same output bits, empty
    tensors for grad_weight's quantized input, which is then not made; the op passes
    opcheck that way too, and its backward refuses a weight gradient it kept nothing for."""
    x_shape, w_shape, has_bias, rest = CONV_CONFIGS[config]
    x = _gaussian(x_shape, 0)
    x = x.to(memory_format=torch.channels_last) if rest[-1] else x
    w, b = _gaussian(w_shape, 1), _gaussian(w_shape[:1], 2) if has_bias else None
    y, x_padded, x_exponent = torch.ops.dfp.conv2d(x, w, b, *rest, True)
    for call in (torch.ops.dfp.conv2d, dfp.autograd.conv2d_impl):
        y_alone, *kept = call(x, w, b, *rest, False)
        assert torch.equal(y_alone, y) and [t.shape for t in kept] == [(0,), (0,)]
        assert [t.dtype for t in kept] == [x_padded.dtype, x_exponent.dtype]
    opcheck(torch.ops.dfp.conv2d.default, (x.requires_grad_(), w, b, *rest, False))
    if rest[8]:  # grad_weight in DFP16 reads what was not made
        y = torch.ops.dfp.conv2d(x, w.requires_grad_(), b, *rest, False)[0]
        with pytest.raises(ValueError, match="need_weight_grad=False"):
            y.sum().backward()


@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_eager_function_gives_the_registered_ops_bits(config):
    """Eager layers run dfp.autograd.EagerConv2d (the op bodies without torch.library's
    dispatch); it must give the op's output and gradients bit for bit, stochastic rounding
    of the gradients included (both draw the seed from torch's generator)."""
    x_shape, w_shape, has_bias, rest = CONV_CONFIGS[config]
    runs = []
    for eager in (False, True):
        x = _gaussian(x_shape, 0)
        x = (x.to(memory_format=torch.channels_last) if rest[-1] else x).requires_grad_()
        w = _gaussian(w_shape, 1).requires_grad_()
        b = _gaussian(w_shape[:1], 2).requires_grad_() if has_bias else None
        torch.manual_seed(5)
        config = tuple(tuple(a) if isinstance(a, list) else a for a in rest)  # pairs as tuples
        y = dfp.autograd.EagerConv2d.apply(x, w, b, config) if eager else torch.ops.dfp.conv2d(x, w, b, *rest)[0]
        y.backward(_gaussian(y.shape, 3))
        runs.append([y.detach(), x.grad, w.grad, None if b is None else b.grad])
    for op_result, eager_result in zip(*runs, strict=True):
        assert (op_result is None and eager_result is None) or torch.equal(op_result, eager_result)


def test_layers_use_the_eager_function_only_on_plain_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(dfp.autograd.EagerConv2d, "apply", lambda *args: calls.append(args) or torch.zeros(1))
    DF.conv2d(_gaussian((1, 2, 4, 4), 0), _gaussian((3, 2, 3, 3), 1))
    assert len(calls) == 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a traced call keeps the registered op, which has a fake kernel
        y = DF.conv2d(torch.empty(1, 2, 4, 4), torch.empty(3, 2, 3, 3))
    assert len(calls) == 1 and y.shape == (1, 3, 2, 2)


def test_opcheck_backward_ops():
    x, w = _gaussian((2, 4, 6, 6), 0), _gaussian((6, 2, 3, 3), 1)
    grad = _gaussian((2, 6, 6, 2), 2)
    seed = torch.tensor(12345, dtype=torch.int64)
    for rounding in (0, 1, 2):  # codes of dfp.format.ROUNDINGS
        opcheck(torch.ops.dfp.quantize_channels_last.default, (grad, 2, rounding, seed))
        for block, input_exponent in ((4, 0), (4, 1), (0, 2), (4, 2)):
            args = (grad, 2, block, input_exponent, rounding, (rounding + 1) % 3, seed)
            opcheck(torch.ops.dfp.quantize_grad_output.default, args)
    grad_q, grad_e = torch.ops.dfp.quantize_channels_last(grad, 2, 0, seed)
    grad_bq, grad_be, grad_sq, grad_se = torch.ops.dfp.quantize_grad_output(grad, 2, 4, 2, 0, 0, seed)
    for weight_channel, channels_last in ((False, False), (True, True)):
        for q, e in ((grad_q, grad_e), (grad_sq, grad_se)):
            args = (q, e, w, [2, 4, 6, 6], [1, 2], [1, 0], [1, 1], 2, 2, weight_channel, channels_last)
            opcheck(torch.ops.dfp.conv2d_grad_input.default, args)
    _, x_padded, x_e = torch.ops.dfp.conv2d(
        x, w, None, [1, 2], [1, 0], [1, 1], 2, 2, False, True, True, True, False, False, 0, False, False, False
    )
    # per sample and channel (12 output pixels per sample: whole blocks of 4)
    x_sample_e = torch.tensor([[-3, -5, -7, -2], [-9, -1, -4, -6]], dtype=torch.int32)
    for channels_last in (False, True):
        args = (grad_q, grad_e, x_padded, x_e, [6, 2, 3, 3], [1, 2], [1, 1], 2, 2, 0, channels_last)
        opcheck(torch.ops.dfp.conv2d_grad_weight.default, args)
        args = (grad_bq, grad_be, x_padded, x_e, [6, 2, 3, 3], [1, 2], [1, 1], 2, 2, 4, channels_last)
        opcheck(torch.ops.dfp.conv2d_grad_weight.default, args)
        args = (grad_bq, grad_be, x_padded, x_sample_e, [6, 2, 3, 3], [1, 2], [1, 1], 2, 2, 4, channels_last)
        opcheck(torch.ops.dfp.conv2d_grad_weight.default, args)


class _Net(torch.nn.Module):
    """conv -> relu -> depthwise conv -> linear, with a bf16 head beside the DFP16 one."""

    def __init__(self, fmt):
        super().__init__()
        self.fmt = fmt
        self.conv = torch.nn.Parameter(_gaussian((8, 3, 3, 3), 0, 0.3))
        self.bias = torch.nn.Parameter(_gaussian((8,), 1))
        self.depthwise = torch.nn.Parameter(_gaussian((8, 1, 3, 3), 2, 0.3))
        self.head = torch.nn.Parameter(_gaussian((10, 8 * 4 * 4), 3, 0.1))

    def forward(self, x):
        y = torch.relu(DF.conv2d(x, self.conv, self.bias, stride=2, padding=1, fmt=self.fmt))
        y = DF.conv2d(y, self.depthwise, padding="same", groups=8, padding_mode="reflect", fmt=self.fmt)
        y = y.flatten(1)
        return DF.linear(y, self.head, fmt=self.fmt) + DF.linear(y, self.head, fmt="bf16")


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-sr"])
def test_torch_compile_fullgraph_matches_eager(fmt):
    """aot_eager: it traces and runs the same graphs as inductor would get, without
    inductor's minutes of C++ compilation on this machine."""
    model, x = _Net(fmt), _gaussian((4, 3, 8, 8), 4)

    def step(fn):
        model.zero_grad()
        torch.manual_seed(0)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    torch._dynamo.reset()
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def _dequantized(t: torch.Tensor, spec: DFPSpec) -> torch.Tensor:
    return dfp.quantize(t, spec).dequantize().double()


def _dequantized_pixel_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """t (N, C, H, W) quantized with an exponent per block of pixels and channel."""
    n, c, h, w = t.shape
    pixels = t.permute(0, 2, 3, 1).reshape(-1, c)
    return _dequantized(pixels, DFPSpec(axis=0, block=block)).view(n, h, w, c).permute(0, 3, 1, 2)


def _dequantized_row_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """t (N, C, H, W) quantized with an exponent per image row and block of channels."""
    n, c, h, w = t.shape
    groups = t.view(n, c // block, block, h, w).permute(0, 3, 1, 2, 4).reshape(-1, block * w)
    return (
        _dequantized(groups, DFPSpec(axis=0)).view(n, h, c // block, block, w).permute(0, 2, 3, 1, 4).reshape(t.shape)
    )


def _dequantized_sample_channels(t: torch.Tensor, samples: int) -> torch.Tensor:
    """t (N, C, H, W) quantized with an exponent per group of ``samples`` samples and channel."""
    n, c, h, w = t.shape
    groups = -(-n // samples)
    padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, groups * samples - n))
    rows = padded.view(groups, samples, c, h * w).transpose(1, 2).reshape(groups * c, -1)
    q = _dequantized(rows, DFPSpec(axis=0)).view(groups, c, samples, h, w).transpose(1, 2)
    return q.reshape(-1, c, h, w)[:n]


@pytest.mark.parametrize("name", ["dfp16", "dfp16-tensor", "sample"])
@pytest.mark.parametrize("stride", [1, 2])
def test_each_product_multiplies_the_operands_quantized_as_documented(stride, name):
    """Forward: x per tensor ("dfp16-tensor") or per image row and block of channels (all
    12: a kernel row of them, 36, holds an int32 chain), weight per output channel; grad_input: dY per tensor
    ("dfp16-tensor"), per sample ("sample") or per image row and block of 20 channels
    (the largest divisor of 40 up to the chain length 32: "dfp16"), weight per block of
    32 (rows: 20) output channels along the reduction; grad_weight: x per tensor or per
    channel and sample (stride 1: 64 output pixels, whole blocks of 32) or pair of samples
    (stride 2: 16), dY per tensor ("dfp16-tensor") or per block of 32 output pixels and
    channel. The result equals fp64 on the dequantized operands up to fp32 accumulation,
    and the channels', samples' and rows' scales (weights 2^0 .. 2^-13; dY 2^-9 and
    2^0 .. 2^-14; x 2^-9, 2^0 .. 2^-22 and 2^0 .. 2^-14) make any other grouping miss by
    orders of magnitude more."""
    # nearest rounding everywhere: this is about which values share an exponent
    fmt = resolve("dfp16" if name == "sample" else name)
    fmt = dataclasses.replace(fmt, weight_exponent="channel", grad_weight_rounding="nearest")
    fmt = dataclasses.replace(fmt, grad_input_exponent="sample") if name == "sample" else fmt
    rows, input_rows = fmt.grad_input_exponent == "row", fmt.input_exponent == "row"
    cout = 40  # two blocks along Cout in grad_input: 32 + 8 (rows: 20 + 20)
    samples, rows_scale = torch.tensor([1.0, 2.0**-9]).view(2, 1, 1, 1), torch.exp2(-2.0 * torch.arange(8)).view(8, 1)
    # x's small sample is dY's large one: both add as much to grad_weight
    x = _gaussian((2, 12, 8, 8), 0) * samples.flip(0) * rows_scale * torch.exp2(-2.0 * torch.arange(12)).view(12, 1, 1)
    x.requires_grad_()
    w = (_gaussian((cout, 12, 3, 3), 1) * torch.exp2(-torch.arange(cout) % 14.0).view(-1, 1, 1, 1)).requires_grad_()
    grad = (_gaussian((2, cout, 8, 8), 2) * samples * rows_scale)[:, :, ::stride, ::stride]
    DF.conv2d(x, w, stride=stride, padding=1, fmt=fmt).backward(grad)

    xd, dyd = _dequantized(x.detach(), DFPSpec()), _dequantized(grad, DFPSpec())
    x_forward = _dequantized_row_blocks(x.detach(), 12) if input_rows else xd
    x_weight = (
        _dequantized_sample_channels(x.detach(), input_group_samples(32, (8 // stride) ** 2)) if input_rows else xd
    )
    dyd_weight = _dequantized_pixel_blocks(grad, fmt.grad_weight_block) if fmt.grad_weight_block else dyd
    dyd_input = {"tensor": dyd, "sample": _dequantized(grad, DFPSpec(axis=0)), "row": _dequantized_row_blocks(grad, 20)}
    dyd_input = dyd_input[fmt.grad_input_exponent]
    w_forward = _dequantized(w.detach(), DFPSpec(axis=0))
    w_block = 20 if rows else 32
    w_backward = _dequantized(w.detach().reshape(cout, -1), DFPSpec(axis=0, block=w_block)).view(w.shape)
    y = DF.conv2d(x.detach(), w.detach(), stride=stride, padding=1, fmt=fmt)
    checks = [
        (y, torch.nn.functional.conv2d(x_forward, w_forward, stride=stride, padding=1)),
        (x.grad, torch.nn.grad.conv2d_input(x.shape, w_backward, dyd_input, stride=stride, padding=1)),
        (w.grad, torch.nn.grad.conv2d_weight(x_weight, w.shape, dyd_weight, stride=stride, padding=1)),
    ]
    for got, want in checks:
        assert (got.double() - want).norm() <= 1e-6 * want.norm()


# the default's input per sample and channel where a kernel row of it holds an int32
# chain (16 channels), one exponent for a narrower one (3 channels, padded to 4)
@pytest.mark.parametrize("fmt, channels, exponent", [("dfp16", 16, (2, 16)), ("dfp16", 3, ()), ("dfp16-tensor", 3, ())])
def test_backward_keeps_int16_mantissas_not_float_copies(fmt, channels, exponent):
    x = _gaussian((2, channels, 8, 8), 0).requires_grad_()
    w = _gaussian((4, channels, 3, 3), 1).requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DF.conv2d(x, w, padding=1, fmt=fmt)
    # the padded int16 input (3 channels get a zero one) and its exponents, and the (master) weight itself
    padded = channels + channels % 2
    assert sorted(saved, key=str) == sorted(
        [(torch.int16, (2, 10, 10, padded)), (torch.int32, exponent), (torch.float32, (4, channels, 3, 3))], key=str
    )
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DF.conv2d(x, w.detach(), padding=1)  # no weight gradient: nothing of x is kept
    assert saved == [(torch.float32, (4, channels, 3, 3))]


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-tensor"])
def test_a_frozen_weight_or_no_grad_mode_changes_no_bit(fmt, monkeypatch):
    """Without a weight gradient the layer skips grad_weight's copy of its input (the
    op's need_weight_grad): its output, and grad_input of a frozen weight, keep their bits."""
    x = _gaussian((4, 16, 8, 8), 0).to(memory_format=torch.channels_last).requires_grad_()
    w = _gaussian((8, 16, 3, 3), 1).requires_grad_()
    dy = _gaussian((4, 8, 8, 8), 2)
    y = DF.conv2d(x, w, padding=1, fmt=fmt)
    y.backward(dy)
    asked = []
    apply = dfp.autograd.EagerConv2d.apply
    monkeypatch.setattr(dfp.autograd.EagerConv2d, "apply", lambda *args: asked.append(args[-1][-1]) or apply(*args))
    with torch.no_grad():
        assert torch.equal(DF.conv2d(x, w, padding=1, fmt=fmt), y.detach())
    x_frozen = x.detach().requires_grad_()
    y_frozen = DF.conv2d(x_frozen, w.detach(), padding=1, fmt=fmt)
    y_frozen.backward(dy)
    assert torch.equal(y_frozen, y) and torch.equal(x_frozen.grad, x.grad)
    assert asked == [False, False]


def test_stochastic_rounding_is_seeded_by_torch_and_touches_only_gradients():
    x, w = _gaussian((16, 30), 0), _gaussian((20, 30), 1)
    grad = _gaussian((16, 20), 2) * 1e-3

    def grads(fmt, seed):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.manual_seed(seed)
        y = DF.linear(xr, wr, fmt=fmt)
        y.backward(grad)
        return y.detach(), xr.grad, wr.grad

    first, again, other, nearest = grads("dfp16-sr", 1), grads("dfp16-sr", 1), grads("dfp16-sr", 2), grads("dfp16", 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(first[0], other[0]) and torch.equal(first[0], nearest[0])  # forward rounds to nearest
    assert not torch.equal(first[1], other[1]) and not torch.equal(first[2], other[2])


def test_the_default_format_draws_nothing_from_torch_generator():
    """dfp16 rounds grad_weight's output gradient with dithering: a fixed function of each
    value, so the results do not depend on torch's generator and do not advance it."""
    x, w = _gaussian((2, 6, 8, 8), 0), _gaussian((8, 6, 3, 3), 1)
    grad = _gaussian((2, 8, 8, 8), 2) * 1e-3

    def grads(seed):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.manual_seed(seed)
        DF.conv2d(xr, wr, padding=1, fmt="dfp16").backward(grad)
        return xr.grad, wr.grad, torch.get_rng_state()

    first, other = grads(1), grads(2)
    assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    torch.manual_seed(1)
    assert torch.equal(first[2], torch.get_rng_state())


def test_grad_scaler_skips_the_step_when_a_gradient_overflows():
    w = torch.nn.Parameter(_gaussian((3, 4), 0))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**64)
    x = _gaussian((5, 4), 1)

    def step(loss_factor):
        opt.zero_grad()
        loss = DF.linear(x, w, fmt="dfp16").square().sum() * loss_factor
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    before = w.detach().clone()
    step(1e30)  # times 2^64: the output gradient overflows to inf
    assert w.grad.isnan().all()  # NaN weight gradients, no error
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 2.0**63
    step(1.0)
    assert torch.isfinite(w.grad).all() and not torch.equal(w.detach(), before)
    assert scaler.get_scale() == 2.0**63


@pytest.mark.parametrize("weight_grad", [False, True])
def test_double_backward_is_a_clear_error(weight_grad):
    x = _gaussian((2, 3, 5, 5), 0).requires_grad_()
    w = _gaussian((4, 3, 3, 3), 1).requires_grad_(weight_grad)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(DF.conv2d(x, w).square().sum(), x, create_graph=True)


def test_narrow_stride_1_layers_keep_their_input_as_channel_planes(monkeypatch):
    """grad_weight reads the image of a layer of 16 to 64 output channels and stride 1 as
    channel planes, so the compiled backend keeps grad_weight's input so (a permuted view
    of (N, C, Hp, Wp)), from its one-call forward and from the steps (an NCHW input) alike;
    other layers, and the numba backend, keep it contiguous. The values are the same, on
    a small image and on a wide one whose padded pixels are no multiple of 8 (the
    transposing pass's last 8 pixels overlap the ones before)."""
    cases = [
        (_gaussian((2, 16, 6, 6), 0), cout, stride, planes)
        for cout, stride, planes in ((16, 1, True), (32, 1, True), (64, 1, True), (128, 1, False), (16, 2, False))
    ]
    cases.append((_gaussian((2, 32, 4, 36), 2), 16, 1, True))
    for x, cout, stride, planes in cases:
        w = _gaussian((cout, x.shape[1], 3, 3), 1)
        # the default format's exponents: per image row in the forward, per sample in grad_weight
        rest = ([stride] * 2, [1, 1], [1, 1], 1, 2, False, True, True, True, 0, 2, 4, 2, True)
        kept = {}
        for backend, channels_last in (("cpu", True), ("cpu", False), ("numba", True)):
            monkeypatch.setenv("DFP_BACKEND", backend)
            xi = x.to(memory_format=torch.channels_last) if channels_last else x
            _, kept[backend, channels_last], _ = torch.ops.dfp.conv2d(xi, w, None, *rest, channels_last)
        for (backend, _), t in kept.items():
            assert (t.stride(3) != 1) == (planes and backend == "cpu"), (cout, stride, backend)
            assert torch.equal(t, kept["numba", True])


@pytest.mark.parametrize("threads", [1, 2])
def test_the_one_call_forward_a_few_images_at_a_time_gives_the_steps_bits(threads, monkeypatch):
    """The compiled one-call forward of the default format quantizes and multiplies a few
    images at a time (those whose int16 rows fit 256 KB: 7 of 16 channels at 34x34), the
    pieces handed to the threads as they come free: over 33 images (7 + 7 + 7 + 7 + 5 on one
    thread; on two 7 + 7 + 5 + 4 + 3 + 2 + 2 + 2 + 1, smaller towards the end) its output,
    grad_weight's copy and exponents are those of the steps (which an NCHW input takes),
    and a NaN in the last image gives the steps' NaN output."""
    monkeypatch.setenv("DFP_BACKEND", "cpu")
    torch.set_num_threads(threads)
    x, w = _gaussian((33, 16, 32, 32), 0), _gaussian((16, 16, 3, 3), 1)
    # the default format's exponents: per image row in the forward, per sample in grad_weight
    rest = ([1, 1], [1, 1], [1, 1], 1, 2, False, True, True, True, 0, 2, 4, 2, True)
    for nonfinite in (False, True):
        if nonfinite:
            x[-1, 3, 10, 10] = float("nan")
        one_call, steps = (
            torch.ops.dfp.conv2d(x.to(memory_format=torch.channels_last), w, None, *rest, True),
            torch.ops.dfp.conv2d(x, w, None, *rest, False),
        )
        assert one_call[0].isnan().any() == nonfinite
        for got, want in zip(one_call, steps, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("images", "channels", "size"), [(17, 16, 32), (17, 32, 32), (45, 64, 8)])
def test_the_one_call_backward_with_both_products_at_once_gives_numbas_bits(images, channels, size, monkeypatch):
    """On two threads the compiled one-call backward of a 16- to 64-channel layer runs
    grad_weight on one thread and grad_input a few images at a time on both (at most those
    whose window of dY fits 256 KB, fewer towards the end: 5 + 3 + 3 + 2 + 2 + 2 of 17
    images of 16 channels at 34x34, 12 + 9 + 6 + 5 + 5 + 5 + 3 of 45 of 64 at 10x10): dX
    and dW are the numba backend's bits, on one thread and on two, and a NaN in the last
    image's output gradient gives NaN gradients."""

    def grads(backend, threads, grad):
        monkeypatch.setenv("DFP_BACKEND", backend)
        torch.set_num_threads(threads)
        x = _gaussian((images, channels, size, size), 0).to(memory_format=torch.channels_last).requires_grad_()
        w = _gaussian((channels, channels, 3, 3), 1).requires_grad_()
        DF.conv2d(x, w, padding=1, fmt="dfp16").backward(grad)
        return x.grad, w.grad

    grad = _gaussian((images, channels, size, size), 2, 1e-3)
    for nonfinite in (False, True):
        if nonfinite:
            grad[-1, 3, size // 2, size // 3] = float("nan")
        want = grads("numba", 1, grad)
        assert want[0].isnan().any() == want[1].isnan().any() == nonfinite
        with monkeypatch.context() as m:
            if not nonfinite:  # no fallback to the steps (which NaN takes)
                m.setattr(dfp.autograd, "_products", lambda *args: pytest.fail("the steps ran"))
            got = [grads("cpu", threads, grad) for threads in (1, 2)]  # all kept: no buffer reused
        for result in got:
            for one, expected in zip(result, want, strict=True):
                torch.testing.assert_close(one, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["conv2d", "conv2d-stride2", "linear"])
def test_eager_layers_take_the_compiled_one_call_paths(kind, monkeypatch):
    """A channels-last layer of stride 1 or 2 (and a linear one) in the default format
    runs its forward and its whole backward in one call each of the compiled backend,
    planned once per shape; the steps (``conv2d_impl``, ``_products``) are not reached. A
    plan that silently fell back would keep every bit and lose the speed."""
    monkeypatch.setenv("DFP_BACKEND", "cpu")
    if kind == "linear":
        x, w = _gaussian((8, 64), 0).requires_grad_(), _gaussian((10, 64), 1).requires_grad_()
        layer = DF.linear
    else:
        x = _gaussian((2, 16, 6, 6), 0).to(memory_format=torch.channels_last).requires_grad_()
        w = _gaussian((32, 16, 3, 3), 1).to(memory_format=torch.channels_last).requires_grad_()
        layer = functools.partial(DF.conv2d, padding=1, stride=2 if kind == "conv2d-stride2" else 1)
    y = layer(x, w)
    grad = _gaussian(y.shape, 2)
    for step in ("conv2d_impl", "_products"):
        monkeypatch.setattr(dfp.autograd, step, lambda *args, name=step: pytest.fail(f"{name} ran"))
    again = layer(x, w)
    again.backward(grad)
    assert torch.equal(again, y) and x.grad is not None and w.grad is not None


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-tensor"])
@pytest.mark.parametrize(
    ("images", "channels", "size", "kernel", "padding", "dilation", "stride"),
    [
        (9, 64, 8, 3, 1, 1, 1),  # ResNet-20's third stage: 16 % of the products read only padding
        (7, 32, 4, 3, 1, 1, 1),  # kinds of 7 x 4 corners, 7 x 8 edges: tiles of mixed kinds
        (5, 32, 6, 5, 2, 1, 1),  # two rows and columns of padding, per side
        (5, 32, 8, 3, 2, 2, 1),  # dilated taps
        (6, 32, 8, 3, 1, 1, 2),  # strided: the forward skips, the strided grad_input does not
    ],
)
def test_products_of_the_padding_skipped_change_no_bit(
    fmt, images, channels, size, kernel, padding, dilation, stride, monkeypatch
):
    """Where whole int32 chains of a tile read only the zero padding (at least 12 % of a
    layer's products: small images), the compiled forward and stride-1 grad_input visit the
    output pixels grouped by which chains those are and skip them (csrc/cpu/conv.h,
    padding_order): the output, dX and dW are the numba backend's bits on one and two
    threads, with real zeros and tiny values inside the image too."""

    def run(backend, threads):
        monkeypatch.setenv("DFP_BACKEND", backend)
        torch.set_num_threads(threads)
        x = _gaussian((images, channels, size, size), 0)
        x[0, :, 1:3] = 0  # zeros of the image's own, next to the padding
        x[1] *= 1e-30
        x = x.to(memory_format=torch.channels_last).requires_grad_()
        w = _gaussian((channels, channels, kernel, kernel), 1).requires_grad_()
        y = DF.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, fmt=fmt)
        y.backward(_gaussian(y.shape, 2, 1e-3))
        return y.detach(), x.grad, w.grad

    want = run("numba", 1)
    for threads in (1, 2):
        for got, expected in zip(run("cpu", threads), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
