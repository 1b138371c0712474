"""Floors on the fidelity report (benchmarks/fidelity.py): SQNR against fp64 of every
product of a layer, the default DFP16 format against bf16 and Das et al.'s per-tensor
scheme. The inputs are fixed by seeds and the DFP16 bits do not depend on the CPU path,
so the floors sit a few dB under what was measured (2026-12-02, AMD Zen 4), which
bf16's own rounding (oneDNN's order of sums) cannot move."""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import median

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks package
from benchmarks import fidelity

FORMATS = ("bf16", "dfp16-tensor", "dfp16")


@pytest.fixture(scope="module")
def digits_rows():
    return fidelity.fidelity_rows(fidelity.digits_cases(), FORMATS)


@pytest.fixture(scope="module")
def synthetic_rows():
    return fidelity.fidelity_rows(fidelity.synthetic_cases(), FORMATS)


def test_digits_step_every_conv_and_linear_layer_is_captured(digits_rows):
    layers = {layer for _, layer, _, _ in digits_rows}
    assert len(layers) == 22 and {"conv1", "fc", "stages.2.0.shortcut.0"} <= layers


def test_default_weight_gradient_beats_bf16_by_12_db_on_every_layer(digits_rows):
    """Measured: at least 16.4 dB above bf16 (per tensor: down to 4.3 dB below it)."""
    for _, layer, product, s in digits_rows:
        if product == "grad_weight":
            assert s["dfp16"] >= s["bf16"] + 12, (layer, s)


def test_default_beats_bf16_on_every_product_of_the_step(digits_rows):
    """Measured: every product at least 16.3 dB above bf16, 18.9 dB at the median."""
    margins = [s["dfp16"] - s["bf16"] for *_, s in digits_rows]
    assert min(margins) >= 12
    assert median(margins) >= 16


def test_default_is_never_below_bf16_on_synthetic_data(synthetic_rows):
    """Outlier channels and heavy-tailed (Student-t) operands are the closest calls
    (measured 5.6 dB above bf16 at the least); Gaussian and ReLU data 18.4 dB and more."""
    for _, layer, product, s in synthetic_rows:
        assert s["dfp16"] >= s["bf16"], (layer, product, s)
        if layer.split(" ", 1)[1] in ("gaussian", "relu"):
            assert s["dfp16"] >= s["bf16"] + 15, (layer, product, s)


def test_finer_gradient_exponents_never_lose_to_one_per_tensor(digits_rows, synthetic_rows):
    for _, layer, product, s in digits_rows + synthetic_rows:
        if product == "forward":  # computed alike: the same bits
            assert s["dfp16"] == s["dfp16-tensor"], (layer, product, s)
        else:
            assert s["dfp16"] >= s["dfp16-tensor"] - 0.5, (layer, product, s)


def test_fp16_beyond_its_range_scores_minus_infinity():
    ref = fidelity.torch.ones(3, dtype=fidelity.torch.float64)
    assert fidelity.sqnr_db(ref, fidelity.torch.tensor([1.0, float("inf"), 1.0])) == -float("inf")
    assert fidelity.sqnr_db(ref, ref.float()) == float("inf")
