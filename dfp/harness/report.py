"""The report of a study, regenerated from results.jsonl: ``report.md`` (a table of
format x batch size), ``pareto.png`` (training time against accuracy, the Pareto front
highlighted) and ``curves.png`` (accuracy over training time).

Runs are grouped by everything in their config but format, batch size, seed and SWA
start; each group (one data set, model, epoch budget, ...) gets its own table and plot
panel. Within a group, "speed-up over fp32" is the median training time of fp32 at the
same batch size over the median of the row (medians over seeds): above 1, faster than
fp32.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .formats import FORMATS
from .results import ResultStore, config_key, time_to_target
from .schedule import scaled_lr

REPORT_FILE, PARETO_FILE, CURVES_FILE = "report.md", "pareto.png", "curves.png"
PER_RUN = ("format", "batch_size", "seed", "swa_start")
MARKERS = {"fp32": "o", "bf16": "s", "fp16": "D", "dfp16": "^", "dfp16-sr": "v", "swalp": "*"}
COLORS = {"fp32": "C0", "bf16": "C1", "fp16": "C2", "dfp16": "C3", "dfp16-sr": "C4", "swalp": "C5"}
LINESTYLES = ("-", "--", ":", "-.")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (time, accuracy) point, whether it is on the Pareto front: no other point
    is at least as fast and at least as accurate while strictly better in one of the two.
    Equal points do not dominate each other, so all of them stay on the front."""
    on_front = []
    for i, (time_i, acc_i) in enumerate(points):
        dominated = any(
            time_j <= time_i and acc_j >= acc_i and (time_j < time_i or acc_j > acc_i)
            for j, (time_j, acc_j) in enumerate(points)
            if j != i
        )
        on_front.append(not dominated)
    return on_front


@dataclass(frozen=True)
class Row:
    """One format at one batch size, summarised over its seeds (times in seconds,
    accuracies as fractions)."""

    format: str
    batch_size: int
    lr: float
    runs: int
    train_seconds: float
    data_seconds: float
    eval_seconds: float
    images_per_second: float | None
    accuracy: float
    accuracy_min: float
    accuracy_max: float
    trained_accuracy: float
    time_to_target: float | None
    reached: int
    diverged: int
    averaged: int
    speedup: float | None


