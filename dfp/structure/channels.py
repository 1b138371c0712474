"""The surgery that gathers the channels of one channel space, on every tensor of it."""

from __future__ import annotations

import torch
from torch import nn

from .spaces import ChannelSpace
from .surgery import Gather, Surgery

# The per-channel tensors of a batch norm, all indexed by its channel.
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def channel_surgery(
    model: nn.Module, space: ChannelSpace, index: torch.Tensor, reader_scale: torch.Tensor | None = None
) -> Surgery:
    """The surgery after which channel ``j`` of ``space`` is old channel ``index[j]``:
    writers' output channels, their batch norms (parameters and running statistics) and
    readers' input channels, the latter multiplied by ``reader_scale[j]`` when given."""
    width = space.width(model)
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if index.numel() == 0:
        raise ValueError(
            f"channel space {space.name!r} would keep no channel; keep at least one (removing a whole residual "
            "branch is not supported)"
        )
    if index.min() < 0 or index.max() >= width:
        raise ValueError(f"channel space {space.name!r} has {width} channels; the indices must lie in 0..{width - 1}")
    modules = dict(model.named_modules())
    surgery = Surgery()
    for writer in space.writers:
        layer = modules[writer.layer]
        _check_groups(layer, writer.layer)
        surgery.add(f"{writer.layer}.weight", Gather(0, index))
        if layer.bias is not None:
            surgery.add(f"{writer.layer}.bias", Gather(0, index))
        if writer.norm is not None:
            norm = modules[writer.norm]
            for tensor in NORM_TENSORS:
                if getattr(norm, tensor, None) is not None:
                    surgery.add(f"{writer.norm}.{tensor}", Gather(0, index))
    for reader in space.readers:
        _check_groups(modules[reader.layer], reader.layer)
        f = reader.features_per_channel
        # A flattened (C, H, W) input: channel c owns features c * f .. c * f + f - 1.
        features = (index[:, None] * f + torch.arange(f)).flatten()
        scale = None if reader_scale is None else reader_scale.repeat_interleave(f)
        surgery.add(f"{reader.layer}.weight", Gather(1, features, scale))
    return surgery


def _check_groups(layer: nn.Module, name: str) -> None:
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(
            f"{name} is a grouped convolution (groups={layer.groups}); channel surgery supports groups=1 only"
        )
