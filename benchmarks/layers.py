"""Layer benchmarks, shared by bench_layers.py and the report: conv2d and linear in DFP16
against torch fp32 and bf16, forward and forward+backward, quantization included.

Every contender takes a float32 input and float32 master weights, as in training:
"dfp16" and "bf16" call ``dfp.functional`` in that format, so the DFP16 quantization and
the bf16 casts are inside the timed call; "fp32" is torch itself. Convolutions run in
NCHW and in channels_last, and the table shows each format in its faster layout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Literal

import torch
import torch.nn.functional as F

import dfp

from .report import speed, table
from .timing import interleaved_times, speedup

FORMATS = ("dfp16", "fp32", "bf16")
PASSES = ("forward", "forward+backward")
TABLE_NOTE = (
    "Layers: conv2d 3x3 stride 1 padding 1 (C_in = C_out, no bias), linear with bias. GOP/s = 2 x multiply-adds "
    "(x3 for forward+backward) / median time; forward under no_grad; each format in its faster layout "
    "(cl: channels_last); DFP16 quantization and bf16 casts are inside the timed calls. Speed-ups are paired "
    "medians (>1: dfp16 faster; in brackets the first to third quartile of the rounds' ratios). Quantize "
    "share: dfp.quantize of the tensors the dfp16 layer quantizes, over the layer's time."
)
# Not a layer: the dfp.quantize passes that a DFP16 layer makes, on the same tensors.
QUANTIZE = "quantize passes"


@dataclass(frozen=True)
class LayerCase:
    """A 3x3 convolution, stride 1, padding 1, ``channels`` in and out, on (``batch``,
    ``channels``, ``size``, ``size``) inputs (the body of a ResNet stage); or a linear
    layer with bias, ``channels`` features in and out, on (``batch``, ``channels``)."""

    name: str
    kind: Literal["conv", "linear"]
    batch: int
    channels: int
    size: int = 1
    passes: tuple[str, ...] = PASSES

    @property
    def layouts(self) -> tuple[str, ...]:
        return ("NCHW", "channels_last") if self.kind == "conv" else ("",)

    def ops(self, pass_: str) -> int:
        """2 x multiply-adds; the backward pass is two products of the forward's size."""
        forward = 2 * self.batch * self.channels**2 * (9 * self.size**2 if self.kind == "conv" else 1)
        return forward * (3 if pass_ == "forward+backward" else 1)

    def tensors(self, layout: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input, weight and bias (None for the convolutions, which a batch norm follows)."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "linear":
            x = torch.randn(self.batch, self.channels, generator=gen)
            w = torch.randn(self.channels, self.channels, generator=gen) / self.channels**0.5
            return x, w, torch.randn(self.channels, generator=gen)
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(self.batch, self.channels, self.size, self.size, generator=gen)
        w = torch.randn(self.channels, self.channels, 3, 3, generator=gen) / (9 * self.channels) ** 0.5
        return x.contiguous(memory_format=memory_format), w.contiguous(memory_format=memory_format), None

    def layer(self, fmt: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """``f(x, weight, bias)``: the layer in ``fmt``."""
        if self.kind == "linear":
            return F.linear if fmt == "fp32" else lambda x, w, b: dfp.functional.linear(x, w, b, fmt=fmt)
        if fmt == "fp32":
            return lambda x, w, b: F.conv2d(x, w, b, padding=1)
        return lambda x, w, b: dfp.functional.conv2d(x, w, b, padding=1, fmt=fmt)


def resnet_convs(batch: int) -> tuple[LayerCase, ...]:
    """The 3x3 convolutions of ResNet-20 and ResNet-18 on CIFAR (32x32 inputs), by stage."""
    return tuple(
        LayerCase(f"{net} {c}ch {s}x{s}", "conv", batch, c, s)
        for net, stages in (("ResNet-20", ((16, 32), (32, 16), (64, 8))), ("ResNet-18", ((64, 32), (128, 16), (256, 8), (512, 4))))
        for c, s in stages
    )  # fmt: skip


# Ordered by work, so that a contender's rate on one case predicts its time on the next.
CASES = (*resnet_convs(128), LayerCase("Linear 4096x4096", "linear", 512, 4096, passes=("forward+backward",)))
# --quick: a smoke test of a few seconds, at small batches.
QUICK_CASES = (
    LayerCase("ResNet-20 16ch 32x32", "conv", 4, 16, 32),
    LayerCase("ResNet-18 512ch 4x4", "conv", 8, 512, 4),
    LayerCase("Linear 1024x1024", "linear", 32, 1024, passes=("forward+backward",)),
)


def contender_names(case: LayerCase) -> list[str]:
    return [f"{fmt} {layout}".rstrip() for fmt in FORMATS for layout in case.layouts] + [QUANTIZE]


def contenders(case: LayerCase, pass_: str, names: list[str]) -> dict[str, Callable[[], object]]:
    """A zero-argument call per name in ``names`` (see ``contender_names``)."""
    fns = {}
    for fmt in FORMATS:
        for layout in case.layouts:
            name = f"{fmt} {layout}".rstrip()
            if name in names:
                fns[name] = layer_call(case, pass_, fmt, layout)
    if QUANTIZE in names:
        fns[QUANTIZE] = quantize_passes(case, pass_)
    return fns


def layer_call(case: LayerCase, pass_: str, fmt: str, layout: str) -> Callable[[], object]:
    """The forward pass under no_grad, or forward and backward to input, weight and bias."""
    layer = case.layer(fmt)
    x, w, b = case.tensors(layout)
    if pass_ == "forward":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return layer(x, w, b)

        return forward
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad_out = case.tensors(layout, seed=1)[0]  # every case's output has its input's shape
    return lambda: torch.autograd.grad(layer(x, w, b), inputs, grad_out)


def quantize_passes(case: LayerCase, pass_: str) -> Callable[[], object]:
    """The quantizations a DFP16 layer makes (as dfp.autograd does): input and weight in
    the forward; in the backward the output gradient, and the weight again for grad_input."""
    x, w, _ = case.tensors("NCHW")
    tensors = (x, w) if pass_ == "forward" else (x, w, case.tensors("NCHW", seed=1)[0], w)
    return lambda: [dfp.quantize(t) for t in tensors]


def format_of(name: str) -> str:
    """ "bf16 channels_last" -> "bf16"."""
    return name.split(" ")[0]


def fastest_layout(times: dict[str, list[float]], fmt: str) -> str | None:
    """The name of ``fmt``'s contender with the lowest median time, None if none ran."""
    return min((name for name in times if format_of(name) == fmt), key=lambda name: median(times[name]), default=None)


def layer_table(args, cfg: dict) -> list[str]:
    """The layer table for benchmarks/report.py (``args.threads``, ``args.quick``;
    ``cfg``'s repeats, min_sample_s and max_call_s)."""
    rows, skipped = [], False
    rates: dict[tuple[str, str, int], float] = {}  # GOP/s by (contender or format, pass, threads)
    for case in QUICK_CASES if args.quick else CASES:
        for pass_ in case.passes:
            for threads in args.threads:
                torch.set_num_threads(threads)
                names = affordable(case, pass_, threads, rates, cfg["max_call_s"])
                skipped |= len(names) < len(contender_names(case))
                times = interleaved_times(contenders(case, pass_, names), cfg["repeats"], cfg["min_sample_s"])
                for name, t in times.items():
                    rate = case.ops(pass_) / median(t) / 1e9
                    rates[(name, pass_, threads)] = rate
                    key = (format_of(name), pass_, threads)
                    rates[key] = max(rate, rates.get(key, 0.0))
                rows.append(
                    [case.name, pass_, str(threads), *row_cells(times, {n: rates[(n, pass_, threads)] for n in times})]
                )
                print(f"  layer {case.name} {pass_} t{threads} done", file=sys.stderr)
    headers = ["layer", "pass", "threads", *(f"{fmt} GOP/s" for fmt in FORMATS), "dfp16 / fp32", "dfp16 / bf16"]
    lines = [TABLE_NOTE, "", *table([*headers, "quantize share of dfp16"], rows)]
    if skipped:
        lines += ["", f"bf16 in a layout whose last rate predicted over {cfg['max_call_s']} s per call was skipped."]
    return lines


def affordable(case: LayerCase, pass_: str, threads: int, rates: dict, max_call_s: float) -> list[str]:
    """The contenders to time: dfp16, fp32 and the quantize passes always; bf16 unless its
    last rate predicts a call over ``max_call_s`` (without native bf16 support torch runs
    it at 1 to 8 GOP/s). The linear layer, after the convolutions, goes by bf16's best
    convolution rate."""
    names = []
    for name in contender_names(case):
        rate = rates.get((name, pass_, threads), rates.get((format_of(name), pass_, threads)))
        if format_of(name) != "bf16" or rate is None or case.ops(pass_) / (rate * 1e9) <= max_call_s:
            names.append(name)
    return names


def row_cells(times: dict[str, list[float]], gops: dict[str, float]) -> list[str]:
    """GOP/s of each format in its faster layout, dfp16's speed-ups and quantize share."""
    best = {fmt: fastest_layout(times, fmt) for fmt in FORMATS}
    cells = [f"{gops[best[fmt]]:.3g}{layout_tag(best[fmt])}" if best[fmt] else "skipped" for fmt in FORMATS]
    cells += [speed(times, best["dfp16"], best[fmt]) for fmt in ("fp32", "bf16")]
    if best["dfp16"] is None or QUANTIZE not in times:
        return [*cells, "-"]
    # speedup() pairs the rounds: this is the median of quantize[r] / dfp16[r].
    return [*cells, f"{100 * speedup(times[best['dfp16']], times[QUANTIZE]):.0f}%"]


def layout_tag(name: str) -> str:
    return " cl" if name.endswith("channels_last") else ""
