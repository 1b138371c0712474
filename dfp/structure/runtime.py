"""Rebuilding what was built on the old shapes: the DistributedDataParallel wrapper and
torch.compile's caches."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn


def rewrap(network: nn.Module, ctx, compress: str | None = None, *, compiled: bool = False) -> nn.Module:
    """The module of ``network`` (a DDP wrapper or the model itself) wrapped again for
    ``ctx`` (a ``dfp.distributed.Context``) after a surgery applied alike on every rank.

    The old wrapper is disabled (its reducer released): do not call it again. Every rank
    waits for the others first, so none starts the new wrapper's collective
    operations while another still applies its surgery. ``compiled``: reset
    ``torch._dynamo``, whose shape guards would otherwise recompile up to their cache
    limit and then silently fall back to eager; compile the returned module again.
    """
    from .. import distributed  # dfp.distributed is imported on use, as ``import dfp`` does not

    module = network
    if isinstance(network, nn.parallel.DistributedDataParallel):
        module = network.module
        # The old wrapper's reducer holds every parameter's gradient accumulator, and autograd
        # checks new gradients against the shape the accumulator recorded (set_data resets it
        # only on a change of dtype or device): release the reducer so they are made afresh.
        for attribute in ("reducer", "logger"):
            if hasattr(network, attribute):
                delattr(network, attribute)
        gc.collect()
    if compiled:
        torch._dynamo.reset()
    if ctx.world_size > 1:
        dist.barrier()
    return distributed.wrap(module, ctx, compress)
