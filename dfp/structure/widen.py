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
``split="fresh"`` makes no copies at all (not Net2Net; the random growth baseline of
Evci et al., GradMax, ICLR 2022): the new channels' incoming weights are drawn afresh, at
the std of their writer's weights, and their readers' weights are zero, so the function is
kept exactly, the old channels' readers keep their weights whole, and the new channels
differ from every old one from the start.

Dividing a reader's input weights among copies also shrinks each of its filters: by
sqrt(2) when every channel is doubled. Behind a batch norm a filter's scale does not change
the function, but it sets the step: the gradient scales with 1 / norm, the step relative
to the weights with 1 / norm^2, so the widened readers train at twice the effective
learning rate, for good (weight decay restores a norm only over about 1 / (lr * decay)
steps, longer than a short schedule). ``keeping_filter_norms`` scales them back.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .channels import channel_surgery
from .spaces import ChannelSpace
from .surgery import Gather, Surgery

# How a reader's weight of a channel is shared among its copies ("fresh": all of it stays
# with the channel, and the new channels are no copies).
SPLITS = ("even", "random", "fresh")


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
    channels' incoming weights; randomness drawn from ``generator``. ``split="fresh"``:
    the new channels copy only their batch norms and biases; their incoming weights are
    drawn afresh at the writer weights' std, their readers' weights are zero, and
    ``noise`` is not used."""
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
    new = (torch.arange(mapping.numel()) >= width).double()
    if split == "fresh":
        return _fresh_channels(model, space, mapping, new, generator)
    surgery = channel_surgery(model, space, mapping, reader_scale=1.0 / counts[mapping].double())
    if split == "random":
        for reader in space.readers:
            name = f"{reader.layer}.weight"
            (gather,) = surgery.edits[name]
            seed = int(torch.randint(2**62, (1,), generator=generator))
            surgery.edits[name] = [replace(gather, split_seed=seed)]
    if noise > 0:
        _draw_new_rows(model, space, surgery, noise * new, generator)
    return surgery


def _fresh_channels(
    model: nn.Module, space: ChannelSpace, mapping: torch.Tensor, new: torch.Tensor, generator: torch.Generator | None
) -> Surgery:
    """``widening(split="fresh")``: the new channels' incoming weights (and momentum)
    zeroed, then drawn afresh; their readers' weights zero."""
    surgery = channel_surgery(model, space, mapping, reader_scale=1.0 - new)
    for writer in space.writers:
        name = f"{writer.layer}.weight"
        (gather,) = surgery.edits[name]
        surgery.edits[name] = [replace(gather, scale=1.0 - new)]
    _draw_new_rows(model, space, surgery, new, generator)
    return surgery


def _draw_new_rows(
    model: nn.Module, space: ChannelSpace, surgery: Surgery, fraction: torch.Tensor, generator: torch.Generator | None
) -> None:
    """Noise on the writers' output channels: N(0, (fraction[j] * std(W))^2) on channel j."""
    modules = dict(model.named_modules())
    for writer in space.writers:
        name = f"{writer.layer}.weight"
        std = float(modules[writer.layer].weight.detach().float().std())
        seed = int(torch.randint(2**62, (1,), generator=generator))
        (gather,) = surgery.edits[name]
        surgery.edits[name] = [replace(gather, noise_std=std * fraction, noise_seed=seed)]


def keeping_filter_norms(model: nn.Module, spaces: list[ChannelSpace], surgery: Surgery) -> Surgery:
    """``surgery`` (widenings of ``spaces``), then every reader followed by a batch norm
    scaled per filter (output channel) back to the norm it had before its input weights were
    shared among copies, its batch norm's running mean scaled alike and its running variance
    by the square: the function is unchanged but for the norm's eps (1e-5 relative to
    the variances), and the effective learning rate is the narrow model's (see the module
    docstring). Momentum and SWALP's average are scaled with the weights, so the
    step keeps its direction. Readers without a batch norm (a classifier) keep the split.

    A reader's shares of a weight sum to it, so the surgery applied to the squared weights
    gives, summed over a filter, its squared norm before the split."""
    modules = dict(model.named_modules())
    kept = Surgery({name: list(gathers) for name, gathers in surgery.edits.items()})
    norms = {writer.layer: writer.norm for space in spaces for writer in space.writers if writer.norm is not None}
    for layer, norm in norms.items():
        name = f"{layer}.weight"
        if not any(gather.dim == 1 for gather in surgery.edits.get(name, ())):
            continue  # its inputs were not widened
        old = modules[layer].weight.detach().double()
        before = surgery.transform(name, old.square()).flatten(1).sum(1)
        after = surgery.transform(name, old, noise_weight=1.0).square().flatten(1).sum(1)
        scale = torch.where(after > 0, (before / after).sqrt(), torch.ones_like(after))
        rows = torch.arange(scale.numel())
        kept.add(name, Gather(0, rows, scale))
        if modules[layer].bias is not None:
            kept.add(f"{layer}.bias", Gather(0, rows, scale))
        if getattr(modules[norm], "running_mean", None) is not None:
            kept.add(f"{norm}.running_mean", Gather(0, rows, scale))
            kept.add(f"{norm}.running_var", Gather(0, rows, scale.square()))
    return kept
