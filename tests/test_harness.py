"""The comparison harness (issue 4): command-line checks, the learning-rate schedule, the
results store and its resume, the Pareto front, the report and its plots, and short
training runs of the main job through the command line."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from distributed_worker import HARNESS_RUN
from PIL import Image

import dfp
from dfp import allocator, data, distributed, models, structure
from dfp.harness import cli, environment, formats, report, strategies, study, train
from dfp.harness.results import CorruptLineWarning, DuplicateRunWarning, ResultStore, config_key, time_to_target
from dfp.harness.schedule import Schedule, scaled_lr

CPU = torch.device("cpu")
ONE_PROCESS = distributed.Context(rank=0, world_size=1, local_rank=0, device=CPU)

# ---------------------------------------------------------------- command line


def _error(capsys, argv: list[str]) -> str:
    """The message of a command line that must fail with argparse's usage error."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--formats", "fp32,fp8"], "unknown format 'fp8'"),
        (["--formats", "fp32,fp32"], "names an item twice"),
        (["--model", "vgg16"], "unknown model 'vgg16'"),
        (["--batch-sizes", "32,0"], "'0' is not a positive integer"),
        (["--seeds", "a"], "'a' is not a non-negative integer"),
        (["--lr", "nan"], "'nan' is not a positive finite number"),
        (["--momentum", "1"], "momentum in [0, 1)"),
        (["--target-accuracy", "97"], "fraction in (0, 1]"),
        (["--epochs", "3", "--warmup-epochs", "3.5"], "must not exceed --epochs 3"),
        (["--epochs", "3", "--swa-start", "4"], "after the last epoch"),
        (["--epochs", "3", "--swa-start", "1"], "--swa-start 1 falls inside the warm-up of 1 epochs"),
        (["--epochs", "3", "--warmup-epochs", "1.5", "--swa-start", "2"], "choose --swa-start 3 or later"),
        (["--epochs", "1"], "swalp needs an epoch after the warm-up"),  # the default start, past the warm-up
        (["--cache-dir", "/tmp"], "--cache-dir applies only to --data cifar10"),
        (["--data-dir", "/tmp"], "--data-dir is not used by --data digits, whose data are embedded in scikit-learn"),
        (["--data", "synthetic", "--data-dir", "/tmp"], "--data-dir is not used by --data synthetic"),
        (["--data", "imagenet"], "invalid choice: 'imagenet'"),
        (["--compress", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_cli_rejects_bad_options(capsys, argv, message):
    assert message in _error(capsys, argv)


def test_cli_rejects_unknown_fp32_layer_and_lists_the_layers(capsys, tmp_path):
    err = _error(capsys, ["--fp32-layers", "first,conv9", "--out", str(tmp_path)])
    assert "no module named 'conv9'" in err and "conv1" in err and "fc" in err


def test_cli_names_the_missing_data_directory(capsys, tmp_path):
    assert "--data mnist needs --data-dir" in _error(capsys, ["--data", "mnist", "--out", str(tmp_path)])
    err = _error(capsys, ["--data", "mnist", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path)])
    assert "absent" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_rejects_cuda_without_a_gpu(capsys):
    assert "sees no CUDA device; use --device cpu" in _error(capsys, ["--device", "cuda"])


@pytest.mark.parametrize(
    "variable, message",
    [
        ("DFP_BACKEND", "DFP_BACKEND: unknown dfp backend 'bogus'; choose one of cpu, numba, reference"),
        ("DFP_CPU_ISA", "DFP_CPU_ISA='bogus' is not a path this CPU supports"),
    ],
)
def test_cli_names_a_bad_environment_switch_in_one_line(tmp_path, variable, message):
    """In a fresh process, as a user meets it (the compiled core reads DFP_CPU_ISA when it loads)."""
    argv = ["--formats", "dfp16", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]
    env = {**os.environ, variable: "bogus"}
    done = subprocess.run(
        [sys.executable, "-m", "dfp.harness", *argv], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_cli_says_what_to_use_when_fp16_cannot_run(capsys, monkeypatch):
    real_probe = formats._probe
    monkeypatch.setattr(
        formats,
        "_probe",
        lambda name, device: "RuntimeError: no fp16 conv" if name == "fp16" else real_probe(name, device),
    )
    err = _error(capsys, ["--formats", "fp32,fp16"])
    assert "format 'fp16' cannot train on cpu: RuntimeError: no fp16 conv; use bf16 instead" in err


def test_formats_are_probed_after_setup_on_the_device_of_the_process(capsys, monkeypatch):
    calls = []

    def fake_setup(device):
        calls.append("setup")
        return distributed.Context(rank=0, world_size=1, local_rank=0, device=torch.device(device))

    def fake_probe(name, device):
        calls.append((name, device))
        return "RuntimeError: stop here"

    monkeypatch.setattr(distributed, "setup", fake_setup)
    monkeypatch.setattr(formats, "_probe", fake_probe)
    assert "format 'fp32' cannot train on cpu" in _error(capsys, ["--formats", "fp32,dfp16", "--no-progress"])
    assert calls == ["setup", ("fp32", "cpu")]


def test_missing_harness_extras_are_named_with_the_install_command(capsys, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real_find_spec(name, *a)
    )
    assert "pip install 'dfp[harness]' (missing: tqdm)" in _error(capsys, ["--no-progress"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert cli.main(["report"]) == 2
    assert "pip install 'dfp[harness]' (missing: matplotlib)" in capsys.readouterr().err
    monkeypatch.undo()

    def no_pillow(*args, **kwargs):
        raise ImportError("No module named 'PIL'")

    monkeypatch.setattr(data, "load", no_pillow)
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path)])  # the results directory is made first
    assert "--data synthetic: No module named 'PIL'; dfp-compare needs the harness extras" in err


def test_the_command_line_imports_without_matplotlib_and_tqdm():
    # The check above runs only if the modules import without the extras: block them and start.
    code = (
        "import sys; sys.modules['matplotlib'] = sys.modules['tqdm'] = None\n"
        "from dfp.harness import cli\n"
        "try:\n    cli.main(['--no-progress'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "missing: matplotlib, tqdm" in done.stderr


def test_report_command_needs_an_existing_study(capsys, tmp_path):
    assert cli.main(["report", "--out", str(tmp_path / "none")]) == 2
    assert "results.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- schedule


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 256, 32) == pytest.approx(0.8)
    assert scaled_lr(0.1, 16, 32) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="positive"):
        scaled_lr(0.1, 0, 32)


def test_warm_up_then_cosine_to_zero():
    schedule = Schedule.build(0.1, 128, 32, warmup_epochs=1, epochs=4, steps_per_epoch=10)
    assert (schedule.peak_lr, schedule.start_lr, schedule.warmup_steps, schedule.total_steps) == (
        pytest.approx(0.4),
        0.1,
        10,
        40,
    )
    # Linear from base_lr (the small batch's rate) to the peak over the first epoch.
    assert [schedule.learning_rate(s) for s in (0, 5, 10)] == pytest.approx([0.1, 0.25, 0.4])
    # Cosine: half the peak halfway through the decay, zero at the end.
    assert schedule.learning_rate(25) == pytest.approx(0.2)
    assert 0 < schedule.learning_rate(39) < 0.01 * schedule.peak_lr  # the last step: small, not zero
    rates = [schedule.learning_rate(s) for s in range(10, 40)]
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))


