"""What a network costs as its structure changes: parameters, forward FLOPs per image,
the width of each channel space."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn import revert
from .spaces import ChannelSpace

# A training step costs about three forward passes: the forward, and the two products of
# the backward (input gradients and weight gradients) that cost as much each.
TRAINING_FLOPS_PER_FORWARD = 3


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (a multiply-add is 2) of the convolutions and linear layers for one input of
    shape ``input_shape`` (without the batch dimension); other layers are not counted.

    Measured on a float32 CPU copy of the model (dfp layers reverted), so it costs one
    small forward and leaves the model and torch's random generators untouched."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    shadow = revert(copy.deepcopy(model)).to(device="cpu", dtype=torch.float32).eval()
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total += 2 * output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in shadow.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        shadow(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return total


def widths(model: nn.Module, spaces: list[ChannelSpace]) -> dict[str, int]:
    """The number of channels of each space, by name."""
    return {space.name: space.width(model) for space in spaces}
