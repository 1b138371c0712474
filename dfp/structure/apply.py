"""One call that applies a surgery to everything a training run holds."""

from __future__ import annotations

import torch
from torch import nn

from ..optim import SWALP, WeightAverage
from .state import apply_to_optimizer, apply_to_weight_average, round_swalp_parameters
from .surgery import Surgery, apply_to_model


def apply(
    model: nn.Module,
    surgery: Surgery,
    optimizer: torch.optim.Optimizer | None = None,
    average: WeightAverage | None = None,
) -> None:
    """Apply ``surgery`` in place to ``model`` (not a DistributedDataParallel wrapper: pass
    ``ddp.module``, then wrap it again, see ``dfp.structure`` docstring), to the
    per-parameter state of ``optimizer`` and to SWALP's ``average``. Under SWALP the
    reshaped weights are rounded back to DFP16."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "apply got a DistributedDataParallel wrapper: its gradient hooks and buckets are fixed at construction; "
            "apply the surgery to ddp.module on every rank, then wrap the module again (dfp.distributed.wrap)"
        )
    if optimizer is not None:
        apply_to_optimizer(optimizer, model, surgery)
    apply_to_model(model, surgery)
    if isinstance(optimizer, SWALP):
        round_swalp_parameters(optimizer, model, set(surgery.edits))
    if average is not None:
        apply_to_weight_average(average, surgery)
