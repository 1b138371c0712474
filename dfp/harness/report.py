"""The report of a study, regenerated from results.jsonl: ``report.md`` (a table of
format x batch size), ``pareto.png`` (training time against accuracy, the Pareto front
highlighted) and ``curves.png`` (accuracy over training time).

Runs are grouped by everything in their config but format, batch size, seed, SWA
start and structural strategy; each group (one data set, model, epoch budget, ...) gets
its own table and plot panel, and a row of the table is one format at one batch size
(for swalp, one SWA start) and one strategy over its seeds. Where a group has structural
strategies, a second table gives their training FLOPs, parameters, widths and surgery
time. A run recorded twice (the same config) counts once, with a
``DuplicateRunWarning``; a group whose runs come from different environments gets a
``MixedEnvironmentWarning`` and a note, since their times are not comparable.

Times (medians) come from the runs that did not diverge: a run stopped early by a NaN
is short, not fast. Diverged runs still count in the accuracy (mean over seeds) and stay
off the Pareto front (drawn with an x). "Speed-up over fp32" is the median training time
of fp32 (without a strategy) at the same batch size over the median of the row: above 1, faster than fp32.
Where two or more seeds were timed in both, the range of the per-seed ratios (a seed's
fp32 time over its time in the row's format) follows: on a shared machine it shows
whether a speed-up is larger than the noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .formats import FORMATS
from .results import DuplicateRunWarning, ResultStore, config_key, run_label, time_to_target
from .schedule import scaled_lr
from .strategies import GROW_THEN_PRUNE, NONE, PRUNED_SCRATCH, PRUNETRAIN, STRATEGIES

REPORT_FILE, PARETO_FILE, CURVES_FILE = "report.md", "pareto.png", "curves.png"
# Runs that differ only in these share a table (a run of no structural strategy stores
# neither strategy key: its config is that of a run from before the strategies).
PER_RUN = ("format", "batch_size", "seed", "swa_start", "strategy", "strategy_settings")
MARKERS = {"fp32": "o", "bf16": "s", "fp16": "D", "dfp16": "^", "dfp16-sr": "v", "dfp16-tensor": "<", "swalp": "*"}
COLORS = {
    "fp32": "C0",
    "bf16": "C1",
    "fp16": "C2",
    "dfp16": "C3",
    "dfp16-sr": "C4",
    "dfp16-tensor": "C6",
    "swalp": "C5",
}
LINESTYLES = ("-", "--", ":", "-.")
# Where a table has structural strategies, the marker tells the strategy (colour: format).
STRATEGY_MARKERS = {"none": "o", "prunetrain": "v", "net2net": "^", "net2net+prunetrain": "D", "pruned-scratch": "s"}

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class MixedEnvironmentWarning(UserWarning):
    """The runs of one table were measured in different environments (machine, versions)."""


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
    """One format at one batch size (and SWA start), summarised over its seeds (times in
    seconds, medians over the runs that did not diverge, None when all did; accuracies
    as fractions, over all runs)."""

    format: str
    batch_size: int
    swa_start: int | None
    lr: float
    runs: int
    train_seconds: float | None
    data_seconds: float | None
    eval_seconds: float | None
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
    speedup_range: tuple[float, float] | None  # lowest and highest per-seed speed-up
    strategy: str = NONE
    variant: str = ""  # the settings that set this row apart from its strategy's others (variant_names)
    train_flops: float | None = None  # median over the seeds; None for runs from before it was recorded
    parameters: int | None = None  # at the end, of the first seed
    widths: dict[str, int] | None = None  # of each channel space at the end, of the first seed
    surgery_seconds: float | None = None  # median
    batch_sizes: tuple[int, ...] = ()  # the batch grown after pruning to, of the first seed
    proximal: bool = False  # the group lasso applied as a proximal step
    penalty_epochs: int | None = None  # the group lasso in the first N epochs only
    prune_multiple: int = 1  # widths kept multiples of this
    lasso_weights: str = "uniform"  # how the group lasso weighs a layer's groups
    widen_split: str = "even"  # how a widened channel's reader weights were shared among its copies
    keep_filter_norms: bool = False  # readers scaled back to their filters' norms after each widening

    @property
    def label(self) -> str:
        """The format, with the first averaged epoch for swalp ("swalp (avg from 8)") and
        the structural strategy if any ("dfp16 + prunetrain"), and the settings that tell it
        from the same strategy's other rows ("dfp16 + prunetrain (prune_multiple 8)")."""
        label = self.format if self.swa_start is None else f"{self.format} (avg from {self.swa_start})"
        label = label if self.strategy == NONE else f"{label} + {self.strategy}"
        return f"{label} ({self.variant})" if self.variant else label


