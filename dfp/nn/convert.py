"""Swap a model's torch layers for dfp layers (``convert``) and back (``revert``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..format import DFPSpec
from ..formats import Format, resolve
from ._layer import DFPLayer
from .conv import Conv2d
from .linear import Linear

# Exact classes only: a subclass of nn.Linear may not call its own forward (nn.MultiheadAttention
# reads out_proj.weight directly), or may override it; either way a swap would be wrong or useless.
DFP_CLASS_OF: dict[type[nn.Module], type[DFPLayer]] = {
    nn.Conv2d: Conv2d,
    nn.Linear: Linear,
    Conv2d: Conv2d,
    Linear: Linear,
}


def convert(
    model: nn.Module, fmt: str | DFPSpec | Format = "dfp16", filter_fn: Callable[[str, nn.Module], bool] | None = None
) -> nn.Module:
    """Make the ``nn.Conv2d`` and ``nn.Linear`` layers of ``model`` compute in ``fmt``, in place.

    Each layer whose class is exactly ``nn.Conv2d`` / ``nn.Linear`` (or a dfp layer, whose
    format then changes) and for which ``filter_fn(name, module)`` is true (``name`` as in
    ``model.named_modules()``; default: every layer) is replaced by a dfp layer sharing
    its Parameter objects, so an optimizer built before the call keeps working. For
    example, Das et al. kept the first convolution in fp32::

        dfp.convert(model, "dfp16", filter_fn=lambda name, m: name != "conv1")

    Returns ``model``; if ``model`` is itself a layer, its replacement.
    """
    resolve(fmt)  # an unknown name fails even when no layer is selected

    def replacement(name: str, module: nn.Module) -> nn.Module | None:
        dfp_class = DFP_CLASS_OF.get(type(module))
        if dfp_class is None or (filter_fn is not None and not filter_fn(name, module)):
            return None
        return dfp_class.from_float(module, fmt)

    return swap_modules(model, replacement)


def revert(model: nn.Module) -> nn.Module:
    """Replace every dfp layer of ``model`` by the plain torch layer with the same
    Parameter objects, in place. Returns ``model``; if ``model`` is itself a dfp layer,
    its replacement."""
    return swap_modules(model, lambda name, module: module.to_float() if isinstance(module, DFPLayer) else None)


def swap_modules(model: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Put ``replacement(name, module)`` in place of each submodule for which it is not
    None, visiting modules in the order and under the names of ``model.named_modules()``.

    A module reached under several names (one layer used twice) is decided once, under
    its first name, and every place gets the same replacement: the sharing survives.
    """
    root = replacement("", model)
    if root is not None:
        return root
    decided: dict[nn.Module, nn.Module | None] = {model: None}

    def visit(prefix: str, parent: nn.Module) -> None:
        # _modules, not named_children(): that one hides a second name of a child.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if child not in decided:
                decided[child] = replacement(prefix + child_name, child)
                if decided[child] is None:
                    visit(f"{prefix}{child_name}.", child)
            if decided[child] is not None:
                setattr(parent, child_name, decided[child])

    visit("", model)
    return model
