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
"""

from __future__ import annotations

import torch
from torch import nn

from .._batch_statistics import handed_over
from .._errors import BackendUnavailableError
from ..backends import cpu

_LINE_FLOATS = 16  # float32 values in a 64-byte cache line


class _TrainingBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias over the batch's statistics (those handed
    over, else dfp's); returns y and the batch's mean and biased variance (float64, for
    the running statistics). Given the statistics, torch's kernels normalise and
    differentiate where they do not stall; dfp's do where they would."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, statistics=None):
        mean, variance = statistics or cpu.batch_norm_statistics(x)
        invstd = (variance + eps).rsqrt()
        mean32 = mean.float()
        ctx.on_torch = not _torch_kernel_stalls(x.shape[1])
        if ctx.on_torch:
            y = torch.batch_norm(x, weight, bias, mean32, variance.float(), False, 0.0, eps, False)
        else:
            scale = invstd if weight is None else invstd * weight.double()
            shift = torch.zeros_like(mean32) if bias is None else bias.float()
            y = cpu.batch_norm_affine(x, mean32, scale.float(), shift)
        ctx.save_for_backward(x, weight, mean32, invstd.float() if ctx.on_torch else invstd)
        ctx.mark_non_differentiable(mean, variance)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        return y, mean, variance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _mean, _variance):
        x, weight, mean32, invstd = ctx.saved_tensors
        if ctx.on_torch:  # torch's training backward, given the statistics
            grads = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, None, None, mean32, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
            )  # fmt: skip
            return *grads, None, None
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        sum_dy, sum_dy_centered = cpu.batch_norm_gradient_sums(dy, x, mean32)
        rows = x.numel() // x.shape[1]
        gain = invstd if weight is None else invstd * weight.double()
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * gain
            x_scale = -invstd.square() * (sum_dy_centered / rows) * gain
            dx = cpu.batch_norm_affine(
                x, mean32, x_scale.float(), (-sum_dy / rows * gain).float(), dy, gain.float()
            )  # fmt: skip
        dweight = (sum_dy_centered * invstd).float() if ctx.needs_input_grad[1] else None
        dbias = sum_dy.float() if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (same arguments, parameters and state_dict) that trains on
    dfp's kernels where torch's would have two threads writing one cache line, and on the
    statistics a DFP16 convolution hands over (see the module's docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        statistics = handed_over(input)
        if not self._on_dfp_kernels(input, statistics is not None):
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average, as torch's
                factor = 1.0 / float(self.num_batches_tracked)
        y, mean, variance = _TrainingBatchNorm.apply(input, self.weight, self.bias, self.eps, statistics)
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


def _torch_kernel_stalls(channels: int) -> bool:
    """Whether torch's training kernel would have two threads writing one cache line."""
    return channels % _LINE_FLOATS != 0 and torch.get_num_threads() > 1


def _core_available() -> bool:
    try:
        cpu.ensure_available()
    except BackendUnavailableError:  # no compiled core, or a bad DFP_CPU_ISA: torch's layer runs
        return False
    return True
