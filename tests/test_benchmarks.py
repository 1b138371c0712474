"""The benchmarks' own code: the baselines compute what dfp computes, and the report
runs (in its quick form) on every table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dfp
from benchmarks import cases, peaks, step, timing


@pytest.mark.parametrize("group", cases.QUANT_GROUPS)
def test_naive_quantize_baseline_gives_dfps_mantissas(group):
    # Every group's largest magnitude is 3, away from the top step of the range, where
    # dfp raises the exponent (docs/design.md) and the naive chain clamps instead.
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).clamp(-2.9, 2.9)
    x[:, ::32] = 3.0
    spec = cases.quant_spec(group, "nearest", 2)
    assert torch.equal(cases.naive_quantize(x, spec).reshape(x.shape), dfp.quantize(x, spec).mantissa)


def _report(tmp_path, *args: str) -> str:
    """The text ``python -m benchmarks.report --quick --threads 1 *args`` writes."""
    out = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--quick", "--threads", "1", *args, "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def test_report_runs_every_table_quickly(tmp_path):
    text = _report(tmp_path)
    assert "GEMM, GOP/s" in text and "Quantize" in text and "| Linear" in text
    assert "Training steps" in text and "| ResNet-20 | 1 |" in text and "Breakdown of a ResNet-18-CIFAR step" in text


def test_the_step_table_times_only_the_models_asked_for(tmp_path):
    text = _report(tmp_path, "--tables", "step", "--models", "resnet20")
    assert "| ResNet-20 | 1 |" in text and "ResNet-18" not in text


def test_the_step_table_takes_the_rounds_asked_for(tmp_path):
    text = _report(tmp_path, "--tables", "step", "--models", "resnet20", "--step-rounds", "2")
    assert "median of 2 rounds" in text


def test_step_rounds_must_be_a_positive_whole_number():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--tables", "step", "--step-rounds", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--step-rounds: expected a whole number of at least 1, got '0'" in done.stderr


def test_the_step_table_skips_bf16_where_its_first_step_or_its_last_rate_says_too_long_a_step(tmp_path):
    text = _report(tmp_path, "--tables", "step", "--max-step-s", "1e-9")
    for model in ("ResNet-20", "ResNet-18-CIFAR"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {model} | 1 |"))
        assert row.count("skipped") == 1
    assert "| part | fp32 | dfp16-tensor | dfp16 |" in text and "| bf16 |" not in text  # the breakdowns
    # ResNet-20's first bf16 step was too long; ResNet-18-CIFAR's was predicted from it, and not run
    assert "on ResNet-20 (its first step took " in text
    assert "; ResNet-18-CIFAR (predicted from its rate on the previous model)." in text


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "").split())


def test_peaks_probe_every_path_the_core_has():
    measured = peaks.measure(quick=True)
    if not measured:
        pytest.skip("no compiled dfp core: no register probes")
    assert all(value > 0 for value in measured.values()), measured
    flags = _cpu_flags()
    expected = {"fp32 vfmadd231ps zmm", "int16 vpdpwssd zmm"} if "avx512_vnni" in flags else set()
    if "avx512_bf16" in flags:
        expected.add(peaks.BF16)
    if {"amx_tile", "amx_int8", "amx_bf16"} <= flags:  # Linux grants the tiles to any process that asks
        expected |= {"int8 tdpbssd amx", peaks.BF16_AMX}
    assert expected <= set(measured), (expected, measured)


def test_the_micro_kernel_probe_times_the_wide_kernel_of_every_path(backend):
    name, gmacs = peaks.micro_kernel(headroom=2, quick=True)
    if not backend.startswith("cpu"):
        assert (name, gmacs) == (None, None)  # no compiled kernel to time
        return
    from dfp import _C

    assert name == _C.micro_kernel() and gmacs > 0, (backend, name, gmacs)
    for headroom in (0, 13):  # one K-pair per chain; one chain per call
        assert _C.micro_kernel_gmacs(headroom, 10)[1] > 0
    with pytest.raises(ValueError, match="headroom must be in 0..13"):
        _C.micro_kernel_gmacs(14, 10)


def test_the_bf16_baseline_is_measured_against_amx_where_the_core_has_it():
    zmm_only = {"fp32 vfmadd231ps zmm": 100.0, peaks.BF16: 50.0, "int16 vpdpwssd zmm": 200.0}
    with_amx = {**zmm_only, "int8 tdpbssd amx": 3000.0, peaks.BF16_AMX: 1500.0}
    assert peaks.bf16_path(zmm_only) == (peaks.BF16, 50.0)
    assert peaks.bf16_path(with_amx) == (peaks.BF16_AMX, 1500.0)
    assert peaks.bf16_path({"fp32 vfmadd231ps zmm": 100.0}) == (None, None)
    assert step.format_peaks(with_amx, "avx512_vnni")["bf16"] == (peaks.BF16_AMX, 1500.0)
    assert "0.13x the bf16 peak (bf16 tdpbf16ps amx)" in peaks.describe(with_amx, "avx512_vnni")


@pytest.mark.parametrize("user_value", [None, "20"])
def test_benchmarks_stop_openblas_spinning_before_numpy_loads(user_value):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = "import benchmarks, os, torch; print(benchmarks.OPENBLAS_SPIN_SET_IN_TIME, os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", user_value or "17"]


def test_step_breakdown_parts():
    # Op paths as torch.profiler nests them, from the step's child down to the op.
    evaluate = "autograd::engine::evaluate_function: "
    assert step._part(["EagerConv2d", "dfp: quantize", "aten::empty"]) == step.QUANTIZE
    assert step._part(["EagerConv2d", "aten::copy_"]) == step.CONV_FORWARD
    assert step._part([evaluate + "EagerConv2dBackward", "EagerConv2dBackward", "dfp: grad_input", "aten::flip"]) == (
        step.GRAD_INPUT
    )
    assert step._part([evaluate + "EagerConv2dBackward", "dfp: grad_input", "dfp: quantize"]) == step.QUANTIZE
    assert step._part([evaluate + "EagerConv2dBackward", "dfp: grad_weight"]) == step.GRAD_WEIGHT
    assert step._part(["aten::conv2d", "aten::_to_copy"], autocast=True) == step.CASTS
    assert step._part(["aten::conv2d", "aten::convolution", "aten::mkldnn_convolution"]) == step.CONV_FORWARD
    assert step._part([evaluate + "ConvolutionBackward0", "aten::convolution_backward", "aten::to"]) == (
        step.CONV_BACKWARD
    )
    assert step._part(["aten::batch_norm", "aten::native_batch_norm"]) == step.BATCH_NORM
    assert step._part(["aten::relu", "aten::clamp_min"]) == step.ELEMENTWISE
    assert step._part(["aten::adaptive_avg_pool2d", "aten::mean", "aten::div_"]) == step.OTHER
    assert step._part(["Optimizer.step#SGD.step", "aten::_foreach_add_"]) == step.OPTIMIZER


def test_step_macs_count_every_product():
    # ResNet-20 on 32x32: about 41 M multiply-adds per image forward; a step is three
    # products per layer, less the first layer's grad_input.
    assert 3 * 40e6 < step.step_macs("resnet20", 1) < 3 * 42e6
    assert step.step_macs("resnet20", 4) == 4 * step.step_macs("resnet20", 1)


def test_speedup_cells_give_the_paired_median_and_the_middle_half_of_the_rounds():
    # rounds' ratios baseline / times: 0.5, 1, 2, 4, 8 (the median pairs rounds, it is not
    # the ratio of the medians); quartiles as statistics.quantiles' default method gives them
    baseline, times = [1.0, 2.0, 4.0, 8.0, 16.0], [2.0, 2.0, 2.0, 2.0, 2.0]
    assert timing.speedup_cell(times, baseline) == "2.00x (0.75-6.00)"
    assert timing.speedup_cell([2.0], [3.0]) == "1.50x"  # one round: no spread to give


def test_step_load_line_counts_the_step_workers_as_ours():
    # The step workers are child processes: their CPU time must not read as other tenants'.
    burn = "import time\nwhile time.process_time() < 0.5: pass"
    before = step._cpu_times()
    if before is None:
        pytest.skip("no /proc/stat here")
    subprocess.run([sys.executable, "-c", burn], check=True)
    after = step._cpu_times()
    # os.times counts whole clock ticks: a child's 0.5 s may read as 0.49 (and 75.57 - 75.07
    # is 0.4999... in floats); not counting it at all would read as about 0
    assert after[2] - before[2] >= 0.45


def test_main_job_steps_run_in_turns(capsys):
    from benchmarks import main_job

    main_job.main(["--formats", "fp32,dfp16", "--epochs", "1", "--batch", "64"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| fp32", "| dfp16"))]
    assert rows[0].endswith("| 1.00x |") and len(rows) == 2
    with pytest.raises(SystemExit):
        main_job.main(["--formats", "dfp16,fp32"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_norm_kernels_and_steps_are_timed_in_turns(capsys, dtype):
    from benchmarks import batch_norm

    batch_norm.main(["--threads", "2", "--repeats", "1", "--batch", "4", "--dtype", dtype])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    kernels = {row[0][2:]: row[-1] for row in rows if row[0][2:].isdigit()}
    assert kernels == {
        "8": "dfp's |",
        "16": "torch's |",
        "24": "dfp's |",
        "32": "torch's |",
        "56": "dfp's |",
        "64": "torch's |",
    }
    assert [row[0] for row in rows if row[0][2:] in ("full", "half", "pruned")] == ["| full", "| half", "| pruned"]
