"""One rank of the 2-process gloo group that tests/test_distributed.py starts, with the
environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

``python tests/distributed_worker.py OUT_DIR`` runs every scenario and saves this rank's
results to ``OUT_DIR/rank<R>.pt``. The test imports the same inputs, model and training loop
for its single-process reference runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dfp
from dfp import data, models
from dfp.distributed import Context, all_reduce_mean, dfp16_all_reduce_mean, setup, teardown, wrap
from dfp.harness.train import RunConfig, train_run

WORLD_SIZE = 2
TOP = 2**14 - 1  # the largest mantissa at headroom 1, the headroom of 2 ranks

# dfp16_all_reduce_mean inputs: each returns rank's flat float32 tensor
CASES = ("mixed", "single", "zeros", "subnormal", "huge", "top", "ties", "nan", "inf")
TRAIN_STEPS = 30
BATCH = 64
LR = 0.1
# (layer format, compression) of the DDP training runs
TRAIN_RUNS = (("fp32", None), ("dfp16", None), ("dfp16", "dfp16"))
# The harness run: rank 1's logits turn NaN at its POISONED_FORWARD-th training forward
# (the first is train_run's untimed warm-up step, so this is training step 2).
POISONED_FORWARD = 3
HARNESS_RUN = RunConfig(
    data="synthetic",
    model="small_cnn",
    format="fp32",
    batch_size=64,
    seed=0,
    epochs=2,
    base_lr=0.05,
    base_batch_size=32,
    warmup_epochs=0.0,
    momentum=0.9,
    weight_decay=0.0,
    fp32_layers=(),
    swa_start=None,
    augment=False,
    device="cpu",
    threads=1,
    world_size=WORLD_SIZE,
    compress="none",
    limit_train_batches=3,
)


def case_input(name: str, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * CASES.index(name) + rank)
    if name == "mixed":  # odd length; magnitudes over 20 binades
        return torch.randn(1001, generator=g) * 2.0 ** torch.randint(-20, 1, (1001,), generator=g)
    if name == "single":
        return torch.tensor([0.3 - 0.5 * rank])
    if name == "zeros":
        return torch.zeros(10)
    if name == "subnormal":  # 2**-e beyond the fp32 range: the two-step scaling
        return torch.randn(64, generator=g) * 1e-42
    if name == "huge":
        return torch.randn(64, generator=g) * 1e37
    if name == "top":  # both lanes of every word summed to +-(2**15 - 2) on 2 ranks
        return torch.tensor([TOP, -TOP, -TOP, TOP, TOP, TOP, -TOP], dtype=torch.float32)
    if name == "ties":  # the largest value fixes e = 0: the others lie exactly half-way
        return torch.tensor([TOP, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5 + rank], dtype=torch.float32)
    x = torch.randn(100, generator=g)
    if name == "nan" and rank == 1:
        x[3] = float("nan")
    if name == "inf" and rank == 0:
        x[5] = float("inf")
    return x


def synthetic_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of a training step, fresh each step: float32 images (BATCH, 1, 8, 8),
    one of 10 fixed random prototypes plus unit Gaussian noise, and int64 labels (BATCH,)."""
    prototypes = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(-1))
    g = torch.Generator().manual_seed(step)
    labels = torch.randint(0, 10, (BATCH,), generator=g)
    return prototypes[labels] + torch.randn(BATCH, 1, 8, 8, generator=g), labels


