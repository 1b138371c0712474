"""The reference backend against independent definitions: plain Python integers, float64
and numpy float32 scalars, written from docs/design.md without sharing its code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import random_bits

from dfp import NonFiniteError, reference

FP32_MAX = float(torch.finfo(torch.float32).max)
INT32_MAX = 2**31 - 1


def limit(s: int) -> int:
    return 2 ** (15 - s) - 1


def expected_exponent(amax: float, s: int) -> int:
    """The brief's rule floor(log2 amax) + 1 - (15 - s), one more when amax would scale
    above M, unless amax >= 2**127 (design.md); a zero group gets the exponent of
    2**-149, the smallest float32."""
    if amax == 0:
        amax = 2.0**-149
    e = math.floor(math.log2(amax)) + 1 - (15 - s)
    return e + 1 if amax * 2.0**-e > limit(s) and amax < 2.0**127 else e


def group_key(mode: int, block: int, o: int, n: int, i: int) -> tuple[int, ...]:
    if mode == 0:
        return (0,)
    return (n,) if mode == 1 else (o, n // block, i)


def awkward(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """float32 values whose scale changes along N by up to 2**±140, with zeros, subnormals,
    exact powers of two and the largest float32 below a power of two mixed in."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.randint(-140, 110, (1, shape[1], 1), generator=g).double()
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).float().flatten()
    special = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-140), 1.0, -(2.0**20), 1 - 2.0**-24, FP32_MAX])
    picks = torch.randint(0, x.numel() + 1, (special.numel(),), generator=g)
    for value, pick in zip(special, picks):
        if pick < x.numel():
            x[pick] = value
    return x.view(shape)


def elements(x: torch.Tensor):
    o_size, n_size, i_size = x.shape
    values = x.double().tolist()
    for o in range(o_size):
        for n in range(n_size):
            for i in range(i_size):
                yield o, n, i, values[o][n][i]


MODES = [(0, 0), (1, 0), (2, 1), (2, 3), (2, 8)]