def unique_runs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with each config once (its first record), warning about the repeats: a
    run stored twice is one measurement, not two seeds."""
    seen: set[str] = set()
    unique, repeated = [], []
    for record in records:
        key = config_key(record["config"])
        if key in seen:
            repeated.append(record)
            continue
        seen.add(key)
        unique.append(record)
    if repeated:
        warnings.warn(
            f"{len(repeated)} record(s) repeat a run already in the results (the same config, e.g. "
            f"{run_label(repeated[0]['config'])}); each run is counted once, from its first record",
            DuplicateRunWarning,
            stacklevel=2,
        )
    return unique


def group_records(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``records`` (each config once, see ``unique_runs``) split by everything in their
    config but PER_RUN, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in unique_runs(records):
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


def _format_order(fmt: str) -> int:
    return FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS)


def _strategy_order(strategy: str) -> int:
    return STRATEGIES.index(strategy) if strategy in STRATEGIES else len(STRATEGIES)


def strategy_of(config: dict[str, Any]) -> str:
    return config.get("strategy", NONE)


def _settings_of(config: dict[str, Any]) -> str:
    return config_key(config.get("strategy_settings") or {})


def _settings_by_kind(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """The distinct strategy settings of each (format, strategy), by their key."""
    by_kind: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for record in records:
        config = record["config"]
        by_kind.setdefault((config["format"], strategy_of(config)), {})[_settings_of(config)] = (
            config.get("strategy_settings") or {}
        )
    return by_kind


def _differing(variants: dict[str, dict[str, Any]]) -> list[str]:
    """The settings whose values (or absence) differ between these runs of one strategy."""
    keys = sorted({k for settings in variants.values() for k in settings})
    return [k for k in keys if len({json.dumps(v.get(k)) for v in variants.values()}) > 1]


def variant_names(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """For every (format, strategy, settings) among ``records``: "" where that format ran
    that strategy with one set of settings, else the settings that tell its runs apart
    ("prune_multiple 8"; "default" for a setting a run left unset), so that runs of other
    settings are other rows and points, never seeds of one."""
    names = {}
    for (fmt, strategy), variants in _settings_by_kind(records).items():
        differing = _differing(variants)
        for key, settings in variants.items():
            names[fmt, strategy, key] = ", ".join(f"{k} {settings.get(k, 'default')}" for k in differing)
    return names


def _kind(record: dict[str, Any], variants: dict[tuple[str, str, str], str]) -> tuple[str, str, str]:
    """(format, strategy, variant name) of a run: one row and one series of points."""
    config = record["config"]
    fmt, strategy = config["format"], strategy_of(config)
    return fmt, strategy, variants[fmt, strategy, _settings_of(config)]


def summarise(group: Sequence[dict[str, Any]], target_accuracy: float | None) -> list[Row]:
    """The rows of one group, ordered by batch size, then format (in FORMATS order), then
    SWA start, then strategy (in STRATEGIES order)."""
    variants = variant_names(group)
    cells: dict[tuple[str, int, int | None, str, str], list[dict[str, Any]]] = {}
    for record in group:
        fmt, strategy, variant = _kind(record, variants)
        config = record["config"]
        cells.setdefault((fmt, config["batch_size"], config["swa_start"], strategy, variant), []).append(record)
    seed_seconds = {
        cell: {r["config"]["seed"]: r["result"]["train_seconds"] for r in runs if not r["result"]["diverged"]}
        for cell, runs in cells.items()
    }
    rows = []
    for (fmt, batch_size, swa_start, strategy, variant), runs in cells.items():
        config, results = runs[0]["config"], [r["result"] for r in runs]
        # the regulariser's settings, only where it ran (the control shares them, not the penalty)
        settings = config.get("strategy_settings") or {}
        penalty = settings if strategy in (PRUNETRAIN, GROW_THEN_PRUNE) else {}
        completed = [r for r in results if not r["diverged"]]
        accuracies = [r["final_accuracy"] for r in results]
        times_to_target = [time_to_target(r["epochs"], target_accuracy) for r in results]
        # A seed that never reached the target counts as infinitely slow in the median.
        median_to_target = statistics.median([math.inf if t is None else t for t in times_to_target])
        rows.append(
            Row(
                format=fmt,
                batch_size=batch_size,
                swa_start=swa_start,
                lr=scaled_lr(config["base_lr"], batch_size, config["base_batch_size"]),
                runs=len(runs),
                train_seconds=_median([r["train_seconds"] for r in completed]),
                data_seconds=_median([r["data_seconds"] for r in completed]),
                eval_seconds=_median([r["eval_seconds"] for r in completed]),
                images_per_second=_median([r["images_per_second"] for r in completed]),
                accuracy=statistics.fmean(accuracies),
                accuracy_min=min(accuracies),
                accuracy_max=max(accuracies),
                trained_accuracy=statistics.fmean(r["trained_accuracy"] for r in results),
                time_to_target=None if math.isinf(median_to_target) else median_to_target,
                reached=sum(t is not None for t in times_to_target),
                diverged=len(results) - len(completed),
                averaged=sum(r["epochs"][-1].get("swa_accuracy") is not None for r in results),
                speedup=None,
                speedup_range=None,
                strategy=strategy,
                variant=variant,
                train_flops=_median([r.get("train_flops") for r in completed]),
                parameters=results[0].get("parameters"),
                widths=results[0].get("widths"),
                surgery_seconds=_median([r["epochs"][-1].get("surgery_seconds") for r in completed]),
                batch_sizes=tuple(s["batch_size"] for s in results[0].get("surgeries", []) if "batch_size" in s),
                proximal=penalty.get("proximal", False),
                penalty_epochs=penalty.get("penalty_epochs"),
                prune_multiple=penalty.get("prune_multiple", 1),
                lasso_weights=penalty.get("lasso_weights", "uniform"),
                widen_split=settings.get("widen_split", "even"),
                keep_filter_norms=settings.get("keep_filter_norms", False),
            )
        )
    fp32_seconds = {row.batch_size: row.train_seconds for row in rows if row.format == "fp32" and row.strategy == NONE}
    rows = [
        dataclasses.replace(
            row,
            speedup=fp32_seconds[row.batch_size] / row.train_seconds,
            speedup_range=None if (row.format, row.strategy) == ("fp32", NONE) else _per_seed_range(row, seed_seconds),
        )
        if fp32_seconds.get(row.batch_size) is not None and row.train_seconds
        else row
        for row in rows
    ]
    return sorted(
        rows,
        key=lambda row: (
            row.batch_size,
            _format_order(row.format),
            row.format,
            row.swa_start or 0,
            _strategy_order(row.strategy),
            row.variant,
        ),
    )


def _per_seed_range(row: Row, seed_seconds: dict[tuple, dict[int, float]]) -> tuple[float, float] | None:
    """The lowest and highest per-seed speed-up of ``row`` (fp32's time of a seed at the
    same batch size over the row's) over the seeds timed in both; None for fewer than two."""
    fp32 = seed_seconds[("fp32", row.batch_size, None, NONE, "")]
    seconds = seed_seconds[(row.format, row.batch_size, row.swa_start, row.strategy, row.variant)]
    ratios = [fp32[seed] / t for seed, t in seconds.items() if seed in fp32 and t]
    return (min(ratios), max(ratios)) if len(ratios) > 1 else None


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def _accuracy_cell(row: Row) -> str:
    text = _percent(row.accuracy)
    if row.runs > 1:
        text += f" ({100 * row.accuracy_min:.2f}-{100 * row.accuracy_max:.2f})"
    return text


def _speedup_cell(row: Row, fp32: Row | None) -> str:
    if row.speedup is not None:
        spread = f" (per seed {row.speedup_range[0]:.2f}-{row.speedup_range[1]:.2f}x)" if row.speedup_range else ""
        return f"{row.speedup:.2f}x{spread}"
    if row.train_seconds is None:
        return "diverged"
    return "no fp32 run" if fp32 is None else "fp32 diverged"


def _seconds(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.1f}"


def _notes(row: Row) -> str:
    notes = []
    if row.averaged:
        notes.append(f"SWA average; its low-precision weights: {_percent(row.trained_accuracy)}")
    if row.diverged:
        notes.append(f"diverged in {row.diverged} of {row.runs} runs")
    if row.batch_sizes:
        grown = " -> ".join(map(str, (row.batch_size, *row.batch_sizes)))
        notes.append(f"batch grown after pruning: {grown} (as PruneTrain's paper describes; not in its code)")
    if row.proximal:
        notes.append("group lasso as a proximal step (PruneTrain adds it to the loss)")
    if row.penalty_epochs is not None:
        notes.append(f"group lasso in the first {row.penalty_epochs} epochs only (PruneTrain keeps it)")
    if row.prune_multiple > 1:
        notes.append(f"widths kept multiples of {row.prune_multiple} (PruneTrain removes every zero channel)")
    if row.lasso_weights == "flops":
        notes.append("group lasso weighted by each layer's FLOPs per weight (PruneTrain weighs every group alike)")
    if row.widen_split == "random":
        notes.append("readers' weights shared among a channel's copies at random (Net2Net divides them evenly)")
    if row.widen_split == "fresh":
        notes.append("new channels drawn afresh, read with zero weights (Net2Net copies channels)")
    if row.keep_filter_norms:
        notes.append("readers scaled back to their filters' norms after widening (Net2Net leaves them divided)")
    if row.strategy == PRUNED_SCRATCH:
        notes.append("the prunetrain run's final widths, initialised afresh and trained without the penalty")
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
    environments = {config_key(record.get("environment") or {}) for record in group}
    seen = []
    for record in group:
        env = record.get("environment") or {}
        line = (
            f"{env.get('device_name', '?')} | torch {env.get('torch', '?')} | dfp {env.get('dfp', '?')}, "
            f"CPU path {env.get('dfp_cpu_isa', '?')} on {env.get('dfp_threads_on', '?')} | Python {env.get('python', '?')}"
        )
        if line not in seen:
            seen.append(line)
    lines = [f"- Environment: {line}" for line in seen]
    if len(environments) > 1:
        warnings.warn(
            f"{_title(group[0]['config'])}: the runs come from {len(environments)} different environments "
            "(machine, library versions); their times are not comparable",
            MixedEnvironmentWarning,
            stacklevel=3,
        )
        lines.insert(
            0,
            f"- **Mixed environments**: these runs come from {len(environments)} environments; "
            "their times are not comparable",
        )
    return lines


def _title(config: dict[str, Any]) -> str:
    return f"{config['data']}, {config['model']}, {config['epochs']} epochs"


def group_markdown(group: Sequence[dict[str, Any]], target_accuracy: float | None = None) -> str:
    """The section of one group: heading, settings, environment and the table;
    ``target_accuracy`` overrides the target the runs were trained with."""
    target = group_target(group, target_accuracy)
    lines = [f"## {_title(group[0]['config'])}", "", f"- Settings: {_settings(group[0]['config'])}"]
    lines += _environment_lines(group)
    lines += [
        (
            "- Training time: forward, backward and optimizer steps (for swalp also the weight averaging and "
            "the batch-norm recomputation of the final average); data preparation and evaluation are timed "
            "apart. Times are medians over the seeds that did not diverge; images/s = training images / "
            "training time. Accuracy: test accuracy after the last epoch (mean over all seeds, min-max in "
            "brackets). Speed-up over fp32: fp32's median time over the row's, with the lowest and highest "
            "per-seed ratio in brackets where two or more seeds were timed in both. swalp (avg from N): the average of the weights of epochs N to the last, evaluated "
            "with dfp16-sr layers."
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
    rows = summarise(group, target)
    fp32 = {row.batch_size: row for row in rows if row.format == "fp32" and row.strategy == NONE}
    for row in rows:
        if target is None:
            to_target = "no target set"
        elif row.time_to_target is None:
            to_target = f"not reached ({row.reached}/{row.runs})"
        else:
            to_target = f"{row.time_to_target:.1f}" + (f" ({row.reached}/{row.runs})" if row.runs > 1 else "")
        images = f"{row.images_per_second:.0f}" if row.images_per_second is not None else "-"
        lines.append(
            f"| {row.label} | {row.batch_size} | {row.lr:.4g} | {row.runs} | {_seconds(row.train_seconds)} "
            f"| {images} | {_accuracy_cell(row)} | {_speedup_cell(row, fp32.get(row.batch_size))} | {to_target} "
            f"| {_seconds(row.data_seconds)} / {_seconds(row.eval_seconds)} | {_notes(row)} |"
        )
    if any(row.strategy != NONE for row in rows):
        lines += _structure_lines(rows, group[0]["config"], [r for r in group if strategy_of(r["config"]) != NONE])
    return "\n".join(lines) + "\n"


def _structure_lines(rows: Sequence[Row], config: dict[str, Any], structured: Sequence[dict[str, Any]]) -> list[str]:
    """The table of what the structural strategies cost: training FLOPs, time and accuracy
    against the same format without a strategy (PruneTrain's targets), parameters and
    widths at the end, surgery time."""
    # the settings of every strategy, but those that tell a strategy's rows apart (Row.variant)
    named = {k for variants in _settings_by_kind(structured).values() for k in _differing(variants)}
    settings = {}
    for record in structured:
        settings.update(record["config"].get("strategy_settings") or {})
    settings = {k: v for k, v in settings.items() if k not in named}
    lines = [
        "",
        (
            f"Structural strategies ({', '.join(f'{k} {v}' for k, v in sorted(settings.items()))}; "
            "see dfp.harness.strategies). Training FLOPs: convolutions and linear layers, 3 forward passes per "
            "image trained, summed over the epochs as the network changed (medians over the seeds). Surgery time "
            "(removing or copying channels, wrapping DDP again) counts in the training time above."
        ),
        "",
        (
            "| format + strategy | batch | training FLOPs | FLOPs vs. no strategy | time vs. no strategy "
            "| accuracy vs. no strategy | parameters at the end | widths at the end | surgery time (s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(row.format, row.batch_size, row.swa_start): row for row in rows if row.strategy == NONE}
    for row in rows:
        base = plain.get((row.format, row.batch_size, row.swa_start))
        flops = _ratio(row.train_flops, base.train_flops if base else None)
        time = _ratio(row.train_seconds, base.train_seconds if base else None)
        points = "-" if base is None else f"{100 * (row.accuracy - base.accuracy):+.2f} points"
        widths = ", ".join(f"{name} {width}" for name, width in (row.widths or {}).items()) or "-"
        surgery = "-" if row.surgery_seconds is None else f"{row.surgery_seconds:.2f}"
        lines.append(
            f"| {row.label} | {row.batch_size} | {_flops(row.train_flops)} | {flops} | {time} | {points} | "
            f"{row.parameters if row.parameters is not None else '-'} | {widths} | {surgery} |"
        )
    return lines


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


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
            f"- {run_label(config)}: epoch {epoch.get('epoch')} of {config['epochs']}, accuracy "
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


def _point(record: dict[str, Any]) -> tuple[float, float]:
    """(training seconds, test accuracy in %) of one run."""
    return record["result"]["train_seconds"], 100 * record["result"]["final_accuracy"]


def front_records(group: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of ``group`` on the Pareto front of (training time, accuracy), among the
    runs that did not diverge: a run stopped early by a NaN is short, not fast."""
    completed = [r for r in group if not r["result"]["diverged"]]
    return [r for r, on in zip(completed, pareto_front([_point(r) for r in completed])) if on]


def _annotate(axes: Any, record: dict[str, Any], text: str, batch_sizes: list[int]) -> None:
    """Write ``text`` beside the run's point: above for every other batch size, below for
    the rest, so that two batch sizes at one spot stay readable."""
    above = batch_sizes.index(record["config"]["batch_size"]) % 2 == 0
    axes.annotate(text, _point(record), textcoords="offset points", xytext=(5, 4 if above else -10), fontsize=7)


def plot_pareto(records: Sequence[dict[str, Any]], path: str | Path) -> Figure:
    """Training time against final accuracy, one point per run, one marker per format
    (where a group has structural strategies: one colour per format, one marker per
    strategy); the Pareto front of each group circled and joined; diverged runs drawn as an x (with
    their format), off the front. Returns the figure saved to ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    groups = group_records(records) or [[]]
    figure = Figure(figsize=(7, 4.5 * len(groups)), layout="constrained")
    for axes, group in zip(figure.subplots(len(groups), 1, squeeze=False)[:, 0], groups):
        batch_sizes = sorted({r["config"]["batch_size"] for r in group})
        structured = any(strategy_of(r["config"]) != NONE for r in group)
        variants = variant_names(group)
        kinds = sorted(
            {_kind(r, variants) for r in group},
            key=lambda kind: (_format_order(kind[0]), _strategy_order(kind[1]), kind[2]),
        )
        for index, (fmt, strategy, variant) in enumerate(kinds):
            mine = [r for r in group if _kind(r, variants) == (fmt, strategy, variant) and not r["result"]["diverged"]]
            if not mine:
                continue
            # a strategy's other settings: the same marker, hollow after the first
            hollow = index > 0 and kinds[index - 1][:2] == (fmt, strategy)
            axes.scatter(
                [_point(r)[0] for r in mine],
                [_point(r)[1] for r in mine],
                marker=STRATEGY_MARKERS.get(strategy, "P") if structured else MARKERS.get(fmt, "P"),
                color="none" if hollow else COLORS.get(fmt),
                edgecolors=COLORS.get(fmt),
                s=70,
                label=(f"{fmt} + {strategy}" if structured else fmt) + (f" ({variant})" if variant else ""),
                zorder=3,
            )
            for record in mine:
                _annotate(axes, record, f"b{record['config']['batch_size']}", batch_sizes)
        diverged = [r for r in group if r["result"]["diverged"]]
        if diverged:
            axes.scatter(
                [_point(r)[0] for r in diverged],
                [_point(r)[1] for r in diverged],
                marker="x",
                color=[COLORS.get(r["config"]["format"], "black") for r in diverged],
                s=70,
                label="diverged",
                zorder=3,
            )
            for record in diverged:
                _annotate(axes, record, f"{record['config']['format']} b{record['config']['batch_size']}", batch_sizes)
        front = sorted(_point(r) for r in front_records(group))
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
        title = _title(group[0]["config"]) if group else "no runs"
        axes.set(xlabel="training time (s)", ylabel="test accuracy (%)", title=title)
        axes.grid(alpha=0.3)
        times = [_point(r)[0] for r in group]
        if times and max(times) > 10 * min(times) > 0:
            axes.set_xscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            axes.xaxis.set_major_formatter(plain)
            axes.xaxis.set_minor_formatter(plain)
        if group:
            axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return figure


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Figure:
    """Test accuracy after each epoch against cumulative training time, one line per run
    (colour: format, line style: batch size). Returns the figure saved to ``path``."""
    from matplotlib.figure import Figure

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
        title = _title(group[0]["config"]) if group else "no runs"
        axes.set(xlabel="training time (s)", ylabel="test accuracy (%)", title=title)
        axes.grid(alpha=0.3)
        if group:
            axes.legend(fontsize=7, ncols=2)
    figure.savefig(path, dpi=110)
    return figure


def write_report(store: ResultStore, target_accuracy: float | None = None) -> str:
    """Regenerate report.md, pareto.png and curves.png in the store's directory from its
    files; returns the markdown. Each group's time-to-target column uses the target its
    runs were trained with, unless ``target_accuracy`` overrides it for every group."""
    records = store.load()
    text = markdown(records, store.load_progress(), target_accuracy)
    (store.directory / REPORT_FILE).write_text(text, encoding="utf-8")
    plot_pareto(records, store.directory / PARETO_FILE)
    plot_curves(records, store.directory / CURVES_FILE)
    return text
