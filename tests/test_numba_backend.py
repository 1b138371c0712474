"""The numba backend is bit-identical to the reference: mantissas, exponents and GEMM
outputs compared with torch.equal over shapes, groupings, headrooms and roundings."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from helpers import random_bits

from dfp import BackendUnavailableError, NonFiniteError, backends, reference

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


def numba_backend():
    return backends.get("numba")


def awkward(shape, seed: int) -> torch.Tensor:
    """Values spread over 2**±140 along N, with zeros, subnormals, ties at small scales,
    tiny negatives and the float32 extremes mixed in."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.randint(-140, 110, (1, shape[1], 1), generator=g).double()
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).float().flatten()
    fmax = torch.finfo(torch.float32).max
    special = torch.tensor([0.0, -0.0, 1e-45, -3e-41, 2.5, -3.5, -(2.0**-30), 1 - 2.0**-24, fmax, -fmax])
    picks = torch.randint(0, x.numel() + 1, (special.numel(),), generator=g)
    for value, pick in zip(special, picks):
        if pick < x.numel():
            x[pick] = value
    return x.view(shape)


SHAPES = [(1, 1, 1), (1, 1000, 1), (3, 37, 5), (2, 130, 3), (0, 4, 3), (2, 0, 3), (4, 9, 0)]
MODES = [(0, 0), (1, 0), (2, 1), (2, 4), (2, 7), (2, 1000)]


# (rounding code of dfp.format.ROUNDINGS, seed)
ROUNDINGS = [(0, 0), (1, 0), (1, -(2**63)), (1, 0x0123456789ABCDEF), (2, 0)]


@needs_numba
@pytest.mark.parametrize("rounding,seed", ROUNDINGS, ids=["nearest", "seed0", "seed-min", "seed-mixed", "dithered"])
@pytest.mark.parametrize("headroom", [0, 1, 2, 3, 7, 13])
@pytest.mark.parametrize("mode,block", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_bit_exact(shape, mode, block, headroom, rounding, seed):
    x = awkward(shape, seed=hash((shape, mode, block, headroom)) & 0xFFFF)
    got = numba_backend().quantize3d(x, mode, block, headroom, rounding, seed)
    want = reference.quantize3d(x, mode, block, headroom, rounding, seed)
    assert got[0].dtype == torch.int16 and got[1].dtype == torch.int32
    assert torch.equal(got[0], want[0]), "mantissas differ"
    assert torch.equal(got[1], want[1]), "exponents differ"


@needs_numba
@pytest.mark.parametrize("headroom", [0, 2, 13])
def test_quantize_fractions_that_round_in_fp32(headroom):
    # v in (-0.5, 0): floor(v) = -1 and v - floor(v) is inexact in fp32 (design.md)
    g = torch.Generator().manual_seed(headroom)
    x = -torch.rand(1, 4096, 1, generator=g) * 2.0 ** torch.randint(-40, 0, (1, 4096, 1), generator=g)
    x[0, 0, 0] = 2.0 ** (14 - headroom)  # e = 0: v = x
    got = numba_backend().quantize3d(x, 0, 0, headroom, True, 5)
    want = reference.quantize3d(x, 0, 0, headroom, True, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_numba
def test_quantize_stochastic_threshold_ties():
    # v = (r + d) / 2**23 puts the threshold exactly at r + d: the strict comparison with
    # r + 0.5 decides, which random data almost never tests
    seed, n = -987654321, 301
    values = [4096.0] + [(random_bits(j, seed) + (0.0, 0.5, 1.0)[j % 3]) / 2**23 for j in range(1, n)]
    x = torch.tensor(values).view(1, n, 1)
    got = numba_backend().quantize3d(x, 0, 0, 2, True, seed)
    want = reference.quantize3d(x, 0, 0, 2, True, seed)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_numba
def test_quantize_non_finite_raises():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN/Inf.*\b1 of its 24\b"):
        numba_backend().quantize3d(x, 1, 0, 2, False, 0)


def random_gemm_operands(m, k, n, ha, hb, kblock, spread, seed):
    g = torch.Generator().manual_seed(seed)
    la, lb = 2 ** (15 - ha) - 1, 2 ** (15 - hb) - 1
    a = torch.randint(-la, la + 1, (m, k), generator=g, dtype=torch.int16)
    b = torch.randint(-lb, lb + 1, (k, n), generator=g, dtype=torch.int16)
    blocks = -(-k // kblock)
    ea = torch.randint(-spread, 9, (m, blocks), generator=g, dtype=torch.int32)
    eb = torch.randint(-spread, 9, (blocks, n), generator=g, dtype=torch.int32)
    return a, ea, b, eb


GEMM_SHAPES = [(1, 1, 1), (3, 7, 5), (17, 100, 9), (5, 257, 4), (0, 5, 3), (4, 5, 0), (64, 1000, 33)]


# spread 300: scales underflow to subnormals and 0; offset -80: 2**(ra + rb) is beyond
# fp32 and C may be subnormal
EXPONENTS = [(0, 0), (40, 0), (300, 0), (40, -80)]


@needs_numba
@pytest.mark.parametrize("spread,offset", EXPONENTS)
@pytest.mark.parametrize("kblock", [None, 1, 5, 32, 48])
@pytest.mark.parametrize("ha,hb", [(0, 0), (2, 2), (3, 1), (13, 0), (13, 13)])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES, ids=str)
def test_gemm_bit_exact(m, k, n, ha, hb, kblock, spread, offset):
    kblock = kblock or k
    a, ea, b, eb = random_gemm_operands(m, k, n, ha, hb, kblock, spread, seed=m + k + n + ha + spread)
    ea, eb = ea + offset, eb + offset
    bias = torch.randn(n) if k % 2 else None
    got = numba_backend().gemm(a, ea, ha, b, eb, hb, kblock, bias)
    want = reference.gemm(a, ea, ha, b, eb, hb, kblock, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got, want)


@needs_numba
@pytest.mark.parametrize("headroom", [0, 1, 2, 3])
def test_gemm_worst_case_and_strided_operands(headroom):
    k = 3001
    top = torch.full((k,), 2 ** (15 - headroom) - 1, dtype=torch.int16)
    alternating = top * torch.tensor([1, -1], dtype=torch.int16).repeat(k // 2 + 1)[:k]
    a = torch.stack([top, -top, alternating])
    b = torch.stack([alternating, top]).t()  # a column-major view
    a_strided = torch.zeros(3, 2 * k, dtype=torch.int16)
    a_strided[:, ::2] = a
    for kblock in (k, 100):
        blocks = -(-k // kblock)
        ea, eb = torch.zeros(3, blocks, dtype=torch.int32), torch.zeros(blocks, 2, dtype=torch.int32)
        got = numba_backend().gemm(a, ea, headroom, b, eb, headroom, kblock, None)
        assert torch.equal(got, reference.gemm(a, ea, headroom, b, eb, headroom, kblock, None))
        assert torch.equal(numba_backend().gemm(a_strided[:, ::2], ea, headroom, b, eb, headroom, kblock, None), got)


def test_missing_numba_is_reported_clearly(monkeypatch):
    """Importing the backend works without numba; choosing it says what to install."""
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` fail
    monkeypatch.delitem(sys.modules, "dfp.backends.numba", raising=False)
    monkeypatch.setattr(backends, "numba", None, raising=False)  # restored afterwards
    monkeypatch.setattr(backends, "_checked", {})  # forget that it passed its check before
    with pytest.raises(BackendUnavailableError, match="pip install numba"):
        backends.get("numba")
