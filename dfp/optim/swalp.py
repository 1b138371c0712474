"""SGD whose weights stay DFP16 numbers: the low-precision optimizer of SWALP (Yang et
al., "SWALP: Stochastic Weight Averaging in Low-Precision Training", ICML 2019),
with DFP16 (one exponent per tensor) in place of the paper's 8-bit block floating point."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._errors import NonFiniteError
from ..format import DFPSpec, quantize


class SWALP(torch.optim.Optimizer):
    """SGD with momentum whose parameters and momentum buffers are DFP16 numbers.

    One step, for each parameter ``w`` with gradient ``g`` (PyTorch's SGD convention,
    no dampening; the buffer starts as the first ``d``)::

        d = g + weight_decay * w
        buf = Q(momentum * buf + d)          # momentum > 0; otherwise buf = d
        w = Q(w - lr * buf)

    ``Q`` quantizes a whole tensor to DFP16 (``dfp.quantize`` with
    ``DFPSpec(headroom, rounding="stochastic")``: int16 mantissas, one exponent per
    tensor) and dequantizes it, so the float32 tensor holds exactly a DFP16 number.
    **There is no fp32 master copy**: the float32 parameter is only the storage of DFP16
    values, and an update smaller than a quantization step survives only through
    stochastic rounding, which makes ``Q`` unbiased (``E[Q(x)] = x``). Gradient
    accumulation is low precision too, as in the paper (its momentum is quantized); the
    gradients themselves come from the model (from int16 products when it was converted
    with ``dfp.convert``).

    Every parameter is quantized, the 1-D ones (batch-norm weights, biases) included: the
    paper keeps all weights in low precision, and with its own exponent a 1-D tensor
    keeps ``15 - headroom`` bits relative to its largest entry. The constructor rounds the
    initial parameters (to nearest), in place, so they are DFP16 from the first forward pass.

    Stochastic rounding draws from the optimizer's own ``torch.Generator`` seeded with
    ``seed``: runs are reproducible, and ``state_dict()`` includes the generator state,
    so a restored optimizer takes the same next step bit for bit. Under
    DistributedDataParallel give every rank the same seed, so the replicas stay equal.

    A non-finite update (NaN or Inf in a gradient, or an overflow) raises
    ``dfp.NonFiniteError`` naming the parameter, and the step changes nothing: no
    parameter, buffer or generator state. DFP16 cannot hold NaN, and turning it into a
    finite weight would hide the divergence. To skip such steps instead (mixed
    precision with loss scaling), step through ``torch.amp.GradScaler``.

    Args:
        params: float32 parameters (on any device ``dfp.quantize`` supports: CPU or CUDA; the
            rounding seeds come from the CPU generator either way) or parameter groups (a group
            may set its own ``lr``, ``momentum``, ``weight_decay`` and ``headroom``).
        lr: learning rate (>= 0).
        momentum: momentum factor in [0, 1).
        weight_decay: L2 penalty (>= 0), added to the gradient.
        headroom: unused top bits of the int16 mantissas (``DFPSpec.headroom``, 0..13); 2
            keeps 13 bits of magnitude, the format of the dfp16 layers.
        seed: seed of the stochastic rounding generator.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        headroom: int = 2,
        seed: int = 0,
    ) -> None:
        self._generator = torch.Generator().manual_seed(seed)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "headroom": headroom})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``) and round its parameters to DFP16, in place."""
        index = len(self.param_groups)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        settings = {**self.defaults, **param_group}
        # Checked before the group is added, so that a refused group leaves the optimizer as it was.
        if not settings["lr"] >= 0:
            raise ValueError(f"SWALP: lr must be >= 0, got {settings['lr']!r}")
        if not 0 <= settings["momentum"] < 1:
            raise ValueError(f"SWALP: momentum must be in [0, 1), got {settings['momentum']!r}")
        if not settings["weight_decay"] >= 0:
            raise ValueError(f"SWALP: weight_decay must be >= 0, got {settings['weight_decay']!r}")
        spec = DFPSpec(settings["headroom"])  # validates the headroom
        for number, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.dtype != torch.float32:
                raise TypeError(
                    f"SWALP: parameter {number} of group {index} is {p.dtype}; DFP16 weights are stored in "
                    "float32 tensors: call model.float() before building the optimizer"
                )
        super().add_param_group({**param_group, "params": params})
        with torch.no_grad():
            for number, p in enumerate(params):
                try:
                    p.copy_(_round(p, spec, None))
                except NonFiniteError as error:
                    raise NonFiniteError(
                        f"SWALP: the initial value of parameter {number} of group {index} holds NaN or Inf, which "
                        "DFP16 cannot represent; initialise the model with finite values"
                    ) from error

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One SWALP update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        generator_state = self._generator.get_state()
        # New values are computed for every parameter before any is written, so that a
        # non-finite update leaves the model and the optimizer as they were.
        updates = []
        for index, group in enumerate(self.param_groups):
            spec = DFPSpec(group["headroom"], rounding="stochastic")
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for number, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"SWALP: parameter {number} of group {index} has a sparse gradient")
                try:
                    d = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
                    buffer = None
                    if momentum != 0:
                        previous = self.state[p].get("momentum_buffer")
                        buffer = _round(
                            d if previous is None else previous.mul(momentum).add_(d), spec, self._generator
                        )
                        d = buffer
                    updates.append((p, _round(p.add(d, alpha=-lr), spec, self._generator), buffer))
                except NonFiniteError as error:
                    self._generator.set_state(generator_state)
                    cause = "its gradient holds NaN or Inf" if not p.grad.isfinite().all() else "the update overflowed"
                    raise NonFiniteError(
                        f"SWALP: the step of parameter {number} of group {index} (shape {tuple(p.shape)}) is not "
                        f"finite: {cause}, and DFP16 cannot represent it. No parameter was changed: lower the "
                        "learning rate, or skip such steps with torch.amp.GradScaler"
                    ) from error
        for p, value, buffer in updates:
            p.copy_(value)
            if buffer is not None:
                self.state[p]["momentum_buffer"] = buffer
        return loss

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's optimizer state plus ``"generator_state"``, the stochastic rounding generator."""
        state = super().state_dict()
        state["generator_state"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator_state" not in state_dict:
            raise KeyError(
                "SWALP.load_state_dict: the state has no 'generator_state' (the stochastic rounding generator); "
                "pass a state saved by SWALP.state_dict()"
            )
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state")
        super().load_state_dict(state_dict)
        self._generator.set_state(generator_state)


def _round(x: torch.Tensor, spec: DFPSpec, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` rounded to a DFP16 number (a new float32 tensor); raises dfp.NonFiniteError on NaN or Inf."""
    return quantize(x.detach(), spec, generator=generator).dequantize()