def small_cnn(fmt: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        # not max-pooling: a 1e-7 perturbation can move a window's argmax and change that
        # gradient by O(1), which training amplifies (fp32 DDP drifted 3e-4 from one process
        # in 30 steps with max-pooling at one seed, 2e-7 with average pooling)
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return dfp.convert(model, fmt) if fmt != "fp32" else model


def train_losses(model: nn.Module, ctx: Context, micro_batches: int = 1) -> list[float]:
    """Mean loss over the full batch at each of TRAIN_STEPS SGD steps. Rank r of W takes the
    r-th of W equal contiguous parts of every batch and accumulates the gradient over
    ``micro_batches`` equal parts of its share, each quantized on its own by dfp16 layers."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(TRAIN_STEPS):
        x, y = (part.chunk(ctx.world_size)[ctx.rank] for part in synthetic_batch(step))
        optimizer.zero_grad()
        loss = 0.0
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            part_loss = F.cross_entropy(model(xm), ym) / micro_batches
            part_loss.backward()
            loss += part_loss.item()
        optimizer.step()
        losses.append(all_reduce_mean(loss, ctx))
    return losses


def half_batch_grads(model: nn.Module, rank: int) -> list[torch.Tensor]:
    x, y = (part.chunk(WORLD_SIZE)[rank] for part in synthetic_batch(0))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def harness_run(ctx: Context) -> tuple[dict, float]:
    """dfp.harness's train_run of HARNESS_RUN on small synthetic data, rank 1's model poisoned
    (see POISONED_FORWARD); returns the result and one draw of torch's global generator after
    the run (the ranks must not share its stream)."""
    dataset = data.load("synthetic", channels=1, image_size=8, num_classes=4, train_size=256, test_size=32)
    real_build = models.build

    def build_poisoned(*args) -> nn.Module:
        model = real_build(*args)
        forwards = 0

        def poison(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
            nonlocal forwards
            if not module.training:  # evaluation
                return None
            forwards += 1
            return output * float("nan") if forwards == POISONED_FORWARD else None

        if ctx.rank == 1:
            model.register_forward_hook(poison)
        return model

    models.build = build_poisoned
    try:
        result = train_run(HARNESS_RUN, dataset, ctx, target_accuracy=None)
    finally:
        models.build = real_build
    return result, float(torch.rand(()))


@contextmanager
def all_reduce_log() -> Iterator[list[tuple[str, torch.dtype, int]]]:
    """Inside the block, every torch.distributed.all_reduce the code under test makes is
    passed through and recorded as (op, dtype, numel) in the list yielded."""
    calls = []
    real = dist.all_reduce

    def logged(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(
            ({dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}.get(op, str(op)), tensor.dtype, tensor.numel())
        )
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = logged
    try:
        yield calls
    finally:
        dist.all_reduce = real


def run(out_dir: Path) -> None:
    torch.set_num_threads(1)
    ctx = setup("cpu")
    results: dict = {
        "context": (ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device), ctx.is_main),
        "initialised": dist.is_initialized(),
        "metric_mean": all_reduce_mean(1.0 + 2.0 * ctx.rank, ctx),
    }

    results["cases"] = {}
    for name in CASES:
        with all_reduce_log() as calls:
            mean = dfp16_all_reduce_mean(case_input(name, ctx.rank)).wait()
        results["cases"][name] = (mean, calls)

    # one backward step of the same model: plain on this rank's half batch, DDP fp32, DDP dfp16
    results["local_grads"] = half_batch_grads(small_cnn("dfp16"), ctx.rank)
    results["ddp_grads"] = {}
    for compress in (None, "dfp16"):
        ddp = wrap(small_cnn("dfp16"), ctx, compress=compress)
        with all_reduce_log() as calls:
            grads = half_batch_grads(ddp, ctx.rank)
        results["ddp_grads"][compress] = (grads, calls)

    # a NaN loss on rank 1 only must leave non-finite gradients on every rank
    ddp = wrap(small_cnn("dfp16"), ctx, compress="dfp16")
    x, y = (part.chunk(WORLD_SIZE)[ctx.rank] for part in synthetic_batch(0))
    loss = F.cross_entropy(ddp(x), y) * (float("nan") if ctx.rank == 1 else 1.0)
    loss.backward()
    results["nan_grads_finite"] = [bool(torch.isfinite(p.grad).all()) for p in ddp.parameters()]

    results["losses"] = {run: train_losses(wrap(small_cnn(run[0]), ctx, compress=run[1]), ctx) for run in TRAIN_RUNS}
    results["harness"], results["draw_after_harness"] = harness_run(ctx)

    teardown(ctx)
    results["initialised_after_teardown"] = dist.is_initialized()
    torch.save(results, out_dir / f"rank{ctx.rank}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]))
