"""dfp.quantize on every backend and CPU path: bit-exact against the reference, and the
format's contract checked directly (range, exponent rule, error bound, rounding)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import on_reference, wide_range

import dfp
from dfp import DFPSpec

SPECS = [
    DFPSpec(),
    DFPSpec(headroom=0),
    DFPSpec(headroom=3),
    DFPSpec(headroom=13),
    DFPSpec(axis=0),
    DFPSpec(axis=-1),
    DFPSpec(axis=1, block=1),
    DFPSpec(axis=1, block=3),
    DFPSpec(axis=0, block=16),
    DFPSpec(axis=-1, block=32),
]
SHAPES = [(1,), (37,), (5, 7), (64, 129), (3, 17, 4, 5), (0, 6), (2, 33, 40)]


def _valid(spec: DFPSpec, shape) -> bool:
    return spec.axis is None or -len(shape) <= spec.axis < len(shape)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "dithered"])
@pytest.mark.parametrize(
    "shape,spec", [(shape, spec) for shape in SHAPES for spec in SPECS if _valid(spec, shape)], ids=str
)
def test_bit_exact_against_reference(backend, shape, spec, rounding):
    spec = DFPSpec(spec.headroom, spec.axis, spec.block, rounding)
    x = wide_range(shape)
    got = dfp.quantize(x, spec, generator=torch.Generator().manual_seed(7))
    want = on_reference(dfp.quantize, x, spec, generator=torch.Generator().manual_seed(7))
    assert got.mantissa.dtype == torch.int16 and got.exponent.dtype == torch.int32
    assert torch.equal(got.mantissa, want.mantissa)
    assert torch.equal(got.exponent, want.exponent)


@pytest.mark.parametrize("headroom", [0, 2, 3, 8])
def test_range_exponent_rule_and_half_step_bound(backend, headroom):
    x = wide_range((64, 100), seed=3)
    q = dfp.quantize(x, DFPSpec(headroom=headroom, axis=0))
    limit = 2 ** (15 - headroom) - 1
    assert int(q.mantissa.abs().max()) <= limit
    assert int(q.mantissa.min()) != -32768
    amax = x.abs().amax(dim=1).double()
    e = q.exponent.view(-1).double()
    # amax / 2^e lies in [2^(14-s), 2^(15-s)) (the brief's rule), or in (M/2, 2^(14-s))
    # where design.md raises e by one so that amax / 2^e <= M
    ratio = amax / torch.exp2(e)
    assert bool(((ratio > limit / 2) & (ratio <= limit)).all())
    assert bool(((ratio >= 2 ** (14 - headroom)) | (amax / torch.exp2(e - 1) > limit)).all())
    err = (q.dequantize().double() - x.double()).abs()
    assert bool((err <= torch.exp2(e).unsqueeze(1) / 2).all()), "nearest rounding is off by more than half a step"


def test_zero_groups_have_the_smallest_exponent(backend):
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8)
    q = dfp.quantize(x, DFPSpec(axis=0))
    assert q.mantissa[0].eq(0).all() and q.mantissa[2].eq(0).all()
    assert q.exponent[0].item() == q.exponent[2].item() == -149 + 1 - 13
    assert torch.equal(q.dequantize()[0], torch.zeros(8))


def test_subnormals_and_values_near_the_fp32_maximum(backend):
    # subnormal float32 with at most 13 significant bits: exact in DFP16 at headroom 2
    tiny = torch.tensor([[1.0, 2.0], [-3.0, 0.0], [5000.0, -8191.0], [0.0, 0.0]]) * 2.0**-149
    assert 0 < tiny.abs().max() < torch.finfo(torch.float32).tiny
    q = dfp.quantize(tiny, DFPSpec(axis=0))
    assert torch.equal(q.dequantize(), tiny)
    big = torch.tensor([3.4e38, -3.0e38, 1.0, 0.0])
    q = dfp.quantize(big)
    assert torch.isfinite(q.dequantize()).all()
    assert abs(q.dequantize()[0].item() - 3.4e38) <= 2.0 ** q.exponent.item()


def test_stochastic_rounding_is_unbiased(backend):
    # x sits at a fraction 0.3 of a step: each sample rounds up with probability 0.3.
    n = 200_000
    step = 2.0**-13  # amax 1.0 -> e = 1 - 13 with headroom 2
    x = torch.full((n,), 0.3 * step)
    x[0] = 1.0
    q = dfp.quantize(x, DFPSpec(rounding="stochastic"), generator=torch.Generator().manual_seed(1))
    assert q.exponent.item() == -12
    ups = q.mantissa[1:].double()  # 0 or 1 (value 0.15 of a mantissa unit)
    p = 0.15
    mean = ups.mean().item()
    sigma = math.sqrt(p * (1 - p) / (n - 1))
    assert set(ups.unique().tolist()) <= {0.0, 1.0}
    assert abs(mean - p) < 5 * sigma, f"mean {mean} vs {p} (5 sigma = {5 * sigma:.2e})"


def test_stochastic_rounding_reproducible_and_thread_independent(backend):
    x = torch.randn(300, 1000)
    spec = DFPSpec(axis=1, block=32, rounding="stochastic")
    torch.set_num_threads(1)
    one = dfp.quantize(x, spec, generator=torch.Generator().manual_seed(11))
    torch.set_num_threads(2)
    two = dfp.quantize(x, spec, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(5)
    global_a = dfp.quantize(x, spec)
    torch.manual_seed(5)
    global_b = dfp.quantize(x, spec)
    other = dfp.quantize(x, spec, generator=torch.Generator().manual_seed(12))
    assert torch.equal(one.mantissa, two.mantissa)
    assert torch.equal(global_a.mantissa, global_b.mantissa)
    assert not torch.equal(one.mantissa, other.mantissa)


def test_dithered_rounding_is_unbiased_deterministic_and_draws_nothing(backend):
    """Dithered rounding: stochastic rounding's rule with bits hashed from each value's
    sign, significand and flat index."""
    # equal values at 0.3 of a step: rounding to nearest takes every one down (a bias of
    # 0.3 step); dithering takes about 30 % up, the index telling them apart
    n = 100_000
    step = 2.0**-12  # amax 1.0 -> e = -12 with headroom 2
    x = torch.full((n,), 0.3 * step)
    x[0] = 1.0
    spec = DFPSpec(rounding="dithered")
    rng = torch.get_rng_state()
    q = dfp.quantize(x, spec)
    assert torch.equal(torch.get_rng_state(), rng), "dithered rounding must not draw from torch's generator"
    assert q.exponent.item() == -12
    ups = q.mantissa[1:].double()
    assert set(ups.unique().tolist()) == {0.0, 1.0}
    assert abs(ups.mean().item() - 0.3) < 5 * math.sqrt(0.21 / (n - 1))
    assert int(dfp.quantize(x, DFPSpec()).mantissa[1:].abs().sum()) == 0  # nearest: all down
    # no seed: the same bits for any generator; and a power-of-two scale changes nothing
    varied = x * (1 + torch.rand(n, generator=torch.Generator().manual_seed(3)) * 0.01)
    once = dfp.quantize(varied, spec).mantissa
    assert torch.equal(dfp.quantize(varied, spec, generator=torch.Generator().manual_seed(9)).mantissa, once)
    assert torch.equal(dfp.quantize(varied * 2.0**-40, spec).mantissa, once)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(backend, bad):
    x = torch.randn(4, 4)
    x[2, 3] = bad
    with pytest.raises(dfp.NonFiniteError, match="NaN"):
        dfp.quantize(x)


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="x must be float32"):
        dfp.quantize(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        dfp.quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="x is on meta"):
        dfp.quantize(torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        dfp.quantize(torch.ones(3, 3), DFPSpec(axis=2))
    with pytest.raises(ValueError, match="headroom"):
        DFPSpec(headroom=14)
    with pytest.raises(ValueError, match="block needs an axis"):
        DFPSpec(block=4)
    with pytest.raises(ValueError, match="rounding"):
        DFPSpec(rounding="up")


def test_exponent_shapes_broadcast():
    x = torch.randn(4, 6, 5)
    assert dfp.quantize(x).exponent.shape == ()
    assert dfp.quantize(x, DFPSpec(axis=1)).exponent.shape == (1, 6, 1)
    assert dfp.quantize(x, DFPSpec(axis=1, block=4)).exponent.shape == (4, 2, 5)
    q = dfp.quantize(x, DFPSpec(axis=2, block=2))
    assert torch.allclose(q.dequantize(), x, rtol=0, atol=x.abs().max().item() * 2**-12)


def test_opcheck_quantize():
    x = torch.randn(6, 10)
    for args in [(2, None, None, False, 0), (3, 1, None, True, 99), (2, 0, 4, True, -5)]:
        torch.library.opcheck(torch.ops.dfp.quantize.default, (x, *args))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "dithered"])
def test_top_step_values_never_clamp(backend, rounding):
    # amax just below 2^13 would round to 8192 > 8191 = M under the plain exponent rule
    x = torch.tensor([8191.75, -8191.6, 8191.4, 1.0])
    q = dfp.quantize(x, DFPSpec(rounding=rounding), generator=torch.Generator().manual_seed(0))
    assert q.exponent.item() == 1
    assert bool(((q.dequantize() - x).abs() <= 2.0 ** q.exponent.item()).all())
    if rounding == "nearest":
        assert bool(((q.dequantize() - x).abs() <= 1.0).all())


def test_the_top_of_the_fp32_range_stays_finite(backend):
    x = torch.tensor([torch.finfo(torch.float32).max, -3.3e38, 1.0])
    q = dfp.quantize(x)
    assert torch.isfinite(q.dequantize()).all()
    assert int(q.mantissa.abs().max()) == 2**13 - 1


def test_quantize_of_fake_tensors_goes_through_the_registered_op():
    """Eager calls run the op's body directly (dfp._ops.plain_eager); a traced one needs
    the op's fake kernel, which gives shapes and dtypes without data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = dfp.quantize(torch.empty(4, 6), dfp.DFPSpec(axis=0))
    assert q.mantissa.shape == (4, 6) and q.mantissa.dtype == torch.int16 and q.exponent.shape == (4, 1)
