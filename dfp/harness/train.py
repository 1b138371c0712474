"""One training run: a model, a format, a batch size and a seed, timed and evaluated
after every epoch.

Three clocks, kept apart (seconds of ``time.perf_counter``):

- training: forward, backward and optimizer step of every batch (the batch already in
  memory), plus SWALP's once-per-epoch update of its weight average. The averaged model
  exists only once its batch-norm statistics are recomputed (a forward pass over the
  training split), so the time at which an epoch's SWA model is reported adds that
  epoch's recomputation, once: the final time counts the last one, not every epoch's.
  ``images_per_second`` is the training images over that final time;
- data: preparing the training batches (indexing, normalising, augmenting, copying to
  the device), including those of the batch-norm recomputation;
- evaluation: the test-set passes after each epoch.

Before the first epoch one training step runs untimed and is undone (weights, optimizer,
loss scaler and random generators restored), so that one-time start-up costs (memory
allocation, oneDNN / cuBLAS / cuDNN set-up, DDP's bucket rebuild) fall on no run's clock,
whichever run of a study comes first. On CUDA the clock waits for the device after every
step (``torch.cuda.synchronize``), so that each step's time is its own. Under
DistributedDataParallel every rank trains on its shard of each batch; the times are rank
0's and the training loss is the mean over ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import dfp

from .. import data, distributed, models, structure
from . import formats
from .results import time_to_target
from .schedule import Schedule
from .strategies import NONE, GroupLasso, StrategySettings, StructuredRun

EVAL_BATCH_SIZE = 500
NO_COMPRESSION = "none"  # RunConfig.compress without gradient compression (distributed.wrap's None)
# Rank r > 0 reseeds torch's generator with seed + RANK_SEED_STRIDE * r (a prime, so that
# the seeds of different runs and ranks do not collide for any realistic seed).
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes and on what it is timed; a finished
    run is identified by all of it (``as_dict`` is the key in results.jsonl).

    ``batch_size`` is the global batch (all ranks together); ``base_lr`` the learning
    rate at ``base_batch_size`` (see ``schedule``); ``swa_start`` the first epoch
    (1-based) whose weights enter the SWALP average (None for other formats);
    ``limit_train_batches`` caps the steps per epoch (smoke tests), None for all;
    ``strategy`` the structural strategy (``strategies``) with its ``strategy_settings``
    (None: the defaults). A run without a strategy ("none") is keyed without these two
    fields, as before they existed, so results stored then still resume.
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
    strategy: str = NONE
    strategy_settings: StrategySettings | None = None

    def as_dict(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config["fp32_layers"] = list(self.fp32_layers)
        del config["strategy"], config["strategy_settings"]
        if self.strategy != NONE:
            config["strategy"] = self.strategy
            config["strategy_settings"] = (self.strategy_settings or StrategySettings()).for_strategy(self.strategy)
        return config

    @property
    def label(self) -> str:
        strategy = "" if self.strategy == NONE else f" {self.strategy}"
        return f"{self.format}{strategy} batch {self.batch_size} seed {self.seed}"


class _Timed:
    """Iterates ``batches``, moving each to ``device`` and adding the time that takes
    (preparation included) to ``seconds``."""

    def __init__(self, batches: Iterable, device: torch.device) -> None:
        self.batches = iter(batches)
        self.device = device
        self.seconds = 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        try:
            x, y = next(self.batches)
            x = x.to(self.device, memory_format=formats.MEMORY_FORMAT, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return x, y
        finally:
            self.seconds += time.perf_counter() - start


def evaluate(model: nn.Module, dataset: data.Dataset, training: formats.Training) -> tuple[float, float]:
    """(accuracy as a fraction, mean cross-entropy) of ``model`` on the test split, in
    the format's autocast; the model is left in eval mode."""
    check_test_split(dataset)
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    test = data.batches(dataset.test, dataset, EVAL_BATCH_SIZE, shuffle=False)
    with torch.no_grad():
        for x, y in _Timed(test, training.device):
            with training.autocast():
                logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
    return correct / count, loss_sum / count


