"""A convolution's output handed to the batch norm behind it together with its per channel
batch statistics, which the convolution's forward summed while it wrote the output (the
compiled core sums each piece's blocks from the cache, csrc/cpu/layer.h): the batch norm
then needs no pass of its own over the output to find them, and gets the bits it would
have found (``dfp.nn.BatchNorm2d``). They stay valid while the output is not modified
in place."""

from __future__ import annotations

import torch

_ATTRIBUTE = "_dfp_batch_statistics"


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
