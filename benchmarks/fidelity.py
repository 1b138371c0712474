"""Numerical fidelity of each product of a layer in each number format: SQNR (dB) against
fp64 of the forward output, grad_input and grad_weight, on synthetic data and on the
tensors every conv and linear layer saw in a real training step of ResNet-20.

SQNR = 10 log10(sum ref^2 / sum (ref - got)^2), ref computed in fp64 from the same fp32
inputs. A format's result holding Inf or NaN (fp16 beyond its range) scores -inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from statistics import median

import torch
import torch.nn.functional as F

from dfp import data as datasets
from dfp import functional as DF
from dfp import models

FORMATS = ("fp32", "bf16", "fp16", "dfp16-tensor", "dfp16", "dfp16-sr")
PRODUCTS = ("forward", "grad_input", "grad_weight")


@dataclass
class LayerCase:
    """One layer's operands: x (N, C, H, W) or (N, C) for a linear layer, its weight,
    and the gradient of its output."""

    source: str
    name: str
    x: torch.Tensor
    weight: torch.Tensor
    grad_y: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1

    @property
    def is_linear(self) -> bool:
        return self.x.dim() == 2


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return -math.inf
    noise = (ref - got).square().sum().item()
    signal = ref.square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _exact(case: LayerCase) -> dict[str, torch.Tensor]:
    x, w, dy = case.x.double(), case.weight.double(), case.grad_y.double()
    if case.is_linear:
        return {"forward": x @ w.t(), "grad_input": dy @ w, "grad_weight": dy.t() @ x}
    conv = (case.stride, case.padding, (1, 1), case.groups)
    return {
        "forward": F.conv2d(x, w, None, *conv),
        "grad_input": torch.nn.grad.conv2d_input(x.shape, w, dy, *conv),
        "grad_weight": torch.nn.grad.conv2d_weight(x, w.shape, dy, *conv),
    }


def _in_format(case: LayerCase, fmt: str) -> dict[str, torch.Tensor]:
    x = case.x.detach().clone()
    if not case.is_linear:
        x = x.contiguous(memory_format=torch.channels_last)  # as the harness trains
    x.requires_grad_()
    w = case.weight.detach().clone().requires_grad_()
    if case.is_linear:
        y = DF.linear(x, w, fmt=fmt)
    else:
        y = DF.conv2d(x, w, stride=case.stride, padding=case.padding, groups=case.groups, fmt=fmt)
    y.backward(case.grad_y.to(y.dtype))
    return {"forward": y.detach(), "grad_input": x.grad, "grad_weight": w.grad}


def fidelity(case: LayerCase, formats=FORMATS) -> dict[str, dict[str, float]]:
    """{product: {format: SQNR dB}} of one layer."""
    exact = _exact(case)
    scores = {p: {} for p in PRODUCTS}
    for fmt in formats:
        torch.manual_seed(0)  # dfp16-sr's rounding
        got = _in_format(case, fmt)
        for p in PRODUCTS:
            scores[p][fmt] = sqnr_db(exact[p], got[p])
    return scores


# Synthetic layers: a 3x3 convolution of 16 channels over 16x16 images (batch 16) and a
# linear layer of 256 -> 64 features (batch 128), each operand drawn from one law.
def _student_t(shape, g, dof=3):
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((dof, *shape), generator=g).square().sum(0)
    return normal / (chi2 / dof).sqrt()


def _laws(g: torch.Generator) -> dict[str, Callable[[tuple], torch.Tensor]]:
    def outlier_channels(shape):  # four channels 100x the others
        t = torch.randn(shape, generator=g)
        t[:, :4] *= 100
        return t

    return {
        "gaussian": lambda shape: torch.randn(shape, generator=g),
        "relu": lambda shape: torch.relu(torch.randn(shape, generator=g)),
        "heavy-tailed": lambda shape: _student_t(shape, g),
        "outlier channels": outlier_channels,
        "tiny gradients (2^-110)": lambda shape: torch.randn(shape, generator=g) * 2.0**-110,
        "huge inputs (2^100)": lambda shape: torch.randn(shape, generator=g) * 2.0**100,
    }


def synthetic_cases(seed: int = 0) -> Iterator[LayerCase]:
    """Each law for the layer's input and output gradient alike (weights Gaussian, He
    scale), except: ReLU for the input only (gradients are not rectified), tiny
    magnitudes for the gradient only and huge ones for the input only (near fp32's range
    ends, where their products still are fp32 numbers)."""
    g = torch.Generator().manual_seed(seed)
    for law, draw in _laws(g).items():
        for kind, x_shape, w_shape, y_shape in (
            ("conv3x3", (16, 16, 16, 16), (16, 16, 3, 3), (16, 16, 16, 16)),
            ("linear", (128, 256), (64, 256), (128, 64)),
        ):
            x = torch.randn(x_shape, generator=g) if law.startswith("tiny") else draw(x_shape)
            fan_in = math.prod(w_shape[1:])
            w = torch.randn(w_shape, generator=g) * math.sqrt(2 / fan_in)
            plain_grad = law == "relu" or law.startswith("huge")
            dy = torch.randn(y_shape, generator=g) if plain_grad else draw(y_shape)
            padding = (1, 1) if kind == "conv3x3" else (0, 0)
            yield LayerCase("synthetic", f"{kind} {law}", x, w, dy, padding=padding)


def captured_cases(source: str, batches: list[tuple[torch.Tensor, torch.Tensor]], classes: int) -> list[LayerCase]:
    """The operands of every conv and linear layer of ResNet-20 in one fp32 training step
    on the last of ``batches``, after SGD steps on the others (so that the gradients are
    those of a model that has begun to learn, not of its initialisation alone)."""
    torch.manual_seed(0)
    images, labels = batches[-1]
    model = models.build("resnet20", images.shape[1], classes, images.shape[-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for warmup_images, warmup_labels in batches[:-1]:
        optimizer.zero_grad()
        F.cross_entropy(model(warmup_images), warmup_labels).backward()
        optimizer.step()
    cases, handles = [], []

    def capture(name: str, module: torch.nn.Module):
        def hook(_module, inputs, output):
            case = LayerCase(source, name, inputs[0].detach(), module.weight.detach(), torch.empty(0))
            if isinstance(module, torch.nn.Conv2d):
                case.stride, case.padding, case.groups = module.stride, module.padding, module.groups
            cases.append(case)
            output.register_hook(lambda grad: setattr(case, "grad_y", grad.detach()))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            handles.append(module.register_forward_hook(capture(name, module)))
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    for h in handles:
        h.remove()
    return cases


def fidelity_rows(cases, formats=FORMATS) -> list[tuple[str, str, str, dict[str, float]]]:
    """(source, layer, product, {format: SQNR}) for every case and product."""
    rows = []
    for case in cases:
        for product, scores in fidelity(case, formats).items():
            rows.append((case.source, case.name, product, scores))
    return rows


def _cell(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else ("exact" if v > 0 else "Inf/NaN")


def fidelity_table(rows, formats=FORMATS) -> list[str]:
    """Markdown: a row per layer and product, then the median and the worst row per
    format, and each DFP16 format's margin over bf16 (its worst and median difference)."""
    headers = ["data", "layer", "product", *formats]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for source, layer, product, scores in rows:
        lines.append(f"| {source} | {layer} | {product} | " + " | ".join(_cell(scores[f]) for f in formats) + " |")
    summary = {
        "median": lambda f: median(s[f] for *_, s in rows),
        "worst": lambda f: min(s[f] for *_, s in rows),
    }
    for label, value in summary.items():
        lines.append(f"| **{label}** | | | " + " | ".join(_cell(value(f)) for f in formats) + " |")
    if "bf16" in formats:
        lines += ["", "DFP16 formats against bf16, dB (per row: format minus bf16):", ""]
        lines += ["| format | worst margin | median margin | worst row |", "|---|---|---|---|"]
        for f in formats:
            if not f.startswith("dfp16"):
                continue
            margins = [(s[f] - s["bf16"], f"{src} {layer} {product}") for src, layer, product, s in rows]
            worst = min(margins)
            lines.append(f"| {f} | {_cell(worst[0])} | {_cell(median(m for m, _ in margins))} | {worst[1]} |")
    return lines