def test_small_batch_needs_no_warm_up_and_swalp_holds_the_rate():
    small = Schedule.build(0.1, 16, 32, warmup_epochs=1, epochs=2, steps_per_epoch=10)
    assert small.learning_rate(0) == small.learning_rate(9) == pytest.approx(0.05)
    held = Schedule.build(0.1, 32, 32, warmup_epochs=0, epochs=4, steps_per_epoch=10, hold_from_epoch=3)
    assert held.learning_rate(0) == pytest.approx(0.1)
    assert held.learning_rate(20) == held.learning_rate(39) == pytest.approx(0.05)
    assert held.learning_rate(19) > held.learning_rate(20)
    with pytest.raises(ValueError, match="hold_from_step=10 lies inside the warm-up of 20 steps"):
        Schedule.build(0.1, 128, 32, warmup_epochs=2, epochs=4, steps_per_epoch=10, hold_from_epoch=2)


# ---------------------------------------------------------------- results store


def _record(fmt: str, batch_size: int, seed: int, seconds: float, accuracy: float, **config) -> dict:
    """A finished run as the harness writes it, with two epochs: one at ``seconds / 2``,
    the second (more accurate by one point) at ``seconds``."""
    epochs = [
        {"epoch": 1, "accuracy": accuracy - 0.01, "trained_accuracy": accuracy - 0.01, "seconds": seconds / 2},
        {"epoch": 2, "accuracy": accuracy, "trained_accuracy": accuracy, "seconds": seconds},
    ]
    base = {
        "data": "digits",
        "model": "small_cnn",
        "format": fmt,
        "batch_size": batch_size,
        "seed": seed,
        "epochs": 2,
        "base_lr": 0.05,
        "base_batch_size": 32,
        "warmup_epochs": 1.0,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "fp32_layers": [],
        "swa_start": 2 if fmt == "swalp" else None,
        "augment": False,
        "device": "cpu",
        "threads": 2,
        "world_size": 1,
        "compress": "none",
        "limit_train_batches": None,
    }
    if fmt == "swalp":
        epochs[-1]["swa_accuracy"] = accuracy
    return {
        "config": {**base, **config},
        "result": {
            "final_accuracy": accuracy,
            "trained_accuracy": accuracy - 0.005,
            "train_seconds": seconds,
            "data_seconds": 0.1,
            "eval_seconds": 0.2,
            "images_per_second": 1000 / seconds,
            "steps": 20,
            "images": 1000,
            "time_to_target_seconds": None,
            "target_accuracy": 0.95,
            "diverged": False,
            "epochs": epochs,
        },
        "environment": {"device_name": "Test CPU", "torch": torch.__version__, "dfp": "0", "dfp_cpu_isa": "scalar"},
    }


def test_store_appends_and_resumes_by_config(tmp_path):
    store = ResultStore(tmp_path / "out")
    first, second = _record("fp32", 32, 0, 2.0, 0.97), _record("dfp16", 32, 0, 1.0, 0.96)
    store.append(first)
    store.append(second)
    loaded = ResultStore(tmp_path / "out").load()
    assert [r["config"]["format"] for r in loaded] == ["fp32", "dfp16"]
    finished = {config_key(r["config"]) for r in loaded}
    assert finished == {config_key(first["config"]), config_key(second["config"])}
    # Key order does not matter; any changed setting makes another run.
    assert config_key(dict(reversed(list(first["config"].items())))) == config_key(first["config"])
    assert config_key({**first["config"], "seed": 1}) not in finished
    with pytest.raises(ValueError, match="needs 'config' and 'result'"):
        store.append({"config": {}})


def test_a_partial_last_line_is_skipped_with_a_warning_and_kept(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record("fp32", 32, 0, 2.0, 0.97))
    with store.results_path.open("a") as file:
        file.write('{"config": {"data": "dig')  # the write a kill interrupted
    with pytest.warns(CorruptLineWarning, match=r"results.jsonl:2: .*interrupted write"):
        assert len(store.load()) == 1
    store.append(_record("dfp16", 32, 0, 1.0, 0.96))
    lines = store.results_path.read_text().splitlines()
    assert lines[1] == '{"config": {"data": "dig'  # nothing lost, the new record on its own line
    with pytest.warns(CorruptLineWarning, match=r"results.jsonl:2: .*damaged line"):
        assert [r["config"]["format"] for r in store.load()] == ["fp32", "dfp16"]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda r: r.update(result={}), r"result lacks \['final_accuracy'"),
        (lambda r: r.update(result=[1]), "result is not an object"),
        (lambda r: r.update(config={}), r"config lacks \['data'"),
        (lambda r: r["result"].update(diverged="no"), r"result\.diverged is not true or false"),
        (lambda r: r["result"].update(train_seconds="2 s"), r"result has \['train_seconds'\] that are not numbers"),
        (lambda r: r["result"].update(epochs=[]), r"result\.epochs is not a non-empty list"),
        (lambda r: r["result"]["epochs"][1].pop("accuracy"), r"epoch 2 lacks \['accuracy'\]"),
    ],
)
def test_a_record_that_parses_but_is_damaged_is_skipped_with_a_warning(tmp_path, capsys, damage, problem):
    store = ResultStore(tmp_path)
    store.append(_record("fp32", 32, 0, 2.0, 0.97))
    broken = _record("dfp16", 32, 0, 1.0, 0.96)
    damage(broken)
    store.append(broken)
    with pytest.warns(CorruptLineWarning, match=rf"results.jsonl:2: skipping a damaged record: {problem}"):
        assert [r["config"]["format"] for r in store.load()] == ["fp32"]
    with pytest.warns(CorruptLineWarning):
        assert cli.main(["report", "--out", str(tmp_path)]) == 0  # the report of what is intact
    assert "| fp32 |" in capsys.readouterr().out


def test_a_damaged_progress_record_is_skipped_with_a_warning(tmp_path):
    store = ResultStore(tmp_path)
    store.append_progress({"data": "digits"}, "a1", {"epoch": 1})
    store.append_progress(_record("fp32", 32, 0, 2.0, 0.97)["config"], ["a2"], {"epoch": 1})
    store.append_progress(_record("fp32", 32, 0, 2.0, 0.97)["config"], "a3", {"epoch": 1})
    with pytest.warns(CorruptLineWarning) as caught:
        assert [entry["attempt"] for entry in store.load_progress()] == ["a3"]
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "skipping a damaged record: config lacks ['model', 'format', 'batch_size', 'seed', 'epochs']",
        "skipping a damaged record: attempt is not a string",
    ]


