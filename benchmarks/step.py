"""Whole training steps (forward, backward, SGD) of ResNet-20 and ResNet-18-CIFAR in
fp32, bf16 autocast and DFP16, for ``python -m benchmarks.report --tables step`` and
bench_step.py; plus a torch.profiler breakdown of each format's step into parts.

Each format is set up as the comparison harness sets it up (``dfp.harness.formats.prepare``:
fp32 torch layers; bf16 = ``torch.autocast(bfloat16)`` around the forward; dfp16 =
``dfp.convert(model, "dfp16")``), channels_last, SGD with momentum, on one fixed random
CIFAR-shaped batch. The formats are timed in turns, so that their ratios come from the
same rounds, each in a process of its own (``StepWorkers``): in one process the formats
share the memory allocator, and what one keeps or frees moves the page faults of the
others (with dfp's reused buffers, fp32 steps ran 10-15 % slower next to dfp16 steps than
alone).

The breakdown attributes each profiled op's self time to the part of the outermost
region it runs in (a convolution, a batch norm, the optimizer, ...). Inside a dfp layer
it goes further: dfp's layers run as a plain ``torch.autograd.Function`` whose C++ calls
are no torch ops, so while profiling (only then) the functions that quantize and the
backward's two products are wrapped in ``record_function`` labels (``dfp_labels``).
oneDNN computes grad_input and grad_weight of a torch convolution in one op: for fp32
and bf16 they stay one part ("conv backward, unsplit").
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from statistics import median

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from . import peaks as peak_probes
from .timing import speedup_cell

MODELS = {"resnet20": "ResNet-20", "resnet18": "ResNet-18-CIFAR"}
FORMATS = ("fp32", "bf16", "dfp16-tensor", "dfp16")
IMAGE = (3, 32, 32)
CLASSES = 10


@dataclass(frozen=True)
class StepConfig:
    batch: int
    repeats: int  # interleaved rounds, one step per format each
    profile_steps: int  # steps under torch.profiler, per format and thread count
    # bf16 is skipped on a model where its rate on the previous model predicts a step
    # longer than this, or where its first step took longer: without native bf16, torch
    # emulates autocast at a tenth of fp32's speed (an AMD Zen 2: 7.1 s a ResNet-20 step,
    # about 100 s a ResNet-18-CIFAR step; asked for ResNet-18-CIFAR alone on an AMD Zen 3,
    # the table took 36 minutes).
    max_step_s: float


FULL = StepConfig(batch=128, repeats=5, profile_steps=3, max_step_s=20.0)
# --quick: a smoke test of well under a minute on 2 cores.
QUICK = StepConfig(batch=8, repeats=3, profile_steps=1, max_step_s=2.0)

# Parts of a step, in the order the breakdown prints them.
CONV_FORWARD, GRAD_INPUT, GRAD_WEIGHT, CONV_BACKWARD = (
    "conv forward",
    "grad_input",
    "grad_weight",
    "conv backward, unsplit",
)
QUANTIZE, CASTS, BATCH_NORM, ELEMENTWISE = "quantization", "casts", "batch norm", "elementwise"
OPTIMIZER, ACCUMULATE = "optimizer", "AccumulateGrad (autograd)"
OTHER, OUTSIDE = "other ops", "outside ops (Python)"
PARTS = (
    CONV_FORWARD, GRAD_INPUT, GRAD_WEIGHT, CONV_BACKWARD, QUANTIZE, CASTS, BATCH_NORM, ELEMENTWISE, OPTIMIZER,
    ACCUMULATE, OTHER, OUTSIDE,
)  # fmt: skip
STEP_LABEL = "benchmark step"
# record_function labels of dfp's functions (see dfp_labels).
LABELS = {"dfp: quantize": QUANTIZE, "dfp: grad_input": GRAD_INPUT, "dfp: grad_weight": GRAD_WEIGHT}


class Step:
    """One training step of ``model_name`` in ``fmt`` on a fixed random batch, callable."""

    def __init__(self, model_name: str, fmt: str, batch: int, seed: int = 0, device: str = "cpu") -> None:
        from dfp.harness import formats
        from dfp.models import build

        torch.manual_seed(seed)
        model = build(model_name, IMAGE[0], CLASSES, IMAGE[1])
        # A small rate: the same random batch again and again must not drive any format
        # to non-finite values, which a DFP16 layer refuses.
        self.training = formats.prepare(
            fmt, model, torch.device(device), fp32_layers=set(), lr=1e-3, momentum=0.9, weight_decay=5e-4, seed=seed
        )
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *IMAGE, generator=gen).contiguous(memory_format=torch.channels_last)
        self.x, self.y = x.to(device), torch.randint(0, CLASSES, (batch,), generator=gen).to(device)

    def __call__(self) -> None:
        training = self.training
        training.optimizer.zero_grad(set_to_none=True)
        with training.autocast():
            loss = nn.functional.cross_entropy(training.model(self.x), self.y)
        if training.scaler is None:
            loss.backward()
            training.optimizer.step()
        else:  # fp16: loss scaling, as the harness trains it
            training.scaler.scale(loss).backward()
            training.scaler.step(training.optimizer)
            training.scaler.update()


def _step_worker(connection, model_name: str, fmt: str, batch: int) -> None:
    """A worker process's loop: build the step, then on ("step", threads) time one step
    and send its seconds back, until "stop"."""
    from dfp import keep_freed_memory

    keep_freed_memory()  # as the harness trains (see dfp.allocator)
    step = Step(model_name, fmt, batch)
    step()
    connection.send("ready")
    while (message := connection.recv()) != "stop":
        torch.set_num_threads(message[1])
        start = time.perf_counter()
        step()
        connection.send(time.perf_counter() - start)


class StepWorkers:
    """One process per format, each holding its own model and memory allocator, timed in
    turns (the others wait for their turn, idle), as ``interleaved_times`` does in one
    process. A context manager: the processes end with it."""

    def __init__(self, model_name: str, formats: tuple[str, ...], batch: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP threads run
        self.workers = {}
        self.warmup_s: dict[str, float] = {}  # each format's longest warm-up step
        # The process started first ran its steps 1-3 % slower than identical ones started
        # after it (AMD Zen 4, 2026-12-08: four dfp16 ResNet-20 processes, 21 rounds): the
        # last format (dfp16) starts first, so that the bias counts against it.
        for fmt in reversed(formats):
            ours, theirs = context.Pipe()
            process = context.Process(target=_step_worker, args=(theirs, model_name, fmt, batch), daemon=True)
            process.start()
            self.workers[fmt] = (process, ours)
        self.workers = {fmt: self.workers[fmt] for fmt in formats}
        for fmt, (_, connection) in self.workers.items():
            try:
                connection.recv()
            except EOFError as err:  # its traceback went to stderr
                self.__exit__()
                raise RuntimeError(f"the {fmt} step worker process died while starting (see its error above)") from err

    def times(
        self, threads: int, repeats: int, keep: Callable[[str, float], bool] = lambda name, seconds: True
    ) -> dict[str, list[float]]:
        """``repeats`` step times (s) per format, the formats in turns (rotated each round),
        of those that ``keep`` takes given their warm-up step's time (s); the others' processes
        end."""
        names = []
        for name in list(self.workers):
            seconds = self._step(name, threads)  # a warm-up step at this thread count
            self.warmup_s[name] = max(seconds, self.warmup_s.get(name, 0.0))
            if keep(name, seconds):
                names.append(name)
            else:
                self._stop(name)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(self._step(name, threads))
        return samples

    def _step(self, name: str, threads: int) -> float:
        connection = self.workers[name][1]
        connection.send(("step", threads))
        return connection.recv()

    def __enter__(self) -> StepWorkers:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self.workers):
            self._stop(name)

    def _stop(self, name: str) -> None:
        process, connection = self.workers.pop(name)
        with contextlib.suppress(OSError):
            connection.send("stop")
        process.join(timeout=30)


@functools.cache
def step_macs(model_name: str, batch: int) -> int:
    """Multiply-adds of the convolutions and linear layers in one training step: each
    layer's forward, grad_weight, and grad_input (except the first layer's: the images
    need no gradient)."""
    from dfp.models import build

    model, forward = build(model_name, IMAGE[0], CLASSES, IMAGE[1]), []

    def count(module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            forward.append(output.numel() * module.in_channels // module.groups * kh * kw)
        elif isinstance(module, nn.Linear):
            forward.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *IMAGE))
    for hook in hooks:
        hook.remove()
    return batch * (3 * sum(forward) - forward[0])


# --- the profiler breakdown ---------------------------------------------------------------


def _labelled(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def _label_of(name: str) -> str | None:
    """The record_function label for a dfp function or backward call of this name."""
    if "grad_input" in name:
        return "dfp: grad_input"
    if "grad_weight" in name:
        return "dfp: grad_weight"
    return "dfp: quantize" if name.startswith("quantize") else None


@contextlib.contextmanager
def dfp_labels() -> Iterator[None]:
    """Wrap, while the block runs, the functions through which dfp's eager layers
    quantize (the public ``quantize*`` functions of ``dfp._conv_layout``) and compute
    grad_input and grad_weight (the fields of ``dfp.autograd._EAGER``, the calls its
    backward makes, by name: ``quantize*``, ``grad_input``, ``grad_weight``) in
    record_function labels, with the backward's one-call path (``whole``) switched off
    so that its parts show: the same kernels and bits, called one by one (a little more
    Python per layer than the timed steps run). Work that a later dfp does under other
    names stays in the enclosing layer's part ("conv forward", "conv backward, unsplit"):
    so does the forward's quantization of the input and weight on the compiled backend,
    which runs inside the forward's one call."""
    import dfp._conv_layout as layout
    from dfp import autograd

    saved = []

    def patch(owner, name: str, value) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    for name, fn in list(vars(layout).items()):
        if callable(fn) and name.startswith("quantize") and getattr(fn, "__module__", None) == layout.__name__:
            patch(layout, name, _labelled(fn, "dfp: quantize"))
    calls = getattr(autograd, "_EAGER", None)
    if calls is not None and hasattr(calls, "_replace"):
        labelled = {f: _labelled(getattr(calls, f), label) for f in calls._fields if (label := _label_of(f))}
        if "whole" in calls._fields:  # one call for the whole backward would hide its parts
            labelled["whole"] = None
        patch(autograd, "_EAGER", calls._replace(**labelled))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _region(name: str) -> str | None:
    """The part that an op (or autograd node, or label) and everything inside it belong
    to, when it is the outermost such one; None for ops that are not a region."""
    name = name.removeprefix("autograd::engine::evaluate_function: ")
    if name in ("EagerConv2d", "dfp::conv2d", "aten::conv2d", "aten::convolution", "aten::linear"):
        return CONV_FORWARD  # a linear layer is a 1x1 convolution in dfp: the same part everywhere
    if name in ("EagerConv2dBackward", "ConvolutionBackward0", "AddmmBackward0", "MmBackward0"):
        return CONV_BACKWARD
    if name in LABELS:
        return LABELS[name]
    if name.startswith("dfp::"):  # traced dfp ops (torch.compile), by their names
        return GRAD_INPUT if "grad_input" in name else GRAD_WEIGHT if "grad_weight" in name else QUANTIZE
    if "batch_norm" in name or "BatchNorm" in name:
        return BATCH_NORM
    if name.startswith("Optimizer."):
        return OPTIMIZER
    if name == "torch::autograd::AccumulateGrad":
        return ACCUMULATE
    if name in ("aten::to", "aten::_to_copy", "ToCopyBackward0"):
        return CASTS
    if name in ("ReluBackward0", "AddBackward0", "CloneBackward0") or name.removeprefix("aten::").rstrip("_") in (
        "relu", "add", "mul", "sub", "div", "clamp_min", "threshold_backward", "copy", "clone", "contiguous", "fill", "zero"
    ):  # fmt: skip
        return ELEMENTWISE
    return None


