"""dfp.functional.linear and conv2d: every torch.nn.Conv2d option exact against torch in
fp64, SQNR against fp64 on Gaussian data, bit-exact against the integer reference,
products switched to fp32 one at a time, thread-count independence, float formats,
autocast, non-finite values and bad inputs."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import on_reference, wide_range

import dfp
from dfp import functional as DF
from dfp.formats import FORMATS, Format, resolve

DFP16 = resolve("dfp16")
CHANNEL = dataclasses.replace(DFP16, name="dfp16-channel", weight_exponent="channel")
# grad_input's dY per sample (the default's: per image row and block of channels)
SAMPLE = dataclasses.replace(DFP16, name="dfp16-sample", grad_input_exponent="sample")
# the input per tensor in the forward and grad_weight (the default's: per image row and
# channel block, and per sample and channel)
TENSOR_INPUT = dataclasses.replace(DFP16, name="dfp16-tensor-input", input_exponent="tensor")


def _integers(shape, seed, high=8) -> torch.Tensor:
    """Small integers: DFP16 represents them exactly and every sum of their products
    is exact in fp32, so a correct DFP16 layer equals torch's fp64 result bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-high, high + 1, shape, generator=g).float()


def _gaussian(shape, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _forward_backward(fn, x, weight, bias, grad_seed, grad=None, frozen=None):
    """(y, dx, dw, db) of ``fn(x, weight, bias)`` for an output gradient of integers
    (or ``grad``); inputs are cloned (memory format kept), so calls do not interfere.
    The input at index ``frozen`` needs no gradient (its is None)."""
    leaves = [
        t.detach().clone().requires_grad_(i != frozen) if t is not None else None
        for i, t in enumerate((x, weight, bias))
    ]
    y = fn(*leaves)
    g = _integers(y.shape, grad_seed).to(y.dtype) if grad is None else grad
    y.backward(g)
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _torch_fn(**options):
    """torch.nn.Conv2d in float64 with the same options: the independent oracle."""

    def run(x, weight, bias):
        cout, cin_g, kh, kw = weight.shape
        groups = options.get("groups", 1)
        conv = torch.nn.Conv2d(cin_g * groups, cout, (kh, kw), bias=bias is not None, **options)
        params = {"weight": weight.double()} | ({} if bias is None else {"bias": bias.double()})
        return torch.func.functional_call(conv.double(), params, (x.double(),))

    return run


def _conv_fn(fmt, **options):
    return lambda x, w, b: DF.conv2d(x, w, b, fmt=fmt, **options)


def _assert_equal(got, want):
    for g, w in zip(got, want):
        if g is None:
            assert w is None
            continue
        assert g.shape == w.shape and g.dtype == torch.float32
        assert torch.equal(g, w.float()), (g - w.float()).abs().max()


# (x shape, weight shape, options): every option torch.nn.Conv2d accepts
CONV_CASES = {
    "plain": ((2, 3, 7, 6), (4, 3, 3, 3), {}),
    "stride": ((2, 3, 9, 8), (4, 3, 3, 3), {"stride": 2}),
    "stride-tuple-padding-tuple": ((2, 3, 9, 8), (4, 3, 3, 2), {"stride": (2, 1), "padding": (1, 2)}),
    "padding-int": ((1, 3, 5, 5), (5, 3, 3, 3), {"padding": 2}),
    "same-odd-kernel": ((2, 3, 6, 7), (4, 3, 3, 5), {"padding": "same"}),
    "same-even-kernel": ((2, 3, 6, 7), (4, 3, 4, 2), {"padding": "same"}),
    "same-dilated": ((2, 3, 8, 8), (4, 3, 3, 3), {"padding": "same", "dilation": 2}),
    "valid": ((2, 3, 6, 7), (4, 3, 3, 3), {"padding": "valid"}),
    "dilation": ((2, 3, 9, 9), (4, 3, 3, 3), {"dilation": (2, 3), "padding": 1}),
    "stride-dilation": ((2, 3, 11, 10), (4, 3, 2, 3), {"stride": (3, 2), "dilation": (2, 3), "padding": (1, 2)}),
    "groups": ((2, 6, 7, 7), (9, 2, 3, 3), {"groups": 3, "padding": 1}),
    "depthwise": ((2, 5, 7, 7), (5, 1, 3, 3), {"groups": 5, "padding": 1, "stride": 2}),
    "depthwise-multiplier": ((2, 4, 6, 6), (8, 1, 3, 3), {"groups": 4}),
    "pointwise": ((2, 8, 5, 5), (6, 8, 1, 1), {}),
    "pointwise-strided": ((2, 4, 7, 6), (5, 4, 1, 1), {"stride": 2}),
    "stride-beyond-kernel": ((2, 3, 10, 9), (4, 3, 2, 1), {"stride": (3, 2), "padding": (1, 0)}),
    "grouped-pointwise": ((2, 8, 5, 5), (6, 4, 1, 1), {"groups": 2}),
    "no-bias": ((2, 3, 7, 6), (4, 3, 3, 3), {"padding": 1, "bias": False}),
    "reflect": ((2, 3, 7, 6), (4, 3, 3, 3), {"padding": (2, 1), "padding_mode": "reflect"}),
    "replicate": ((2, 3, 7, 6), (4, 3, 3, 3), {"padding": 2, "padding_mode": "replicate"}),
    "circular": ((2, 3, 7, 6), (4, 3, 3, 3), {"padding": 1, "padding_mode": "circular", "stride": 2}),
    "circular-same": ((2, 3, 7, 6), (4, 3, 4, 3), {"padding": "same", "padding_mode": "circular"}),
    "batch-0": ((0, 3, 7, 6), (4, 3, 3, 3), {"padding": 1}),
    "image-1x1": ((3, 3, 1, 1), (4, 3, 1, 1), {}),
    "image-1x1-padded": ((3, 3, 1, 1), (4, 3, 3, 3), {"padding": 1}),
    "kernel-fills-image": ((2, 3, 4, 5), (4, 3, 4, 5), {}),
    "unbatched": ((3, 7, 6), (4, 3, 3, 3), {"padding": 1}),
    "channels-last": ((2, 3, 7, 6), (4, 3, 3, 3), {"padding": 1, "stride": 2, "channels_last": True}),
    "channels-last-groups": ((2, 6, 7, 6), (4, 3, 3, 3), {"groups": 2, "channels_last": True}),
}


def _conv_case(name, seed=0):
    x_shape, w_shape, options = CONV_CASES[name]
    options = dict(options)
    x = _integers(x_shape, seed)
    if options.pop("channels_last", False):
        x = x.to(memory_format=torch.channels_last)
    bias = _integers(w_shape[:1], seed + 2) if options.pop("bias", True) else None
    return x, _integers(w_shape, seed + 1), bias, options


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the oracle's
@pytest.mark.parametrize("fmt", [DFP16, CHANNEL], ids=lambda f: f.name)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_options_exact_against_torch_fp64(case, fmt):
    x, weight, bias, options = _conv_case(case)
    got = _forward_backward(_conv_fn(fmt, **options), x, weight, bias, grad_seed=3)
    want = _forward_backward(_torch_fn(**options), x, weight, bias, grad_seed=3)
    _assert_equal(got, want)
    y, dx = got[:2]
    assert dx.shape == x.shape
    layout = _memory_format(x)
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("fmt", ["dfp16", "fp32"])
@pytest.mark.parametrize("input_layout", [torch.channels_last, torch.contiguous_format])
def test_conv2d_with_one_input_channel_takes_torchs_layout(fmt, input_layout):
    """A one-channel batch (grayscale) is contiguous in both layouts; as torch's
    convolutions do, the layer then follows its input's channel stride and its weight's
    layout (Module.to(memory_format=torch.channels_last) sets both): the layers after it
    stay channels-last (in NCHW, batch norm and pooling of 8x8 digits ran 2-7x slower)."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6).contiguous(memory_format=input_layout).requires_grad_()
    ours = dfp.nn.Conv2d(1, 4, 3, padding=1, fmt=fmt).to(memory_format=torch.channels_last)
    theirs = torch.nn.Conv2d(1, 4, 3, padding=1).to(memory_format=torch.channels_last)
    for layer in (ours, theirs):
        y = layer(x)
        y.backward(torch.ones_like(y))
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert layer.weight.grad.stride() == layer.weight.stride()


LINEAR_SHAPES = [((5,), (6, 5)), ((4, 5), (6, 5)), ((2, 3, 5), (6, 5)), ((2, 0, 3, 5), (6, 5)), ((2, 1, 3, 5), (6, 5)),
                 ((3, 0), (6, 0)), ((3, 5), (0, 5))]  # fmt: skip


@pytest.mark.parametrize("x_shape, w_shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("fmt", [DFP16, CHANNEL], ids=lambda f: f.name)
def test_linear_shapes_exact_against_torch_fp64(x_shape, w_shape, fmt):
    x, weight, bias = _integers(x_shape, 0), _integers(w_shape, 1), _integers(w_shape[:1], 2)

    def torch_linear(x, w, b):
        return F.linear(x.double(), w.double(), b.double())

    got = _forward_backward(lambda *a: DF.linear(*a, fmt=fmt), x, weight, bias, grad_seed=3)
    want = _forward_backward(torch_linear, x, weight, bias, grad_seed=3)
    assert got[0].shape == (*x_shape[:-1], w_shape[0])
    _assert_equal(got, want)


@pytest.mark.parametrize("fmt", [DFP16, CHANNEL], ids=lambda f: f.name)
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_weight_read_in_place_or_gathered_exact_against_torch_fp64(fmt, transposed):
    """A contiguous weight is read where it lies and its gradient written there; a
    transposed view's is gathered and scattered (in_features not adjacent): both exact."""
    x, bias = _integers((4, 6), 0), _integers((5,), 2)
    weight = _integers((6, 5), 1).t() if transposed else _integers((5, 6), 1)

    def torch_linear(x, w, b):
        return F.linear(x.double(), w.double(), b.double())

    got = _forward_backward(lambda *a: DF.linear(*a, fmt=fmt), x, weight, bias, grad_seed=3)
    _assert_equal(got, _forward_backward(torch_linear, x, weight, bias, grad_seed=3))
    assert got[2].stride() == weight.stride()


def _sqnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (got.double() - want).square().sum()
    return 10 * math.log10(want.square().sum() / noise)


def _gaussian_problem(kind):
    if kind == "linear":
        x, w = _gaussian((64, 96), 0), _gaussian((48, 96), 1, 0.1)
        return x, w, _gaussian((48,), 2), lambda fmt: lambda *a: DF.linear(*a, fmt=fmt) if fmt else F.linear(*a)
    x, w = _gaussian((4, 16, 12, 12), 0), _gaussian((24, 16, 3, 3), 1, 0.1)

    def make(fmt):
        return lambda *a: DF.conv2d(*a, padding=1, fmt=fmt) if fmt else F.conv2d(*a, padding=1)

    return x, w, _gaussian((24,), 2), make


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-sr", CHANNEL], ids=lambda f: getattr(f, "name", f))
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_sqnr_against_fp64_on_gaussian_data(kind, fmt):
    x, w, b, make = _gaussian_problem(kind)
    grad = _gaussian((64, 48) if kind == "linear" else (4, 24, 12, 12), 3)
    torch.manual_seed(0)
    got = _forward_backward(make(fmt), x, w, b, None, grad)
    want = _forward_backward(make(None), *(t.double() for t in (x, w, b)), None, grad.double())
    sqnr = [_sqnr(g, r) for g, r in zip(got[:3], want[:3])]
    name = fmt if isinstance(fmt, str) else fmt.name
    print(f"SQNR {kind} {name}: output {sqnr[0]:.1f} dB, grad_input {sqnr[1]:.1f} dB, grad_weight {sqnr[2]:.1f} dB")
    assert min(sqnr) >= 60
    assert _sqnr(got[3], want[3]) > 120  # the bias gradient stays fp32


@pytest.mark.parametrize("fmt", [DFP16, CHANNEL, resolve("dfp16-sr"), SAMPLE, TENSOR_INPUT], ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["linear", "linear-even", "conv2d"])
def test_bit_exact_against_the_integer_reference(backend, kind, fmt):
    if kind.startswith("linear"):
        # 37 features get a zero one; 64 do not, and their 45 samples are one group of 32
        # and a short one, each a tile (csrc/cpu/quantize_input.cpp)
        features, rows = (37, (3, 7)) if kind == "linear" else (64, (5, 9))
        x, w, b = _gaussian((*rows, features), 0), _gaussian((9, features), 1), _gaussian((9,), 2)

        def fn(*a):
            return DF.linear(*a, fmt=fmt)
    else:
        # 12 channels per group: a kernel row of them holds an int32 chain, so the default
        # gives the input exponents per image row (docs/design.md)
        x, w, b = _gaussian((2, 24, 7, 7), 0), _gaussian((8, 12, 3, 3), 1), _gaussian((8,), 2)

        def fn(*a):
            return DF.conv2d(*a, padding=1, stride=(1, 2), groups=2, fmt=fmt)

    grad = _gaussian(fn(x, w, b).shape, 3)
    torch.manual_seed(5)  # stochastic rounding is deterministic given the seed
    got = _forward_backward(fn, x, w, b, None, grad)
    torch.manual_seed(5)
    want = on_reference(_forward_backward, fn, x, w, b, None, grad)
    _assert_equal(got, want)


# Channels-last layers, which the compiled backend runs in one call per product (and
# the whole backward in one): (x shape, weight shape, options).
ONE_CALL_CASES = {
    "3x3": ((2, 16, 6, 5), (24, 16, 3, 3), {"padding": 1}),
    "odd-channels-dilated": ((2, 3, 9, 8), (8, 3, 3, 2), {"padding": 2, "dilation": 2}),
    "groups-two-weight-blocks": ((2, 8, 5, 5), (128, 4, 3, 3), {"padding": (1, 0), "groups": 2}),
    "weight-blocks-padded": ((2, 4, 4, 4), (40, 4, 1, 1), {}),
    "stride-2": ((2, 6, 7, 7), (8, 6, 3, 3), {"padding": 1, "stride": 2}),
    "unpadded-5x5": ((2, 4, 7, 6), (6, 4, 5, 5), {}),
    # wide enough for the default's input exponents per image row
    "stride-2-input-rows": ((2, 12, 7, 7), (8, 12, 3, 3), {"padding": 1, "stride": 2}),
    "groups-input-rows": ((2, 24, 5, 5), (16, 12, 3, 3), {"padding": 1, "groups": 2}),
    # 16 and 32 output channels at an even width: grad_weight's dY quantized into the
    # GEMM's K-pair panels, its last pixel block short (108 and 60 pixels, blocks of 32)
    "16-channels-dy-panels": ((3, 16, 6, 6), (16, 16, 3, 3), {"padding": 1}),
    "32-channels-dy-panels": ((2, 8, 5, 6), (32, 8, 3, 3), {"padding": 1}),
    "16-channels-dy-panels-one-block": ((1, 16, 2, 4), (16, 16, 3, 3), {"padding": 1}),  # 8 pixels
    # grad_weight's input as channel planes (an even output width), an image of 30 pixels:
    # not whole blocks of 8
    "16-channels-planes-30-pixels": ((2, 16, 5, 6), (16, 16, 3, 3), {}),
    # grad_input's phases (csrc/cpu/grad_input.cpp): dilated taps at stride 2, a stride
    # past the kernel (a phase no tap reaches), groups, strides differing by axis
    "stride-2-dilated": ((2, 8, 9, 8), (8, 8, 3, 3), {"padding": 2, "stride": 2, "dilation": 2}),
    "stride-3-kernel-2": ((2, 6, 8, 7), (8, 6, 2, 2), {"stride": 3}),
    "stride-2-groups": ((2, 8, 7, 6), (16, 4, 3, 3), {"padding": 1, "stride": 2, "groups": 2}),
    "stride-2-by-1": ((2, 8, 7, 6), (8, 8, 3, 3), {"padding": (1, 0), "stride": (2, 1)}),
}


@pytest.mark.parametrize(
    "fmt", [DFP16, CHANNEL, resolve("dfp16-tensor"), resolve("dfp16-sr"), SAMPLE, TENSOR_INPUT], ids=lambda f: f.name
)
@pytest.mark.parametrize("case", ONE_CALL_CASES)
def test_channels_last_layers_bit_exact_against_the_integer_reference(backend, case, fmt):
    x_shape, w_shape, options = ONE_CALL_CASES[case]
    x = wide_range(x_shape, 0).to(memory_format=torch.channels_last)
    w, b = _gaussian(w_shape, 1), _gaussian(w_shape[:1], 2)

    def fn(*a):
        return DF.conv2d(*a, fmt=fmt, **options)

    grad = wide_range(fn(x, w, b).shape, 3).to(memory_format=torch.channels_last)
    for frozen in (None, 0, 1):  # all gradients; none for the input (a first layer); none for the weight
        results = []
        for run in (_forward_backward, functools.partial(on_reference, _forward_backward)):
            torch.manual_seed(5)  # stochastic rounding draws its seed from torch's generator
            y, *grads = run(fn, x, w, b, None, grad, frozen=frozen)
            results.append((y, *grads))
        _assert_equal(*results)


@pytest.mark.parametrize("product", ["forward", "grad_input", "grad_weight"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_each_product_switches_to_fp32_alone(kind, product):
    x, w, b, make = _gaussian_problem(kind)
    grad = _gaussian((64, 48) if kind == "linear" else (4, 24, 12, 12), 3)
    switched = dataclasses.replace(DFP16, **{product: "fp32"})
    all_dfp = _forward_backward(make(DFP16), x, w, b, None, grad)
    mixed = _forward_backward(make(switched), x, w, b, None, grad)
    want = _forward_backward(make(None), *(t.double() for t in (x, w, b)), None, grad.double())
    index = {"forward": 0, "grad_input": 1, "grad_weight": 2}[product]
    for i in range(3):
        if i == index:  # fp32 accuracy, far beyond DFP16's
            assert _sqnr(mixed[i], want[i]) > 110 > _sqnr(all_dfp[i], want[i])
        else:  # the other products are untouched
            assert torch.equal(mixed[i], all_dfp[i])


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_weight_gradient_alone_can_round_stochastically(kind):
    """grad_weight_rounding="stochastic": the weight gradient's dY rounds from torch's
    generator (the same seed, the same bits; another, other bits) and is about as
    accurate as to nearest on Gaussian data; the other products keep their bits."""
    x, w, b, make = _gaussian_problem(kind)
    grad = _gaussian((64, 48) if kind == "linear" else (4, 24, 12, 12), 3)
    stochastic = dataclasses.replace(DFP16, grad_weight_rounding="stochastic")
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(_forward_backward(make(stochastic), x, w, b, None, grad))
    nearest = _forward_backward(make(DFP16), x, w, b, None, grad)
    want = _forward_backward(make(None), *(t.double() for t in (x, w, b)), None, grad.double())
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][2], runs[2][2])
    assert torch.equal(runs[0][0], nearest[0]) and torch.equal(runs[0][1], nearest[1])
    assert abs(_sqnr(runs[0][2], want[2]) - _sqnr(nearest[2], want[2])) < 6


# conv2d-32: grad_weight reads the patches transposed, 288 rows in two blocks per thread;
# conv2d-stride2: it gathers them, 144 columns in 5 panels of 32, in tasks of 3 and 2.
@pytest.mark.parametrize("fmt", [resolve("dfp16-sr"), DFP16], ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv2d-32", "conv2d-stride2"])
def test_results_do_not_depend_on_the_thread_count(kind, fmt):
    if kind == "linear":
        shapes, fn = ((256, 200), (64, 200), (256, 64)), lambda *a: DF.linear(*a, fmt=fmt)
    elif kind == "conv2d":
        shapes, fn = ((4, 16, 16, 16), (32, 16, 3, 3), (4, 32, 16, 16)), _conv_fn(fmt, padding=1)
    elif kind == "conv2d-32":
        shapes, fn = ((4, 32, 16, 16), (32, 32, 3, 3), (4, 32, 16, 16)), _conv_fn(fmt, padding=1)
    else:
        shapes, fn = ((8, 16, 32, 32), (32, 16, 3, 3), (8, 32, 16, 16)), _conv_fn(fmt, padding=1, stride=2)
    x, w, grad = (_gaussian(shape, seed) for seed, shape in enumerate(shapes))
    results = []
    for threads in (1, 2, 3):  # on 2 and 3, grad_weight in parts of the input channels
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        results.append(_forward_backward(fn, x, w, _gaussian(w.shape[:1], 5), None, grad))
    for one, *more in zip(*results):
        assert all(torch.equal(one, other) for other in more)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_float_formats_compute_in_their_dtype_with_fp32_master_weights(name):
    dtype = resolve(name).dtype
    x, w, b = _gaussian((2, 3, 6, 6), 0), _gaussian((4, 3, 3, 3), 1), _gaussian((4,), 2)
    got = _forward_backward(_conv_fn(name, padding=1), x, w, b, grad_seed=3)
    want = _forward_backward(lambda *a: F.conv2d(*(t.to(dtype) for t in a), padding=1).float(), x, w, b, grad_seed=3)
    for g, r in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, r)
    y = DF.linear(x.view(2, -1)[:, :5].to(dtype), w.view(4, -1)[:, :5], fmt=name)
    assert y.dtype == dtype  # the input's dtype


def test_dfp_formats_accept_half_inputs_and_return_fp32():
    x, w = _integers((2, 5), 0), _integers((3, 5), 1)
    y = DF.linear(x.bfloat16(), w, fmt="dfp16")
    assert y.dtype == torch.float32 and torch.equal(y, x @ w.t())


FP32_PRODUCTS = dataclasses.replace(DFP16, name="dfp16-fp32-products", forward="fp32", grad_input="fp32")


@pytest.mark.parametrize("fmt", ["dfp16", FP32_PRODUCTS, "fp32", "fp16"], ids=lambda f: getattr(f, "name", f))
def test_autocast_does_not_change_a_format(fmt):
    x, w, b = _gaussian((2, 3, 6, 6), 0), _gaussian((4, 3, 3, 3), 1), _gaussian((4,), 2)
    plain = _forward_backward(_conv_fn(fmt), x, w, b, grad_seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _forward_backward(_conv_fn(fmt), x, w, b, grad_seed=3)
        lin = DF.linear(x.flatten(1), _gaussian((4, 108), 3), fmt=fmt)
    for a, c in zip(inside, plain):
        assert a.dtype == torch.float32 and torch.equal(a, c)
    assert lin.dtype == torch.float32


def test_fp16_unsupported_by_torch_is_a_clear_error(monkeypatch):
    def conv2d(*args):
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")

    monkeypatch.setattr(F, "conv2d", conv2d)
    with pytest.raises(RuntimeError, match=r"format 'fp16'.*not supported on cpu by torch"):
        DF.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), fmt="fp16")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])  # two ways to quantize x
