"""The learning-rate schedule of every run: linear scaling with the batch size, linear
warm-up, cosine decay.

- Linear scaling (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): the peak
  learning rate is ``base_lr * batch_size / base_batch_size``, where ``base_lr`` is the
  rate that suits ``base_batch_size``. Under DistributedDataParallel ``batch_size`` is
  the global batch (all ranks together).
- Warm-up, also Goyal et al.'s: the rate grows linearly over the first
  ``warmup_epochs`` from ``base_lr`` (the rate of the small batch, which needs no
  warm-up) to the peak. A batch no larger than ``base_batch_size`` has a peak no higher
  than ``base_lr`` and starts at its peak: nothing to warm up.
- Cosine decay (Loshchilov and Hutter 2017) from the peak to zero over the remaining
  steps: the rate at step ``total_steps`` would be exactly zero, so the last step uses a
  small positive rate.
- ``hold_from_step`` (SWALP, Yang et al. 2019, after SWA's constant averaging rate):
  from this step on the rate stays at the value the schedule has there, so the weights
  keep moving while their average is taken. It must not lie inside the warm-up, whose
  rate (below the peak) is not the one to average at.

Steps count optimizer steps from 0; ``learning_rate(step)`` is the rate of step ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The linear-scaling rule: ``base_lr`` suits ``base_batch_size`` images per step."""
    if base_lr <= 0 or batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(
            f"scaled_lr needs a positive rate and batch sizes, got base_lr={base_lr}, "
            f"batch_size={batch_size}, base_batch_size={base_batch_size}"
        )
    return base_lr * batch_size / base_batch_size


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rates: warm-up from ``start_lr`` to ``peak_lr`` over
    ``warmup_steps`` steps, then cosine decay to zero at ``total_steps``, held constant
    from ``hold_from_step`` on when that is set."""

    peak_lr: float
    start_lr: float
    warmup_steps: int
    total_steps: int
    hold_from_step: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in 0..total_steps={self.total_steps}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if not 0 < self.start_lr <= self.peak_lr:
            raise ValueError(f"need 0 < start_lr <= peak_lr, got start_lr={self.start_lr}, peak_lr={self.peak_lr}")
        if self.hold_from_step is not None and not self.warmup_steps <= self.hold_from_step:
            raise ValueError(
                f"hold_from_step={self.hold_from_step} lies inside the warm-up of {self.warmup_steps} steps; hold "
                "the rate from the end of the warm-up or later"
            )

    @classmethod
    def build(
        cls,
        base_lr: float,
        batch_size: int,
        base_batch_size: int,
        warmup_epochs: float,
        epochs: int,
        steps_per_epoch: int,
        hold_from_epoch: int | None = None,
    ) -> Schedule:
        """The schedule of a run of ``epochs`` epochs of ``steps_per_epoch`` steps;
        ``hold_from_epoch`` (1-based) holds the rate from the start of that epoch on."""
        peak = scaled_lr(base_lr, batch_size, base_batch_size)
        total = epochs * steps_per_epoch
        hold = None if hold_from_epoch is None else (hold_from_epoch - 1) * steps_per_epoch
        return cls(
            peak_lr=peak,
            start_lr=min(base_lr, peak),
            warmup_steps=min(total, round(warmup_epochs * steps_per_epoch)),
            total_steps=total,
            hold_from_step=hold,
        )

    def learning_rate(self, step: int) -> float:
        """The rate of optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.hold_from_step is not None and step > self.hold_from_step:
            step = self.hold_from_step
        if step < self.warmup_steps:
            # Reaches the peak at the first step after the warm-up.
            return self.start_lr + (self.peak_lr - self.start_lr) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:  # all warm-up: only a step past the end gets here
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
