"""``BatchNorm2d``: torch's, with dfp's kernels where torch's CPU training kernel stalls
and the batch statistics a DFP16 convolution hands over.

torch's channels-last batch norm (forward statistics and backward) keeps each thread's
per-channel sums side by side in one buffer and updates them on every pixel. Where a
pixel's channels do not fill whole cache lines (a channel count that is not a multiple
of 16: the 8, 24 or 56 channels of pruned and half-width networks), two threads write the
same line all the time. On an Intel Xeon, batch 128 (``python -m benchmarks.batch_norm``,
docs/harness.md): forward and backward of 8 channels at 32x32 took 9.43 ms on 2 threads
against 2.34 ms on one, and on dfp's kernels (each task summing blocks of pixels into
memory of its own) 1.25 ms.

torch's bfloat16 kernel (a batch norm's input under bf16 autocast) lays its sums out the
same way and stalls likewise: 9.75 ms on 2 threads against 4.17 ms on one for those 8
channels.

So in training, on a CPU float32 or bfloat16 channels-last input with more than one
thread and such a channel count, this layer runs dfp's kernels (sums in float and double,
a bfloat16 output rounded once from float).

A DFP16 convolution's output reaches it in training with its batch statistics, which the
convolution summed while it wrote the output, a few images at a time from the cache
(``dfp._batch_statistics``): the bits dfp's kernels would find, without their pass over
the output. torch's training kernel spent about 1.8 ms on its statistics of a 16-channel
32x32 output at batch 128 (Intel Xeon, one thread), the convolution's sums about 0.5 ms.
With them the layer normalises and differentiates on torch's kernels (dfp's where those
would stall). Everywhere else it is torch's layer, bit for bit. Parameters, buffers,
state_dict and the running statistics' update are torch's.

``norm(x, residual=r, relu=True)`` is ``torch.relu(norm(x) + r)``, either part optional,
as a residual block ends (``dfp.models``). Where the layer runs dfp's kernels they are
fused: the forward writes the result in one pass over x (and r) instead of a pass per op,
and the backward gates dy inside its two passes, recomputing the forward's output from x
(or, where r was added, reading the output), instead of torch's threshold_backward pass
before them. The same float operations in the same order, so the same bits as torch's
ReLU and add behind the norm (but for a bfloat16 sum, rounded once). On an AMD Zen 3 a
dfp16 ResNet-20 step at batch 128 went from 1.14x to 1.21x fp32's speed (one thread, the
three in turns, 61 rounds; docs/step.md). Elsewhere torch's ops run after torch's layer.

Behind a DFP16 convolution the backward's second pass, dx, is not written: the convolution
makes it a block at a time as its quantization reads it (``dfp._norm_gradient``).
"""

from __future__ import annotations

import torch
from torch import nn

from .._batch_statistics import handed_over, pending_gradient
from .._errors import BackendUnavailableError
from .._norm_gradient import hands_over
from ..backends import cpu

_LINE_FLOATS = 16  # float32 values in a 64-byte cache line


