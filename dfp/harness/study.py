"""A study: every (seed, batch size, format, strategy) run of one data set and model,
resumable.

Runs go seed by seed, batch size by batch size, so that an interrupted study has
compared every format at the first settings before it starts the next. Within a format
the strategies go in the order given, except the pruned-scratch control, which comes
after the prunetrain run whose final architecture it trains.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch.distributed as dist

from .. import data, distributed
from . import environment
from .results import ResultStore, config_key
from .strategies import NONE, PRUNED_SCRATCH, PRUNETRAIN, StrategySettings
from .train import RunConfig, train_run


@dataclass(frozen=True)
class StudyConfig:
    """The settings a study shares across its runs (see ``cli`` for each option)."""

    data: str
    model: str
    formats: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int
    base_lr: float
    base_batch_size: int
    warmup_epochs: float
    momentum: float
    weight_decay: float
    fp32_layers: tuple[str, ...]
    swa_start: int
    device: str
    threads: int
    compress: str
    limit_train_batches: int | None
    target_accuracy: float | None
    strategies: tuple[str, ...] = (NONE,)
    strategy_settings: StrategySettings = StrategySettings()  # noqa: RUF009 (frozen: one shared instance is safe)

    def runs(self, world_size: int) -> list[RunConfig]:
        """The runs of the study, in the order they are trained."""
        strategies = [s for s in self.strategies if s != PRUNED_SCRATCH]
        strategies += [PRUNED_SCRATCH] if PRUNED_SCRATCH in self.strategies else []
        return [
            RunConfig(
                data=self.data,
                model=self.model,
                format=fmt,
                batch_size=batch_size,
                seed=seed,
                epochs=self.epochs,
                base_lr=self.base_lr,
                base_batch_size=self.base_batch_size,
                warmup_epochs=self.warmup_epochs,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                fp32_layers=self.fp32_layers,
                swa_start=self.swa_start if fmt == "swalp" else None,
                augment=self.data == "cifar10",
                device=self.device,
                threads=self.threads,
                world_size=world_size,
                compress=self.compress,
                limit_train_batches=self.limit_train_batches,
                strategy=strategy,
                strategy_settings=None if strategy == NONE else self.strategy_settings,
            )
            for seed in self.seeds
            for batch_size in self.batch_sizes
            for fmt in self.formats
            for strategy in strategies
        ]


def run_study(
    study: StudyConfig,
    dataset: data.Dataset,
    ctx: distributed.Context,
    store: ResultStore | None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every run of ``study`` not yet in ``store`` and append each as it finishes.

    ``store`` is None on ranks other than 0 (they train but write nothing); every rank
    must see the same list of runs, so rank 0's finished runs are the ones skipped.
    Returns the records of this study's runs, finished now or before.
    """
    runs = study.runs(ctx.world_size)
    finished: dict[str, dict[str, Any]] = {}
    for record in store.load() if store is not None else []:
        finished.setdefault(config_key(record["config"]), record)  # the first of repeats, as the report
    finished = _agree_on_finished(finished, runs, ctx)
    records = []
    for number, run in enumerate(runs, start=1):
        key = config_key(run.as_dict())
        if key in finished:
            if ctx.is_main:
                log(f"[{number}/{len(runs)}] {run.label}: already in results, skipped")
            records.append(finished[key])
            continue
        attempt = uuid.uuid4().hex[:12]

        def save_progress(epoch: dict[str, Any], run: RunConfig = run, attempt: str = attempt) -> None:
            if store is not None:
                store.append_progress(run.as_dict(), attempt, epoch)

        result = train_run(
            run,
            dataset,
            ctx,
            target_accuracy=study.target_accuracy,
            progress=progress,
            on_epoch=save_progress,
            control_widths=_control_widths(run, finished, records, ctx),
        )
        record = {
            "config": run.as_dict(),
            "result": result,
            "environment": environment.collect(ctx.device, study.threads, ctx.world_size),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if store is not None:
            store.append(record)
        records.append(record)
        if ctx.is_main:
            log(f"[{number}/{len(runs)}] {run.label}: {_summary(result)}")
    return records


def _control_widths(
    run: RunConfig, finished: dict[str, dict[str, Any]], records: Sequence[dict[str, Any]], ctx: distributed.Context
) -> dict[str, int] | None:
    """For a pruned-scratch run, the final widths of the prunetrain run with the same
    config (trained earlier in this study or found in the results), rank 0's on every
    rank (only rank 0 reads the results file); else None."""
    if run.strategy != PRUNED_SCRATCH:
        return None
    source = config_key(dataclasses.replace(run, strategy=PRUNETRAIN).as_dict())
    found = [None]
    for record in [*records, finished.get(source)]:
        if record and config_key(record.get("config", {})) == source and "widths" in record.get("result", {}):
            found = [record["result"]["widths"]]
    if ctx.world_size > 1:
        dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        return found[0]
    raise ValueError(
        f"{run.label}: the control trains the final architecture of the prunetrain run with the same settings, "
        "which is neither in the results nor in this study; add prunetrain to --strategies"
    )


def _summary(result: dict[str, Any]) -> str:
    text = f"accuracy {100 * result['final_accuracy']:.2f} %, training {result['train_seconds']:.1f} s"
    if result["images_per_second"] is not None:
        text += f" ({result['images_per_second']:.0f} images/s)"
    return text + (", diverged" if result["diverged"] else "")


def _agree_on_finished(
    finished: dict[str, dict[str, Any]], runs: Sequence[RunConfig], ctx: distributed.Context
) -> dict[str, dict[str, Any]]:
    """Rank 0's finished runs, known on every rank: a run that one rank skips and
    another trains would hang the collective operations of DistributedDataParallel."""
    if ctx.world_size == 1:
        return finished
    keys = [config_key(run.as_dict()) for run in runs]
    flags = [[key in finished for key in keys]]
    dist.broadcast_object_list(flags, src=0)
    return {key: finished.get(key, {}) for key, done in zip(keys, flags[0]) if done}