@pytest.mark.parametrize("where", ["x", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_operands_give_nan_never_an_error(where, value, layout):
    x, w = _gaussian((2, 3, 5, 5), 0).to(memory_format=layout), _gaussian((4, 3, 3, 3), 1)
    (x if where == "x" else w)[0, 0, 1, 1] = value
    x.requires_grad_()
    w.requires_grad_()
    y = DF.conv2d(x, w, padding=1)
    assert y.isnan().all()  # the shared exponent is undefined: every output is affected
    y.backward(torch.ones_like(y))
    # as in fp32: the gradient that depends on the bad operand is NaN, the other is not
    dependent, independent = (w.grad, x.grad) if where == "x" else (x.grad, w.grad)
    assert dependent.isnan().all() and independent.isfinite().all()


def test_nan_where_follows_the_flag_of_nonfinite():
    from dfp import _conv_layout as layout

    result = torch.ones(2, 3)
    marked = torch.tensor([3, layout.NONFINITE], dtype=torch.int32)
    assert layout.nonfinite(torch.tensor([3, 4], dtype=torch.int32)) is False  # on the CPU: a bool, read at once
    assert layout.nonfinite(marked) is True
    assert layout.nan_where(result, False) is result
    assert layout.nan_where(result, torch.tensor(True)).isnan().all()  # the device flag of a GPU
    assert torch.equal(layout.nan_where(result, torch.tensor(False)), result)


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-sr", CHANNEL], ids=lambda f: getattr(f, "name", f))
def test_nonfinite_output_gradient_gives_nan_gradients(fmt):
    x = _gaussian((3, 4), 0).requires_grad_()
    w = _gaussian((2, 4), 1).requires_grad_()
    b = torch.zeros(2, requires_grad=True)
    y = DF.linear(x, w, b, fmt=fmt)
    assert y.isfinite().all()
    y.backward(torch.tensor([[1.0, float("inf")], [0.0, 1.0], [1.0, 1.0]]))
    assert x.grad.isnan().all() and w.grad.isnan().all() and not b.grad.isfinite().all()


def test_resolve_names_specs_and_formats():
    assert set(FORMATS) == {"dfp16", "dfp16-sr", "dfp16-tensor", "fp32", "bf16", "fp16"}
    assert resolve("dfp16").is_dfp and resolve("dfp16").headroom == 2
    assert resolve("dfp16").grad_weight_block == 32 and resolve("dfp16-tensor").grad_weight_block is None
    assert resolve("dfp16").input_exponent == "row" and resolve("dfp16-tensor").input_exponent == "tensor"
    assert resolve("dfp16-sr").grad_rounding == "stochastic" and resolve("dfp16-sr").grad_weight_block == 32
    assert resolve("bf16").dtype == torch.bfloat16 and not resolve("bf16").is_dfp
    assert resolve(CHANNEL) is CHANNEL
    spec = resolve(dfp.DFPSpec(headroom=3, axis=0, rounding="stochastic"))
    assert (spec.headroom, spec.weight_exponent, spec.grad_rounding, spec.is_dfp) == (3, "channel", "stochastic", True)


@pytest.mark.parametrize(
    "fmt, match",
    [
        ("int8", "unknown format 'int8'; choose one of dfp16, dfp16-sr, dfp16-tensor, fp32, bf16, fp16"),
        (dfp.DFPSpec(axis=1), "per tensor .* or per output channel"),
        (dfp.DFPSpec(axis=0, block=4), "block=4"),
    ],
)
def test_resolve_rejects_unknown_formats(fmt, match):
    with pytest.raises(ValueError, match=match):
        resolve(fmt)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"is_dfp": True, "forward": "bf16"}, "forward='bf16'"),
        ({"is_dfp": False, "dtype": torch.bfloat16, "forward": "dfp"}, "forward='dfp'"),
        ({"is_dfp": True, "dtype": torch.float16}, "float32"),
        ({"is_dfp": True, "weight_exponent": "row"}, "weight_exponent"),
        ({"is_dfp": True, "headroom": 14}, "headroom"),
        ({"is_dfp": True, "headroom": True}, "headroom"),
        ({"is_dfp": True, "grad_rounding": "up"}, "grad_rounding"),
        ({"is_dfp": True, "grad_weight_block": 31}, "grad_weight_block"),
        ({"is_dfp": True, "grad_weight_rounding": "up"}, "grad_weight_rounding"),
        ({"is_dfp": True, "grad_input_exponent": "pixel"}, "grad_input_exponent"),
        ({"is_dfp": True, "grad_input_exponent": True}, "grad_input_exponent"),
        ({"is_dfp": True, "grad_weight_block": True}, "grad_weight_block"),
        ({"is_dfp": True, "input_exponent": "pixel"}, "input_exponent"),
        ({"is_dfp": True, "input_exponent": "row"}, "input_exponent='row' needs grad_weight_block"),
    ],
)
def test_inconsistent_formats_are_rejected(fields, match):
    with pytest.raises(ValueError, match=match):
        Format("custom", **fields)


