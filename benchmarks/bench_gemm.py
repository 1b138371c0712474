"""GEMM throughput: dfp on pre-quantized operands, dfp with quantization, torch fp32 and
bf16, one pytest-benchmark group per shape and thread count."""

from __future__ import annotations

import pytest

from .cases import GEMM_CONTENDERS, GEMM_SHAPES, gemm_contenders, gemm_ops

# torch's bf16 mm runs at about 1 GOP/s on CPUs without AVX512-BF16 or AMX: above this
# it would take seconds per call.
BF16_MAX_OPS = gemm_ops(512, 512, 512)
# Rough GOP/s, only to choose between calibrated and fixed rounds.
EXPECTED_GOPS = 50.0


@pytest.mark.parametrize("contender", GEMM_CONTENDERS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm(benchmark, run, threads, shape, contender):
    ops = gemm_ops(*shape)
    if contender == "torch bf16" and ops > BF16_MAX_OPS:
        pytest.skip("torch bf16 mm is too slow on this shape for a benchmark run")
    benchmark.group = f"gemm {'x'.join(map(str, shape))} t{threads}"
    benchmark.extra_info["ops"] = ops
    fn = gemm_contenders(*shape, names=[contender])[contender]
    run(fn, ops / (EXPECTED_GOPS * 1e9))