# Parts that count only for an op called by the step itself (not inside another op).
TOP_ONLY = (ELEMENTWISE, CASTS)
# Parts that refine a layer's region: the innermost of them inside it decides. A dfp layer
# quantizes and runs its two backward products inside its own region; autocast casts a
# torch convolution's operands inside aten::conv2d.
DFP_LAYERS = ("EagerConv2d", "EagerConv2dBackward", "dfp::conv2d")
REFINES_DFP = (QUANTIZE, GRAD_INPUT, GRAD_WEIGHT)


def _part(path: list[str], autocast: bool = False) -> str:
    """The part of an event, given the names from the step's child down to the event."""
    top = _region(path[0])
    if top in TOP_ONLY:
        return top
    outer = next((i for i, name in enumerate(path) if _region(name) not in (None, *TOP_ONLY)), None)
    if outer is None:
        return OTHER
    part = _region(path[outer])
    if part in (CONV_FORWARD, CONV_BACKWARD):
        if path[outer].removeprefix("autograd::engine::evaluate_function: ") in DFP_LAYERS:
            refines = REFINES_DFP
        else:
            refines = (CASTS,) if autocast and part == CONV_FORWARD else ()
        for name in path[outer + 1 :]:
            if (inner := _region(name)) in refines:
                part = inner
    return part