def check_test_split(dataset: data.Dataset) -> None:
    """Raise ValueError when the test split is empty: every epoch is evaluated on it."""
    if len(dataset.test) == 0:
        raise ValueError(
            f"{dataset.name}: the test split is empty, but every epoch is evaluated on it; give the data set "
            "at least one test image"
        )


def check_batch_size(batch_size: int, dataset: data.Dataset, world_size: int) -> None:
    """Raise ValueError unless the global ``batch_size`` splits evenly over ``world_size``
    processes and each process's shard of the training split (``len // world_size``
    images) holds at least one of its batches (``batch_size // world_size`` images)."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
    images, per_rank_batch = len(dataset.train), batch_size // world_size
    shard = images // world_size
    if per_rank_batch <= shard:
        return
    if world_size == 1:
        raise ValueError(
            f"batch size {batch_size} is larger than the {images} training images of {dataset.name}; "
            "choose a smaller batch size"
        )
    raise ValueError(
        f"batch size {batch_size} gives each of the {world_size} processes {per_rank_batch} images per step, but "
        f"each process gets only {shard} of the {images} training images of {dataset.name}; choose a smaller "
        "batch size"
    )


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
    control_widths: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; returns its result (see ``results.py`` for the file).

    ``on_epoch`` gets each epoch's record as soon as the epoch is evaluated;
    ``control_widths``: for the pruned-scratch strategy, the final widths of its prunetrain
    run. The result:
    final_accuracy (the reported model: SWALP's average for "swalp", else the trained
    weights), trained_accuracy (the trained weights), train_seconds, data_seconds,
    eval_seconds, images_per_second (images over train_seconds), steps, images,
    time_to_target_seconds (None if never reached), target_accuracy, diverged (a
    non-finite training or test loss stopped the run), and
    ``epochs``, a list of per-epoch records: epoch, lr, train_loss, test_loss,
    trained_accuracy, swa_accuracy, accuracy (the reported model's), seconds (cumulative
    training time when that model existed), train_seconds, data_seconds, eval_seconds
    (cumulative); and the structural accounting: forward_flops (per image, this epoch's
    architecture), train_flops (cumulative, ``TRAINING_FLOPS_PER_FORWARD`` forwards per
    image trained), parameters (this epoch's), surgery_seconds (cumulative, counted in the
    training time too), widths (of each channel space after the epoch).

    The result adds train_flops (total), parameters and widths at the end, surgeries (epoch,
    kind and new widths of each), and penalty_coefficient (PruneTrain's lambda, else None).
    Surgery happens after an epoch's evaluation; its time counts in that epoch.
    """
    check_test_split(dataset)
    check_batch_size(config.batch_size, dataset, ctx.world_size)
    from tqdm.auto import tqdm  # a harness extra: imported when used (dfp-compare checks it first)

    device = ctx.device
    torch.manual_seed(config.seed)
    model = models.build(config.model, dataset.channels, dataset.num_classes, dataset.image_size)
    plan = None
    if config.strategy != NONE:
        plan = StructuredRun.plan(
            config.strategy, config.strategy_settings, config.epochs, config.seed, model, control_widths
        )
        plan.shape_initial_model(model)
    if ctx.rank:
        # dfp16-sr layers draw their stochastic rounding from torch's generator: with one seed
        # the ranks would round alike and their errors would add up instead of averaging out.
        # The weights stay rank 0's (DDP broadcasts them); SWALP keeps its own generator, the
        # same on every rank, because its updates must stay identical.
        torch.manual_seed(config.seed + RANK_SEED_STRIDE * ctx.rank)
    fp32_layers = formats.resolve_fp32_layers(model, config.fp32_layers)

    def epoch_steps(per_rank_batch: int) -> int:
        steps = data.num_batches(dataset.train, per_rank_batch, drop_last=True, world_size=ctx.world_size)
        return steps if config.limit_train_batches is None else min(steps, config.limit_train_batches)

    per_rank_batch = config.batch_size // ctx.world_size
    steps_per_epoch = epoch_steps(per_rank_batch)
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
    compress = None if config.compress == NO_COMPRESSION else config.compress
    network = distributed.wrap(module, ctx, compress)
    order = torch.Generator().manual_seed(config.seed)  # the same permutation on every rank
    input_shape = (dataset.channels, dataset.image_size, dataset.image_size)
    regulariser = plan.make_regulariser(module, ctx, input_shape) if plan is not None else None
    _warm_up(training, network, dataset, per_rank_batch, ctx, regulariser)
    if regulariser is not None:
        regulariser.coefficient = None  # set again at the first timed step, as the warm-up is undone

    forward_flops = structure.forward_flops(module, input_shape)
    train_flops = 0
    train_seconds = data_seconds = eval_seconds = surgery_seconds = 0.0
    epochs: list[dict[str, Any]] = []
    step = images = 0
    # The batch grows after pruning where the strategy says so: the schedule then runs on
    # images trained on (its step at the first batch size), the rate scaled with the batch.
    batch_size, position = config.batch_size, 0.0
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
            if batch_size != config.batch_size:
                per_rank_batch = batch_size // ctx.world_size
                steps_per_epoch = epoch_steps(per_rank_batch)
            scale = batch_size / config.batch_size
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
            )
            loss_sum = torch.zeros((), device=device)
            epoch_flops, parameters = forward_flops, structure.parameter_count(module)
            for _ in range(steps_per_epoch):
                x, y = next(batches)
                start = time.perf_counter()
                lr = schedule.learning_rate(int(position)) * scale
                for group in training.optimizer.param_groups:
                    group["lr"] = lr
                loss = _train_step(training, network, x, y, ctx, regulariser)
                loss_sum += loss
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - start
                step, images, position = step + 1, images + batch_size, position + scale
                train_flops += batch_size * structure.TRAINING_FLOPS_PER_FORWARD * forward_flops
                bar.update(1)
                # Every rank must leave at the same step, or the others would wait in the next
                # step's all-reduce: the mean over ranks is NaN when any rank's loss is.
                if not math.isfinite(distributed.all_reduce_mean(float(loss), ctx)):
                    break
            data_seconds += batches.seconds
            train_loss = distributed.all_reduce_mean(loss_sum.item() / steps_per_epoch, ctx)

            start = time.perf_counter()
            trained_accuracy, test_loss = evaluate(module, dataset, training)
            eval_seconds += time.perf_counter() - start
            # A NaN from the epoch's last update shows only in the test loss. Batch-norm
            # statistics differ between ranks, so the ranks agree on the mean.
            diverged = not math.isfinite(train_loss) or not math.isfinite(distributed.all_reduce_mean(test_loss, ctx))

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

            if plan is not None and not diverged:
                start = time.perf_counter()
                changed = plan.after_epoch(epoch, module, training.optimizer, training.average)
                if changed:
                    # DDP's hooks and buckets belong to the old parameters: wrap again.
                    network = structure.rewrap(network, ctx, compress)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start  # the check for channels to remove counts too
                surgery_seconds += elapsed
                train_seconds += elapsed
                if changed:  # accounting, not timed
                    flops = (forward_flops, structure.forward_flops(module, input_shape))
                    most = data.num_batches(dataset.train, 1, world_size=ctx.world_size) * ctx.world_size
                    batch_size = plan.batch_after_surgery(epoch, batch_size, flops, 8 * ctx.world_size, most)
                    forward_flops = flops[1]

            record = {
                "epoch": epoch,
                "lr": lr,
                "batch_size": per_rank_batch * ctx.world_size,
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
                "forward_flops": epoch_flops,
                "train_flops": train_flops,
                "parameters": parameters,
                "surgery_seconds": surgery_seconds,
                "widths": structure.widths(module, structure.channel_spaces(module)),
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
    return {
        "final_accuracy": last["accuracy"],
        "trained_accuracy": last["trained_accuracy"],
        "train_seconds": last["seconds"],
        "data_seconds": last["data_seconds"],
        "eval_seconds": last["eval_seconds"],
        "images_per_second": images / last["seconds"] if last["seconds"] > 0 else None,
        "steps": step,
        "images": images,
        "time_to_target_seconds": time_to_target(epochs, target_accuracy),
        "target_accuracy": target_accuracy,
        "diverged": diverged,
        "epochs": epochs,
        "train_flops": train_flops,
        "parameters": structure.parameter_count(module),
        "widths": last["widths"],
        "surgeries": plan.surgeries if plan is not None else [],
        "penalty_coefficient": regulariser.coefficient if regulariser is not None else None,
    }


def _train_step(
    training: formats.Training,
    network: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: distributed.Context,
    regulariser: GroupLasso | None = None,
) -> torch.Tensor:
    """One optimizer step on the batch (x, y); returns the loss (a 0-d float32 tensor,
    with ``regulariser``'s penalty added if given), NaN when a dfp layer or SWALP refused
    a non-finite value (the run diverged).

    Raises RuntimeError when a dfp layer refuses a non-finite value under DDP (see below).
    """
    training.optimizer.zero_grad(set_to_none=True)
    try:
        with training.autocast():
            loss = nn.functional.cross_entropy(network(x), y)
        if regulariser is not None:  # in float32 on the master weights, outside autocast
            loss = regulariser(loss.float())
        (loss if training.scaler is None else training.scaler.scale(loss)).backward()
    except dfp.NonFiniteError as err:
        # dfp layers raise on NaN or Inf activations and gradients, which DFP16 cannot hold.
        if ctx.world_size > 1:
            # The other ranks are in this step's gradient all-reduce and would wait for this
            # one until the timeout: stop the process, and torchrun stops the others.
            raise RuntimeError(
                f"rank {ctx.rank}: non-finite activations or gradients ({err}); DistributedDataParallel cannot "
                "finish a step the other ranks are all-reducing, so the run stops here: it diverged"
            ) from err
        return torch.tensor(math.nan, device=x.device)
    try:
        if training.scaler is not None:
            training.scaler.step(training.optimizer)
            training.scaler.update()
        else:
            training.optimizer.step()
        if regulariser is not None:
            regulariser.after_step(training.optimizer.param_groups[0]["lr"])
    except dfp.NonFiniteError:
        # SWALP refuses a non-finite update and leaves the weights as they were. Its gradients
        # are the all-reduced ones, the same on every rank, so every rank refuses together.
        return torch.tensor(math.nan, device=x.device)
    return loss.detach().float()


def _warm_up(
    training: formats.Training,
    network: nn.Module,
    dataset: data.Dataset,
    batch_size: int,
    ctx: distributed.Context,
    regulariser: GroupLasso | None = None,
) -> None:
    """One untimed training step, undone: it pays the one-time start-up costs (allocator,
    oneDNN / cuBLAS / cuDNN set-up and autotuning, DDP's first iteration) before the clock
    starts. Weights, buffers, optimizer (SWALP's generator included) and loss scaler get
    their state back, and torch's generators are forked, so the run computes what it would
    have computed without this step.

    The batch is the first ``batch_size`` training images in file order: the shape of every
    training batch, and drawing it takes nothing from the run's order generator.
    """
    x, y = next(data.batches(dataset.train, dataset, batch_size, shuffle=False, drop_last=True))
    x = x.to(training.device, memory_format=formats.MEMORY_FORMAT)
    y = y.to(training.device)
    saved = copy.deepcopy(
        {
            "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "scaler": None if training.scaler is None else training.scaler.state_dict(),
        }
    )
    devices = [training.device] if training.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        training.model.train()
        _train_step(training, network, x, y, ctx, regulariser)
        if training.device.type == "cuda":
            torch.cuda.synchronize(training.device)
    training.model.load_state_dict(saved["model"])
    training.optimizer.load_state_dict(saved["optimizer"])
    if training.scaler is not None:
        training.scaler.load_state_dict(saved["scaler"])
    training.optimizer.zero_grad(set_to_none=True)


def _averaged_model(training: formats.Training, dataset: data.Dataset) -> tuple[float, float, nn.Module]:
    """(training seconds, data seconds, model): SWALP's weight average with batch-norm
    statistics recomputed over the whole training split (the same on every rank)."""
    loaders: list[_Timed] = []

    def loader() -> _Timed:
        loaders.append(
            _Timed(
                data.batches(dataset.train, dataset, EVAL_BATCH_SIZE, shuffle=False),
                training.device,
            )
        )
        return loaders[-1]

    start = time.perf_counter()
    with torch.no_grad(), training.autocast():
        averaged = training.average.averaged_model(loader)
    elapsed = time.perf_counter() - start
    data_time = sum(timed.seconds for timed in loaders)
    return elapsed - data_time, data_time, averaged
