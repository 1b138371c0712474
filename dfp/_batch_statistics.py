"""A convolution's output handed to the batch norm behind it together with its per channel
batch statistics, which the convolution's forward summed while it wrote the output (the
compiled core sums each piece's blocks from the cache, csrc/cpu/layer.h): the batch norm
then needs no pass of its own over the output to find them, and gets the bits it would
have found (``dfp.nn.BatchNorm2d``). They stay valid while the output is not modified
in place."""

from __future__ import annotations

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


def hand_over(y: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> None:
    """Attach y's per channel mean and biased variance (float64) to y."""
    setattr(y, _ATTRIBUTE, (mean, variance, y._version))


def handed_over(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, variance) handed over with x, or None where none was or x was modified
    in place since."""
    handed = getattr(x, _ATTRIBUTE, None)
    if handed is None or handed[2] != x._version:
        return None
    return handed[0], handed[1]
