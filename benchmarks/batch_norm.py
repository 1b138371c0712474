"""Batch norm in training, torch's kernel against dfp's: ``python -m benchmarks.batch_norm``.

torch's channels-last kernel has two threads write one cache line where the channels
are not a multiple of 16 (dfp/nn/batch_norm.py). This times a batch norm's forward and
backward at ResNet-20's sizes (batch 128) on each kernel, and whole ResNet-20 training
steps (fp32, SGD) at full width, half width (Net2Net's start) and the widths PruneTrain
left in the study of docs/harness.md, with torch.nn.BatchNorm2d against
dfp.nn.BatchNorm2d, in turns in one process: paired medians. ``--dtype bfloat16`` times
bf16 batch norms, and the steps under bf16 autocast (where a batch norm's input is bf16).
"""

from __future__ import annotations

import argparse
from statistics import median

import torch

from dfp import keep_freed_memory
from dfp.nn import BatchNorm2d
from dfp.nn.batch_norm import _TrainingBatchNorm

from .timing import interleaved_times, machine, speedup

# the inner widths of a block's first convolution, and the stages' widths, after PruneTrain
# (fp32, --prune-multiple 8, docs/harness.md)
PRUNED = {
    "stages.0.0.conv1": 8, "stages.0.1.conv1": 8, "stages.0.2.conv1": 8, "stages.1.0.conv1": 32,
    "stages.1.1.conv1": 24, "stages.1.2.conv1": 8, "stages.2.0.conv1": 64, "stages.2.1.conv1": 56,
    "stages.2.2.conv1": 8, "stages.2": 56,
}  # fmt: skip


def layer_input(batch: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, channels, s, s), s as ResNet-20's stage of that width, channels last."""
    size = 32 if channels <= 16 else 16 if channels <= 32 else 8
    return torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)


def layer_times(batch: int, channels: int, dtype: torch.dtype, repeats: int) -> dict[str, list[float]]:
    """Seconds of a batch norm's forward and backward on torch's kernel and on dfp's."""
    x = layer_input(batch, channels, dtype).requires_grad_()
    dy = torch.randn_like(x)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)

    def torchs():
        y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
        torch.autograd.grad(y, (x, weight, bias), dy)

    def dfps():
        y = _TrainingBatchNorm.apply(x, weight, bias, 1e-5)[0]
        torch.autograd.grad(y, (x, weight, bias), dy)

    return interleaved_times({"torch": torchs, "dfp": dfps}, repeats)


def resnet20(widths: str, torch_norms: bool) -> torch.nn.Module:
    from dfp import models, structure

    torch.manual_seed(0)
    model = models.resnet20(3, 10)
    if widths != "full":
        spaces = structure.channel_spaces(model)
        narrow = PRUNED if widths == "pruned" else {space.name: space.width(model) // 2 for space in spaces}
        structure.apply(model, structure.narrowing(model, spaces, narrow))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if torch_norms and isinstance(child, BatchNorm2d):
                plain = torch.nn.BatchNorm2d(child.num_features)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    return model.to(memory_format=torch.channels_last)


def step_times(batch: int, widths: str, dtype: torch.dtype, repeats: int) -> dict[str, list[float]]:
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    steps = {}
    for kind in ("torch", "dfp"):
        model = resnet20(widths, torch_norms=kind == "torch")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()

        steps[kind] = step
    return interleaved_times(steps, repeats)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_norm", description=__doc__)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="rounds per measurement (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="(default: %(default)s)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="the batch norms' inputs; bfloat16 runs the steps under bf16 autocast (default: %(default)s)",
    )  # fmt: skip
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    keep_freed_memory()  # as the harness trains
    print(machine())
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s); batch {args.batch}, {args.dtype}, forward + backward, ms (medians)\n")
        print("| channels | torch | dfp | dfp's speed-up | dfp.nn.BatchNorm2d runs |\n|---|---|---|---|---|")
        for channels in (8, 16, 24, 32, 56, 64):
            t = layer_times(args.batch, channels, dtype, args.repeats)
            runs = "dfp's" if BatchNorm2d(channels)._on_dfp_kernels(layer_input(2, channels, dtype)) else "torch's"
            print(
                f"| {channels} | {1e3 * median(t['torch']):.2f} | {1e3 * median(t['dfp']):.2f} "
                f"| {speedup(t['dfp'], t['torch']):.2f}x | {runs} |"
            )
        print("\n| ResNet-20 widths | steps with torch's batch norm | with dfp.nn.BatchNorm2d | speed-up |")
        print("|---|---|---|---|")
        for widths in ("full", "half", "pruned"):
            t = step_times(args.batch, widths, dtype, max(5, args.repeats // 2))
            print(
                f"| {widths} | {1e3 * median(t['torch']):.1f} ms | {1e3 * median(t['dfp']):.1f} ms "
                f"| {speedup(t['dfp'], t['torch']):.2f}x |"
            )


if __name__ == "__main__":
    main()
