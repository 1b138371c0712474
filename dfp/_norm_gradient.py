"""A batch norm's input gradient handed, unwritten, to the DFP16 convolution before it:
the backward's counterpart of ``dfp._batch_statistics``.

Written by the norm, the gradient is a pass that writes the convolution's whole output
gradient to memory (8 MB for 16 channels at 32x32 and batch 128), which the convolution's
quantization then reads back. Handed over instead, the convolution's quantization makes it
a block of rows at a time from the norm's input and output gradient, into the cache as it
reads them (csrc/cpu/layer.h): the same bits, one pass over memory fewer.

The convolution's forward opens a ``Pending`` beside the statistics it hands over; the
norm's backward, which runs first, hands it the gradient unwritten and returns a
placeholder of zeros to autograd; the convolution's backward takes it. Where the
placeholder reaches the convolution as it left, its output had no other consumer and the
convolution makes the gradient; where autograd summed the output's other gradients into
it, the norm's gradient is written and added to that sum. The norm hands nothing over
where a hook or ``retain_grad`` would see the placeholder (``hands_over``)."""

from __future__ import annotations

import torch


class Pending:
    """The gradient a norm hands to the convolution before it, between their backwards."""

    __slots__ = ("made", "placeholder")

    def __init__(self) -> None:
        self.made = None  # cpu.NormInputGradient, from the norm's backward until the convolution's
        self.placeholder: torch.Tensor | None = None

    def hand(self, made, like: torch.Tensor) -> torch.Tensor:
        """The norm's backward: hands ``made`` over; returns the placeholder to give autograd
        as the gradient of ``like`` (zeros, so that a sum with other gradients is theirs)."""
        self.made = made
        self.placeholder = like.new_zeros(()).expand(like.shape)
        return self.placeholder

    def take(self, grad: torch.Tensor):
        """The convolution's backward, with the output gradient autograd gave it: (the
        gradient unwritten, None) where ``grad`` is the placeholder as it left, else (None,
        the output gradient: ``grad`` plus the norm's, written, where one was handed)."""
        made, placeholder = self.made, self.placeholder
        self.made = self.placeholder = None
        if made is None:
            return None, grad
        if grad is placeholder:
            return made, None
        return None, grad + made.written()


def hands_over(x: torch.Tensor) -> bool:
    """Whether no hook and no ``retain_grad`` on x (the convolution's output) would see the
    placeholder in place of its gradient."""
    return not getattr(x, "_backward_hooks", None) and not x.retains_grad
