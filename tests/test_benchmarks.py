"""The benchmarks' own code: the baselines compute what dfp computes, and the report
runs (in its quick form) on every table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dfp
from benchmarks import cases


@pytest.mark.parametrize("group", cases.QUANT_GROUPS)
def test_naive_quantize_baseline_gives_dfps_mantissas(group):
    # Every group's largest magnitude is 3, away from the top step of the range, where
    # dfp raises the exponent (docs/design.md) and the naive chain clamps instead.
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).clamp(-2.9, 2.9)
    x[:, ::32] = 3.0
    spec = cases.quant_spec(group, "nearest", 2)
    assert torch.equal(cases.naive_quantize(x, spec).reshape(x.shape), dfp.quantize(x, spec).mantissa)


def test_report_runs_every_table_quickly(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--quick", "--threads", "1", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "GEMM, GOP/s" in text and "Quantize" in text and "| Linear" in text
