"""How each compared format sets up a run: the layers, the optimizer, autocast and loss
scaling.

=========  ==================================================================================
format     set-up
=========  ==================================================================================
fp32       torch layers in float32; SGD with momentum
bf16       ``torch.autocast(device, dtype=torch.bfloat16)`` around the forward; SGD
fp16       autocast to float16 + ``torch.amp.GradScaler``; SGD
dfp16      ``dfp.convert(model, "dfp16")``: int16 products, nearest rounding; SGD
dfp16-sr   ``dfp.convert(model, "dfp16-sr")``: stochastic rounding of gradients; SGD
dfp16-tensor  ``dfp.convert(model, "dfp16-tensor")``: one exponent per tensor everywhere
           (Das et al. 2018); SGD
swalp      dfp16-sr layers and ``dfp.optim.SWALP`` (weights kept as DFP16 numbers, no fp32
           master copy), plus ``dfp.optim.WeightAverage``: the fp32 average of the weights,
           taken once per epoch, with batch-norm statistics recomputed (Yang et al. 2019);
           the average is evaluated with dfp16-sr layers, like the trained weights
=========  ==================================================================================

Every format trains in channels_last: the layout of cuDNN's tensor-core path, and on the
development CPU (AMD EPYC Zen 3, 2 threads) the faster one for a ResNet-20 training step
in fp32, bf16 and dfp16 alike (1.24x, 1.17x and 1.26x over NCHW), so that no format is
measured in a layout that slows it down.

On CUDA every format runs with ``cudnn.benchmark`` on (each convolution autotuned, during
the untimed warm-up step of ``train``), so that no format is compared against a slower
baseline; on the CPU it is off. ``prepare`` sets it for every run, so no run inherits it.

Layers named in ``fp32_layers`` stay in float32 in every format (Das et al. 2018 kept the
first convolution in fp32): for the float formats they become dfp layers in the "fp32"
format, which compute in float32 whatever autocast says. Under "swalp" their products are
fp32 but the SWALP optimizer still stores their weights as DFP16 numbers, like every weight.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import dfp

from ..optim import SWALP, WeightAverage

FORMATS: tuple[str, ...] = ("fp32", "bf16", "fp16", "dfp16", "dfp16-sr", "dfp16-tensor", "swalp")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The layer format of each format's converted layers (None: torch layers).
LAYER_FORMATS = {
    "fp32": None,
    "bf16": None,
    "fp16": None,
    "dfp16": "dfp16",
    "dfp16-sr": "dfp16-sr",
    "dfp16-tensor": "dfp16-tensor",
    "swalp": "dfp16-sr",
}
FIRST, LAST = "first", "last"


# The layout of every model, input and batch (the module docstring says why).
MEMORY_FORMAT = torch.channels_last


class FormatUnavailableError(RuntimeError):
    """A format that cannot run on the chosen device."""


@dataclass
class Training:
    """Everything a training loop needs to train a model in one format.

    Attributes:
        model: the model to train (converted, on the device, in ``MEMORY_FORMAT``).
        optimizer: SGD with momentum, or SWALP for "swalp".
        autocast_dtype: the dtype of ``torch.autocast`` around the forward, or None.
        scaler: a GradScaler for "fp16", else None.
        average: the SWALP weight average (``WeightAverage``), else None.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    average: WeightAverage | None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the forward pass (a no-op for formats without one)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def check_format_name(name: str) -> None:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")


def check_available(name: str, device: torch.device) -> None:
    """Raise FormatUnavailableError, saying what to use instead, when ``name`` cannot
    train on ``device`` (tried on a tiny conv + linear, forward and backward)."""
    check_format_name(name)
    error = _probe(name, str(device))
    if error is None:
        return
    if name == "fp16":
        hint = "use bf16 instead, or run on a CUDA GPU (--device cuda)"
    elif name == "bf16":
        hint = "use fp16 (on CUDA) or fp32 instead"
    elif LAYER_FORMATS[name] is not None and device.type == "cuda":
        hint = (
            "dfp layers on CUDA compile their kernels at run time with NVRTC (torch.cuda._compile_kernel or "
            "cupy: pip install 'dfp[cuda]') from the csrc/cuda sources shipped with dfp; use --device cpu otherwise"
        )
    elif LAYER_FORMATS[name] is not None:
        hint = "dfp layers on the CPU need the compiled dfp core: build dfp (pip install -e .)"
    else:
        hint = "check the torch installation"
    raise FormatUnavailableError(f"format {name!r} cannot train on {device}: {error}; {hint}")


@functools.cache
def _probe(name: str, device: str) -> str | None:
    """None if a tiny model trains one step in format ``name`` on ``device``, else the error."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).to(device)
    if LAYER_FORMATS[name] is not None:
        dfp.convert(model, LAYER_FORMATS[name])
    autocast = (
        torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[name])
        if name in AUTOCAST_DTYPES
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            out = model(torch.randn(2, 1, 4, 4, device=device))
        out.float().sum().backward()
    except (RuntimeError, NotImplementedError, dfp.BackendUnavailableError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def layer_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the conv and linear layers, in order."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def resolve_fp32_layers(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The module names that ``names`` selects: a name from ``model.named_modules()`` (a
    container selects every layer inside it), "first" (the first conv, or the first
    layer when there is none) or "last" (the last linear layer, or the last layer)."""
    modules = dict(model.named_modules())
    layers = layer_names(model)
    selected = set()
    for name in names:
        if name == FIRST:
            convs = [n for n in layers if isinstance(modules[n], nn.Conv2d)]
            selected.add((convs or layers)[0])
        elif name == LAST:
            linears = [n for n in layers if isinstance(modules[n], nn.Linear)]
            selected.add((linears or layers)[-1])
        elif name in modules and name:
            selected.add(name)
        else:
            raise ValueError(
                f"--fp32-layers: no module named {name!r} in the model; use 'first', 'last' or one of "
                f"its conv/linear layers: {', '.join(layers)}"
            )
    return selected


def _outside(selected: set[str]):
    """A filter_fn for dfp.convert: True for layers not inside a selected module."""

    def keep_in_format(name: str, module: nn.Module) -> bool:
        return not any(name == s or name.startswith(s + ".") for s in selected)

    return keep_in_format


def prepare(
    name: str,
    model: nn.Module,
    device: torch.device,
    *,
    fp32_layers: set[str],
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
) -> Training:
    """Set ``model`` (torch layers, on the CPU) up to train in format ``name`` on
    ``device``, with ``fp32_layers`` (module names, see ``resolve_fp32_layers``) kept in
    float32. ``lr`` is the initial rate (the schedule sets it at every step)."""
    check_format_name(name)
    layer_format = LAYER_FORMATS[name]
    if layer_format is not None:
        dfp.convert(model, layer_format, filter_fn=_outside(fp32_layers))
    elif name in AUTOCAST_DTYPES and fp32_layers:
        dfp.convert(model, "fp32", filter_fn=lambda layer, module: not _outside(fp32_layers)(layer, module))
    model.to(device)
    model.to(memory_format=MEMORY_FORMAT)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if name == "swalp":
        optimizer = SWALP(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed)
        average = WeightAverage(model)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        average = None
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Training(
        model=model,
        optimizer=optimizer,
        device=device,
        autocast_dtype=AUTOCAST_DTYPES.get(name),
        scaler=scaler,
        average=average,
    )