@pytest.mark.parametrize("s", [0, 1, 2, 3, 7, 13])
@pytest.mark.parametrize("mode,block", MODES)
def test_exponent_rule(mode, block, s):
    x = awkward((3, 17, 4), seed=s * 10 + mode + block)
    _, exponent = reference.quantize3d(x, mode, block, s, False, 0)
    amax: dict[tuple[int, ...], float] = {}
    for o, n, i, value in elements(x):
        key = group_key(mode, block, o, n, i)
        amax[key] = max(amax.get(key, 0.0), abs(value))
    assert exponent.dtype == torch.int32
    assert exponent.shape == {0: (1,), 1: (17,), 2: (3, -(-17 // max(block, 1)), 4)}[mode]
    for key, group_max in amax.items():
        e = expected_exponent(group_max, s)
        assert int(exponent[key]) == e
        if group_max > 0:
            # the brief's range, or just below it where the exponent was raised by one
            # (at the top of the fp32 range the brief's rule stays: up to 2^(15-s), then the clamp)
            top = 2 ** (15 - s) if group_max >= 2.0**127 else limit(s)
            assert 2 ** (14 - s) <= group_max / 2.0**e <= top or limit(s) / 2 < group_max / 2.0**e < 2 ** (14 - s)


@pytest.mark.parametrize("s", [0, 1, 2, 3, 13])
@pytest.mark.parametrize("mode,block", MODES)
def test_nearest_is_round_half_even_then_clamp(mode, block, s):
    x = awkward((2, 23, 3), seed=100 + s)
    # exact ties at the group scale: k + 0.5 steps must go to the even neighbour
    x[0, 0, :] = torch.tensor([2.0 ** (14 - s) + 0.5, 2.5, -3.5])
    mantissa, exponent = reference.quantize3d(x, mode, block, s, False, 0)
    m = limit(s)
    for o, n, i, value in elements(x):
        e = int(exponent[group_key(mode, block, o, n, i)])
        v = value * 2.0**-e  # exact in float64
        q = round(v)  # Python's round is half to even
        if abs(q) > m:  # only at the top of the fp32 range does the clamp act (design.md)
            assert e == 128 - (15 - s)
            q = max(-m, min(m, q))
        else:  # elsewhere the exponent rule keeps |v| <= M
            assert abs(v - q) <= 0.5
        assert int(mantissa[o, n, i]) == q, (o, n, i, value, e)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("s", [0, 1, 2, 3])
def test_range_is_symmetric_and_never_int16_min(s, stochastic):
    m = float(limit(s))
    x = torch.tensor([-m, m, -0.5, 0.25]).view(1, 4, 1)
    mantissa, exponent = reference.quantize3d(x, 0, 0, s, stochastic, 7)
    assert int(exponent) == 0 and mantissa[0, :2, 0].tolist() == [-limit(s), limit(s)]
    # 1 - 2**-24 would scale to M < v < M + 1 and round to M + 1: the exponent goes up
    top = 1 - 2.0**-24
    x = torch.tensor([-top, top]).view(1, 2, 1)
    mantissa, exponent = reference.quantize3d(x, 0, 0, s, stochastic, 7)
    assert int(exponent) == -(14 - s) and mantissa.flatten().tolist() == [-(2 ** (14 - s)), 2 ** (14 - s)]
    big = awkward((4, 64, 8), seed=s)
    for mode, block in MODES:
        mantissa, _ = reference.quantize3d(big, mode, block, s, stochastic, 11)
        assert int(mantissa.min()) >= -limit(s) and int(mantissa.max()) <= limit(s)


@pytest.mark.parametrize("s", [0, 2, 13])
def test_zero_groups(s):
    zero_exponent = -149 - (15 - s) + 1
    x = torch.zeros(2, 6, 3)
    x[0, 1, 0], x[1, 4, 2] = -0.0, 0.0
    mantissa, exponent = reference.quantize3d(x, 0, 0, s, False, 0)
    assert exponent.tolist() == [zero_exponent] and not mantissa.any()

    x[:, 2, :] = 3.0  # channel 2 is the only non-zero channel
    mantissa, exponent = reference.quantize3d(x, 1, 0, s, True, 5)
    assert exponent.tolist() == [zero_exponent] * 2 + [2 - (15 - s)] + [zero_exponent] * 3
    assert mantissa[:, 2, :].eq(3 * 2 ** (13 - s)).all() and mantissa.count_nonzero() == 6

    _, exponent = reference.quantize3d(x, 2, 4, s, False, 0)
    assert exponent[:, 1, :].eq(zero_exponent).all()


@pytest.mark.parametrize("s", [0, 2, 5])
def test_subnormal_inputs_are_exact(s):
    # amax = 300 * 2**-149 gives e = -140 - (15 - s) <= -149: every k * 2**-149 is an
    # integer number of steps, so the mantissas are exact
    k = torch.tensor([300.0, -1.0, 2.0, 77.0, -300.0, 0.0])
    x = (k * 2.0**-149).view(1, 6, 1)
    assert x.abs().max() < torch.finfo(torch.float32).tiny  # really subnormal
    mantissa, exponent = reference.quantize3d(x, 0, 0, s, False, 0)
    e = int(exponent)
    assert e == expected_exponent(300 * 2.0**-149, s) and e < -127  # two-step scaling
    assert mantissa.flatten().tolist() == [int(v) * 2 ** (-149 - e) for v in k.tolist()]


@pytest.mark.parametrize("s", [0, 2, 13])
def test_near_float32_max(s):
    values = [FP32_MAX, -FP32_MAX, 2.0**127, -(2.0**126) * 1.5, 1.0, 2.0**-149]
    x = torch.tensor(values).view(1, 6, 1)
    mantissa, exponent = reference.quantize3d(x, 0, 0, s, False, 0)
    e = int(exponent)
    # FP32_MAX / 2**(128 - (15 - s)) > M, but a raised exponent would round it to 2**128
    # (Inf): at the top of the range the brief's rule and the clamp stay (design.md)
    assert e == 128 - (15 - s)
    m = limit(s)
    assert mantissa.flatten().tolist() == [max(-m, min(m, round(v * 2.0**-e))) for v in values]
    dequantized = mantissa.flatten().double() * 2.0**e
    assert dequantized.abs().max() < FP32_MAX


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(bad):
    x = torch.ones(2, 5, 3)
    x[0, 1, 2] = bad
    x[1, 4, 0] = bad
    for mode, block in MODES:
        with pytest.raises(NonFiniteError, match=r"NaN/Inf.*\b2 of its 30\b"):
            reference.quantize3d(x, mode, block, 2, False, 0)
    assert issubclass(NonFiniteError, ValueError)


def stochastic_by_definition(value: float, e: int, index: int, seed: int, s: int) -> int:
    """q = floor(v) + (r + 0.5 < (v - floor(v)) * 2**23) with fp32 steps (numpy scalars)."""
    r = random_bits(index, seed)
    v = np.float32(value * 2.0**-e)  # exact
    floor = np.floor(v)
    threshold = np.float32(v - floor) * np.float32(2**23)
    q = int(floor) + int(np.float32(r) + np.float32(0.5) < threshold)
    return max(-limit(s), min(limit(s), q))


def fractions(seed: int) -> torch.Tensor:
    """Values whose group exponent is 0 at s = 2 (amax 4096 in every group of mode 0 and
    of mode 2 with block 5), among them values in (-0.5, 0) whose fraction v - floor(v)
    is inexact in fp32."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, 5, 7, generator=g) * 2 - 1) * 2.0 ** torch.randint(-30, 12, (3, 5, 7), generator=g)
    x[:, 1, :] = 4096.0
    x[0, 0, :] = torch.tensor([-(2.0**-30), -0.4999999, -0.25, 0.1, -1e-3, 7.75, -0.3333333])
    return x


@pytest.mark.parametrize("seed", [0, 12345, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF])
@pytest.mark.parametrize("data", ["awkward", "fractions"])
@pytest.mark.parametrize("mode,block", [(0, 0), (2, 5)])
def test_stochastic_matches_definition(mode, block, data, seed):
    s = 2
    x = awkward((3, 11, 7), seed=seed & 0xFFFF) if data == "awkward" else fractions(seed & 0xFFFF)
    mantissa, exponent = reference.quantize3d(x, mode, block, s, True, seed)
    for index, (o, n, i, value) in enumerate(elements(x)):
        e = int(exponent[group_key(mode, block, o, n, i)])
        assert int(mantissa[o, n, i]) == stochastic_by_definition(value, e, index, seed, s), (o, n, i)


def test_stochastic_threshold_is_strict():
    """v = (r + d) / 2**23 puts the threshold exactly at r + d: it rounds up for d = 1 only
    (r + 0.5 < r + 0.5 is false), which pins both the 0.5 and the strict comparison."""
    s, seed, n = 2, 77, 300
    offsets = [(0.0, 0.5, 1.0)[j % 3] for j in range(1, n)]
    values = [4096.0] + [(random_bits(j, seed) + d) / 2**23 for j, d in zip(range(1, n), offsets)]
    x = torch.tensor(values).view(1, n, 1)
    mantissa, exponent = reference.quantize3d(x, 0, 0, s, True, seed)
    assert int(exponent) == 0
    expected = [4096] + [int(v) + (d == 1.0) for v, d in zip(values[1:], offsets)]
    assert mantissa.flatten().tolist() == expected


def test_stochastic_is_unbiased():
    """Each value repeated n times: the mean of its mantissas estimates E[q] = v (up to
    the 2**-23 resolution of the threshold); with a fixed seed, the deviation must stay
    within 5 standard deviations sqrt(p (1 - p) / n)."""
    s, n = 2, 20000
    values = torch.tensor([0.5, 0.1, -0.1, 2.3, -7.75, 1000.999, -0.001, 0.0625])
    x = values.repeat(n, 1)
    x[0, 0] = 4096.0  # amax in [2**12, 2**13): e = 0, so v = x
    mantissa, exponent = reference.quantize3d(x.view(1, -1, 1), 0, 0, s, True, 2024)
    assert int(exponent) == 0
    q = mantissa.view(n, -1)[1:].double()
    for column, v in enumerate(values.double().tolist()):
        p = v - math.floor(v)
        samples = q[:, column]
        assert set(samples.unique().tolist()) <= {math.floor(v), math.floor(v) + 1}
        sigma = math.sqrt(p * (1 - p) / samples.numel())
        assert abs(samples.mean().item() - v) <= 5 * sigma + 2.0**-23, v


def test_stochastic_depends_only_on_the_seed():
    x = awkward((2, 50, 3), seed=3)
    first = reference.quantize3d(x, 1, 0, 2, True, 99)
    again = reference.quantize3d(x.clone(), 1, 0, 2, True, 99)
    other = reference.quantize3d(x, 1, 0, 2, True, 100)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


def test_empty_inputs():
    for o, n, i in [(0, 4, 3), (2, 0, 3), (4, 5, 0)]:
        for mode, block in MODES:
            mantissa, exponent = reference.quantize3d(torch.zeros(o, n, i), mode, block, 2, False, 0)
            assert mantissa.shape == (o, n, i) and mantissa.dtype == torch.int16
            assert exponent.shape == {0: (1,), 1: (n,), 2: (o, -(-n // max(block, 1)), i)}[mode]


def test_chain_length():
    assert [reference.chain_length(s, s) for s in range(4)] == [2, 8, 32, 128]
    for ha in range(14):
        for hb in range(14):
            chain = reference.chain_length(ha, hb)
            assert chain & (chain - 1) == 0
            assert chain * limit(ha) * limit(hb) <= INT32_MAX < 2 * chain * limit(ha) * limit(hb)


def f32(value: float) -> float:
    return float(np.float32(value))


def gemm_by_definition(a, ea, ha, b, eb, hb, kblock, bias):
    """docs/design.md's GEMM transcribed with Python ints and numpy float32 scalars."""
    a, b, ea, eb = a.tolist(), b.tolist(), ea.tolist(), eb.tolist()
    m_size, k_size, n_size = len(a), len(b), len(b[0]) if b else 0
    bias = None if bias is None else bias.tolist()
    chain = reference.chain_length(ha, hb)
    out = np.zeros((m_size, n_size), np.float32)
    for m in range(m_size):
        for n in range(n_size):
            ra = max(ea[m])
            rb = max(row[n] for row in eb)
            acc = np.float32(0)
            for blk, start in enumerate(range(0, k_size, kblock)):
                scale = np.float32(2.0 ** (ea[m][blk] - ra)) * np.float32(2.0 ** (eb[blk][n] - rb))
                stop = min(start + kblock, k_size)
                for c0 in range(start, stop, chain):
                    chain_sum = sum(a[m][k] * b[k][n] for k in range(c0, min(c0 + chain, stop)))
                    assert abs(chain_sum) <= INT32_MAX
                    acc = acc + np.float32(chain_sum) * scale
            out[m, n] = np.float32(float(acc) * 2.0 ** (ra + rb))
            if bias is not None:
                out[m, n] = out[m, n] + np.float32(bias[n])
    return torch.from_numpy(out)


def random_operands(m, k, n, ha, hb, kblock, spread, seed, offset=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-limit(ha), limit(ha) + 1, (m, k), generator=g, dtype=torch.int16)
    b = torch.randint(-limit(hb), limit(hb) + 1, (k, n), generator=g, dtype=torch.int16)
    blocks = -(-k // kblock)
    ea = torch.randint(-spread, 9, (m, blocks), generator=g, dtype=torch.int32) + offset
    eb = torch.randint(-spread, 9, (blocks, n), generator=g, dtype=torch.int32) + offset
    return a, ea, b, eb


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("offset", [0, -80])  # -80: 2**(ra + rb) is beyond fp32, C may be subnormal
@pytest.mark.parametrize("spread", [0, 30, 250])  # 250: scales underflow to subnormals and 0
@pytest.mark.parametrize(
    "m,k,n,ha,hb,kblock",
    [(1, 1, 1, 2, 2, 1), (3, 7, 2, 0, 0, 7), (2, 33, 3, 2, 2, 5), (4, 70, 3, 3, 1, 16), (2, 65, 2, 13, 0, 64)],
)
def test_gemm_matches_definition(m, k, n, ha, hb, kblock, spread, offset, with_bias):
    a, ea, b, eb = random_operands(m, k, n, ha, hb, kblock, spread, seed=k + spread, offset=offset)
    bias = torch.randn(n) if with_bias else None
    out = reference.gemm(a, ea, ha, b, eb, hb, kblock, bias)
    assert out.dtype == torch.float32
    assert torch.equal(out, gemm_by_definition(a, ea, ha, b, eb, hb, kblock, bias))


@pytest.mark.parametrize("s", [0, 1, 2, 3])
def test_gemm_within_one_chain_equals_int64_product(s):
    chain = reference.chain_length(s, s)
    for k in sorted({1, chain - 1, chain}):
        a, ea, b, eb = random_operands(5, k, 4, s, s, k, 20, seed=k)
        a[0], b[:, 0] = limit(s), limit(s)  # the largest chain sum there is
        exact = [[sum(x * y for x, y in zip(row, col)) for col in b.t().tolist()] for row in a.tolist()]
        shift = ea + eb  # KB = 1: every element's scale is 2**(ea + eb)
        expected = [[f32(v * 2.0 ** int(shift[m, n])) for n, v in enumerate(row)] for m, row in enumerate(exact)]
        assert reference.gemm(a, ea, s, b, eb, s, k, None).tolist() == expected
        assert reference.gemm(a, ea * 0, s, b, eb * 0, s, k, None).tolist() == [[f32(v) for v in r] for r in exact]


def chains(k: int, kblock: int, chain: int) -> list[tuple[int, int]]:
    out = []
    for start in range(0, k, kblock):
        stop = min(start + kblock, k)
        out += [(c0, min(c0 + chain, stop)) for c0 in range(start, stop, chain)]
    return out


@pytest.mark.parametrize("blocked", [False, True])
# K as long as the proof of exactness allows (K * unit < 2**24, unit = float32(max**2))
@pytest.mark.parametrize("s,k", [(0, 1001), (1, 2043), (2, 4096)])
def test_gemm_worst_case_operands_stay_exact(s, k, blocked):
    """All +max, all -max and alternating signs over a long K: a naive int32 accumulator
    overflows, the chains never do. The expected value is the fp64 sum of the chains'
    fp32 sums; we check that every partial sum is a float32, which proves the fp32
    accumulation exact, so the output must equal it bit for bit."""
    m_max, chain = limit(s), reference.chain_length(s, s)
    kblock = 3 * chain // 2 if blocked else k
    alternating = [m_max if j % 2 == 0 else -m_max for j in range(k)]
    a = torch.tensor([[m_max] * k, [-m_max] * k, alternating], dtype=torch.int16)
    b = torch.tensor([[m_max] * k, [-m_max] * k, alternating], dtype=torch.int16).t()
    blocks = -(-k // kblock)
    ea, eb = torch.zeros(3, blocks, dtype=torch.int32), torch.zeros(blocks, 3, dtype=torch.int32)
    out = reference.gemm(a, ea, s, b, eb, s, kblock, None)
    assert k * m_max**2 > INT32_MAX  # the full dot product overflows int32
    for row, col in [(r, c) for r in range(3) for c in range(3)]:
        products = [x * y for x, y in zip(a[row].tolist(), b[:, col].tolist())]
        partial = 0.0
        for c0, c1 in chains(k, kblock, chain):
            partial += f32(sum(products[c0:c1]))
            assert f32(partial) == partial  # exact in fp32 at every step
        assert out[row, col].item() == partial


def test_gemm_close_to_float64():
    """Against the fp64 product of the dequantized operands, the error is bounded by one
    rounding per chain conversion, one per accumulation and one in the epilogue."""
    k, kblock, s = 1000, 96, 2
    a, ea, b, eb = random_operands(6, k, 5, s, s, kblock, 8, seed=1)
    out = reference.gemm(a, ea, s, b, eb, s, kblock, None).double()
    ea_k = ea.repeat_interleave(kblock, dim=1)[:, :k].double()
    eb_k = eb.repeat_interleave(kblock, dim=0)[:k].double()
    a64, b64 = a.double() * 2.0**ea_k, b.double() * 2.0**eb_k
    exact, magnitude = a64 @ b64, a64.abs() @ b64.abs()
    roundings = 2 * len(chains(k, kblock, reference.chain_length(s, s))) + 1
    assert ((out - exact).abs() <= 1.01 * roundings * 2.0**-24 * magnitude).all()


def test_gemm_strided_and_empty_operands():
    a, ea, b, eb = random_operands(9, 40, 7, 2, 1, 16, 10, seed=2)
    expected = reference.gemm(a, ea, 2, b, eb, 1, 16, None)
    a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()  # column-major views
    assert torch.equal(reference.gemm(a_t, ea, 2, b_t, eb, 1, 16, None), expected)
    a_wide = torch.zeros(9, 80, dtype=torch.int16)
    a_wide[:, ::2] = a
    assert torch.equal(reference.gemm(a_wide[:, ::2], ea, 2, b, eb, 1, 16, None), expected)
    assert reference.gemm(a[:0], ea[:0], 2, b, eb, 1, 16, None).shape == (0, 7)
    assert reference.gemm(a, ea, 2, b[:, :0], eb[:, :0], 1, 16, torch.zeros(0)).shape == (9, 0)
