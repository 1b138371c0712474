"""Net2DeeperNet (Chen, Goodfellow and Shlens, ICLR 2016): new layers that start as the
identity.

- ``identity_conv``: a stride-1 convolution whose kernel is 1 at the centre tap of its own
  channel. After a ReLU, ``relu(identity(relu(v))) = relu(v)``, so inserting it (and a
  ReLU) is exact for any odd kernel size. The centre is ``k // 2`` (0-based); erogol/Net2Net
  ports Lua's 1-based ``floor(k / 2) + 1`` unchanged and shifts the feature map.
- ``undo_norm``: a batch norm set, from statistics measured on data, to undo its own
  normalisation (the paper's choice): exact in eval mode, approximate in train mode.
- ``insert_block``: a whole residual basic block in a ``CifarResNet`` stage whose last
  batch norm has gamma = beta = 0, so its branch adds exactly 0 in both modes and the
  block passes its (non-negative, post-ReLU) input through. Its convolutions are
  He-initialised, so the gradient reaching gamma is not zero and the block starts
  learning at once (zero conv weights followed by batch norm would give batch variance 0
  and gradients scaled by 1 / sqrt(eps)).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models import BasicBlock, CifarResNet
from ..nn._layer import DFPLayer
from ..optim import WeightAverage


def identity_conv(channels: int, kernel_size: int, like: nn.Conv2d | None = None) -> nn.Conv2d:
    """A ``channels`` -> ``channels`` convolution with an odd ``kernel_size``, stride 1,
    'same' padding and no bias that returns its input; of ``like``'s class, format, device
    and memory format when given (a dfp layer stays a dfp layer)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"an identity convolution needs an odd kernel size (its centre tap), got {kernel_size}")
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        centre = kernel_size // 2
        conv.weight[torch.arange(channels), torch.arange(channels), centre, centre] = 1.0
    return _like(conv, like)


def undo_norm(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Set ``norm`` (in place) to return its input in eval mode, given the per-channel
    ``mean`` and (biased) ``var`` of that input measured on data: running statistics
    ``mean`` / ``var``, gamma = sqrt(var + eps), beta = mean."""
    with torch.no_grad():
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_((var + norm.eps).sqrt())
        norm.bias.copy_(mean)


def insert_block(
    model: CifarResNet,
    stage: int,
    after: int,
    optimizer: torch.optim.Optimizer | None = None,
    average: WeightAverage | None = None,
) -> BasicBlock:
    """Insert an identity basic block into ``model.stages[stage]`` right after block
    ``after`` (0-based), in the layers' format, device and memory format; returns it.

    Its parameters join ``optimizer`` as a new parameter group with the settings of the
    group of block ``after`` (SWALP rounds them to DFP16), and SWALP's ``average`` gets the
    block too, as if it had been averaged from the start. Blocks after it are renamed
    (``stages.1.2`` becomes ``stages.1.3``): describe the channel spaces again. Under
    DistributedDataParallel insert into ``ddp.module`` on every rank, then wrap again.
    """
    if not isinstance(model, CifarResNet):
        raise TypeError(f"insert_block deepens a dfp.models.CifarResNet, not a {type(model).__name__}")
    if not 0 <= stage < len(model.stages) or not 0 <= after < len(model.stages[stage]):
        raise ValueError(
            f"stage {stage}, block {after}: the model has {len(model.stages)} stages of "
            f"{[len(s) for s in model.stages]} blocks"
        )
    blocks = list(model.stages[stage])
    neighbour = blocks[after]
    width = neighbour.conv2.out_channels
    block = _identity_block(width, neighbour)
    old_names = _stage_parameter_names(model, stage)
    blocks.insert(after + 1, block)
    model.stages[stage] = nn.Sequential(*blocks)
    if optimizer is not None:
        group = next(g for g in optimizer.param_groups if any(p is neighbour.conv1.weight for p in g["params"]))
        settings = {key: value for key, value in group.items() if key != "params"}
        optimizer.add_param_group({**settings, "params": list(block.parameters())})
    if average is not None:
        _insert_into_average(average, model, stage, after, old_names)
    return block


def _identity_block(width: int, neighbour: BasicBlock) -> BasicBlock:
    block = BasicBlock(width, width, 1)
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")  # as dfp.models
    nn.init.zeros_(block.bn2.weight)
    nn.init.zeros_(block.bn2.bias)
    block.conv1 = _like(block.conv1, neighbour.conv1)
    block.conv2 = _like(block.conv2, neighbour.conv2)
    reference = neighbour.conv1.weight
    block.to(device=reference.device, dtype=reference.dtype)
    if reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous():
        block.to(memory_format=torch.channels_last)
    return block.train(neighbour.training)


def _like(conv: nn.Conv2d, like: nn.Conv2d | None) -> nn.Conv2d:
    """``conv`` in the class, format, device, dtype and memory format of ``like``."""
    if like is None:
        return conv
    if isinstance(like, DFPLayer):
        conv = type(like).from_float(conv, like.fmt)
    conv.to(device=like.weight.device, dtype=like.weight.dtype)
    if like.weight.is_contiguous(memory_format=torch.channels_last) and not like.weight.is_contiguous():
        conv.to(memory_format=torch.channels_last)
    return conv


def _stage_parameter_names(model: CifarResNet, stage: int) -> dict[int, str]:
    """id(parameter) -> its name, for the parameters of one stage."""
    prefix = f"stages.{stage}."
    return {id(p): name for name, p in model.named_parameters() if name.startswith(prefix)}


def _insert_into_average(
    average: WeightAverage, model: CifarResNet, stage: int, after: int, old_names: dict[int, str]
) -> None:
    """Insert the block into the average's copy of the model and rename its sums (the
    average's private state: see ``dfp.structure.state.apply_to_weight_average``)."""
    copied = average._model.stages[stage]
    blocks = list(copied)
    new_block = copy.deepcopy(model.stages[stage][after + 1])
    blocks.insert(after + 1, new_block)
    average._model.stages[stage] = nn.Sequential(*blocks)
    sums = {}
    for name, p in model.named_parameters():
        if id(p) in old_names:  # a block of the stage, perhaps renamed
            sums[name] = average._sums[old_names[id(p)]]
        elif not name.startswith(f"stages.{stage}."):  # outside the stage: unchanged
            sums[name] = average._sums[name]
        else:  # the new block: as if averaged from the start at its current value
            sums[name] = p.detach().to(torch.float64) * average.count
    average._sums = sums
