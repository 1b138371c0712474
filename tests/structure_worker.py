"""One rank of the 2-process gloo group that tests/test_structure.py starts (with the
environment torchrun would set): trains a ResNet-20 under DistributedDataParallel, prunes
and widens it in the middle, wraps it again, trains on, and saves its parameters and
momentum buffers to ``OUT_DIR/rank<R>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from dfp import models, structure
from dfp.distributed import setup, teardown, wrap

WORLD_SIZE = 2


def _step(network: nn.Module, optimizer: torch.optim.Optimizer, rank: int, step: int) -> None:
    # Each rank its own batch: only the all-reduce keeps the replicas equal.
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    y = torch.randint(10, (4,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(network(x), y).backward()
    optimizer.step()


def run(out_dir: Path) -> None:
    torch.set_num_threads(1)
    ctx = setup("cpu")
    torch.manual_seed(0)
    model = models.build("resnet20", 3, 10, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    network = wrap(model, ctx)
    _step(network, optimizer, ctx.rank, 0)
    spaces = {space.name: space for space in structure.channel_spaces(model)}
    modules = dict(model.named_modules())
    with torch.no_grad():  # the same channels on every rank: the weights are equal
        for writer in spaces["stages.1"].writers:
            modules[writer.layer].weight[5] = 0
        for reader in spaces["stages.1"].readers:
            modules[reader.layer].weight[:, 5] = 0
    surgery, pruned = structure.pruning(model, list(spaces.values()))
    generator = torch.Generator().manual_seed(7)  # seeded alike: every rank draws the same mapping
    stream = spaces["stages.2"]
    surgery = surgery.merged(
        structure.widening(model, stream, structure.wider_mapping(64, 80, generator), noise=0.05, generator=generator)
    )
    structure.apply(model, surgery, optimizer)
    network = structure.rewrap(network, ctx)
    for step in (1, 2):
        _step(network, optimizer, ctx.rank, step)
    torch.save(
        {
            "pruned": pruned,
            "widths": structure.widths(model, structure.channel_spaces(model)),
            "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
            "momentum": {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()},
        },
        out_dir / f"rank{ctx.rank}.pt",
    )
    teardown(ctx)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
