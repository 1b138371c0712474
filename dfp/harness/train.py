"""One training run: a model, a format, a batch size and a seed, timed and evaluated
after every epoch.

Three clocks, kept apart (seconds of ``time.perf_counter``):

- training: forward, backward and optimizer step of every batch (the batch already in
  memory), plus SWALP's once-per-epoch update of its weight average. The averaged model
  exists only once its batch-norm statistics are recomputed (a forward pass over the
  training split), so the time at which an epoch's SWA model is reported adds that
  epoch's recomputation, once: the final time counts the last one, not every epoch's;
- data: preparing the training batches (indexing, normalising, augmenting, copying to
  the device), including those of the batch-norm recomputation;
- evaluation: the test-set passes after each epoch.

On CUDA the clock waits for the device after every step (``torch.cuda.synchronize``),
so that each step's time is its own. Under DistributedDataParallel every rank trains on
its shard of each batch; the times are rank 0's and the training loss is the mean over
ranks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import dfp

from .. import data, distributed, models
from . import formats
from .results import time_to_target
from .schedule import Schedule

EVAL_BATCH_SIZE = 500


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes and on what it is timed; a finished
    run is identified by all of it (``as_dict`` is the key in results.jsonl).

    ``batch_size`` is the global batch (all ranks together); ``base_lr`` the learning
    rate at ``base_batch_size`` (see ``schedule``); ``swa_start`` the first epoch
    (1-based) whose weights enter the SWALP average (None for other formats);
    ``limit_train_batches`` caps the steps per epoch (smoke tests), None for all.
    """

    data: str
    model: str
    format: str
    batch_size: int
    seed: int
    epochs: int
    base_lr: float
    base_batch_size: int
    warmup_epochs: float
    momentum: float
    weight_decay: float
    fp32_layers: tuple[str, ...]
    swa_start: int | None
    augment: bool
    device: str
    threads: int
    world_size: int
    compress: str
    limit_train_batches: int | None

    def as_dict(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config["fp32_layers"] = list(self.fp32_layers)
        return config

    @property
    def label(self) -> str:
        return f"{self.format} batch {self.batch_size} seed {self.seed}"


class _Timed:
    """Iterates ``batches``, moving each to ``device`` and adding the time that takes
    (preparation included) to ``seconds``."""

    def __init__(self, batches: Iterable, device: torch.device, memory_format: torch.memory_format) -> None:
        self.batches = iter(batches)
        self.device = device
        self.memory_format = memory_format
        self.seconds = 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        try:
            x, y = next(self.batches)
            x = x.to(self.device, memory_format=self.memory_format, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return x, y
        finally:
            self.seconds += time.perf_counter() - start


def evaluate(model: nn.Module, dataset: data.Dataset, training: formats.Training) -> tuple[float, float]:
    """(accuracy as a fraction, mean cross-entropy) of ``model`` on the test split, in
    the format's autocast; the model is left in eval mode."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    test = data.batches(dataset.test, dataset, EVAL_BATCH_SIZE, shuffle=False)
    with torch.no_grad():
        for x, y in _Timed(test, training.device, training.memory_format):
            with training.autocast():
                logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
    return correct / count, loss_sum / count


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train_run(
    config: RunConfig,
    dataset: data.Dataset,
    ctx: distributed.Context,
    *,
    target_accuracy: float | None,
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; returns its result (see ``results.py`` for the file).

    ``on_epoch`` gets each epoch's record as soon as the epoch is evaluated. The result:
    final_accuracy (the reported model: SWALP's average for "swalp", else the trained
    weights), trained_accuracy (the trained weights), train_seconds, data_seconds,
    eval_seconds, images_per_second, steps, images, time_to_target_seconds (None if never
    reached), target_accuracy, diverged (a non-finite training loss stopped the run), and
    ``epochs``, a list of per-epoch records: epoch, lr, train_loss, test_loss,
    trained_accuracy, swa_accuracy, accuracy (the reported model's), seconds (cumulative
    training time when that model existed), train_seconds, data_seconds, eval_seconds
    (cumulative).
    """
    device = ctx.device
    torch.manual_seed(config.seed)
    model = models.build(config.model, dataset.channels, dataset.num_classes, dataset.image_size)
    fp32_layers = formats.resolve_fp32_layers(model, config.fp32_layers)
    per_rank_batch = config.batch_size // ctx.world_size
    steps_per_epoch = data.num_batches(dataset.train, per_rank_batch, drop_last=True, world_size=ctx.world_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the {len(dataset.train.labels)} training images "
            f"of {config.data}; choose a smaller --batch-sizes"
        )
    if config.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, config.limit_train_batches)
    schedule = Schedule.build(
        config.base_lr,
        config.batch_size,
        config.base_batch_size,
        config.warmup_epochs,
        config.epochs,
        steps_per_epoch,
        hold_from_epoch=config.swa_start,
    )
    training = formats.prepare(
        config.format,
        model,
        device,
        fp32_layers=fp32_layers,
        lr=schedule.learning_rate(0),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )
    module = training.model
    network = distributed.wrap(module, ctx, None if config.compress == "none" else config.compress)
    order = torch.Generator().manual_seed(config.seed)  # the same permutation on every rank

    train_seconds = data_seconds = eval_seconds = 0.0
    epochs: list[dict[str, Any]] = []
    step = 0
    diverged = False
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc=config.label,
        unit="step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(1, config.epochs + 1):
            network.train()
            batches = _Timed(
                data.batches(
                    dataset.train,
                    dataset,
                    per_rank_batch,
                    shuffle=True,
                    generator=order,
                    augment=config.augment,
                    drop_last=True,
                    rank=ctx.rank,
                    world_size=ctx.world_size,
                ),
                device,
                training.memory_format,
            )
            loss_sum = torch.zeros((), device=device)
            for _ in range(steps_per_epoch):
                x, y = next(batches)
                start = time.perf_counter()
                lr = schedule.learning_rate(step)
                for group in training.optimizer.param_groups:
                    group["lr"] = lr
                try:
                    loss = _train_step(training, network, x, y)
                except dfp.NonFiniteError:
                    # SWALP refuses a non-finite update and leaves the weights as they were: diverged.
                    loss = torch.tensor(math.nan, device=device)
                loss_sum += loss
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - start
                step += 1
                bar.update(1)
                if not math.isfinite(loss):
                    break
            data_seconds += batches.seconds
            train_loss = distributed.all_reduce_mean(loss_sum.item() / steps_per_epoch, ctx)
            diverged = not math.isfinite(train_loss)

            start = time.perf_counter()
            trained_accuracy, test_loss = evaluate(module, dataset, training)
            eval_seconds += time.perf_counter() - start

            swa_accuracy, bn_seconds = None, 0.0
            if training.average is not None and not diverged and epoch >= config.swa_start:
                start = time.perf_counter()
                training.average.update(module)
                train_seconds += time.perf_counter() - start
                bn_seconds, bn_data_seconds, averaged = _averaged_model(training, dataset)
                data_seconds += bn_data_seconds
                start = time.perf_counter()
                swa_accuracy, _ = evaluate(averaged, dataset, training)
                eval_seconds += time.perf_counter() - start

            record = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": _finite_or_none(train_loss),
                "test_loss": _finite_or_none(test_loss),
                "trained_accuracy": trained_accuracy,
                "swa_accuracy": swa_accuracy,
                "accuracy": trained_accuracy if swa_accuracy is None else swa_accuracy,
                # The reported model exists once its batch-norm statistics are recomputed.
                "seconds": train_seconds + bn_seconds,
                "train_seconds": train_seconds,
                "data_seconds": data_seconds,
                "eval_seconds": eval_seconds,
            }
            epochs.append(record)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{100 * record['accuracy']:.1f}%")
            if on_epoch is not None:
                on_epoch(record)
            if diverged:
                break
    finally:
        bar.close()

    last = epochs[-1]
    images = step * config.batch_size
    return {
        "final_accuracy": last["accuracy"],
        "trained_accuracy": last["trained_accuracy"],
        "train_seconds": last["seconds"],
        "data_seconds": last["data_seconds"],
        "eval_seconds": last["eval_seconds"],
        "images_per_second": images / train_seconds if train_seconds > 0 else None,
        "steps": step,
        "images": images,
        "time_to_target_seconds": time_to_target(epochs, target_accuracy),
        "target_accuracy": target_accuracy,
        "diverged": diverged,
        "epochs": epochs,
    }


def _train_step(training: formats.Training, network: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the batch (x, y); returns the loss (a 0-d tensor)."""
    training.optimizer.zero_grad(set_to_none=True)
    with training.autocast():
        loss = nn.functional.cross_entropy(network(x), y)
    if training.scaler is not None:
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
    else:
        loss.backward()
        training.optimizer.step()
    return loss.detach().float()


def _averaged_model(training: formats.Training, dataset: data.Dataset) -> tuple[float, float, nn.Module]:
    """(training seconds, data seconds, model): SWALP's weight average with batch-norm
    statistics recomputed over the whole training split (the same on every rank)."""
    loaders: list[_Timed] = []

    def loader() -> _Timed:
        loaders.append(
            _Timed(
                data.batches(dataset.train, dataset, EVAL_BATCH_SIZE, shuffle=False),
                training.device,
                training.memory_format,
            )
        )
        return loaders[-1]

    start = time.perf_counter()
    with torch.no_grad(), training.autocast():
        averaged = training.average.averaged_model(loader)
    elapsed = time.perf_counter() - start
    data_time = sum(timed.seconds for timed in loaders)
    return elapsed - data_time, data_time, averaged
