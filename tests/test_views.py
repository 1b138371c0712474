"""Every public op on random views, on every backend and CPU path, against the reference
on contiguous copies, bit for bit.

A kernel that reads raw memory must honour (or copy away) any layout torch can hand it:
slices with steps, transposes, expanded tensors with zero strides, channels_last images
and views that start at an offset into their storage. Each case draws one layout per
operand from a seeded generator; the oracle is ``dfp.reference`` on ``.contiguous()``
copies of the same values. Small shapes: the whole file runs in seconds.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import _backend_params, use_backend
from helpers import backend_env, int16_operand

import dfp
from dfp import DFPSpec, DFPTensor

LAYOUTS = ("contiguous", "slice", "transpose", "offset", "expand", "broadcast", "channels_last")
CASES = range(6)  # random draws of layouts per op and backend


@pytest.fixture(params=[*_backend_params(), pytest.param(("reference", None), id="reference")])
def any_backend(request, monkeypatch):
    """Each backend (and each CPU path of the compiled one), as DFP_BACKEND / DFP_CPU_ISA select them."""
    yield from use_backend(request, monkeypatch)


def _layout(make, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A tensor of ``shape`` with random values from ``make(shape)`` (contiguous), laid out as ``layout``."""
    if layout == "slice":  # every other element along every axis, from index 1
        big = make(tuple(2 * d + 1 for d in shape))
        return big[tuple(slice(1, 1 + 2 * d, 2) for d in shape)]
    if layout == "transpose":  # the axes of a contiguous tensor reversed
        return make(shape[::-1]).permute(tuple(reversed(range(len(shape)))))
    if layout == "offset":  # contiguous, but 5 elements into its storage
        flat = make((5 + torch.Size(shape).numel(),))
        return flat[5:].view(shape)
    if layout == "expand" and shape:  # the first axis repeated: stride 0
        return make((1, *shape[1:])).expand(shape)
    if layout == "broadcast":  # one value everywhere: every stride 0
        return make(()).expand(shape)
    if layout == "channels_last" and len(shape) == 4:
        return make(shape).contiguous(memory_format=torch.channels_last)
    return make(shape)


class _Draw:
    """Random values and layouts of one case, reproducible from its seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def floats(self, *shape: int) -> torch.Tensor:
        return _layout(lambda s: torch.randn(s, generator=self.gen), shape, self.rng.choice(LAYOUTS))

    def mantissas(self, shape: tuple[int, ...], headroom: int) -> torch.Tensor:
        seed = self.rng.randrange(2**31)
        return _layout(lambda s: int16_operand(s, headroom, seed), shape, self.rng.choice(LAYOUTS))

    def exponents(self, shape: tuple[int, ...]) -> torch.Tensor:
        values = lambda s: torch.randint(-40, 10, s, generator=self.gen, dtype=torch.int32)
        return _layout(values, shape, self.rng.choice(LAYOUTS))


def _plain(t):
    """``t`` with every tensor in it (also in a DFPTensor) replaced by a contiguous copy."""
    if isinstance(t, DFPTensor):
        return DFPTensor(t.mantissa.contiguous(), t.exponent.contiguous(), t.spec)
    if isinstance(t, torch.Tensor):
        return t.detach().contiguous().requires_grad_(t.requires_grad)
    return t


def _oracle(fn, *args, **kwargs):
    """``fn`` on the reference backend, on contiguous copies of the arguments."""
    with backend_env("reference"):
        return fn(*map(_plain, args), **{k: _plain(v) for k, v in kwargs.items()})


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want), f"{(got != want).sum()} of {got.numel()} values differ, shape {tuple(got.shape)}"


SPECS = [
    DFPSpec(),
    DFPSpec(axis=0),
    DFPSpec(axis=1, block=3),
    DFPSpec(headroom=4, axis=-1),
    DFPSpec(rounding="stochastic"),
]


@pytest.mark.parametrize("case", CASES)
def test_quantize_and_dequantize(any_backend, case):
    draw = _Draw(case)
    x = draw.floats(5, 7, 3) if case % 2 else draw.floats(6, 9)
    for spec in SPECS:
        got = dfp.quantize(x, spec, generator=torch.Generator().manual_seed(case))
        want = _oracle(dfp.quantize, x, spec, generator=torch.Generator().manual_seed(case))
        _assert_same(got.mantissa, want.mantissa)
        _assert_same(got.exponent, want.exponent)
        # dequantize of mantissas and exponents that are views themselves
        shape = dfp.format.exponent_shape(x.shape, spec)
        hand = DFPTensor(draw.mantissas(tuple(x.shape), spec.headroom), draw.exponents(shape), spec)
        _assert_same(hand.dequantize(), _plain(hand).dequantize())


GEMM_LAYOUTS = [
    (DFPSpec(), DFPSpec()),
    (DFPSpec(axis=0), DFPSpec(axis=1)),
    (DFPSpec(axis=1, block=4), DFPSpec(axis=0, block=6)),
    (DFPSpec(headroom=3), DFPSpec(headroom=1, axis=1)),
]


@pytest.mark.parametrize("case", CASES)
def test_gemm(any_backend, case):
    draw = _Draw(case)
    m, k, n = 5, 70, 6  # K > 32: more than one int32 chain at headroom 2
    for spec_a, spec_b in GEMM_LAYOUTS:
        a = DFPTensor(draw.mantissas((m, k), spec_a.headroom), draw.exponents(
            dfp.format.exponent_shape((m, k), spec_a)), spec_a)  # fmt: skip
        b = DFPTensor(draw.mantissas((k, n), spec_b.headroom), draw.exponents(
            dfp.format.exponent_shape((k, n), spec_b)), spec_b)  # fmt: skip
        bias = draw.floats(n)
        _assert_same(dfp.ops.gemm(a, b, bias=bias), _oracle(dfp.ops.gemm, a, b, bias=bias))
        _assert_same(dfp.ops.gemm(b.t(), a.t()), _oracle(dfp.ops.gemm, b.t(), a.t()))


@pytest.mark.parametrize("case", CASES)
def test_matmul(any_backend, case):
    draw = _Draw(case)
    x, y = draw.floats(7, 40), draw.floats(40, 5)
    for spec in (DFPSpec(), DFPSpec(axis=0), DFPSpec(axis=1, block=8), DFPSpec(rounding="stochastic")):
        got = dfp.matmul(x, y, spec, generator=torch.Generator().manual_seed(case))
        _assert_same(got, _oracle(dfp.matmul, x, y, spec, generator=torch.Generator().manual_seed(case)))


def _forward_backward(fn, *args, grad_output: torch.Tensor, **kwargs):
    """fn's output and the gradients of every argument that requires grad."""
    out = fn(*args, **kwargs)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out.detach(), torch.autograd.grad(out, inputs, grad_output)


