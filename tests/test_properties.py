"""Property-based checks (hypothesis): for any shape and layout the compiled backend is
the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import on_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dfp
from dfp import DFPSpec

pytest.importorskip("dfp._C")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def matmul_cases(draw):
    m, k, n = (draw(st.integers(1, 40)) for _ in range(3))
    headroom = draw(st.integers(0, 6))
    layout = draw(st.sampled_from(["tensor", "rows", "kblock"]))
    block = draw(st.integers(1, 2 * k)) if layout == "kblock" else None
    axis = {"tensor": None, "rows": 0, "kblock": 1}[layout]
    rounding = draw(st.sampled_from(["nearest", "stochastic"]))
    scale = 2.0 ** draw(st.integers(-60, 60))
    seed = draw(st.integers(0, 2**31))
    return (m, k, n), DFPSpec(headroom, axis, block, rounding), scale, seed


@SETTINGS
@given(matmul_cases())
def test_matmul_matches_reference(monkeypatch, case):
    monkeypatch.setenv("DFP_BACKEND", "cpu")
    (m, k, n), spec, scale, seed = case
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, k, generator=g) * scale, torch.randn(k, n, generator=g)
    got = dfp.matmul(x, y, spec, generator=torch.Generator().manual_seed(seed))
    want = on_reference(dfp.matmul, x, y, spec, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    headroom=st.integers(0, 13),
    data=st.data(),
)
def test_quantize_matches_reference(monkeypatch, shape, headroom, data):
    monkeypatch.setenv("DFP_BACKEND", "cpu")
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    block = data.draw(st.one_of(st.none(), st.integers(1, 12))) if axis is not None else None
    spec = DFPSpec(headroom, axis, block, data.draw(st.sampled_from(["nearest", "stochastic"])))
    x = torch.randn(shape) * 2.0 ** data.draw(st.integers(-130, 120))
    got = dfp.quantize(x, spec, generator=torch.Generator().manual_seed(0))
    want = on_reference(dfp.quantize, x, spec, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.mantissa, want.mantissa) and torch.equal(got.exponent, want.exponent)
