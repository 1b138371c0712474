"""Net2WiderNet (Chen, Goodfellow and Shlens, ICLR 2016): a wider layer computing the
same function.

Channel ``j`` of the wider space is a copy of old channel ``g(j)``: ``g(j) = j`` for the
old channels, uniform over them for the new ones. Writers (and their batch norms,
parameters and running statistics) copy their rows; every reader divides its input
weights of a channel by the number of its copies (the original included), so the sum it
computes is unchanged. Copies have identical batch statistics, so the transform is exact
in train and in eval mode. At a residual join one mapping serves every writer and reader
(the space), so the addition stays aligned.

Copies stay identical under gradient descent unless something breaks the symmetry:
``noise`` adds N(0, (noise * std(W))^2) to the incoming weights of the new channels (the
Net2Net paper's suggestion; erogol/Net2Net uses 0.05), which makes the transform only
approximately function-preserving. Behind a batch norm such noise hardly separates the
copies (their normalised outputs stay almost equal). ``split="random"`` breaks the
symmetry and keeps the function: every reader weight of a channel is shared among its
copies in random proportions (``Gather.split_seed``) rather than divided evenly, so each
copy's outgoing weights, and with them its gradient, differ from the start.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .channels import channel_surgery
from .spaces import ChannelSpace
from .surgery import Surgery

SPLITS = ("even", "random")  # how a reader's weight of a channel is shared among its copies


def wider_mapping(width: int, new_width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Net2WiderNet's ``g``: ``arange(width)`` followed by ``new_width - width`` channels
    drawn uniformly (with replacement) from the old ones, from ``generator``."""
    if not 0 < width <= new_width:
        raise ValueError(f"widening needs 0 < width <= new_width, got width {width} and new_width {new_width}")
    extra = torch.randint(width, (new_width - width,), generator=generator)
    return torch.cat([torch.arange(width), extra])


def widening(
    model: nn.Module,
    space: ChannelSpace,
    mapping: torch.Tensor,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    split: str = "even",
) -> Surgery:
    """The surgery widening ``space`` so that its channel ``j`` copies old channel
    ``mapping[j]`` (every old channel must appear), with the readers' weights divided by
    the copy counts (``split="even"``) or shared among the copies in random proportions
    (``"random"``), and ``noise`` (a fraction of each writer weight's std) added to the new
    channels' incoming weights; randomness drawn from ``generator``."""
    width = space.width(model)
    mapping = torch.as_tensor(mapping, dtype=torch.long).flatten()
    counts = torch.bincount(mapping, minlength=width)
    if counts.numel() != width or (counts == 0).any():
        raise ValueError(
            f"channel space {space.name!r}: a Net2WiderNet mapping must name every one of its {width} channels at "
            "least once and no other (use wider_mapping)"
        )
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    surgery = channel_surgery(model, space, mapping, reader_scale=1.0 / counts[mapping].double())
    if split == "random":
        for reader in space.readers:
            name = f"{reader.layer}.weight"
            (gather,) = surgery.edits[name]
            seed = int(torch.randint(2**62, (1,), generator=generator))
            surgery.edits[name] = [replace(gather, split_seed=seed)]
    if noise > 0:
        modules = dict(model.named_modules())
        new = (torch.arange(mapping.numel()) >= width).double()
        for writer in space.writers:
            name = f"{writer.layer}.weight"
            std = float(modules[writer.layer].weight.detach().float().std())
            seed = int(torch.randint(2**62, (1,), generator=generator))
            (gather,) = surgery.edits[name]
            surgery.edits[name] = [replace(gather, noise_std=noise * std * new, noise_seed=seed)]
    return surgery
