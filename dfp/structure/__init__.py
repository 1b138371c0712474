"""Structural surgery of a network while it trains: remove channels (PruneTrain), widen
(Net2WiderNet) and deepen (Net2DeeperNet), in place, on torch layers and on dfp layers in
any format.

A change is computed as a ``Surgery`` (per tensor: gathers along one dimension, scaled
per index) over ``channel_spaces(model)``, then applied with ``apply`` to the model (its
parameters keep their identity; batch-norm parameters and running statistics follow their
channel), to the optimizer's per-parameter state (momentum) and to SWALP's weight
average; under SWALP the reshaped weights are rounded back to DFP16. Example, one
PruneTrain reconfiguration::

    spaces = dfp.structure.channel_spaces(model)
    surgery, new_widths = dfp.structure.pruning(model, spaces, threshold=1e-4)
    dfp.structure.apply(model, surgery, optimizer)

After a change of shape, whatever was built on the old shapes must be rebuilt:
- DistributedDataParallel fixed its gradient hooks and buckets at construction: apply the
  same surgery to ``ddp.module`` on every rank (decisions taken from weights, which DDP
  keeps equal, or from a generator seeded alike), then wrap the module again
  (``rewrap``).
- ``torch.compile`` guards on shapes and would recompile up to its cache limit, then fall
  back to eager silently: ``rewrap(..., compiled=True)`` resets dynamo.
- Channel spaces name layers: describe them again after ``insert_block``.
"""

from .apply import apply
from .channels import channel_surgery
from .cost import TRAINING_FLOPS_PER_FORWARD, forward_flops, output_positions, parameter_count, widths
from .deepen import identity_conv, insert_block, undo_norm
from .group_lasso import PENALTY_RATIO, coefficient, group_lasso, shrink_groups
from .prune import THRESHOLD, channel_magnitudes, dense_channels, narrowing, pruning, removal
from .runtime import rewrap
from .spaces import ChannelSpace, Reader, Writer, channel_spaces
from .surgery import Gather, Surgery
from .widen import SPLITS, keeping_filter_norms, widening, wider_mapping

__all__ = [
    "PENALTY_RATIO",
    "SPLITS",
    "THRESHOLD",
    "TRAINING_FLOPS_PER_FORWARD",
    "ChannelSpace",
    "Gather",
    "Reader",
    "Surgery",
    "Writer",
    "apply",
    "channel_magnitudes",
    "channel_spaces",
    "channel_surgery",
    "coefficient",
    "dense_channels",
    "forward_flops",
    "group_lasso",
    "identity_conv",
    "insert_block",
    "keeping_filter_norms",
    "narrowing",
    "output_positions",
    "parameter_count",
    "pruning",
    "removal",
    "rewrap",
    "shrink_groups",
    "undo_norm",
    "widening",
    "wider_mapping",
    "widths",
]
