"""PruneTrain's channel removal (Lym et al., SC 2019): a channel goes when every weight
that writes it and every weight that reads it is below a threshold.

Union rule: a channel of a space is dense if any writer's output weights or any reader's
input weights for it reach the threshold, and it is kept in every layer of the space. A
channel whose writer weights are zero but whose batch norm has a bias still outputs a
constant (beta in train mode, beta - gamma * mean / std in eval mode); only when the
readers ignore it too is removing it exact, which is what the union guarantees.

Deviation from the reference code: its ``_makeSparse`` compares signed values
(``param < threshold``), so an all-negative group counts as zero; here a group is zero
when ``max |w| < threshold``. A space keeps at least its strongest channel (the reference
drops a whole residual branch instead, which loses its batch norm's constant output).
"""

from __future__ import annotations

import torch
from torch import nn

from .channels import channel_surgery
from .spaces import ChannelSpace
from .surgery import Surgery

THRESHOLD = 1e-4  # PruneTrain's configs


def channel_magnitudes(model: nn.Module, space: ChannelSpace) -> torch.Tensor:
    """Per channel of ``space``: the largest |weight| over its writers' output weights
    and its readers' input weights (float32, shape (width,))."""
    modules = dict(model.named_modules())
    width = space.width(model)
    largest = torch.zeros(width)
    with torch.no_grad():
        for writer in space.writers:
            weight = modules[writer.layer].weight.detach().float().cpu()
            largest = torch.maximum(largest, weight.abs().reshape(width, -1).amax(1))
        for reader in space.readers:
            weight = modules[reader.layer].weight.detach().float().cpu()
            per_channel = weight.abs().reshape(weight.shape[0], width, -1)  # a flattened input: f features each
            largest = torch.maximum(largest, per_channel.amax(dim=(0, 2)))
    return largest


def dense_channels(
    model: nn.Module, space: ChannelSpace, threshold: float = THRESHOLD, multiple: int = 1
) -> torch.Tensor:
    """The indices (ascending) of the channels of ``space`` kept by the union rule; at
    least one, the strongest, even when all are below ``threshold``. ``multiple`` > 1:
    the strongest of the other channels kept too, until their number is a multiple of it
    or every channel (an odd width such as 15 or 7 channels runs further from a CPU's or
    a tensor core's peak than the next multiple of 8; not in PruneTrain; keeping a zero
    channel changes no output)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    if not (isinstance(multiple, int) and multiple >= 1):
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    magnitudes = channel_magnitudes(model, space)
    kept = torch.nonzero(magnitudes >= threshold).flatten()
    if not kept.numel():
        kept = magnitudes.argmax().reshape(1)
    wanted = min(-(-kept.numel() // multiple) * multiple, magnitudes.numel())
    if wanted > kept.numel():
        others = magnitudes.clone()
        others[kept] = -1.0  # already kept
        extra = others.argsort(descending=True, stable=True)[: wanted - kept.numel()]
        kept = torch.cat([kept, extra]).sort().values
    return kept


def removal(model: nn.Module, space: ChannelSpace, keep: torch.Tensor) -> Surgery:
    """The surgery that keeps only channels ``keep`` (distinct indices; they are sorted,
    so the survivors keep their order) of ``space``."""
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.unique().numel() != keep.numel():
        raise ValueError(f"channel space {space.name!r}: the channels to keep repeat an index ({keep.tolist()})")
    return channel_surgery(model, space, keep.sort().values)


def pruning(
    model: nn.Module, spaces: list[ChannelSpace], threshold: float = THRESHOLD, multiple: int = 1
) -> tuple[Surgery, dict[str, int]]:
    """The surgery removing every channel that the union rule finds zero in ``spaces``
    (widths kept multiples of ``multiple``: ``dense_channels``), and the new width of each
    space whose width changes (empty: nothing to remove)."""
    surgery, widths = Surgery(), {}
    for space in spaces:
        keep = dense_channels(model, space, threshold, multiple)
        if keep.numel() < space.width(model):
            surgery = surgery.merged(removal(model, space, keep))
            widths[space.name] = keep.numel()
    return surgery, widths


def narrowing(model: nn.Module, spaces: list[ChannelSpace], new_widths: dict[str, int]) -> Surgery:
    """The surgery keeping the first ``new_widths[space.name]`` channels of each named
    space (a smaller architecture of the same family: re-initialise it before training)."""
    by_name = {space.name: space for space in spaces}
    unknown = sorted(new_widths.keys() - by_name.keys())
    if unknown:
        raise ValueError(f"no channel spaces named {unknown}; the model has {sorted(by_name)}")
    surgery = Surgery()
    for name, width in new_widths.items():
        space = by_name[name]
        if not 0 < width <= space.width(model):
            raise ValueError(f"channel space {name!r} has {space.width(model)} channels; cannot narrow it to {width}")
        surgery = surgery.merged(removal(model, space, torch.arange(width)))
    return surgery
