"""Quantization throughput (fp32 input) by grouping and rounding, against the naive torch
chain, one pytest-benchmark group per case and thread count."""

from __future__ import annotations

import pytest

from .cases import QUANT_GROUPS, ROUNDINGS, quant_contenders, quant_input, quant_spec

# (4096, 4096) as in the report would make each case take seconds; 4M elements are
# still well beyond the caches.
SHAPE = (2048, 2048)


@pytest.fixture(scope="module")
def x():
    return quant_input(SHAPE)


@pytest.mark.parametrize("contender", ("dfp", "naive torch"))
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("group", tuple(QUANT_GROUPS))
def test_quantize(benchmark, run, threads, x, group, rounding, contender):
    benchmark.group = f"quantize {group} {rounding} t{threads}"
    benchmark.extra_info["bytes"] = x.numel() * x.element_size()
    fn = quant_contenders(x, quant_spec(group, rounding))[contender]
    # The naive chain runs at about 1 GB/s: 16 MB take about 20 ms.
    run(fn, x.numel() * 4 / 1e9)
