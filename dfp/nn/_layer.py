"""What dfp.nn.Conv2d and dfp.nn.Linear share: the ``fmt`` attribute, its place in
``repr``, and moving a layer's parameters between a torch class and a dfp class."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import Self

from ..format import DFPSpec
from ..formats import Format, resolve

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class DFPLayer(nn.Module):
    """Mixin placed before the torch layer class: ``class Conv2d(DFPLayer, nn.Conv2d)``.

    Subclasses set ``float_class``, the torch class they extend, and ``shape_args``, the
    constructor arguments (besides ``bias``) that torch keeps as attributes of the same
    name: enough to rebuild a layer of the same shape.
    """

    float_class: ClassVar[type[nn.Module]]
    shape_args: ClassVar[tuple[str, ...]]

    @property
    def fmt(self) -> str | DFPSpec | Format:
        """The format the layer computes in, as given: a name ("dfp16", "bf16", ...), a
        DFPSpec or a ``dfp.formats.Format`` (see ``dfp.formats.resolve``)."""
        return self._fmt

    @fmt.setter
    def fmt(self, fmt: str | DFPSpec | Format) -> None:
        resolve(fmt)  # an unknown name fails here, not at the first forward
        self._fmt = fmt

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt!r}"

    @classmethod
    def constructor_args(cls, module: nn.Module) -> dict[str, Any]:
        """The arguments that build a layer of ``module``'s class and shape (not ``fmt``)."""
        return {**{name: getattr(module, name) for name in cls.shape_args}, "bias": module.bias is not None}

    @classmethod
    def from_float(cls, module: nn.Module, fmt: str | DFPSpec | Format = "dfp16") -> Self:
        """A dfp layer computing in ``fmt`` that shares ``module``'s parameters.

        The Parameter objects, buffers, training mode and forward (pre-)hooks are the
        module's own, not copies, so an optimizer built on ``module.parameters()`` keeps
        working; deep-copy the module first for an independent layer. ``module`` may be a
        dfp layer already (this changes its format). Backward and state_dict hooks are
        not carried over.
        """
        if not isinstance(module, cls.float_class):
            raise TypeError(
                f"{cls.__name__}.from_float needs a {cls.float_class.__name__}, got {type(module).__name__}"
            )
        return adopt(cls(**cls.constructor_args(module), device="meta", fmt=fmt), module)

    def to_float(self) -> nn.Module:
        """The plain torch layer (``float_class``) with this layer's parameters (shared,
        as in ``from_float``)."""
        return adopt(self.float_class(**self.constructor_args(self), device="meta"), self)


def adopt(dst: ModuleT, src: nn.Module) -> ModuleT:
    """Give ``dst`` (built on the meta device, so nothing was allocated or drawn from the
    random generator) ``src``'s parameters, buffers, training mode and forward hooks."""
    if parametrize.is_parametrized(src):
        # Its class is a generated subclass and `weight` is computed: rebuilding it
        # would drop the parametrization silently.
        raise TypeError(
            f"{type(src).__name__} is parametrized (torch.nn.utils.parametrize); convert the model "
            "before registering parametrizations"
        )
    for name, param in src.named_parameters(recurse=False):
        dst.register_parameter(name, param)
    for name, buf in src.named_buffers(recurse=False):
        dst.register_buffer(name, buf, persistent=name not in src._non_persistent_buffers_set)
    for hook_id, hook in src._forward_pre_hooks.items():
        dst.register_forward_pre_hook(hook, with_kwargs=hook_id in src._forward_pre_hooks_with_kwargs)
    for hook_id, hook in src._forward_hooks.items():
        dst.register_forward_hook(
            hook,
            with_kwargs=hook_id in src._forward_hooks_with_kwargs,
            always_call=hook_id in src._forward_hooks_always_called,
        )
    return dst.train(src.training)
