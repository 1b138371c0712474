"""Layer throughput: conv2d (ResNet-20 and ResNet-18 on CIFAR) and linear, forward and
forward+backward, dfp16 against torch fp32 and bf16 in each layout, plus the quantize
passes of the dfp16 layer; one pytest-benchmark group per layer, pass and thread count."""

from __future__ import annotations

import pytest

from .layers import CASES, contender_names, contenders, format_of

# Without native bf16 (AVX512-BF16 or AMX) torch runs bf16 convolutions at 1 to 8 GOP/s:
# above this a call takes seconds.
BF16_MAX_OPS = 2e9
# Rough GOP/s, only to choose between calibrated and fixed rounds.
EXPECTED_GOPS = 50.0

PARAMS = [
    pytest.param(case, pass_, name, id=f"{case.name}-{pass_}-{name}".replace(" ", "_"))
    for case in CASES
    for pass_ in case.passes
    for name in contender_names(case)
]


@pytest.mark.parametrize(("case", "pass_", "contender"), PARAMS)
def test_layer(benchmark, run, threads, case, pass_, contender):
    ops = case.ops(pass_)
    if format_of(contender) == "bf16" and ops > BF16_MAX_OPS:
        pytest.skip("torch bf16 is too slow on this layer for a benchmark run")
    benchmark.group = f"{case.name} {pass_} t{threads}"
    benchmark.extra_info["ops"] = ops
    run(contenders(case, pass_, [contender])[contender], ops / (EXPECTED_GOPS * 1e9))