X, W = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: DF.conv2d(X, W, stride=0), ValueError, "stride must be an int >= 1"),
        (lambda: DF.conv2d(X, W, dilation=(1, 2, 3)), ValueError, "dilation"),
        (lambda: DF.conv2d(X, W, stride=1.5), ValueError, "stride must be an int"),
        (lambda: DF.conv2d(X, W, padding=-1), ValueError, "padding must be an int >= 0"),
        (lambda: DF.conv2d(X, W, padding="full"), ValueError, "'same' or 'valid'"),
        (lambda: DF.conv2d(X, W, padding="same", stride=2), ValueError, "strided"),
        (lambda: DF.conv2d(X, W, padding_mode="mirror"), ValueError, "padding_mode"),
        (lambda: DF.conv2d(X, W, groups=3), ValueError, "channels"),
        (lambda: DF.conv2d(X, torch.randn(3, 2, 3, 3), groups=2), ValueError, "divisible by groups"),
        (lambda: DF.conv2d(X, W, groups=0), ValueError, "groups"),
        (lambda: DF.conv2d(X[0, 0], W), ValueError, r"\(N, C, H, W\) or unbatched"),
        (lambda: DF.conv2d(X, W[0]), ValueError, "weight must be 4-D"),
        (lambda: DF.conv2d(X, W, torch.randn(3)), ValueError, r"bias must have shape \(2,\)"),
        (lambda: DF.conv2d(X, torch.randn(2, 4, 7, 7)), ValueError, "smaller than the dilated kernel"),
        (lambda: DF.conv2d(X.long(), W), TypeError, "floating-point"),
        (lambda: DF.conv2d(X.numpy(), W), TypeError, "torch.Tensor"),
        (lambda: DF.conv2d(X, W, fmt="int4"), ValueError, "unknown format"),
        (lambda: DF.conv2d(X.to("meta"), W), ValueError, "x is on meta.*run on CPU and CUDA tensors"),
        (lambda: DF.linear(X[0, 0], torch.randn(2, 5, device="meta")), ValueError, "weight is on meta"),
        (lambda: DF.linear(X, W), ValueError, "weight must be 2-D"),
        (lambda: DF.linear(torch.randn(3, 4), torch.randn(2, 5)), ValueError, "in_features=5"),
        (lambda: DF.linear(torch.tensor(1.0), torch.randn(2, 1)), ValueError, "in_features"),
    ],
)
def test_bad_inputs_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
