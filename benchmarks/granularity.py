"""Which exponent groupings would lift DFP16 where the fidelity table says it is weak:
SQNR against fp64 of each product with every operand quantized as a grouping says,
emulated in float64 (mantissas rounded to nearest, grad_weight's output gradient with
random rounding as the default dithers it; the products of the dequantized operands in
float64, since int32 chains are exact). A design study, not dfp's kernels:
``python -m benchmarks.granularity [--cifar10 DIR_OR_TAR]`` prints, per grouping, the
median and worst margins over bf16 of the rows of ``--tables fidelity``.

Groupings of an operand (N, C, H, W) (a linear layer's (N, C) is N samples of 1x1):
"tensor"; "row" (an image row and block of 32 channels); "pixel" (a pixel and block of
32 channels); "sample-block" and "sample-channel" (a group of samples and block of 32
channels, or channel: the fewest samples whose output pixels are whole runs of 32, as
dfp's input in grad_weight; a linear layer's: 32 samples); "batch-channel" (a channel);
"run32" (runs of 32 pixels in (n, h, w) order, per channel); "channel" (per output
channel, for weights); "cout32" (weights in grad_input: blocks of 32 output channels).
"""

from __future__ import annotations

import argparse
import math
from statistics import median

import torch
import torch.nn.functional as F

from . import fidelity

HEADROOM = 2
PRODUCTS = fidelity.PRODUCTS

# Where each product takes its operands: (x forward, weight forward, dY grad_input,
# weight grad_input, x grad_weight, dY grad_weight).
OPERANDS = ("x_forward", "w_forward", "dy_grad_input", "w_grad_input", "x_grad_weight", "dy_grad_weight")
DEFAULT = dict(zip(OPERANDS, ("row", "tensor", "row", "tensor", "sample-channel", "run32"), strict=True))
GROUPINGS = {
    "dfp16 (the default)": DEFAULT,
    "x per tensor (the default until 2026-12-03)": {**DEFAULT, "x_forward": "tensor", "x_grad_weight": "tensor"},
    "x per sample and channel block": {**DEFAULT, "x_forward": "sample-block", "x_grad_weight": "sample-block"},
    "x per channel in grad_weight": {**DEFAULT, "x_grad_weight": "batch-channel"},
    "+ x and dY per pixel": {**DEFAULT, "x_forward": "pixel", "dy_grad_input": "pixel"},
    "+ weights per channel": {**DEFAULT, "w_forward": "channel", "w_grad_input": "cout32"},
}  # fmt: skip