def group_records(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``records`` split by everything in their config but PER_RUN, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        shared = {k: v for k, v in record["config"].items() if k not in PER_RUN}
        groups.setdefault(config_key(shared), []).append(record)
    return list(groups.values())


def group_target(group: Sequence[dict[str, Any]], target_accuracy: float | None) -> float | None:
    """``target_accuracy`` if given, else the one the group's runs were trained with."""
    if target_accuracy is not None:
        return target_accuracy
    targets = [r["result"].get("target_accuracy") for r in group if r["result"].get("target_accuracy") is not None]
    return max(targets, key=targets.count) if targets else None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(group: Sequence[dict[str, Any]], target_accuracy: float | None) -> list[Row]:
    """The rows of one group, ordered by batch size, then format (in FORMATS order)."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in group:
        cells.setdefault((record["config"]["format"], record["config"]["batch_size"]), []).append(record)
    rows = []
    for (fmt, batch_size), runs in cells.items():
        config, results = runs[0]["config"], [r["result"] for r in runs]
        accuracies = [r["final_accuracy"] for r in results]
        times_to_target = [time_to_target(r["epochs"], target_accuracy) for r in results]
        # A seed that never reached the target counts as infinitely slow in the median.
        median_to_target = statistics.median([math.inf if t is None else t for t in times_to_target])
        rows.append(
            Row(
                format=fmt,
                batch_size=batch_size,
                lr=scaled_lr(config["base_lr"], batch_size, config["base_batch_size"]),
                runs=len(runs),
                train_seconds=statistics.median(r["train_seconds"] for r in results),
                data_seconds=statistics.median(r["data_seconds"] for r in results),
                eval_seconds=statistics.median(r["eval_seconds"] for r in results),
                images_per_second=_median([r["images_per_second"] for r in results]),
                accuracy=statistics.fmean(accuracies),
                accuracy_min=min(accuracies),
                accuracy_max=max(accuracies),
                trained_accuracy=statistics.fmean(r["trained_accuracy"] for r in results),
                time_to_target=None if math.isinf(median_to_target) else median_to_target,
                reached=sum(t is not None for t in times_to_target),
                diverged=sum(bool(r["diverged"]) for r in results),
                averaged=sum(r["epochs"][-1].get("swa_accuracy") is not None for r in results),
                speedup=None,
            )
        )
    fp32_seconds = {row.batch_size: row.train_seconds for row in rows if row.format == "fp32"}
    rows = [
        Row(**{**row.__dict__, "speedup": fp32_seconds[row.batch_size] / row.train_seconds})
        if row.batch_size in fp32_seconds and row.train_seconds > 0
        else row
        for row in rows
    ]
    order = {name: i for i, name in enumerate(FORMATS)}
    return sorted(rows, key=lambda row: (row.batch_size, order.get(row.format, len(order)), row.format))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def _accuracy_cell(row: Row) -> str:
    text = _percent(row.accuracy)
    if row.runs > 1:
        text += f" ({100 * row.accuracy_min:.2f}-{100 * row.accuracy_max:.2f})"
    return text


def _notes(row: Row) -> str:
    notes = []
    if row.averaged:
        notes.append(f"SWA average; its low-precision weights: {_percent(row.trained_accuracy)}")
    if row.diverged:
        notes.append(f"diverged in {row.diverged} of {row.runs} runs")
    return "; ".join(notes)


def _settings(config: dict[str, Any]) -> str:
    fp32_layers = ", ".join(config["fp32_layers"]) or "none"
    limit = config["limit_train_batches"]
    return (
        f"lr {config['base_lr']:g} at batch {config['base_batch_size']} (scaled linearly with the batch size), "
        f"warm-up {config['warmup_epochs']:g} epochs, cosine decay; momentum {config['momentum']:g}, "
        f"weight decay {config['weight_decay']:g}; layers kept in fp32: {fp32_layers}; "
        f"augmentation {'on' if config['augment'] else 'off'}; device {config['device']}, "
        f"{config['threads']} threads x {config['world_size']} process(es), gradient compression "
        f"{config['compress']}" + (f"; at most {limit} batches per epoch (smoke test)" if limit else "")
    )


def _environment_lines(group: Sequence[dict[str, Any]]) -> list[str]:
    seen = []
    for record in group:
        env = record.get("environment") or {}
        line = (
            f"{env.get('device_name', '?')} | torch {env.get('torch', '?')} | dfp {env.get('dfp', '?')}, "
            f"CPU path {env.get('dfp_cpu_isa', '?')} | Python {env.get('python', '?')}"
        )
        if line not in seen:
            seen.append(line)
    return [f"- Environment: {line}" for line in seen]


def group_markdown(group: Sequence[dict[str, Any]], target_accuracy: float | None = None) -> str:
    """The section of one group: heading, settings, environment and the table."""
    config = group[0]["config"]
    target = group_target(group, target_accuracy)
    swa_starts = sorted({r["config"]["swa_start"] for r in group if r["config"]["swa_start"] is not None})
    lines = [
        f"## {config['data']}, {config['model']}, {config['epochs']} epochs",
        "",
        f"- Settings: {_settings(config)}",
    ]
    if swa_starts:
        lines.append(f"- swalp: weights averaged from epoch {', '.join(map(str, swa_starts))} on")
    lines += _environment_lines(group)
    lines += [
        (
            "- Training time excludes data preparation and evaluation (medians over seeds); accuracy is the "
            "test accuracy after the last epoch (mean over seeds, min-max in brackets)."
        ),
        "",
    ]
    target_header = f"time to {100 * target:g} % (s)" if target is not None else "time to target (s)"
    lines += [
        (
            "| format | batch | lr | seeds | training time (s) | images/s | final accuracy | speed-up over fp32 "
            f"| {target_header} | data / eval time (s) | notes |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summarise(group, target):
        speedup = f"{row.speedup:.2f}x" if row.speedup is not None else "no fp32 run"
        if target is None:
            to_target = "no target set"
        elif row.time_to_target is None:
            to_target = f"not reached ({row.reached}/{row.runs})"
        else:
            to_target = f"{row.time_to_target:.1f}" + (f" ({row.reached}/{row.runs})" if row.runs > 1 else "")
        images = f"{row.images_per_second:.0f}" if row.images_per_second is not None else "-"
        lines.append(
            f"| {row.format} | {row.batch_size} | {row.lr:.4g} | {row.runs} | {row.train_seconds:.1f} | {images} "
            f"| {_accuracy_cell(row)} | {speedup} | {to_target} | {row.data_seconds:.1f} / {row.eval_seconds:.1f} "
            f"| {_notes(row)} |"
        )
    return "\n".join(lines) + "\n"


def unfinished_markdown(progress: Sequence[dict[str, Any]], finished_keys: set[str]) -> str:
    """A list of the runs that were interrupted: their last saved epoch ('' if none)."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in progress:
        key = config_key(entry["config"])
        if key not in finished_keys:
            last[(key, entry["attempt"])] = entry
    if not last:
        return ""
    lines = ["## Interrupted runs (from progress.jsonl; a new study run starts them again)", ""]
    for entry in last.values():
        config, epoch = entry["config"], entry["epoch"]
        lines.append(
            f"- {config['data']}, {config['model']}, {config['format']} batch {config['batch_size']} seed "
            f"{config['seed']}: epoch {epoch.get('epoch')} of {config['epochs']}, accuracy "
            f"{_percent(epoch.get('accuracy', float('nan')))} after {epoch.get('seconds', float('nan')):.1f} s"
        )
    return "\n".join(lines) + "\n"


def markdown(
    records: Sequence[dict[str, Any]],
    progress: Sequence[dict[str, Any]] = (),
    target_accuracy: float | None = None,
    figures: bool = True,
) -> str:
    """The whole report: one section per group, then the interrupted runs."""
    parts = ["# dfp format comparison", ""]
    if not records:
        parts.append("No finished runs yet.\n")
    for group in group_records(records):
        parts.append(group_markdown(group, target_accuracy))
    if figures and records:
        parts.append(f"![training time against accuracy]({PARETO_FILE})\n\n![accuracy over time]({CURVES_FILE})\n")
    unfinished = unfinished_markdown(progress, {config_key(r["config"]) for r in records})
    if unfinished:
        parts.append(unfinished)
    return "\n".join(parts)


def _title(group: Sequence[dict[str, Any]]) -> str:
    config = group[0]["config"]
    return f"{config['data']}, {config['model']}, {config['epochs']} epochs"


def plot_pareto(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Training time against final accuracy, one point per run, one marker per format;
    the Pareto front of each group circled and joined."""
    groups = group_records(records) or [[]]
    figure = Figure(figsize=(7, 4.5 * len(groups)), layout="constrained")
    for axes, group in zip(figure.subplots(len(groups), 1, squeeze=False)[:, 0], groups):
        points = [(r["result"]["train_seconds"], 100 * r["result"]["final_accuracy"]) for r in group]
        batch_sizes = sorted({r["config"]["batch_size"] for r in group})
        for fmt in sorted({r["config"]["format"] for r in group}, key=_format_order):
            mine = [(p, r) for p, r in zip(points, group) if r["config"]["format"] == fmt]
            axes.scatter(
                [p[0] for p, _ in mine],
                [p[1] for p, _ in mine],
                marker=MARKERS.get(fmt, "x"),
                color=COLORS.get(fmt),
                s=70,
                label=fmt,
                zorder=3,
            )
            for (x, y), record in mine:
                batch_size = record["config"]["batch_size"]
                # Alternate above and below, so that two batch sizes at one spot stay readable.
                above = batch_sizes.index(batch_size) % 2 == 0
                axes.annotate(
                    f"b{batch_size}", (x, y), textcoords="offset points", xytext=(5, 4 if above else -10), fontsize=7
                )
        front = sorted(p for p, on in zip(points, pareto_front(points)) if on)
        if front:
            axes.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1, zorder=2)
            axes.scatter(
                [p[0] for p in front],
                [p[1] for p in front],
                s=220,
                facecolors="none",
                edgecolors="black",
                label="Pareto front",
                zorder=4,
            )
        axes.set(xlabel="training time (s)", ylabel="test accuracy (%)", title=_title(group) if group else "no runs")
        axes.grid(alpha=0.3)
        if points and max(p[0] for p in points) > 10 * min(p[0] for p in points) > 0:
            axes.set_xscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            axes.xaxis.set_major_formatter(plain)
            axes.xaxis.set_minor_formatter(plain)
        if group:
            axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Test accuracy after each epoch against cumulative training time, one line per run
    (colour: format, line style: batch size)."""
    groups = group_records(records) or [[]]
    figure = Figure(figsize=(7, 4.5 * len(groups)), layout="constrained")
    for axes, group in zip(figure.subplots(len(groups), 1, squeeze=False)[:, 0], groups):
        batch_sizes = sorted({r["config"]["batch_size"] for r in group})
        labelled = set()
        for record in sorted(group, key=lambda r: _format_order(r["config"]["format"])):
            config, epochs = record["config"], record["result"]["epochs"]
            label = f"{config['format']} b{config['batch_size']}"
            axes.plot(
                [e["seconds"] for e in epochs],
                [100 * e["accuracy"] for e in epochs],
                marker=".",
                color=COLORS.get(config["format"]),
                linestyle=LINESTYLES[batch_sizes.index(config["batch_size"]) % len(LINESTYLES)],
                label=None if label in labelled else label,
            )
            labelled.add(label)
        axes.set(xlabel="training time (s)", ylabel="test accuracy (%)", title=_title(group) if group else "no runs")
        axes.grid(alpha=0.3)
        if group:
            axes.legend(fontsize=7, ncols=2)
    figure.savefig(path, dpi=110)


def _format_order(fmt: str) -> int:
    return FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS)


def write_report(store: ResultStore, target_accuracy: float | None = None) -> str:
    """Regenerate report.md, pareto.png and curves.png in the store's directory from its
    files; returns the markdown."""
    records = store.load()
    text = markdown(records, store.load_progress(), target_accuracy)
    (store.directory / REPORT_FILE).write_text(text, encoding="utf-8")
    plot_pareto(records, store.directory / PARETO_FILE)
    plot_curves(records, store.directory / CURVES_FILE)
    return text
