"""The main job's training steps in turns: ``python -m benchmarks.main_job``.

``python -m dfp.harness`` trains each format for 0.4-0.7 s, one after the other, so its
speed-up column moves by up to a third from run to run on a shared machine. This times
the same steps (the harness's ``prepare`` and ``_train_step``, small_cnn on the embedded
digits, its batches, SGD with momentum and weight decay) with the formats in turns in
one process, and prints each format's median step and its paired median speed-up over
fp32, the figure the main job's target is judged by. The formats share the allocator here
(``benchmarks.step.StepWorkers`` separates them for ResNets, where it moved fp32's steps);
with the main job's kilobyte tensors no such shift was seen (docs/step.md).
"""

from __future__ import annotations

import argparse
from statistics import median
from time import perf_counter

import torch

from dfp import keep_freed_memory

from .timing import machine, speedup


def step_times(formats: list[str], epochs: int, batch: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of each training step per format: ``epochs`` passes over digits' training
    split in shuffled batches of ``batch``, every format stepping on the same batch in
    turns (the first epoch is warm-up and not returned)."""
    from dfp import data, distributed, models
    from dfp.harness import formats as harness_formats
    from dfp.harness import train

    dataset = data.load("digits")
    context = distributed.Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    runs = {}
    for name in formats:
        torch.manual_seed(seed)
        model = models.build("small_cnn", dataset.channels, dataset.num_classes, dataset.image_size)
        runs[name] = harness_formats.prepare(
            name, model, torch.device("cpu"), fp32_layers=set(), lr=0.2, momentum=0.9, weight_decay=5e-4, seed=seed
        )
    times: dict[str, list[float]] = {name: [] for name in formats}
    for epoch in range(epochs + 1):
        order = torch.Generator().manual_seed(seed + epoch)
        for x, y in data.batches(dataset.train, dataset, batch, shuffle=True, generator=order, drop_last=True):
            x = x.contiguous(memory_format=harness_formats.MEMORY_FORMAT)
            for name, training in runs.items():
                start = perf_counter()
                train._train_step(training, training.model, x, y, context)
                if epoch:
                    times[name].append(perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.main_job", description=__doc__)
    p.add_argument(
        "--formats", default="fp32,bf16,dfp16,dfp16-sr", help="comma list; fp32 first (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=20, help="timed epochs of 11 steps each (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="(default: %(default)s)")
    args = p.parse_args(argv)
    formats = args.formats.split(",")
    if formats[0] != "fp32" or args.epochs < 1:
        p.error("--formats must start with fp32 (the baseline) and --epochs must be at least 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the harness trains (see dfp.allocator)
    times = step_times(formats, args.epochs, args.batch)
    print(f"{machine()}; {args.threads} thread(s); small_cnn on digits, batch {args.batch}, {len(times['fp32'])} steps")
    print("\n| format | ms per step (median) | speed-up over fp32 (paired median) |\n|---|---|---|")
    for name in formats:
        print(f"| {name} | {1e3 * median(times[name]):.2f} | {speedup(times[name], times['fp32']):.2f}x |")


if __name__ == "__main__":
    main()