def test_the_results_directory_is_checked_before_training(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("trained although --out is unusable"))
    options = ["--formats", "fp32", "--epochs", "1", "--no-progress"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err = _error(capsys, [*options, "--out", str(a_file)])
    assert f"--out {a_file}: exists and is not a directory; choose a directory" in err
    assert "Traceback" not in err
    assert "--out" in _error(capsys, [*options, "--out", str(a_file / "below")])
    (tmp_path / "out" / "results.jsonl").mkdir(parents=True)  # a results file that cannot be appended to
    err = _error(capsys, [*options, "--out", str(tmp_path / "out")])
    assert "holds a file that cannot be written" in err and "results.jsonl" in err
    (tmp_path / "report" / "report.md").mkdir(parents=True)
    (tmp_path / "report" / "results.jsonl").write_text(json.dumps(_record("fp32", 32, 0, 2.0, 0.97)) + "\n")
    err = _error(capsys, ["report", "--out", str(tmp_path / "report")])
    assert "holds a file that cannot be written" in err and "report.md" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_results_directory_is_refused(capsys, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        err = _error(capsys, ["--formats", "fp32", "--epochs", "1", "--no-progress", "--out", str(read_only)])
    finally:
        read_only.chmod(0o755)
    assert f"--out {read_only}: cannot be written to" in err


def test_cache_and_data_directories_that_are_files_are_named(capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err = _error(capsys, ["--data", "cifar10", "--data-dir", str(tmp_path), "--cache-dir", str(a_file)])
    assert f"--cache-dir {a_file}: exists and is not a directory" in err
    err = _error(capsys, ["--data", "mnist", "--data-dir", str(a_file), "--out", str(tmp_path / "out")])
    assert f"MNIST directory {a_file} is not a directory" in err


def test_fresh_moves_the_old_files_aside(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record("fp32", 32, 0, 2.0, 0.97))
    store.append_progress({"format": "fp32"}, "a1", {"epoch": 1})
    before = store.results_path.read_text()
    moved = store.start_fresh()
    assert sorted(p.name.split(".")[0] for p in moved) == ["progress", "results"]
    assert not store.results_path.exists() and store.load() == []
    assert next(p for p in moved if p.name.startswith("results")).read_text() == before
    store.append(_record("fp32", 32, 0, 2.0, 0.97))
    assert len(store.start_fresh()) == 1 and len(list(tmp_path.glob("results.*.jsonl"))) == 2


def test_time_to_target_is_the_first_epoch_that_reaches_it():
    epochs = _record("fp32", 32, 0, 4.0, 0.97)["result"]["epochs"]
    assert time_to_target(epochs, 0.96) == 2.0
    assert time_to_target(epochs, 0.97) == 4.0
    assert time_to_target(epochs, 0.98) is None
    assert time_to_target(epochs, None) is None


# ---------------------------------------------------------------- report


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 0.90), (2.0, 0.95), (2.0, 0.93), (3.0, 0.95), (4.0, 0.99), (1.0, 0.90), (5.0, 0.80)]
    # (2, .93) loses to (2, .95); (3, .95) to (2, .95); (5, .80) to everything; equal points both stay.
    assert report.pareto_front(points) == [True, True, False, False, True, True, False]
    assert report.pareto_front([]) == []


def test_report_table_against_fp32_at_the_same_batch_size(tmp_path):
    records = [
        _record("fp32", 32, 0, 4.0, 0.970),
        _record("fp32", 32, 1, 6.0, 0.980),
        _record("fp32", 32, 2, 100.0, 0.975),  # fp32 at 32: median 6.0 s
        _record("dfp16", 32, 0, 3.0, 0.960),
        _record("dfp16", 32, 1, 2.0, 0.940),  # median 2.5 s: 6.0 / 2.5 = 2.40x
        _record("fp32", 128, 0, 1.0, 0.950),
        _record("swalp", 128, 0, 4.0, 0.960),  # 1.0 / 4.0 = 0.25x
        _record("dfp16", 64, 0, 1.0, 0.9),  # no fp32 at 64
    ]
    text = report.markdown(records, target_accuracy=0.955)
    rows = _rows(text)
    fp32_32, dfp16_32 = rows[("fp32", "32")], rows[("dfp16", "32")]
    assert "| 3 | 6.0 |" in fp32_32 and "| 1.00x |" in fp32_32
    assert "97.50 % (97.00-98.00)" in fp32_32
    # Time to 95.5 %: fp32 seeds reach it at epoch 1 (2.0, 3.0 s) and at 50 s: median 3.0.
    assert "| 3.0 (3/3) |" in fp32_32
    # Per seed: 4.0 / 3.0 and 6.0 / 2.0.
    assert "| 2 | 2.5 |" in dfp16_32 and "| 2.40x (per seed 1.33-3.00x) |" in dfp16_32
    # dfp16: one seed reaches 95.5 % at 3.0 s, the other never: the median is "not reached".
    assert "not reached (1/2)" in dfp16_32
    assert "| 0.25x |" in rows[("swalp (avg from 2)", "128")]
    assert "SWA average; its low-precision weights: 95.50 %" in text
    assert "no fp32 run" in rows[("dfp16", "64")]
    assert "lr" in text and "| 0.2 |" in rows[("fp32", "128")]  # 0.05 * 128 / 32
    assert "## digits, small_cnn, 2 epochs" in text and "Test CPU" in text
    # Batch sizes in order, formats in the harness's order within one.
    order = [key for key in rows if key[0].split()[0] in formats.FORMATS]
    assert order == [("fp32", "32"), ("dfp16", "32"), ("dfp16", "64"), ("fp32", "128"), ("swalp (avg from 2)", "128")]


def _rows(text: str) -> dict[tuple[str, str], str]:
    """The table lines of a report by (format label, batch size)."""
    return {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in text.splitlines() if "| " in line}


def test_runs_of_one_strategy_with_other_settings_are_other_rows_and_points(tmp_path):
    """Two prunetrain runs of fp32 whose settings differ (one predates --prune-multiple) are
    two rows named by what differs, not two seeds of one row; the shared settings head the
    strategies' table."""
    shared = {"penalty_ratio": 0.85, "prune_every": 3}
    records = [
        _record("fp32", 32, 0, 4.0, 0.97),
        _record("fp32", 32, 0, 5.0, 0.95, strategy="prunetrain", strategy_settings=shared),
        _record("fp32", 32, 0, 3.0, 0.94, strategy="prunetrain", strategy_settings={**shared, "prune_multiple": 8}),
        _record("dfp16", 32, 0, 3.0, 0.96, strategy="prunetrain", strategy_settings={**shared, "prune_multiple": 8}),
    ]
    text = report.markdown(records, target_accuracy=None)
    rows = _rows(text[: text.index("Structural strategies")])  # the first table's
    assert "| 1 | 5.0 |" in rows[("fp32 + prunetrain (prune_multiple default)", "32")]
    assert "| 1 | 3.0 |" in rows[("fp32 + prunetrain (prune_multiple 8)", "32")]
    assert "| 1.33x |" in rows[("fp32 + prunetrain (prune_multiple 8)", "32")]  # 4.0 / 3.0
    assert ("dfp16 + prunetrain", "32") in rows  # one set of settings for dfp16: no suffix
    assert "Structural strategies (penalty_ratio 0.85, prune_every 3;" in text
    figure = report.plot_pareto(records, tmp_path / "p.png")
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "fp32 + prunetrain (prune_multiple 8)" in labels and "fp32 + prunetrain (prune_multiple default)" in labels


def test_the_penalty_notes_mark_only_the_rows_that_ran_the_penalty():
    """The pruned-scratch control shares prunetrain's settings (they name its widths) but
    trains without the group lasso: its row says so and carries none of the penalty's notes."""
    settings = {"penalty_ratio": 0.85, "proximal": True, "penalty_epochs": 6, "prune_multiple": 8}
    records = [
        _record("fp32", 32, 0, 4.0, 0.97),
        _record("fp32", 32, 0, 3.0, 0.95, strategy="prunetrain", strategy_settings=settings),
        _record("fp32", 32, 0, 3.0, 0.96, strategy="pruned-scratch", strategy_settings=settings),
    ]
    text = report.markdown(records, target_accuracy=None)
    rows = _rows(text[: text.index("Structural strategies")])  # the first table's
    pruned, control = rows[("fp32 + prunetrain", "32")], rows[("fp32 + pruned-scratch", "32")]
    for note in ("group lasso as a proximal step", "first 6 epochs only", "widths kept multiples of 8"):
        assert note in pruned and note not in control
    assert "trained without the penalty" in control and "trained without the penalty" not in pruned


def _diverged(record: dict) -> dict:
    record["result"]["diverged"] = True
    return record


def test_diverged_runs_stay_out_of_times_speed_ups_and_the_front(tmp_path):
    fp32 = _record("fp32", 32, 0, 4.0, 0.97)
    stopped_early = _diverged(_record("fp32", 32, 1, 0.5, 0.10))  # a NaN after a few steps: short, not fast
    dfp16 = _record("dfp16", 32, 0, 2.0, 0.96)
    bf16 = _diverged(_record("bf16", 32, 0, 0.3, 0.10))
    records = [fp32, stopped_early, dfp16, bf16]
    rows = _rows(report.markdown(records, target_accuracy=0.95))
    # fp32: the time of the run that finished; the accuracy over both seeds.
    assert "| 2 | 4.0 |" in rows[("fp32", "32")] and "53.50 %" in rows[("fp32", "32")]
    assert "diverged in 1 of 2 runs" in rows[("fp32", "32")]
    assert "| 2.00x |" in rows[("dfp16", "32")]  # 4.0 / 2.0, not 0.5-inflated
    assert "| 1 | diverged | - |" in rows[("bf16", "32")] and "| diverged | not reached (0/1) |" in rows[("bf16", "32")]
    assert report.front_records(records) == [fp32, dfp16]
    figure = report.plot_pareto(records, tmp_path / "p.png")
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["fp32", "dfp16", "diverged", "Pareto front"]  # no bf16 marker: it only diverged


def test_per_seed_speed_ups_pair_the_seeds_that_finished_in_both_formats():
    records = [
        _record("fp32", 32, 0, 4.0, 0.97),
        _diverged(_record("fp32", 32, 1, 0.5, 0.10)),
        _record("fp32", 32, 2, 6.0, 0.97),
        _record("fp32", 32, 3, 3.0, 0.97),  # fp32 median 4.0
        _record("dfp16", 32, 0, 2.0, 0.96),
        _record("dfp16", 32, 1, 1.0, 0.96),  # its fp32 run diverged: no pair
        _diverged(_record("dfp16", 32, 2, 0.2, 0.10)),
        _record("dfp16", 32, 3, 1.0, 0.96),  # dfp16 median 1.0
    ]
    rows = _rows(report.markdown(records))
    # Seeds 0 and 3 pair: 4.0 / 2.0 and 3.0 / 1.0.
    assert "| 4.00x (per seed 2.00-3.00x) |" in rows[("dfp16", "32")]
    assert "| 1.00x |" in rows[("fp32", "32")]
    one_pair = _rows(report.markdown(records[:6]))  # seeds 0 and 1 of dfp16: only seed 0 pairs
    assert "| 2.67x |" in one_pair[("dfp16", "32")]  # 4.0 / 1.5, and no range from one pair


def test_each_run_counts_once_and_swalp_rows_are_keyed_by_their_start():
    fp32 = _record("fp32", 128, 0, 1.0, 0.95)
    late, early = _record("swalp", 128, 0, 4.0, 0.96), _record("swalp", 128, 0, 5.0, 0.94, swa_start=1)
    with pytest.warns(DuplicateRunWarning, match=r"1 record\(s\) repeat .* fp32 batch 128 seed 0"):
        rows = _rows(report.markdown([fp32, late, early, copy.deepcopy(fp32)]))
    assert "| 1 | 1.0 |" in rows[("fp32", "128")]  # one seed, not two
    assert "| 1 | 5.0 |" in rows[("swalp (avg from 1)", "128")] and "| 1 | 4.0 |" in rows[("swalp (avg from 2)", "128")]


def test_runs_from_different_environments_are_flagged():
    other = _record("dfp16", 32, 0, 1.0, 0.96)
    other["environment"] = {**other["environment"], "torch": "0.0"}
    with pytest.warns(report.MixedEnvironmentWarning, match="2 different environments"):
        text = report.markdown([_record("fp32", 32, 0, 2.0, 0.97), other])
    assert "**Mixed environments**" in text


def test_report_groups_by_setting_and_lists_interrupted_runs(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record("fp32", 32, 0, 2.0, 0.97))
    store.append(_record("fp32", 32, 0, 2.0, 0.90, epochs=5))
    unfinished = _record("dfp16", 32, 0, 1.0, 0.96)["config"]
    store.append_progress(unfinished, "try1", {"epoch": 1, "accuracy": 0.5, "seconds": 0.4})
    store.append_progress(unfinished, "try1", {"epoch": 2, "accuracy": 0.6, "seconds": 0.8})
    mnist = _record("fp32", 32, 0, 2.0, 0.99, data="mnist")
    mnist["result"]["target_accuracy"] = 0.5
    store.append(mnist)
    text = report.write_report(store)
    assert "## digits, small_cnn, 2 epochs" in text and "## digits, small_cnn, 5 epochs" in text
    # Each group's time-to-target column uses its own runs' target.
    mnist_section = text[text.index("## mnist") :]
    assert "time to 50 % (s)" in mnist_section and "time to 95 %" not in mnist_section
    assert "dfp16 batch 32 seed 0: epoch 2 of 2, accuracy 60.00 % after 0.8 s" in text
    assert "time to 95 % (s)" in text  # the target the runs were trained with
    assert (tmp_path / "report.md").read_text() == text


def test_plots_are_valid_pngs(tmp_path):
    records = [_record(fmt, b, 0, s, a) for fmt, b, s, a in [("fp32", 32, 4, 0.97), ("dfp16", 32, 3, 0.96)]]
    records.append(_record("swalp", 128, 0, 1.0, 0.95, epochs=3))
    for plot, name in ((report.plot_pareto, "p.png"), (report.plot_curves, "c.png")):
        plot(records, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.size[1] > image.size[0]  # one panel per group: two panels, stacked
    report.plot_pareto([], tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


# ---------------------------------------------------------------- formats and environment


def test_fp32_layers_first_last_and_containers():
    model = models.build("resnet20", 3, 10, 32)
    assert formats.resolve_fp32_layers(model, ["first", "last"]) == {"conv1", "fc"}
    assert formats.resolve_fp32_layers(model, ["stages.0", "fc"]) == {"stages.0", "fc"}
    names = formats.layer_names(model)
    container = "stages.0.1"  # a residual block: both its convolutions stay fp32
    training = formats.prepare(
        "dfp16",
        model,
        torch.device("cpu"),
        fp32_layers=formats.resolve_fp32_layers(model, ["first", container]),
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        seed=0,
    )
    kinds = {name: type(m) for name, m in training.model.named_modules() if name in names}
    fp32 = {"conv1", "stages.0.1.conv1", "stages.0.1.conv2"}
    assert {name for name, kind in kinds.items() if kind is torch.nn.Conv2d} == fp32
    assert all(kinds[name] in (dfp.nn.Conv2d, dfp.nn.Linear) for name in names if name not in fp32)
    # every format trains in channels_last, its weights included
    assert formats.MEMORY_FORMAT == torch.channels_last
    assert training.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_float_formats_keep_fp32_layers_out_of_autocast():
    model = models.build("small_cnn", 1, 10, 8)
    training = formats.prepare(
        "bf16", model, torch.device("cpu"), fp32_layers={"conv1"}, lr=0.1, momentum=0.9, weight_decay=0, seed=0
    )
    assert isinstance(training.model.conv1, dfp.nn.Conv2d) and training.model.conv1.fmt == "fp32"
    assert type(training.model.conv2) is torch.nn.Conv2d
    with training.autocast():
        assert training.model.conv1(torch.randn(2, 1, 8, 8)).dtype == torch.float32
        assert training.model.conv2(torch.randn(2, 16, 8, 8)).dtype == torch.bfloat16
    assert (
        formats.prepare(
            "fp16",
            models.build("small_cnn", 1, 10, 8),
            torch.device("cpu"),
            fp32_layers=set(),
            lr=0.1,
            momentum=0.9,
            weight_decay=0,
            seed=0,
        ).scaler
        is not None
    )


def test_environment_reads_the_cpu_model(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t: avx2\n")
    assert environment.cpu_model(cpuinfo) == "Test CPU 9000"
    env = environment.collect(torch.device("cpu"), threads=3, world_size=1)
    assert env["threads"] == 3 and env["torch"] == torch.__version__ and env["dfp_cpu_isa"]
    assert env["dfp_threads_on"] in ("libgomp.so.1", "libiomp5.so", "libomp.so", "dfp's own threads")
    assert not any(socket.gethostname() in str(value) for value in env.values())
    for kept, said in ((False, "the C library's defaults"), (True, "glibc, freed memory kept")):
        monkeypatch.setattr(allocator, "_kept", kept)
        assert environment.collect(torch.device("cpu"), threads=1, world_size=1)["malloc"] == said


# ---------------------------------------------------------------- the main job, short


def _main_job(out: Path, *extra: str) -> int:
    return cli.main(
        [
            "--limit-train-batches",
            "2",
            "--epochs",
            "1",
            "--batch-sizes",
            "64",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_main_job_smoke_writes_records_and_report(tmp_path, capsys, monkeypatch):
    asked = []  # the harness keeps freed memory for the next step (dfp.allocator), here not for real
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: asked.append(True))
    # An earlier study of another data set in the same directory keeps its own target.
    earlier = _record("fp32", 32, 0, 2.0, 0.99, data="mnist")
    earlier["result"]["target_accuracy"] = 0.5
    ResultStore(tmp_path).append(earlier)
    assert _main_job(tmp_path, "--formats", "fp32,dfp16,swalp", "--swa-start", "1", "--warmup-epochs", "0") == 0
    out = capsys.readouterr().out
    assert asked == [True]
    assert "| fp32 | 64 |" in out and "| swalp (avg from 1) | 64 |" in out
    text = (tmp_path / "report.md").read_text()
    assert text.count("time to 97 % (s)") == 1 and text.count("time to 50 % (s)") == 1
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()][1:]
    assert [r["config"]["format"] for r in records] == ["fp32", "dfp16", "swalp"]
    for record in records:
        config, result = record["config"], record["result"]
        assert config["data"] == "digits" and config["model"] == "small_cnn" and config["batch_size"] == 64
        assert config["limit_train_batches"] == 2 and config["world_size"] == 1 and config["threads"] == 1
        assert result["steps"] == 2 and result["images"] == 128 and not result["diverged"]
        assert 0 < result["final_accuracy"] <= 1 and result["target_accuracy"] == 0.97
        assert result["train_seconds"] > 0 and result["data_seconds"] > 0 and result["eval_seconds"] > 0
        assert result["images_per_second"] > 0
        (epoch,) = result["epochs"]
        assert epoch["epoch"] == 1 and math.isfinite(epoch["train_loss"]) and epoch["lr"] > 0
        assert record["environment"]["dfp_cpu_isa"] == dfp.cpu_isa()
    swalp = records[2]
    assert swalp["config"]["swa_start"] == 1 and records[0]["config"]["swa_start"] is None
    assert swalp["result"]["epochs"][0]["swa_accuracy"] == swalp["result"]["final_accuracy"]
    assert swalp["result"]["epochs"][0]["trained_accuracy"] == swalp["result"]["trained_accuracy"]
    progress = (tmp_path / "progress.jsonl").read_text().splitlines()
    assert len(progress) == 3
    for name in ("report.md", "pareto.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_structural_strategies_train_shrink_grow_and_are_reported(tmp_path, capsys):
    strategies = "none,pruned-scratch,prunetrain,net2net,net2net+prunetrain"
    argv = ["--formats", "fp32,dfp16", "--strategies", strategies, "--epochs", "3", "--warmup-epochs", "0"]
    # A threshold far above PruneTrain's 1e-4 prunes after two steps (the strongest channel of a space stays).
    argv += ["--prune-every", "1", "--prune-threshold", "0.3", "--grow-epochs", "1"]
    assert _main_job(tmp_path, *argv) == 0
    records = ResultStore(tmp_path).load()
    runs = {(r["config"]["format"], r["config"].get("strategy", "none")): r for r in records}
    assert [r["config"].get("strategy", "none") for r in records[:5]] == [
        "none",
        "prunetrain",
        "net2net",
        "net2net+prunetrain",
        "pruned-scratch",  # after the run whose architecture it trains
    ]
    assert "strategy_settings" not in runs["fp32", "none"]["config"]  # keyed as before the strategies
    assert runs["fp32", "prunetrain"]["config"]["strategy_settings"] == {
        "penalty_ratio": 0.2,
        "threshold": 0.3,
        "prune_every": 1,
    }
    for fmt in ("fp32", "dfp16"):
        plain, pruned = runs[fmt, "none"]["result"], runs[fmt, "prunetrain"]["result"]
        grown, control = runs[fmt, "net2net"]["result"], runs[fmt, "pruned-scratch"]["result"]
        assert pruned["penalty_coefficient"] > 0 and pruned["surgeries"][0]["kind"] == "prune"
        assert {s["epoch"] for s in pruned["surgeries"]} <= {1, 2}  # never after the last epoch
        assert pruned["parameters"] < plain["parameters"] and pruned["train_flops"] < plain["train_flops"]
        assert pruned["epochs"][-1]["surgery_seconds"] > 0 and pruned["epochs"][0]["train_flops"] > 0
        assert [s["kind"] for s in grown["surgeries"]] == ["grow"] and grown["widths"] == plain["widths"]
        assert grown["epochs"][0]["widths"] == plain["widths"] and grown["train_flops"] < plain["train_flops"]
        assert grown["epochs"][0]["forward_flops"] < grown["epochs"][1]["forward_flops"]
        assert control["widths"] == pruned["widths"] and control["surgeries"] == []
        both = runs[fmt, "net2net+prunetrain"]["result"]
        assert [s["kind"] for s in both["surgeries"]][:2] == ["grow", "prune"] and both["surgeries"][1]["epoch"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "| dfp16 + prunetrain | 64 |" in text and "| format + strategy | batch | training FLOPs |" in text
    assert "penalty_ratio 0.2" in text and "| fp32 | 64 |" in text
    plain, pruned = runs["dfp16", "none"]["result"], runs["dfp16", "prunetrain"]["result"]
    time = f"{pruned['train_seconds'] / plain['train_seconds']:.2f}x"  # against dfp16's own run, not fp32's
    points = f"{100 * (pruned['epochs'][-1]['accuracy'] - plain['epochs'][-1]['accuracy']):+.2f} points"
    structure_row = [line for line in text.splitlines() if line.startswith("| dfp16 + prunetrain | 64 |")][-1]
    assert f"| {time} | {points} |" in structure_row
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_prunetrain_grows_the_batch_after_pruning_with_the_rate(tmp_path):
    """--grow-batch: after a pruning the batch grows as the forward FLOPs per image fell
    (a multiple of 8), the rate with it; the schedule runs on images, the FLOPs count the
    larger batches, and the report says so."""
    argv = ["--formats", "fp32", "--strategies", "prunetrain", "--epochs", "3", "--warmup-epochs", "0"]
    argv += ["--prune-every", "1", "--prune-threshold", "0.3", "--grow-batch", "--limit-train-batches", "3"]
    assert _main_job(tmp_path, *argv) == 0
    (record,) = ResultStore(tmp_path).load()
    assert record["config"]["strategy_settings"]["grow_batch"] is True
    result = record["result"]
    epochs, surgeries = result["epochs"], result["surgeries"]
    assert [s["kind"] for s in surgeries] == ["prune", "prune"]
    batches = [e["batch_size"] for e in epochs]
    assert batches[0] == 64 and batches[1:] == [s["batch_size"] for s in surgeries]
    for (before, after), e in zip(itertools.pairwise(epochs), epochs[1:]):
        fall = before["forward_flops"] / after["forward_flops"]
        assert e["batch_size"] == max(before["batch_size"], int(before["batch_size"] * fall) // 8 * 8)
    assert batches[-1] > 64
    flops = sum(3 * e["batch_size"] * e["forward_flops"] * 3 for e in epochs)  # 3 steps per epoch
    assert result["train_flops"] == flops and result["images"] == 3 * sum(batches)
    # the rate follows the batch: cosine over images, times batch / 64 (lr 0.05 at 32, linearly 0.1 at 64)
    schedule = train.Schedule.build(0.05, 64, 32, 0, 3, 3)
    images = 64 * 3 + batches[1] * 3 + batches[2] * 2  # before the last step of the last epoch
    assert epochs[-1]["lr"] == pytest.approx(schedule.learning_rate(images // 64) * batches[2] / 64)
    text = (tmp_path / "report.md").read_text()
    assert f"batch grown after pruning: 64 -> {batches[1]} -> {batches[2]}" in text


def test_prunetrain_with_the_proximal_lasso_zeroes_groups_and_says_so(tmp_path):
    """--proximal-lasso: the loss carries no penalty, each update is followed by the group
    lasso's proximal step (lambda still from the penalty ratio), and the report marks it."""
    model = models.build("small_cnn", 1, 10, 8)
    lasso = strategies.GroupLasso(model, 0.2, ONE_PROCESS, proximal=True)
    loss = torch.tensor(2.0)
    assert lasso(loss) is loss and lasso.coefficient > 0  # lambda set, no penalty added
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lasso.after_step(1e6)  # a threshold above every group's norm
    for name, p in model.named_parameters():
        grouped = p.dim() > 1  # conv and classifier weights; batch norms and biases are in no group
        assert not p.any() if grouped else torch.equal(p, before[name]), name
    argv = ["--formats", "fp32", "--strategies", "prunetrain", "--epochs", "2", "--warmup-epochs", "0"]
    argv += ["--prune-every", "1", "--proximal-lasso", "--limit-train-batches", "3"]
    assert _main_job(tmp_path, *argv) == 0
    (record,) = ResultStore(tmp_path).load()
    assert record["config"]["strategy_settings"]["proximal"] is True
    assert record["result"]["penalty_coefficient"] > 0
    assert "group lasso as a proximal step" in (tmp_path / "report.md").read_text()


def test_the_grown_batch_keeps_the_work_per_step_and_stays_within_the_data():
    model = models.build("small_cnn", 1, 10, 8)
    plan = strategies.StructuredRun.plan(
        strategies.PRUNETRAIN, strategies.StrategySettings(grow_batch=True), 9, 0, model
    )
    plan.surgeries.append({"epoch": 3, "kind": "prune", "widths": {}})
    assert plan.batch_after_surgery(2, 128, (3.0, 1.0), 8, 10_000) == 128  # no pruning at that epoch
    assert plan.batch_after_surgery(3, 128, (3.0, 2.0), 16, 10_000) == 192
    assert plan.batch_after_surgery(3, 128, (3.0, 1.0), 8, 300) == 300 and plan.surgeries[-1]["batch_size"] == 300
    fixed = strategies.StructuredRun.plan(strategies.PRUNETRAIN, strategies.StrategySettings(), 9, 0, model)
    fixed.surgeries.append({"epoch": 3, "kind": "prune", "widths": {}})
    assert fixed.batch_after_surgery(3, 128, (3.0, 1.0), 8, 10_000) == 128


def test_net2net_deepens_a_resnet_with_identity_blocks():
    """--start-depth: the run starts with the first blocks of each stage and inserts
    identity blocks at the grow epochs, evenly to the full depth; each insertion keeps the
    function (eval mode, on a trained state), the new blocks join the optimizer, and with
    widening too the network ends at the full shape."""
    for start_width in (1.0, 0.5):
        torch.manual_seed(0)
        model = models.build("resnet20", 3, 10, 8)
        full = structure.widths(model, structure.channel_spaces(model))
        settings = strategies.StrategySettings(start_width=start_width, start_depth=0.34, grow_epochs=(1, 2))
        plan = strategies.StructuredRun.plan(strategies.NET2NET, settings, 3, 0, model)
        plan.shape_initial_model(model)
        assert [len(stage) for stage in model.stages] == [1, 1, 1]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(4, 3, 8, 8)
        model(x).square().mean().backward()
        optimizer.step()
        for epoch, depth in ((1, 2), (2, 3)):
            before = model.eval()(x)
            assert plan.after_epoch(epoch, model, optimizer, None)
            assert [len(stage) for stage in model.stages] == [depth] * 3
            if start_width == 1.0:  # no widening noise: exact
                assert torch.equal(model(x), before)
        assert [s["blocks"] for s in plan.surgeries] == [[2, 2, 2], [3, 3, 3]]
        assert structure.widths(model, structure.channel_spaces(model)) == full
        assert len(optimizer.param_groups) == 1 + 6


def test_net2net_deepening_runs_in_the_harness(tmp_path):
    argv = ["--model", "resnet20", "--formats", "dfp16", "--strategies", "net2net", "--epochs", "3"]
    argv += ["--warmup-epochs", "0", "--grow-epochs", "1,2", "--start-depth", "0.34"]
    assert _main_job(tmp_path, *argv) == 0
    (record,) = ResultStore(tmp_path).load()
    assert record["config"]["strategy_settings"]["start_depth"] == 0.34
    result = record["result"]
    assert [s.get("blocks") for s in result["surgeries"]] == [[2, 2, 2], [3, 3, 3]]
    full = models.build("resnet20", 1, 10, 8)
    assert result["widths"] == structure.widths(full, structure.channel_spaces(full))
    flops = [epoch["forward_flops"] for epoch in result["epochs"]]
    assert flops[0] < flops[1] < flops[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "prunetrain,slimming"], "unknown strategy 'slimming'"),
        (["--strategies", "pruned-scratch"], "add prunetrain to --strategies"),
        (["--strategies", "net2net", "--epochs", "2", "--grow-epochs", "2"], "before the last (--epochs 2)"),
        (["--penalty-ratio", "1"], "a ratio in (0, 1)"),
        (["--penalty-epochs", "3", "--epochs", "3"], "would act in every epoch of --epochs 3"),
        (["--start-width", "0"], "a fraction in (0, 1]"),
        (["--start-depth", "1.5"], "a fraction in (0, 1]"),
        (["--strategies", "net2net", "--start-depth", "0.5"], "model 'small_cnn' has none of"),
    ],
)
def test_cli_rejects_bad_strategy_options(capsys, argv, message):
    assert message in _error(capsys, ["--formats", "fp32", *argv])


def test_an_interrupted_study_resumes_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    real_train_run = study.train_run
    trained = []

    def interrupt_second_run(config, *args, on_epoch, **kwargs):
        trained.append(config.format)

        def save_then_interrupt(epoch):
            on_epoch(epoch)
            raise KeyboardInterrupt

        hook = save_then_interrupt if len(trained) == 2 else on_epoch
        return real_train_run(config, *args, on_epoch=hook, **kwargs)

    monkeypatch.setattr(study, "train_run", interrupt_second_run)
    assert _main_job(tmp_path, "--formats", "fp32,dfp16") == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert [r["config"]["format"] for r in ResultStore(tmp_path).load()] == ["fp32"]
    assert "dfp16 batch 64 seed 0: epoch 1 of 1" in (tmp_path / "report.md").read_text()

    trained.clear()
    monkeypatch.setattr(
        study, "train_run", lambda config, *a, **k: trained.append(config.format) or real_train_run(config, *a, **k)
    )
    assert _main_job(tmp_path, "--formats", "fp32,dfp16") == 0
    assert trained == ["dfp16"]
    assert "fp32 batch 64 seed 0: already in results, skipped" in capsys.readouterr().out
    assert [r["config"]["format"] for r in ResultStore(tmp_path).load()] == ["fp32", "dfp16"]
    assert "Interrupted runs" not in (tmp_path / "report.md").read_text()

    # --fresh trains everything again; the old results stay beside the new file.
    trained.clear()
    assert _main_job(tmp_path, "--formats", "fp32", "--fresh") == 0
    assert trained == ["fp32"] and len(list(tmp_path.glob("results.*.jsonl"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["report", "--out", str(tmp_path)]) == 0


def test_a_nan_from_the_last_update_counts_as_diverged(tmp_path, capsys):
    # One step at an absurd rate: its loss is finite, the weights it leaves are not usable.
    assert (
        _main_job(tmp_path, "--formats", "fp32", "--lr", "1e20", "--warmup-epochs", "0", "--limit-train-batches", "1")
        == 0
    )
    (record,) = ResultStore(tmp_path).load()
    (epoch,) = record["result"]["epochs"]
    assert epoch["train_loss"] is not None and epoch["test_loss"] is None and record["result"]["diverged"]


def test_a_diverging_run_is_recorded_as_diverged(tmp_path, capsys):
    assert _main_job(tmp_path, "--formats", "fp32,swalp", "--lr", "1e20", "--warmup-epochs", "0") == 0
    records = ResultStore(tmp_path).load()
    for record in records:
        result = record["result"]
        assert result["diverged"] and result["steps"] <= 2
        assert result["epochs"][-1]["train_loss"] is None and result["epochs"][-1]["swa_accuracy"] is None
    text = (tmp_path / "report.md").read_text()
    assert "diverged in 1 of 1 runs" in text and "SWA average" not in text


# ---------------------------------------------------------------- one run's loop


def _tiny(train_size: int = 64, test_size: int = 16) -> data.Dataset:
    return data.load("synthetic", channels=1, image_size=8, num_classes=4, train_size=train_size, test_size=test_size)


def _prepared(fmt: str, seed: int = 0) -> formats.Training:
    torch.manual_seed(seed)
    return formats.prepare(
        fmt, models.build("small_cnn", 1, 4, 8), CPU, fp32_layers=set(), lr=0.1, momentum=0.9, weight_decay=5e-4, seed=0
    )


def _state(training: formats.Training) -> list[torch.Tensor]:
    """Every tensor of the model and optimizer state (SWALP's generator included)."""
    optimizer = training.optimizer.state_dict()
    tensors = list(training.model.state_dict().values())
    tensors += [t for buffers in optimizer["state"].values() for t in buffers.values()]
    return tensors + ([optimizer["generator_state"]] if "generator_state" in optimizer else [])


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """A list that gets one entry per forward of ``model``."""
    forwards: list[int] = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    return forwards


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "dfp16-sr", "swalp"])
def test_the_warm_up_step_runs_and_is_undone(fmt):
    if formats._probe(fmt, "cpu") is not None:
        pytest.skip(f"{fmt} cannot train on this CPU")
    dataset = _tiny()
    x, y = next(data.batches(dataset.train, dataset, 32, shuffle=True, generator=torch.Generator().manual_seed(1)))
    steps = []
    for warm_up in (False, True):
        training = _prepared(fmt)
        forwards = _count_forwards(training.model)
        before = copy.deepcopy(_state(training))
        random_state = torch.get_rng_state()
        if warm_up:
            train._warm_up(training, training.model, dataset, 32, ONE_PROCESS)
            assert len(forwards) == 1  # it ran ...
            assert torch.equal(torch.get_rng_state(), random_state)  # ... and left everything as it was
            assert all(torch.equal(a, b) for a, b in zip(_state(training), before, strict=True))
            if training.scaler is not None:
                assert training.scaler.get_scale() == 2.0**16
        train._train_step(training, training.model, x, y, ONE_PROCESS)
        steps.append(_state(training))
    assert all(torch.equal(a, b) for a, b in zip(*steps, strict=True))  # the step after it: bit for bit


class _RefusesNonFinite(torch.nn.Module):
    """A network whose forward raises as a dfp layer does on NaN input."""

    def forward(self, x):
        raise dfp.NonFiniteError("NaN in the input of a dfp layer")


def test_non_finite_values_mark_the_step_or_stop_the_rank():
    training = _prepared("fp32")
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64)
    # One process: the step's loss is NaN, the run diverged.
    assert math.isnan(train._train_step(training, _RefusesNonFinite(), x, y, ONE_PROCESS))
    # Under DDP the other ranks are all-reducing this step's gradients: stop the process.
    rank_1 = distributed.Context(rank=1, world_size=2, local_rank=1, device=CPU)
    with pytest.raises(RuntimeError, match="rank 1: non-finite activations .* the run stops here: it diverged"):
        train._train_step(training, _RefusesNonFinite(), x, y, rank_1)
    # SWALP refuses NaN gradients after the all-reduce, on every rank together: a NaN loss, no error.
    # (torch layers: a dfp layer's backward would refuse the NaN first, as above)
    torch.manual_seed(0)
    model = models.build("small_cnn", 1, 4, 8)
    swalp = formats.prepare(
        "swalp", model, CPU, fp32_layers=set(formats.layer_names(model)), lr=0.1, momentum=0.9, weight_decay=0, seed=0
    )
    swalp.model.register_forward_hook(lambda module, inputs, output: output * math.nan)
    weights = copy.deepcopy(list(swalp.model.parameters()))
    assert math.isnan(train._train_step(swalp, swalp.model, x, y, rank_1))
    assert all(torch.equal(a, b) for a, b in zip(swalp.model.parameters(), weights))


def test_cudnn_benchmark_is_set_for_every_run(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as an earlier run on CUDA leaves it
    _prepared("fp32")
    assert torch.backends.cudnn.benchmark is False  # on the CPU


def test_batch_size_is_checked_against_each_process_share():
    dataset = _tiny(train_size=5)
    train.check_batch_size(4, dataset, world_size=2)  # 2 images per process, and each gets 2
    with pytest.raises(ValueError, match="each of the 2 processes 3 images per step, but each process gets only 2 of"):
        train.check_batch_size(6, dataset, world_size=2)
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        train.check_batch_size(5, dataset, world_size=2)
    with pytest.raises(ValueError, match="batch size 6 is larger than the 5 training images of synthetic"):
        train.check_batch_size(6, dataset, world_size=1)


def test_an_empty_test_split_is_refused_before_training():
    tiny = _tiny()
    empty = data.Split(tiny.test.images[:0], tiny.test.labels[:0])
    dataset = data.Dataset.from_splits("no-test", tiny.train, empty, tiny.classes)
    config = dataclasses.replace(
        HARNESS_RUN, data="no-test", batch_size=16, epochs=1, base_batch_size=16, world_size=1, limit_train_batches=1
    )
    with pytest.raises(ValueError, match="no-test: the test split is empty"):
        train.train_run(config, dataset, ONE_PROCESS, target_accuracy=None)


def test_stopping_the_penalty_clears_the_momentum_of_the_weights_it_held_at_zero():
    """Under the proximal step a zeroed group's momentum decays towards subnormal values;
    once the penalty stops, the updates would write them into the weights (a convolution
    over subnormal fp32 weights ran 75x slower on an Intel Xeon). The stop clears that
    momentum and no other."""
    torch.manual_seed(0)
    model = models.build("small_cnn", 1, 10, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).square().sum().backward()
    optimizer.step()
    weight = next(p for p in model.parameters() if p.dim() == 4)
    momentum = optimizer.state[weight]["momentum_buffer"]
    with torch.no_grad():
        weight[0] = 0.0  # a group the proximal step zeroed
        momentum[0] = 1e-40  # its momentum, decayed to subnormal values
    expected = {p: optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    expected[weight][0] = 0.0
    settings = strategies.StrategySettings(proximal=True, penalty_epochs=1, prune_every=5)
    run = strategies.StructuredRun(strategies.PRUNETRAIN, settings, 4, 0, {}, None)
    lasso = run.make_regulariser(model, ONE_PROCESS, (1, 8, 8))
    lasso(torch.tensor(2.0))
    run.after_epoch(1, model, optimizer, None)
    assert not lasso.active
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], expected[p]) for p in model.parameters())
    assert torch.count_nonzero(expected[weight]) > 0  # the other groups' momentum was there to keep


def test_flops_weights_price_each_layers_channels_by_its_output_positions():
    """--lasso-weights flops: the penalty ratio holds on the penalty weighted by output
    positions; blocks inserted later get their weights too; the setting is stored only
    where it is not the default (older runs still match)."""
    model = models.build("resnet20", 3, 10, 8)
    settings = strategies.StrategySettings(lasso_weights="flops")
    run = strategies.StructuredRun(strategies.PRUNETRAIN, settings, 4, 0, {}, None)
    lasso = run.make_regulariser(model, ONE_PROCESS, (3, 8, 8))
    loss = torch.tensor(2.0)
    penalty = lasso(loss).item() - loss.item()
    spaces = structure.channel_spaces(model)
    weighted = structure.group_lasso(model, spaces, structure.output_positions(model, (3, 8, 8))).item()
    assert penalty == pytest.approx(lasso.coefficient * weighted, rel=1e-5)
    assert penalty / (loss.item() + penalty) == pytest.approx(0.2, rel=1e-5)
    assert weighted > 2 * structure.group_lasso(model, spaces).item()
    structure.insert_block(model, 2, len(model.stages[2]) - 1)
    assert lasso(loss).item() > penalty  # the new block's groups, weighted too
    assert settings.for_strategy(strategies.PRUNETRAIN)["lasso_weights"] == "flops"
    assert "lasso_weights" not in strategies.StrategySettings().for_strategy(strategies.PRUNETRAIN)


def test_the_penalty_stops_after_its_epochs_and_the_report_says_so(tmp_path):
    """--penalty-epochs N: the group lasso acts in the first N epochs, then neither adds to
    the loss nor shrinks groups; the run's config and the report carry N."""
    model = models.build("small_cnn", 1, 10, 8)
    settings = strategies.StrategySettings(proximal=True, penalty_epochs=2, prune_every=5)
    run = strategies.StructuredRun(strategies.PRUNETRAIN, settings, 4, 0, {}, None)
    lasso = run.make_regulariser(model, ONE_PROCESS, (1, 8, 8))
    loss = torch.tensor(2.0)
    lasso(loss)
    run.after_epoch(1, model, None, None)
    assert lasso.active
    run.after_epoch(2, model, None, None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lasso.after_step(1e6)  # would zero every group while active
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    plain = strategies.GroupLasso(model, 0.2, ONE_PROCESS)
    plain(loss)
    plain.active = False
    assert plain(loss) is loss  # no penalty in the loss either
    argv = ["--formats", "fp32", "--strategies", "prunetrain", "--epochs", "3", "--warmup-epochs", "0"]
    argv += ["--penalty-epochs", "1", "--limit-train-batches", "3", "--lasso-weights", "flops"]
    assert _main_job(tmp_path, *argv) == 0
    (record,) = ResultStore(tmp_path).load()
    assert record["config"]["strategy_settings"]["penalty_epochs"] == 1
    assert record["config"]["strategy_settings"]["lasso_weights"] == "flops"
    report_text = (tmp_path / "report.md").read_text()
    assert "group lasso in the first 1 epochs only" in report_text
    assert "weighted by each layer's FLOPs per weight" in report_text


def test_keep_filter_norms_scales_the_grown_readers_back_and_is_noted(tmp_path):
    grown = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = models.build("resnet20", 3, 10, 8)
        settings = strategies.StrategySettings(start_width=0.5, grow_epochs=(1,), keep_filter_norms=keep)
        plan = strategies.StructuredRun.plan(strategies.NET2NET, settings, 2, 0, model)
        plan.shape_initial_model(model)
        assert plan.after_epoch(1, model, None, None)
        grown[keep] = dict(model.named_parameters())
    for name in ("stages.0.0.conv2.weight", "stages.2.2.conv1.weight"):
        kept, split = (grown[keep][name].detach().flatten(1).norm(dim=1) for keep in (True, False))
        assert (kept > split).all(), name
    assert torch.equal(grown[True]["fc.weight"], grown[False]["fc.weight"])  # no batch norm behind it
    argv = ["--model", "resnet20", "--formats", "fp32", "--strategies", "net2net", "--epochs", "2"]
    argv += ["--warmup-epochs", "0", "--grow-epochs", "1", "--limit-train-batches", "2", "--keep-filter-norms"]
    assert _main_job(tmp_path, *argv) == 0
    (record,) = ResultStore(tmp_path).load()
    assert record["config"]["strategy_settings"]["keep_filter_norms"] is True
    assert "readers scaled back to their filters' norms" in (tmp_path / "report.md").read_text()
    settings = strategies.StrategySettings()
    assert "keep_filter_norms" not in settings.for_strategy(strategies.NET2NET)  # older runs still match


def test_widen_split_random_runs_in_the_harness_and_names_its_runs(tmp_path):
    argv = ["--model", "resnet20", "--formats", "fp32", "--strategies", "net2net", "--epochs", "2"]
    argv += ["--warmup-epochs", "0", "--grow-epochs", "1", "--limit-train-batches", "2"]
    assert _main_job(tmp_path, *argv, "--widen-split", "random") == 0
    assert _main_job(tmp_path, *argv) == 0  # evenly: another run, whose config stays as before the option
    split = [r["config"]["strategy_settings"].get("widen_split") for r in ResultStore(tmp_path).load()]
    assert split == ["random", None]
    lines = (tmp_path / "report.md").read_text().splitlines()
    note = "readers' weights shared among a channel's copies at random"
    for variant, noted in (("random", True), ("default", False)):
        rows = [line for line in lines if line.startswith(f"| fp32 + net2net (widen_split {variant}) |")]
        assert rows and any(note in row for row in rows) == noted
