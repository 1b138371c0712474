"""The stochastic weight average of SWALP (Yang et al., ICML 2019): the mean of the
low-precision iterates, in full precision, with batch-norm statistics recomputed."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


class WeightAverage:
    """The running mean of a model's parameters over the snapshots given to ``update``.

    SWALP trains with DFP16 weights and averages them in full precision: the mean of
    many low-precision iterates lies between quantization steps and can be closer to the
    optimum than any DFP16 number. The mean is kept as a float64 sum, exact for DFP16
    snapshots unless their exponents drift apart by more than about ``38 - log2(count)``
    bits, so it does not depend on the order of the snapshots; ``averaged_model``
    divides it by ``count`` and rounds to float32.

    Only parameters are averaged. Batch-norm running statistics of the averaged weights
    differ from those collected during training, so ``averaged_model`` recomputes them
    over the data; every other buffer is copied from the model at the latest ``update``.
    The model given here and to ``update`` is only read, never changed.

    Args:
        model: the model being trained (a DistributedDataParallel wrapper is unwrapped).
            It is deep-copied, so the averaged model has the same layers and formats
            (``dfp.revert`` it for fp32 layers).
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = copy.deepcopy(_unwrap(model))
        self._sums: dict[str, torch.Tensor] = {}
        for name, p in self._model.named_parameters():
            p.grad = None
            self._sums[name] = torch.zeros_like(p, dtype=torch.float64)
        self.count = 0

    def update(self, model: nn.Module) -> None:
        """Add the current parameters of ``model`` (the same architecture) to the mean."""
        model = _unwrap(model)
        parameters = dict(model.named_parameters())
        if parameters.keys() != self._sums.keys():
            missing = sorted(self._sums.keys() - parameters.keys())
            unexpected = sorted(parameters.keys() - self._sums.keys())
            raise ValueError(
                "WeightAverage.update: the model's parameters are not those of the model the average was made "
                f"for (missing: {missing[:5]}, unexpected: {unexpected[:5]}); average one architecture"
            )
        for name, total in self._sums.items():
            if parameters[name].shape != total.shape:
                raise ValueError(
                    f"WeightAverage.update: parameter {name!r} has shape {tuple(parameters[name].shape)}, the "
                    f"average holds {tuple(total.shape)}; average one architecture"
                )
        with torch.no_grad():
            for name, total in self._sums.items():
                total.add_(parameters[name].detach().to(torch.float64))
            live_buffers = dict(model.named_buffers())
            for name, buffer in self._model.named_buffers():
                buffer.copy_(live_buffers[name])
        self.count += 1

    def averaged_model(self, loader_fn: Callable[[], Iterable[object]]) -> nn.Module:
        """A new model holding the float32 mean of the parameters, in eval mode, with its
        batch-norm running statistics recomputed over ``loader_fn()``: an iterable of
        batches ``(x, y)`` (or tensors ``x``), ``x`` of shape (N, C, H, W). Each batch
        counts equally (a cumulative average, ``momentum=None``, as
        ``torch.optim.swa_utils.update_bn`` does). A model without batch norm does not
        read the data."""
        if self.count == 0:
            raise RuntimeError("WeightAverage.averaged_model: nothing averaged yet; call update(model) first")
        model = copy.deepcopy(self._model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_((self._sums[name] / self.count).to(p.dtype))
        device = next((p.device for p in model.parameters()), None)
        update_bn(loader_fn(), model, device=device)
        return model.eval()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
