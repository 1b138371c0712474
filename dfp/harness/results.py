"""The study's results on disk: JSON Lines files that survive an interrupted study.

``results.jsonl`` holds one finished run per line, ``{"config": ..., "result": ...,
"environment": ..., "finished_at": ...}``, appended (flushed and fsynced) the moment the
run ends. A run is identified by its whole ``config`` (data, model, format, batch size,
seed, epochs, learning rate, ...): a study skips every run whose config is already in
the file, so running the same command again resumes where it stopped.

``progress.jsonl`` gets one line per finished epoch, ``{"config": ..., "attempt": ...,
"epoch": {...}}``, so an interrupted run still shows how far it got; ``attempt`` tells
two tries of the same run apart. A resumed run starts again from its first epoch.

A line that does not parse (an interrupted write leaves a partial last line), or that
parses but lacks what the study and its report read (a damaged or hand-edited record,
e.g. ``"result": {}``), is skipped with a ``CorruptLineWarning`` naming the file and
line, never an error, and its run counts as not finished; the next append starts on a
new line, so the partial text stays in the file untouched. ``start_fresh``
renames both files aside (``results.<time>.jsonl``) instead of deleting them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"
PROGRESS_FILE = "progress.jsonl"
# What the study and its report read of a record (train.RunConfig and train_run's result
# hold more): a record without one of these is skipped as corrupt.
LABEL_KEYS = ("data", "model", "format", "batch_size", "seed", "epochs")
CONFIG_KEYS = (
    *LABEL_KEYS, "base_lr", "base_batch_size", "warmup_epochs", "momentum", "weight_decay", "fp32_layers", "swa_start",
    "augment", "device", "threads", "world_size", "compress", "limit_train_batches",
)  # fmt: skip
RESULT_NUMBERS = ("final_accuracy", "trained_accuracy", "train_seconds", "data_seconds", "eval_seconds")
EPOCH_NUMBERS = ("seconds", "accuracy")


class CorruptLineWarning(UserWarning):
    """A line of a results file that is not a JSON object of the expected shape."""


class DuplicateRunWarning(UserWarning):
    """A run stored more than once (the same config): it is counted once."""


def config_key(config: Mapping[str, Any]) -> str:
    """The identity of a run: its config as canonical JSON (sorted keys, no spaces)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def run_label(config: Mapping[str, Any]) -> str:
    """A run in words: "digits, small_cnn, fp32 batch 32 seed 0" (with its structural
    strategy, if any, after the format)."""
    strategy = f" {config['strategy']}" if config.get("strategy") else ""
    return (
        f"{config['data']}, {config['model']}, {config['format']}{strategy} batch {config['batch_size']} "
        f"seed {config['seed']}"
    )


def _missing(mapping: object, keys: Sequence[str], where: str) -> str | None:
    if not isinstance(mapping, dict):
        return f"{where} is not an object"
    absent = [key for key in keys if key not in mapping]
    return f"{where} lacks {absent}" if absent else None


def _not_numbers(mapping: dict[str, Any], keys: Sequence[str], where: str) -> str | None:
    # bool is a Real to Python, but never a time or an accuracy
    bad = [key for key in keys if not isinstance(mapping[key], Real) or isinstance(mapping[key], bool)]
    return f"{where} has {bad} that are not numbers" if bad else None


def finished_run_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a results record, as the study and its report read it; None if nothing."""
    config, result = record["config"], record["result"]
    problem = _missing(config, CONFIG_KEYS, "config") or _missing(
        result, (*RESULT_NUMBERS, "images_per_second", "diverged", "epochs"), "result"
    )
    if problem:
        return problem
    problem = _not_numbers(result, RESULT_NUMBERS, "result")
    if problem:
        return problem
    if not isinstance(result["diverged"], bool):
        return "result.diverged is not true or false"
    epochs = result["epochs"]
    if not isinstance(epochs, list) or not epochs:
        return "result.epochs is not a non-empty list"
    for number, epoch in enumerate(epochs, start=1):
        problem = _missing(epoch, EPOCH_NUMBERS, f"epoch {number}") or _not_numbers(
            epoch, EPOCH_NUMBERS, f"epoch {number}"
        )
        if problem:
            return problem
    return None


def progress_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a progress record, as the report reads it; None if nothing."""
    if not isinstance(record["attempt"], str):
        return "attempt is not a string"
    return _missing(record["config"], LABEL_KEYS, "config") or _missing(record["epoch"], (), "epoch")


