"""A surgery: how each tensor of a model changes shape, applied alike to the model, the
optimizer's per-parameter state and SWALP's weight average.

Every edit is a gather along one dimension, optionally scaled per gathered index:
removing channels keeps a subset of indices, Net2WiderNet repeats indices and divides the
readers' copies. Parameters keep their identity (``param.data = new``), so an optimizer, a
hook or a ``WeightAverage`` holding them still sees the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Gather:
    """``new = old.index_select(dim, index) * scale`` (``scale`` per new index, broadcast
    over the other dimensions; None for 1), plus, for the model's parameters, noise:
    N(0, noise_std[j]^2) on new index ``j``, drawn from a generator seeded with
    ``noise_seed`` at the tensor's shape after this gather. Drawn when applied, it fits
    whatever other gathers the tensor gets, and the same surgery draws the same noise on
    every copy of the model (SWALP's average, another rank).

    With ``split_seed`` the copies of an old index share its value at random instead of
    through ``scale``: each element of a copy gets the share u / (the sum of u over the
    copies of its index at that position), u uniform in [0.5, 1.5) drawn from that seed at
    the new shape, so the copies still sum to the old value. Unlike noise it is not a
    perturbation: the optimizer's state and SWALP's average get the same shares."""

    dim: int
    index: torch.Tensor
    scale: torch.Tensor | None = None
    noise_std: torch.Tensor | None = None
    noise_seed: int = 0
    split_seed: int | None = None

    def apply(self, tensor: torch.Tensor, noise_weight: float = 0.0) -> torch.Tensor:
        index = self.index.to(tensor.device)
        out = tensor.index_select(self.dim, index)
        shape = [1] * out.dim()
        shape[self.dim] = -1
        if self.split_seed is not None:
            out = out * self._shares(tensor.shape, out.shape).to(device=out.device, dtype=out.dtype)
        elif self.scale is not None:
            out = out * self.scale.to(device=out.device, dtype=out.dtype).view(shape)
        if noise_weight and self.noise_std is not None:
            generator = torch.Generator().manual_seed(self.noise_seed)
            draw = torch.randn(out.shape, generator=generator, dtype=torch.float64) * self.noise_std.view(shape)
            out = out + (noise_weight * draw).to(device=out.device, dtype=out.dtype)
        return out

    def _shares(self, old_shape: torch.Size, new_shape: torch.Size) -> torch.Tensor:
        u = torch.rand(new_shape, generator=torch.Generator().manual_seed(self.split_seed), dtype=torch.float64) + 0.5
        totals = torch.zeros(old_shape, dtype=torch.float64).index_add_(self.dim, self.index, u)
        return u / totals.index_select(self.dim, self.index)


@dataclass
class Surgery:
    """The edits of a structural change: tensor name (as in ``named_parameters`` /
    ``named_buffers``) -> gathers, applied in order."""

    edits: dict[str, list[Gather]] = field(default_factory=dict)

    def add(self, name: str, gather: Gather) -> None:
        self.edits.setdefault(name, []).append(gather)

    def merged(self, other: Surgery) -> Surgery:
        """Both surgeries at once (they must edit different dimensions of a shared tensor,
        as two channel spaces do)."""
        edits = {name: list(gathers) for name, gathers in self.edits.items()}
        for name, gathers in other.edits.items():
            dims = {g.dim for g in edits.get(name, [])}
            if dims & {g.dim for g in gathers}:
                raise ValueError(f"two surgeries edit the same dimension of {name!r}; apply them one after the other")
            edits.setdefault(name, []).extend(gathers)
        return Surgery(edits)

    def transform(self, name: str, tensor: torch.Tensor, noise_weight: float = 0.0) -> torch.Tensor:
        """``tensor`` (named ``name``, or a state tensor of that shape) after the edits,
        with ``noise_weight`` times their noise (0: none, for optimizer state)."""
        for gather in self.edits.get(name, ()):
            tensor = gather.apply(tensor, noise_weight)
        return tensor


def in_layout_of(tensor: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` contiguous in ``tensor``'s memory format: channels-last where a 4-d
    ``tensor`` is (the layout the model trains in), else row-major."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return new.contiguous(memory_format=torch.channels_last)
    return new.contiguous()


def apply_to_model(model: nn.Module, surgery: Surgery) -> None:
    """Reshape ``model``'s parameters and buffers in place (noise included) and update
    the shape attributes of the layers they belong to (``out_channels``,
    ``in_features``, ``num_features``, ...). Reshaped parameters lose their gradient."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    missing = sorted(surgery.edits.keys() - tensors.keys())
    if missing:
        raise ValueError(
            f"the surgery edits {missing[:5]}, which the model does not have; compute the surgery on this "
            "architecture (channel_spaces(model)) and apply it before changing the model otherwise"
        )
    touched = set()
    with torch.no_grad():
        for name in surgery.edits:
            tensor = tensors[name]
            tensor.data = in_layout_of(tensor, surgery.transform(name, tensor.detach(), noise_weight=1.0))
            if isinstance(tensor, nn.Parameter):
                tensor.grad = None
            touched.add(name.rpartition(".")[0])
    for module_name in touched:
        _sync_shape_attributes(model.get_submodule(module_name))


def _sync_shape_attributes(module: nn.Module) -> None:
    """The attributes torch reads to build, print and check a layer, from its tensors."""
    if isinstance(module, nn.Conv2d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        per_channel = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = per_channel.shape[0]