def _blocks_max(a: torch.Tensor, dim: int, block: int) -> torch.Tensor:
    """max of |a| over runs of ``block`` along ``dim`` (the last run may be shorter),
    broadcast back to a's shape."""
    n = a.shape[dim]
    padded = F.pad(a, [0, 0] * (a.dim() - 1 - dim) + [0, -n % block])
    shape = list(padded.shape)
    shape[dim : dim + 1] = [shape[dim] // block, block]
    m = padded.reshape(shape).amax(dim + 1, keepdim=True).expand(shape).reshape(padded.shape)
    return m.narrow(dim, 0, n)


def group_max(t: torch.Tensor, grouping: str, pixels: int = 1) -> torch.Tensor:
    """max |t| of each element's group (broadcastable to t); ``pixels``: the layer's
    output pixels per sample."""
    a = t.abs()
    image = t.dim() == 4
    if grouping == "tensor":
        return a.amax()
    if grouping == "channel":  # a weight's output channel is its first axis
        return a.flatten(1).amax(1).view(-1, *[1] * (t.dim() - 1))
    if grouping == "row":
        return _blocks_max(a.amax(3, keepdim=True) if image else a, 1, 32).expand_as(a)
    if grouping == "pixel":
        return _blocks_max(a, 1, 32)
    if grouping in ("sample-block", "sample-channel", "batch-channel"):
        samples = t.shape[0] if grouping == "batch-channel" else 32 // math.gcd(32, pixels)
        m = _blocks_max(a.amax((2, 3)) if image else a, 0, samples)
        m = _blocks_max(m, 1, 32) if grouping == "sample-block" else m
        return m.view(*m.shape, 1, 1) if image else m
    if grouping == "run32":
        if not image:
            return _blocks_max(a, 0, 32)
        n, c, h, w = t.shape
        pixels = a.permute(0, 2, 3, 1).reshape(-1, c)
        return _blocks_max(pixels, 0, 32).reshape(n, h, w, c).permute(0, 3, 1, 2)
    if grouping == "cout32":
        return _blocks_max(a, 0, 32)
    raise ValueError(f"unknown grouping {grouping!r}")


def quantized(t: torch.Tensor, grouping: str, random: torch.Generator | None = None, pixels: int = 1) -> torch.Tensor:
    """t (float64) rounded to DFP16 mantissas against its groups' exponents (the rule of
    docs/design.md), dequantized; rounded at random where ``random`` is given; ``pixels``
    as group_max takes it."""
    amax = group_max(t, grouping, pixels)
    digits = 15 - HEADROOM
    f, e = torch.frexp(amax)
    exponent = e - digits + (f * 2**digits > 2**digits - 1).int()
    scale = torch.where(amax > 0, torch.pow(2.0, -exponent.double()), torch.ones_like(amax))
    v = t * scale
    if random is None:
        v = torch.round(v)
    else:
        v = torch.floor(v + torch.rand(v.shape, generator=random, dtype=v.dtype))
    return v / scale


def products(case: fidelity.LayerCase, grouping: dict[str, str]) -> dict[str, torch.Tensor]:
    x, w, dy = case.x.double(), case.weight.double(), case.grad_y.double()
    pixels = dy[0, 0].numel()  # output pixels per sample
    operands = zip(OPERANDS[:5], (x, w, dy, w, x), strict=True)
    q = {name: quantized(t, grouping[name], pixels=pixels) for name, t in operands}
    q["dy_grad_weight"] = quantized(dy, grouping["dy_grad_weight"], torch.Generator().manual_seed(0))
    if case.is_linear:
        return {
            "forward": q["x_forward"] @ q["w_forward"].t(),
            "grad_input": q["dy_grad_input"] @ q["w_grad_input"],
            "grad_weight": q["dy_grad_weight"].t() @ q["x_grad_weight"],
        }
    conv = (case.stride, case.padding, (1, 1), case.groups)
    return {
        "forward": F.conv2d(q["x_forward"], q["w_forward"], None, *conv),
        "grad_input": torch.nn.grad.conv2d_input(x.shape, q["w_grad_input"], q["dy_grad_input"], *conv),
        "grad_weight": torch.nn.grad.conv2d_weight(q["x_grad_weight"], w.shape, q["dy_grad_weight"], *conv),
    }


def margins(cases, groupings=GROUPINGS) -> dict[str, list[tuple[float, str]]]:
    """{grouping: [(SQNR minus bf16's, "source layer product") per row]}."""
    out = {name: [] for name in groupings}
    for case in cases:
        exact = fidelity._exact(case)
        bf16 = fidelity.fidelity(case, ("bf16",))
        for name, grouping in groupings.items():
            got = products(case, grouping)
            for p in PRODUCTS:
                row = f"{case.source} {case.name} {p}"
                out[name].append((fidelity.sqnr_db(exact[p], got[p]) - bf16[p]["bf16"], row))
    return out


def table(rows: dict[str, list[tuple[float, str]]]) -> list[str]:
    lines = ["| grouping (emulated) | median margin (dB) | worst margin (dB) | worst row |", "|---|---|---|---|"]
    for name, m in rows.items():
        worst = min(m)
        lines.append(f"| {name} | {median(v for v, _ in m):.1f} | {worst[0]:.1f} | {worst[1]} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.granularity", description=__doc__)
    p.add_argument("--cifar10", help="a local CIFAR-10 copy for the captured step (as --tables fidelity)")
    p.add_argument("--cache-dir", help="where CIFAR-10's decoded images are cached")
    args = p.parse_args(argv)
    cases = list(fidelity.synthetic_cases()) + fidelity.digits_cases()
    if args.cifar10:
        cases += fidelity.cifar10_cases(args.cifar10, args.cache_dir)
    print("\n".join(table(margins(cases))))


if __name__ == "__main__":
    main()