def read_jsonl(
    path: Path, required: tuple[str, ...] = (), check: Callable[[dict[str, Any]], str | None] | None = None
) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line, skipping (with a warning) lines that
    do not parse, lack one of the ``required`` keys or in which ``check`` finds a
    problem (it returns the problem in words, or None); [] if the file does not exist."""
    if not path.exists():
        return []
    records = []
    with path.open("r", encoding="utf-8", errors="replace") as file:
        lines = file.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            why = "an interrupted write" if last else "a damaged line"
            warnings.warn(f"{path}:{number}: skipping a line that is not JSON ({why}?): {err}", CorruptLineWarning)
            continue
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            warnings.warn(f"{path}:{number}: skipping a record without {missing}", CorruptLineWarning)
            continue
        problem = check(record) if check is not None else None
        if problem:
            warnings.warn(f"{path}:{number}: skipping a damaged record: {problem}", CorruptLineWarning)
            continue
        records.append(record)
    return records


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line and make it durable (flush + fsync) before returning."""
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with path.open("a+b") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() > 0:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                line = "\n" + line  # leave a partial last line alone, on a line of its own
        file.write(line.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


class ResultStore:
    """``results.jsonl`` and ``progress.jsonl`` in ``directory`` (created if needed)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"results directory {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.results_path = self.directory / RESULTS_FILE
        self.progress_path = self.directory / PROGRESS_FILE

    def load(self) -> list[dict[str, Any]]:
        """Every finished run, in the order they finished."""
        return read_jsonl(self.results_path, required=("config", "result"), check=finished_run_problem)

    def append(self, record: Mapping[str, Any]) -> None:
        """Store one finished run (a dict with at least "config" and "result")."""
        if "config" not in record or "result" not in record:
            raise ValueError(f"a result record needs 'config' and 'result', got keys {sorted(record)}")
        append_jsonl(self.results_path, record)

    def load_progress(self) -> list[dict[str, Any]]:
        """Every per-epoch progress line, in the order written."""
        return read_jsonl(self.progress_path, required=("config", "attempt", "epoch"), check=progress_problem)

    def append_progress(self, config: Mapping[str, Any], attempt: str, epoch: Mapping[str, Any]) -> None:
        """Record one finished epoch of the run ``config`` (try ``attempt``)."""
        append_jsonl(self.progress_path, {"config": dict(config), "attempt": attempt, "epoch": dict(epoch)})

    def check_writable(self, names: Sequence[str] = ()) -> None:
        """Raise OSError unless a new file can be made in the directory and its existing
        results and progress files (and ``names``) can be appended to; changes none of them.
        A study calls this before training, so that it never trains what it cannot store."""
        with tempfile.TemporaryFile(dir=self.directory):
            pass
        for name in (RESULTS_FILE, PROGRESS_FILE, *names):
            path = self.directory / name
            if path.exists():
                with path.open("ab"):
                    pass

    def start_fresh(self) -> list[Path]:
        """Rename the existing results and progress files aside so that the study starts
        empty; returns the new names of the files moved (nothing is deleted)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for path in (self.results_path, self.progress_path):
            if not path.exists():
                continue
            target = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
            counter = 1
            while target.exists():
                target = path.with_name(f"{path.stem}.{stamp}-{counter}{path.suffix}")
                counter += 1
            path.rename(target)
            moved.append(target)
        return moved


def time_to_target(epochs: list[dict[str, Any]], target_accuracy: float | None) -> float | None:
    """The training seconds at the first epoch whose reported accuracy reaches
    ``target_accuracy`` (a fraction), or None if none does (or no target is set)."""
    if target_accuracy is None:
        return None
    for record in epochs:
        if record["accuracy"] >= target_accuracy:
            return record["seconds"]
    return None