class _TrainingBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias over the batch's statistics (those handed
    over, else dfp's), + residual, then ReLU where asked; returns y and the batch's mean
    and biased variance (float64, for the running statistics). Given the statistics and
    nothing to fuse, torch's kernels normalise and differentiate where they do not stall;
    dfp's do where they would, and wherever a residual or ReLU is fused."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, statistics=None, residual=None, relu=False, pending=None):
        mean, variance = statistics or cpu.batch_norm_statistics(x)
        ctx.on_torch = not relu and residual is None and not _torch_kernel_stalls(x.shape[1])
        ctx.pending = pending if x.dtype == torch.float32 else None  # the convolution's, for dx
        ctx.relu, ctx.has_residual = relu, residual is not None
        gate = ()
        if ctx.on_torch:
            invstd = (variance + eps).rsqrt().float()
            mean32 = mean.float()
            y = torch.batch_norm(x, weight, bias, mean32, variance.float(), False, 0.0, eps, False)
        else:
            weight_bias = (None if p is None else p.contiguous() for p in (weight, bias))
            y, mean32, invstd, scale, shift = cpu.batch_norm_train_forward(
                x, mean, variance, eps, *weight_bias, residual, relu
            )  # fmt: skip
            if relu:  # the backward's gate: recomputed from x, or read where a residual was added
                gate = (y,) if ctx.has_residual else (scale, shift)
        ctx.save_for_backward(x, weight, mean32, invstd, *gate)
        ctx.mark_non_differentiable(mean, variance)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        return y, mean, variance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _mean, _variance):
        x, weight, mean32, invstd, *saved_gate = ctx.saved_tensors
        if ctx.on_torch:  # torch's training backward, given the statistics
            grads = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, None, None, mean32, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
            )  # fmt: skip
            return *grads, None, None, None, None, None
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        gate = (None,) * 3
        if ctx.relu:  # gated once by the saved y where a residual was added (that gradient is
            # also the residual's), else in both passes, y recomputed from x by the saved scale and shift
            gate = (None, None, *saved_gate) if ctx.has_residual else (*saved_gate, None)
        needs = ctx.needs_input_grad
        weight = None if weight is None else weight.contiguous()
        if ctx.pending is not None and needs[0] and hands_over(x):  # dx handed to the convolution unwritten
            dweight, dbias, gated, made = cpu.batch_norm_backward_scales(
                dy, x, mean32, invstd, weight, gate, needs[1:3]
            )
            dx = ctx.pending.hand(made, x)
        else:
            dx, dweight, dbias, gated = cpu.batch_norm_train_backward(dy, x, mean32, invstd, weight, gate, needs[:3])
        dresidual = (dy if gated is None else gated) if ctx.has_residual and needs[5] else None
        return dx, dweight, dbias, None, None, dresidual, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (same arguments, parameters and state_dict) that trains on
    dfp's kernels where torch's would have two threads writing one cache line, and on the
    statistics a DFP16 convolution hands over (see the module's docstring).

    ``norm(x, residual=r, relu=True)`` is ``torch.relu(norm(x) + r)`` (either part
    optional): on dfp's kernels one pass over the tensors instead of three, and in the
    backward two instead of three (``_TrainingBatchNorm``); elsewhere torch's ops."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        statistics = handed_over(input)
        if not self._on_dfp_kernels(input, statistics is not None):
            return _add_relu(super().forward(input), residual, relu)
        if residual is not None and not _fusable(residual, input):
            return _add_relu(self._train(input, statistics, None, False), residual, relu)
        return self._train(input, statistics, residual, relu)

    def _train(self, input, statistics, residual, relu):
        """The batch norm in training on dfp's statistics and kernels, with the running
        statistics' update."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average, as torch's
                factor = 1.0 / float(self.num_batches_tracked)
        y, mean, variance = _TrainingBatchNorm.apply(
            input, self.weight, self.bias, self.eps, statistics, residual, bool(relu), pending_gradient(input)
        )  # fmt: skip
        if self.training and self.running_mean is not None and self.running_var is not None:
            rows = input.numel() // input.shape[1]
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(variance * (rows / (rows - 1)), alpha=factor)
        return y

    def _on_dfp_kernels(self, x: torch.Tensor, statistics_handed_over: bool = False) -> bool:
        """Whether this call runs on dfp's statistics and kernels (``_TrainingBatchNorm``)
        rather than as torch's layer."""
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        return (
            batch_statistics
            and (statistics_handed_over or _torch_kernel_stalls(self.num_features))
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() == 4
            and x.shape[1] == self.num_features
            and x.numel() > x.shape[1]  # torch's layer says what is wrong with one value per channel
            and x.is_contiguous(memory_format=torch.channels_last)
            and all(p is None or p.dtype == torch.float32 for p in (self.weight, self.bias))
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and _core_available()
        )


def _add_relu(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """torch.relu(y + residual), each part where asked: torch's ops, unfused."""
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _fusable(residual: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether dfp's kernels can add residual as they normalise x: the same shape, dtype
    and channels-last memory (else torch adds it, broadcasting and promoting)."""
    return (
        isinstance(residual, torch.Tensor)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and residual.device == x.device
        and residual.is_contiguous(memory_format=torch.channels_last)
    )


def _torch_kernel_stalls(channels: int) -> bool:
    """Whether torch's training kernel would have two threads writing one cache line."""
    return channels % _LINE_FLOATS != 0 and torch.get_num_threads() > 1


def _core_available() -> bool:
    try:
        cpu.ensure_available()
    except BackendUnavailableError:  # no compiled core, or a bad DFP_CPU_ISA: torch's layer runs
        return False
    return True
