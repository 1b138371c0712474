"""Whole training steps (forward, backward, SGD) of ResNet-20 and ResNet-18-CIFAR at
batch 128, channels_last, in fp32, bf16 autocast and dfp16: one pytest-benchmark group
per model and thread count. `python -m benchmarks.report --tables step` times the same
steps interleaved, with ratios and a per-part breakdown."""

from __future__ import annotations

import pytest

from .step import FORMATS, FULL, MODELS, Step, step_macs

# Rough multiply-adds per second of one step, only to choose between calibrated and
# fixed rounds (every step here takes well over 50 ms: fixed rounds).
EXPECTED_GMACS = 30.0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", tuple(MODELS))
def test_step(benchmark, run, threads, model, fmt):
    macs = step_macs(model, FULL.batch)
    benchmark.group = f"step {MODELS[model]} batch {FULL.batch} t{threads}"
    benchmark.extra_info["macs"] = macs
    run(Step(model, fmt, FULL.batch), macs / (EXPECTED_GMACS * 1e9))
