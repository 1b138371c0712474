"""What trains beside the model and must follow a surgery: the optimizer's per-parameter
state (SGD's momentum buffer, Adam's moments), SWALP's DFP16 grid and SWALP's weight
average.

Momentum of a copied channel (Net2WiderNet) is a copy of its source's, divided like the
weights on the reader side, so the widened model takes the step the narrow one would have
taken, split over the copies. A removed channel's momentum goes with it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..format import DFPSpec, quantize
from ..optim import SWALP, WeightAverage
from .surgery import Surgery, apply_to_model, in_layout_of


def apply_to_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, surgery: Surgery) -> None:
    """Reshape the per-parameter state of ``optimizer`` (every tensor in ``state[p]`` of
    the parameter's shape; scalars such as Adam's ``step`` are kept) for the parameters of
    ``model`` that ``surgery`` edits. Call it before ``apply_to_model``: it reads the old
    shapes. Noise is not added to the state."""
    parameters = dict(model.named_parameters())
    for name in surgery.edits:
        param = parameters.get(name)
        if param is None or param not in optimizer.state:
            continue
        state = optimizer.state[param]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                state[key] = in_layout_of(param, surgery.transform(name, value))  # as its parameter


def round_swalp_parameters(optimizer: SWALP, model: nn.Module, names: set[str]) -> None:
    """Round the parameters ``names`` of ``model`` and their momentum buffers back to DFP16
    numbers (to nearest, with their group's headroom), as SWALP keeps every weight.

    A gather keeps values on their tensor's DFP16 grid; a removal can only make the grid
    finer, so it changes nothing. Net2WiderNet's division by a copy count that is not a
    power of two (and any noise or random split) leaves the grid: the rounding changes
    the function by at most half a quantization step per weight.
    """
    parameters = dict(model.named_parameters())
    headroom = {id(p): group["headroom"] for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for name in names:
            param = parameters.get(name)
            if param is None or id(param) not in headroom:
                continue
            spec = DFPSpec(headroom[id(param)])
            param.copy_(quantize(param.detach(), spec).dequantize())
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                buffer.copy_(quantize(buffer, spec).dequantize())


def apply_to_weight_average(average: WeightAverage, surgery: Surgery) -> None:
    """Reshape SWALP's weight average: its copy of the model and its running sums.

    The edits are linear, so the edited sum is the sum of the edited snapshots: the average
    stays exact. Net2WiderNet's noise counts once per snapshot (``count`` times), as if
    every averaged snapshot had carried it. (This reads the average's private state: the average belongs to
    the model it copies, and a change of architecture is the one case that must reach in.)
    """
    apply_to_model(average._model, surgery)
    for name, total in average._sums.items():
        if name in surgery.edits:
            average._sums[name] = surgery.transform(name, total, noise_weight=float(average.count)).contiguous()
