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
    shape ``input_shape`` (without the batch dimension); other layers are not counted."""
    return sum(2 * outputs * per_output for outputs, per_output, _ in _products(model, input_shape).values())


def output_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Per convolution and linear layer, by name: the positions of its output for one
    input of shape ``input_shape`` (H * W; 1 for a linear layer on a vector), which is
    how many multiply-adds each of its weights does per image."""
    return {name: positions for name, (_, _, positions) in _products(model, input_shape).items()}


def _products(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int, int]]:
    """Per convolution and linear layer, by name: its outputs, the multiply-adds per
    output and the positions per output channel, for one input of shape ``input_shape``.

    Measured on a float32 CPU copy of the model (dfp layers reverted), so it costs one
    small forward and leaves the model and torch's random generators untouched."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    shadow = revert(copy.deepcopy(model)).to(device="cpu", dtype=torch.float32).eval()
    found: dict[str, tuple[int, int, int]] = {}

    def record(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        channels = module.weight.shape[0]
        outputs, _, positions = found.get(name, (0, 0, 0))  # a layer called twice counts twice
        found[name] = (outputs + output.numel(), per_output, positions + output.numel() // channels)

    hooks = [
        module.register_forward_hook(lambda m, inputs, output, name=name: record(name, m, output))
        for name, module in shadow.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        shadow(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return found


def widths(model: nn.Module, spaces: list[ChannelSpace]) -> dict[str, int]:
    """The number of channels of each space, by name."""
    return {space.name: space.width(model) for space in spaces}