def _assert_bias_grad(got: torch.Tensor, want: torch.Tensor, grad_output: torch.Tensor, channel_dim: int) -> None:
    """The bias gradient is torch's fp32 sum of ``grad_output`` over all but its channels,
    whose order (so its rounding) follows grad_output's layout: no integer kernel is
    involved. Each order is within (n - 1) * 2**-24 * sum |g| of the exact sum."""
    dims = [d for d in range(grad_output.dim()) if d != channel_dim]
    n = grad_output.numel() // grad_output.shape[channel_dim]
    bound = 2 * (n - 1) * 2.0**-24 * grad_output.abs().sum(dims)
    assert got.shape == want.shape and bool(((got - want).abs() <= bound).all())


def _trainable(t: torch.Tensor) -> torch.Tensor:
    """A leaf that requires grad with ``t``'s values and strides (detach keeps the layout)."""
    return t.detach().requires_grad_()


@pytest.mark.parametrize("fmt", ["dfp16", DFPSpec(axis=0)], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("case", CASES)
def test_linear_forward_and_backward(any_backend, case, fmt):
    draw = _Draw(case)
    x, w, b = (_trainable(t) for t in (draw.floats(6, 45), draw.floats(7, 45), draw.floats(7)))
    grad_output = draw.floats(6, 7)
    got = _forward_backward(dfp.functional.linear, x, w, b, fmt=fmt, grad_output=grad_output)
    want = _oracle(_forward_backward, dfp.functional.linear, x, w, b, fmt=fmt, grad_output=grad_output)
    _assert_same(got[0], want[0])
    for g, r in zip(got[1][:2], want[1][:2], strict=True):  # x and w: the integer GEMMs
        _assert_same(g, r)
    _assert_bias_grad(got[1][2], want[1][2], grad_output, channel_dim=1)


@pytest.mark.parametrize("fmt", ["dfp16", DFPSpec(axis=0)], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("case", CASES)
def test_conv2d_forward_and_backward(any_backend, case, fmt):
    draw = _Draw(case)
    groups, stride = (1, 1) if case % 2 else (2, 2)
    x = _trainable(draw.floats(2, 4, 7, 6))
    w = _trainable(draw.floats(6, 4 // groups, 3, 3))
    b = _trainable(draw.floats(6))
    out_size = ((7 + 2 - 3) // stride + 1, (6 + 2 - 3) // stride + 1)
    grad_output = draw.floats(2, 6, *out_size)
    options = {"stride": stride, "padding": 1, "groups": groups, "fmt": fmt, "grad_output": grad_output}
    got = _forward_backward(dfp.functional.conv2d, x, w, b, **options)
    want = _oracle(_forward_backward, dfp.functional.conv2d, x, w, b, **options)
    _assert_same(got[0], want[0])
    for g, r in zip(got[1][:2], want[1][:2], strict=True):  # x and w: the integer GEMMs
        _assert_same(g, r)
    _assert_bias_grad(got[1][2], want[1][2], grad_output, channel_dim=1)