def breakdowns(steps: dict[str, Step], rounds: int) -> dict[str, dict[str, float]]:
    """Seconds per step of each part (PARTS) of each step in ``steps``, from
    torch.profiler over ``rounds`` steps each, the steps profiled in turns (as they are
    timed) so that a burst of load on a shared machine does not fall on one alone."""
    total = {name: dict.fromkeys(PARTS, 0.0) for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for part, s in breakdown(step, 1).items():
                total[name][part] += s / rounds
    return total


def breakdown(step: Step, steps: int) -> dict[str, float]:
    """Seconds per step of each part (PARTS), from torch.profiler over ``steps`` steps."""
    autocast = step.training.autocast_dtype is not None
    with dfp_labels(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                step()
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in prof.events():
        path, node = [], event
        while node is not None and node.name != STEP_LABEL:
            path.append(node.name)
            node = node.cpu_parent
        if node is None:
            continue  # outside the steps (the profiler's own)
        part = OUTSIDE if not path else _part(path[::-1], autocast)
        seconds[part] += event.self_cpu_time_total / 1e6 / steps
    return seconds


# --- the report table ---------------------------------------------------------------------


def format_peaks(peaks: dict[str, float], isa: str | None) -> dict[str, tuple[str, float] | None]:
    """Which register peak each format's step is measured against: (probe, GMAC/s)."""
    fp32 = peak_probes.fp32_peak(peaks)
    fp32_name = max((n for n in peak_probes.FP32 if n in peaks), key=peaks.get, default=None)
    bf16_name, bf16 = peak_probes.bf16_path(peaks)
    int16_name, int16 = peak_probes.int16_peak(peaks, isa)
    return {
        "fp32": (fp32_name, fp32) if fp32 else None,
        "bf16": (bf16_name, bf16) if bf16 else None,
        "dfp16-tensor": (int16_name, int16) if int16 else None,
        "dfp16": (int16_name, int16) if int16 else None,
    }


def step_table(args, peaks: dict[str, float], isa: str | None) -> list[str]:
    """The step table and the breakdowns for benchmarks/report.py (``args.models``,
    ``args.threads``, ``args.quick``, ``args.max_step_s``, ``args.step_rounds``); ``peaks``
    from benchmarks.peaks.measure, ``isa`` dfp's CPU path."""
    cfg = QUICK if args.quick else FULL
    if args.max_step_s is not None:
        cfg = replace(cfg, max_step_s=args.max_step_s)
    if args.step_rounds is not None:
        cfg = replace(cfg, repeats=args.step_rounds)
    against = format_peaks(peaks, isa)
    peak_note = "; ".join(
        f"{fmt} against {p[0]} {p[1]:.1f} GMAC/s per core" if p else f"{fmt}: no peak measured"
        for fmt, p in against.items()
    )
    note = (
        f"Training steps: forward, backward and SGD step (momentum 0.9) of the whole model on one random batch of "
        f"{cfg.batch} CIFAR-shaped images, channels_last, each format set up as the harness does "
        "(fp32: torch layers; bf16: torch.autocast(bfloat16) around the forward; dfp16, dfp16-tensor: "
        "dfp.convert). The formats "
        f"run in turns, each in a process of its own (one allocator shared by all would move each one's page "
        f"faults); ms = median of {cfg.repeats} rounds; speed-ups are paired medians of the same rounds (in "
        "brackets the first to third quartile of the rounds' ratios): bf16 / fp32 and dfp16 / fp32 against torch "
        "fp32 (oneDNN convolutions), dfp16 / bf16 against torch bf16 autocast (oneDNN bf16 convolutions), "
        "dfp16 / tensor against dfp16-tensor (Das et al.'s exponent per tensor: the cost of finer gradient "
        "exponents). % of peak: the step's conv and linear multiply-adds (forward, grad_input, grad_weight) / "
        f"step time / (threads x the register peak of the format's path: {peak_note})."
    )
    lines = [note, ""]
    headers = ["model", "threads", "GMAC/step", *(f"{f} ms (% of peak)" for f in FORMATS)]
    headers += ["bf16 / fp32", "dfp16 / fp32", "dfp16 / bf16", "dfp16 / tensor"]
    rows, medians, parts, skipped = [], {}, {}, []
    cpu_before = _cpu_times()
    bf16_rate = None  # GMAC/s of bf16's step on the previous model, at the fewest threads

    def quick_enough(fmt: str, warmup_s: float) -> bool:  # bf16 only where its first step was
        return fmt != "bf16" or warmup_s <= cfg.max_step_s

    for model_name in args.models:
        title = MODELS[model_name]
        macs = step_macs(model_name, cfg.batch)
        formats = [f for f in FORMATS if f != "bf16" or bf16_rate is None or macs / 1e9 / bf16_rate <= cfg.max_step_s]
        if "bf16" not in formats:
            skipped.append(f"{title} (predicted from its rate on the previous model)")
        with StepWorkers(model_name, tuple(formats), cfg.batch) as workers:
            timed = {threads: workers.times(threads, cfg.repeats, quick_enough) for threads in args.threads}
            bf16_first_s = workers.warmup_s.get("bf16")
        if "bf16" in formats and any("bf16" not in times for times in timed.values()):
            # too slow at some thread count: left out of every row, so that they compare alike
            formats.remove("bf16")
            skipped.append(f"{title} (its first step took {bf16_first_s:.1f} s)")
            for times in timed.values():
                times.pop("bf16", None)
            bf16_rate = macs / 1e9 / bf16_first_s
        elif "bf16" in formats:
            bf16_rate = macs / 1e9 / median(timed[min(args.threads)]["bf16"])
        steps = {fmt: Step(model_name, fmt, cfg.batch) for fmt in formats}  # for the profiled breakdowns
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = timed[threads]
            cells = []
            for fmt in FORMATS:
                if fmt not in times:
                    cells.append("skipped")
                    continue
                t = medians[(model_name, fmt, threads)] = median(times[fmt])
                peak = against[fmt][1] if against[fmt] else None
                cells.append(f"{1e3 * t:.1f} ({peak_probes.fraction(macs / t / 1e9, peak, threads)})")
            ratios = [
                speedup_cell(times[a], times[b]) if a in times and b in times else "-"
                for a, b in (("bf16", "fp32"), ("dfp16", "fp32"), ("dfp16", "bf16"), ("dfp16", "dfp16-tensor"))
            ]
            rows.append([title, str(threads), f"{macs / 1e9:.2f}", *cells, *ratios])
            parts[(model_name, threads)] = breakdowns(steps, cfg.profile_steps)
            print(f"  step {model_name} t{threads} done", file=sys.stderr)
    lines += table(headers, rows)
    if skipped:
        lines += ["", f"bf16 skipped, a step over {cfg.max_step_s} s (`--max-step-s`), on {'; '.join(skipped)}."]
    lines += ["", *scaling_lines(medians, args.models, args.threads), *load_lines(cpu_before, _cpu_times())]
    for (model_name, threads), by_format in parts.items():
        lines += ["", *breakdown_table(MODELS[model_name], threads, cfg, by_format, medians, model_name)]
    return lines


def _cpu_times() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and of its joined
    children, the step workers) from /proc/stat (Linux; None elsewhere). Busy counts
    steal time: a hypervisor's other guests."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
    return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system


def load_lines(before, after) -> list[str]:
    """How much of the machine other processes used while the steps ran: on a shared
    machine that slows multi-threaded steps most (OpenMP's barriers wait for a core)."""
    if before is None or after is None or after[0] <= before[0]:
        return []
    cpus = os.cpu_count() or 1
    others = max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / ((after[0] - before[0]) * cpus)
    warning = "; the multi-threaded rows are the least reliable" if others > 0.1 else ""
    return [f"Other processes used {100 * others:.0f}% of the {cpus} CPUs while the steps ran{warning}."]


def scaling_lines(medians: dict[tuple[str, str, int], float], models: list[str], threads: list[int]) -> list[str]:
    """Speed-up of each format's step from the fewest to the most threads timed."""
    if len(threads) < 2:
        return []
    lo, hi = min(threads), max(threads)
    out = []
    for model_name in models:
        title = MODELS[model_name]
        cells = ", ".join(
            f"{fmt} {medians[(model_name, fmt, lo)] / medians[(model_name, fmt, hi)]:.2f}x"
            for fmt in FORMATS
            if (model_name, fmt, lo) in medians
        )
        out.append(f"{title}, step speed-up from {lo} to {hi} threads: {cells}.")
    return out


def breakdown_table(
    title: str, threads: int, cfg: StepConfig, by_format: dict[str, dict[str, float]], medians: dict, model_name: str
) -> list[str]:
    note = (
        f"Breakdown of a {title} step, {threads} thread(s), batch {cfg.batch}: ms per step (share of the "
        f"profiled step), torch.profiler over {cfg.profile_steps} step(s) per format taken in turns, self time of each op in the "
        "part of the region it runs in. conv covers the linear layer too; 'conv backward, unsplit': one oneDNN "
        "call computes grad_input and grad_weight (fp32, bf16), or a dfp layer's backward outside its products "
        "and quantization (dfp16); grad_input, grad_weight: dfp's products with their own glue, quantization "
        "excluded; casts: autocast's dtype conversions; batch norm: with the ReLU and residual add behind it "
        "where dfp's kernels fuse them (dfp16); elementwise: ReLU, residual adds (unfused), copies; AccumulateGrad: "
        "the autograd engine's writing of parameter gradients."
    )
    rows = []
    formats = [fmt for fmt in FORMATS if fmt in by_format]  # bf16 may have been skipped
    totals = {fmt: sum(p.values()) for fmt, p in by_format.items()}
    for part in PARTS:
        if all(by_format[fmt][part] == 0 for fmt in formats):
            continue
        cells = []
        for fmt in formats:
            s = by_format[fmt][part]
            cells.append(f"{1e3 * s:.1f} ({100 * s / totals[fmt]:.0f}%)" if s else "-")
        rows.append([part, *cells])
    rows.append(["profiled step", *(f"{1e3 * totals[fmt]:.1f}" for fmt in formats)])
    rows.append(["timed step (median)", *(f"{1e3 * medians[(model_name, fmt, threads)]:.1f}" for fmt in formats)])
    return [note, "", *table(["part", *formats], rows)]


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
