"""The int8-limb GEMM of dfp.cuda.limbs (the tensor-core formulation of the int16 GEMM),
run on CPU: the split, the offset corrections and the recombination are exact, every
torch._int_mm call meets cuBLASLt's shape limits and never overflows int32, and the GEMM
is bit-identical to dfp.reference."""

from __future__ import annotations

import pytest
import torch
from helpers import int16_operand

from dfp import reference
from dfp.cuda import limbs


def _max(headroom: int) -> int:
    return 2 ** (15 - headroom) - 1


@pytest.fixture
def checked_int_mm(monkeypatch):
    """torch._int_mm that enforces its CUDA shape limits on CPU and checks every int32
    result against the exact int64 product; records the largest |result|."""
    real = torch._int_mm
    seen = {"calls": 0, "largest": 0}

    def int_mm(x, y):
        assert x.dtype == y.dtype == torch.int8
        assert x.shape[0] > 16 and x.shape[1] % 8 == 0 and x.shape[1] > 0 and y.shape[1] % 8 == 0
        out = real(x, y)
        exact = x.to(torch.int64) @ y.to(torch.int64)
        assert torch.equal(out.to(torch.int64), exact), "an int32 partial overflowed"
        seen["calls"] += 1
        seen["largest"] = max(seen["largest"], int(exact.abs().max()))
        return out

    monkeypatch.setattr(torch, "_int_mm", int_mm)
    return seen


def test_split_is_exact_for_every_int16_value():
    x = torch.arange(-32767, 32768, dtype=torch.int32).to(torch.int16)
    high, low = limbs.split_limbs(x)
    assert high.dtype == low.dtype == torch.int8
    assert torch.equal(256 * high.to(torch.int32) + low.to(torch.int32) + 128, x.to(torch.int32))
    assert int(high.min()) == -128 and int(high.max()) == 127
    assert int(low.min()) == -128 and int(low.max()) == 127


@pytest.mark.parametrize(
    ("k", "kblock", "chain", "segment", "want"),
    [
        (10, 10, 4, 2**16, [(0, 4, True), (4, 8, True), (8, 10, True)]),
        (10, 6, 4, 2**16, [(0, 4, True), (4, 6, True), (6, 10, True)]),
        (9, 9, 8, 3, [(0, 3, False), (3, 6, False), (6, 8, True), (8, 9, True)]),
    ],
)
def test_chain_segments_follow_the_contract(k, kblock, chain, segment, want):
    assert limbs.chain_segments(k, kblock, chain, segment) == want


def _worst_cases(m: int, k: int, n: int, headroom: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    top = _max(headroom)
    ones_a, ones_b = torch.ones(m, k, dtype=torch.int16), torch.ones(k, n, dtype=torch.int16)
    sign = (1 - 2 * (torch.arange(k) % 2)).to(torch.int16)
    return {
        "all +max": (top * ones_a, top * ones_b),
        "all -max": (-top * ones_a, -top * ones_b),
        "+max x -max": (top * ones_a, -top * ones_b),
        "alternating": (top * sign * ones_a, top * sign[:, None] * ones_b),
        "zeros": (0 * ones_a, 0 * ones_b),
        "low byte 0x80": ((top & ~0xFF | 0x80) * ones_a, (top & ~0xFF | 0x80) * ones_b),
    }


@pytest.mark.parametrize("headroom", [0, 1, 2, 3])
@pytest.mark.parametrize("case", ["all +max", "all -max", "+max x -max", "alternating", "zeros", "low byte 0x80"])
def test_chain_sums_exact_at_worst_case_values(headroom, case, checked_int_mm):
    chain = reference.chain_length(headroom, headroom)
    k = 3 * chain + 5  # whole chains and a short last one
    a, b = _worst_cases(9, k, 5, headroom)[case]
    sums = list(limbs.chain_sums(a, b, k, chain))
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    starts = range(0, k, chain)
    assert [blk for blk, _ in sums] == [0] * len(starts)
    for (_, got), c0 in zip(sums, starts):
        want = a64[:, c0 : c0 + chain] @ b64[c0 : c0 + chain]
        assert torch.equal(got, want)
        assert int(got.abs().max()) <= 2**31 - 1  # the contract's chain bound
    assert checked_int_mm["largest"] <= 2**30


def test_long_chains_are_cut_into_segments_that_cannot_overflow(checked_int_mm):
    """Headroom 8: chains of 2**17 products. A zero mantissa has low limb -128, so one
    int32 sum over a whole chain of zeros would reach 2**31; segments of 2**16 keep
    every partial at 2**30."""
    chain = reference.chain_length(8, 8)
    assert chain == 2**17
    k = chain + 3
    a, b = torch.zeros(2, k, dtype=torch.int16), torch.zeros(k, 8, dtype=torch.int16)
    a[:, -1], b[-1] = 127, -127
    sums = list(limbs.chain_sums(a, b, k, chain))
    assert len(sums) == 2 and torch.equal(sums[0][1], torch.zeros(2, 8, dtype=torch.int64))
    assert torch.equal(sums[1][1], torch.full((2, 8), -127 * 127, dtype=torch.int64))
    assert checked_int_mm["calls"] == 3 and checked_int_mm["largest"] == 2**30


def _exponents(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-40, 10, shape, generator=g, dtype=torch.int32)


def _gemm_case(m, k, n, ha, hb, kblock, seed=0, transposed=False):
    a = int16_operand((m, k), ha, seed)
    b = int16_operand((n, k), hb, seed + 1).t() if transposed else int16_operand((k, n), hb, seed + 1)
    kb = -(-k // kblock)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return a, _exponents((m, kb), seed + 2), ha, b, _exponents((kb, n), seed + 3), hb, kblock, bias


GEMM_CASES = {
    "one element": (1, 1, 1, 2, 2, 1),
    "odd shape": (3, 5, 7, 2, 2, 5),
    "M 8 (padded rows)": (8, 40, 3, 2, 2, 40),
    "M 9 (no padding)": (9, 40, 3, 2, 2, 40),
    "K not a multiple of the chain": (17, 100, 9, 2, 2, 100),
    "K blocks of 7": (40, 100, 21, 2, 2, 7),
    "K blocks of 48 (chains cut by blocks)": (12, 200, 10, 2, 2, 48),
    "headroom 0": (17, 31, 9, 0, 0, 31),
    "headroom 3 x 1": (5, 260, 6, 3, 1, 260),
    "headroom 3 (chains of 128)": (6, 700, 5, 3, 3, 700),
    "many chains": (2, 1029, 3, 2, 2, 1029),
}


@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("transposed", [False, True], ids=["b row-major", "b transposed view"])
def test_gemm_bit_identical_to_reference(case, transposed, checked_int_mm):
    args = _gemm_case(*GEMM_CASES[case], transposed=transposed)
    got = limbs.gemm(*args)
    want = reference.gemm(*args)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("headroom", [0, 2])
def test_gemm_bit_identical_at_extremes(headroom, checked_int_mm):
    """-M..M extremes mixed at random (the largest products) and without bias."""
    top = _max(headroom)
    g = torch.Generator().manual_seed(5)
    a = (torch.randint(0, 2, (20, 70), generator=g) * 2 - 1).to(torch.int16) * top
    b = (torch.randint(0, 2, (70, 11), generator=g) * 2 - 1).to(torch.int16) * top
    ea, eb = torch.zeros(20, 1, dtype=torch.int32), torch.zeros(1, 11, dtype=torch.int32)
    args = (a, ea, headroom, b, eb, headroom, 70, None)
    assert torch.equal(limbs.gemm(*args), reference.gemm(*args))