WARMUP_STEPS = 10


def _first_batches(data, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """WARMUP_STEPS + 1 shuffled training batches."""
    it = datasets.batches(data.train, data, batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    return [next(it) for _ in range(WARMUP_STEPS + 1)]


def digits_cases(batch: int = 128) -> list[LayerCase]:
    data = datasets.load("digits")
    return captured_cases("digits", _first_batches(data, batch), len(data.classes))


def cifar10_cases(root: str, cache_dir: str | None = None, batch: int = 64) -> list[LayerCase]:
    data = datasets.load("cifar10", root, cache_dir=cache_dir)
    return captured_cases("cifar10", _first_batches(data, batch), len(data.classes))


def report(args) -> list[str]:
    """The fidelity table of ``python -m benchmarks.report --tables fidelity``: synthetic
    layers, then ResNet-20's layers in a step on digits and, where ``args.cifar10``
    names a local copy, on CIFAR-10."""
    cases = list(synthetic_cases()) + digits_cases()
    note = ""
    if args.cifar10:
        cases += cifar10_cases(args.cifar10, args.cache_dir)
    else:
        note = " (no CIFAR-10 copy given: --cifar10 DIR_OR_TAR for its step)"
    title = (
        "Fidelity: SQNR (dB) against fp64 of each product, same inputs; ResNet-20 layers captured in one fp32 "
        f"training step (batch 128 digits, 64 CIFAR-10) after {WARMUP_STEPS} SGD steps on other batches{note}"
    )
    return [title, "", *fidelity_table(fidelity_rows(cases))]
