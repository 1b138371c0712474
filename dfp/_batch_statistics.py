"""A convolution's output handed to the batch norm behind it together with its per channel
batch statistics, which the convolution's forward summed while it wrote the output (the
compiled core sums each piece's blocks from the cache, csrc/cpu/layer.h): the batch norm
then needs no pass of its own over the output to find them, and gets the bits it would
have found (``dfp.nn.BatchNorm2d``). They stay valid while the output is not modified
in place."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_ATTRIBUTE = "_dfp_batch_statistics"

# Outputs of fewer elements are not handed over: they stay in the cache, where the norm's
# own pass over them costs less than the Python of normalising on given statistics (the
# main job's 8x8 digits, up to 131072 elements: steps 0.96x -> 0.87x of fp32's with them,
# Intel Xeon). ResNet-20's smallest, 64 channels at 8x8 at batch 128, has 524288.
MIN_ELEMENTS = 1 << 18


def worth_handing_over(elements: int) -> bool:
    """Whether an output of this many elements is worth its statistics."""
    return elements >= MIN_ELEMENTS


class Demand:
    """Whether a layer's statistics find a taker. Summing them costs a pass over each
    output block (4 % of a 16-channel convolution's forward, AMD Zen 3): wasted behind
    ``torch.nn.BatchNorm2d`` (``dfp.convert`` keeps it) or no norm at all. A layer stops
    summing them once its outputs went untaken this many times in a row; an output taken
    in between (the layer called twice a step, once before a dfp norm) keeps it summing."""

    UNTAKEN_LIMIT = 3

    def __init__(self) -> None:
        self.untaken = 0
        self.last: list[bool] | None = None  # whether the last output's were taken

    def wanted(self) -> bool:
        return self.untaken < self.UNTAKEN_LIMIT

    def handing(self) -> list[bool]:
        """The taken-flag for an output handed over now, counting the last one's."""
        if self.last is not None:
            self.untaken = 0 if self.last[0] else self.untaken + 1
        self.last = [False]
        return self.last


_demand: contextvars.ContextVar[Demand | None] = contextvars.ContextVar("dfp_statistics_demand", default=None)


@contextmanager
def demanded_by(demand: Demand) -> Iterator[None]:
    """Within it, a convolution sums its output's statistics only where ``demand`` wants
    them (outside: always, for ``dfp.functional`` calls)."""
    token = _demand.set(demand)
    try:
        yield
    finally:
        _demand.reset(token)


def wanted() -> bool:
    """Whether the layer running now wants its output's statistics summed."""
    demand = _demand.get()
    return demand is None or demand.wanted()


def hand_over(y: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor, pending=None) -> None:
    """Attach y's per channel mean and biased variance (float64) to y, and ``pending``
    (``dfp._norm_gradient.Pending``), where the norm may hand its input gradient back."""
    demand = _demand.get()
    setattr(y, _ATTRIBUTE, (mean, variance, y._version, demand.handing() if demand else [False], pending))


def handed_over(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, variance) handed over with x, or None where none was or x was modified
    in place since. Asking takes them."""
    handed = getattr(x, _ATTRIBUTE, None)
    if handed is None or handed[2] != x._version:
        return None
    handed[3][0] = True
    return handed[0], handed[1]


def pending_gradient(x: torch.Tensor):
    """The ``Pending`` handed over with x's statistics, or None."""
    handed = getattr(x, _ATTRIBUTE, None)
    return None if handed is None or handed[2] != x._version else handed[4]
