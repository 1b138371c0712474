"""PruneTrain's group-lasso regulariser (Lym et al., SC 2019; reference code
``get_group_lasso_global`` at VictorSuciu/PruneTrain-Dynamic@5adb367).

Groups, one per channel of every channel space: each writer's output channel (a row of
its weight) and each reader's input channel (a column, or for a classifier after
``flatten`` the H * W columns of one channel). So every convolution gets output and input
groups, except that the first one's inputs (the image) and the classifier's outputs (the
classes) are not penalised; batch norms and biases are in no group. The penalty is
``R(W) = sum over groups sqrt(sum w^2 + 1e-8)``, with one global coefficient and no
weighting by group size.

Deviation: the reference groups a flattened classifier's inputs per column; here per
channel (all its columns at once), the unit that can be removed.

The coefficient is set once, at the first step, from the penalty ratio (LPR, default 0.2):
``lambda = LPR * CE0 / ((1 - LPR) * R0)``, so that ``lambda R / (CE + lambda R) = LPR``
at initialisation; it stays constant for the whole run.

Weighting (not in PruneTrain): with ``weights`` (by layer name), every group of a layer
counts ``weights[layer]`` times. With the output positions per image of each layer
(``output_positions``: how many multiply-adds each of its weights does) the penalty
prices a channel by its FLOPs instead of its weights, as MorphNet's FLOP regulariser
(Gordon et al., CVPR 2018). Unweighted, a weight of a CIFAR ResNet's last stage costs
as much penalty as one of its first, yet does a sixteenth of the multiply-adds (8 x 8
positions against 32 x 32); the last stage holds most of the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .spaces import ChannelSpace

EPS = 1e-8  # inside the square root, as the reference: the norm stays differentiable at 0
PENALTY_RATIO = 0.2


def group_lasso(model: nn.Module, spaces: list[ChannelSpace], weights: dict[str, float] | None = None) -> torch.Tensor:
    """``R(W)`` of ``model`` over the groups of ``spaces`` (a float32 scalar,
    differentiable), each layer's groups counted ``weights[layer]`` times (default once)."""
    modules = dict(model.named_modules())
    total = None
    for space in spaces:
        width = space.width(model)
        for writer in space.writers:
            weight = modules[writer.layer].weight.float()
            term = weight.reshape(width, -1).square().sum(1).add(EPS).sqrt().sum() * _weight(weights, writer.layer)
            total = term if total is None else total + term
        for reader in space.readers:
            weight = modules[reader.layer].weight.float()
            per_channel = weight.reshape(weight.shape[0], width, -1).square().sum(dim=(0, 2))
            total = total + per_channel.add(EPS).sqrt().sum() * _weight(weights, reader.layer)
    if total is None:
        raise ValueError("group_lasso got no channel spaces: nothing to penalise")
    return total


def coefficient(cross_entropy: float, penalty: float, penalty_ratio: float = PENALTY_RATIO) -> float:
    """The global lambda for which ``lambda * penalty / (cross_entropy + lambda * penalty)``
    equals ``penalty_ratio`` (in [0, 1))."""
    if not 0 <= penalty_ratio < 1:
        raise ValueError(f"the penalty ratio must lie in [0, 1), got {penalty_ratio!r}")
    if not penalty > 0 or not cross_entropy >= 0:
        raise ValueError(f"need a positive penalty and a non-negative loss, got {penalty!r} and {cross_entropy!r}")
    return penalty_ratio * cross_entropy / ((1 - penalty_ratio) * penalty)


def shrink_groups(
    model: nn.Module, spaces: list[ChannelSpace], threshold: float, weights: dict[str, float] | None = None
) -> None:
    """The proximal step of ``threshold * R(W)``, group soft-thresholding: every group of
    ``spaces`` (as in ``group_lasso``) is scaled by ``max(0, 1 - threshold / ||w_g||)``,
    so a group whose norm is at most ``threshold`` becomes exactly zero. Applied after an
    update with ``threshold = learning rate * lambda`` instead of the penalty's gradient,
    it zeroes groups in a few epochs, where the subgradient only drives them towards
    zero. Groups overlap (a weight is in its output channel's group and its input
    channel's), so the writers' groups are shrunk first, then the readers'. With
    ``weights``, a layer's groups are shrunk by ``threshold * weights[layer]``."""
    if not threshold >= 0:
        raise ValueError(f"shrink_groups needs a threshold >= 0, got {threshold!r}")
    modules = dict(model.named_modules())

    def factors(norms: torch.Tensor, layer: str) -> torch.Tensor:
        shrink = threshold * _weight(weights, layer)
        return (1 - shrink / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0)

    widths = [space.width(model) for space in spaces]
    with torch.no_grad():
        for space, width in zip(spaces, widths):
            for writer in space.writers:
                weight = modules[writer.layer].weight
                rows = weight.reshape(width, -1)
                weight.copy_((rows * factors(rows.norm(dim=1), writer.layer).unsqueeze(1)).view(weight.shape))
        for space, width in zip(spaces, widths):
            for reader in space.readers:
                weight = modules[reader.layer].weight
                columns = weight.reshape(weight.shape[0], width, -1)
                scale = factors(columns.square().sum(dim=(0, 2)).sqrt(), reader.layer).view(1, width, 1)
                weight.copy_((columns * scale).view(weight.shape))


def _weight(weights: dict[str, float] | None, layer: str) -> float:
    if weights is None:
        return 1.0
    if layer not in weights:
        raise ValueError(f"the group-lasso weights name no layer {layer!r}; give one for every penalised layer")
    return weights[layer]
