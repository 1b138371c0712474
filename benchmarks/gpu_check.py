"""The prepared GPU check of dfp.cuda: runs the GPU tests, then times the GEMMs, the
quantize kernels and conv layers, and prints markdown tables. Sized to finish within 5
minutes on one H100-class GPU (``--quick``: 4096 only, two conv layers); on an H200 it
takes about 25 s plus the tests' 30 s (docs/gpu-check-h200.md).

    python -m benchmarks.gpu_check [--quick] [--skip-tests] [--output results.md]

GEMM at 4096 and 8192 (square): cuBLAS fp16 ``mm`` (tensor cores), cuBLAS fp32 ``mm``
(TF32 off: CUDA cores), ``torch._int_mm`` (int8 tensor cores), and the exact DFP16 GEMM
on its three paths (``mma``: int8 tensor cores on int16 limbs, with the default feed and
the registers feed; ``int16``: CUDA cores; ``limbs``: torch._int_mm per chain), each
also checked bit for bit against the ``int16`` path. Conv layers (forward + backward): fp32, fp16 (channels_last,
cudnn.benchmark) and dfp16, its patches as an im2col matrix and read in place (implicit
GEMM, ``DFP_CUDA_CONV``). A ResNet-20 training step (batch 128) in fp32, fp16 and
dfp16 (both ways), set up as the harness trains them. Times are medians of CUDA-event timings;
ratios are against the baselines measured in the same run. Without a CUDA device it
exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = ("tests/test_cuda.py",)  # tests/test_cuda_limbs.py runs on the CPU only
TESTS_TIMEOUT_S = 240
CONV_LAYERS = (  # name, batch, channels, size (3x3, stride 1, padding 1, no bias)
    ("ResNet-50 stage 1", 64, 64, 56),
    ("ResNet-50 stage 2", 64, 128, 28),
    ("ResNet-50 stage 3", 64, 256, 14),
    ("ResNet-50 stage 4", 64, 512, 7),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4096 only, fewer repeats, two conv layers")
    p.add_argument("--skip-tests", action="store_true", help="only the timings")
    p.add_argument("--output", help="also write the report to this file")
    return p.parse_args(argv)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def median_ms(fn: Callable[[], object], budget_s: float, max_repeats: int) -> float:
    """Median milliseconds per call over CUDA-event timings (two warm-up calls, then as
    many calls as fit in ``budget_s``, at least 3 and at most ``max_repeats``)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    samples, started = [], time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < 3 or time.perf_counter() - started < budget_s):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def run_tests() -> tuple[bool, str]:
    """The GPU tests in a fresh interpreter; (passed, pytest's summary line, or what it
    printed before the time limit stopped it)."""
    # -vv: one line per finished test (a timeout's output shows where the tests stopped), and
    # FAILED lines carry the whole first line of the failure's message, untrimmed
    command = [sys.executable, "-m", "pytest", *GPU_TESTS, "-vv", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:  # the timings still run: report what the tests got to
        printed = _text(err.stdout) + _text(err.stderr)
        tail = [line for line in printed.splitlines() if line.strip()][-20:]
        return False, "\n".join([f"tests timed out after {TESTS_TIMEOUT_S} s; their output so far:", *tail])
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return done.returncode == 0, "\n".join([*failures, lines[-1] if lines else "(no output)"])


def _text(output: str | bytes | None) -> str:
    """TimeoutExpired's partial output: bytes even with text=True, or None."""
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def _int16_operands(size: int, headroom: int = 2):
    top = 2 ** (15 - headroom) - 1
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-top, top + 1, (size, size), device="cuda", dtype=torch.int16, generator=g)
    b = torch.randint(-top, top + 1, (size, size), device="cuda", dtype=torch.int16, generator=g)
    ea = torch.zeros(size, 1, dtype=torch.int32, device="cuda")
    eb = torch.zeros(1, size, dtype=torch.int32, device="cuda")
    return a, ea, headroom, b, eb, headroom, size, None


@contextlib.contextmanager
def _environment(**settings: str | None):
    """dfp's environment settings for the duration (None: left as it is)."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update({name: value for name, value in settings.items() if value is not None})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _with_environment(fn: Callable[[], object], **settings: str | None) -> Callable[[], object]:
    def call():
        with _environment(**settings):
            return fn()

    return call


def _dfp_gemm(path: str, operands, feed: str | None = None) -> Callable[[], torch.Tensor]:
    """The DFP16 GEMM on ``path`` (DFP_CUDA_GEMM), the tensor cores' operands fed as ``feed``
    says (DFP_CUDA_MMA_FEED; None: the default)."""
    from dfp.cuda import gemm

    return _with_environment(lambda: gemm.gemm(*operands), DFP_CUDA_GEMM=path, DFP_CUDA_MMA_FEED=feed)


# What a contender may raise that the report shows instead of stopping: torch's and
# dfp's run-time errors (no kernel, failed compile, out of memory) and refused inputs.
FAILURES = (RuntimeError, ValueError, TypeError, NotImplementedError)


def _gemm_rows(size: int, budget_s: float) -> tuple[list[list[str]], list[str]]:
    ops = 2 * size**3
    x16 = torch.randn(size, size, device="cuda", dtype=torch.float16)
    x32 = x16.float()
    i8 = torch.randint(-128, 128, (size, size), device="cuda", dtype=torch.int8)
    operands = _int16_operands(size)
    contenders = {
        "cuBLAS fp16 mm": lambda: x16 @ x16,
        "cuBLAS fp32 mm (no TF32)": lambda: x32 @ x32,
        "torch._int_mm int8": lambda: torch._int_mm(i8, i8),
        "dfp16 mma (tensor cores)": _dfp_gemm("mma", operands),
        "dfp16 mma, registers feed": _dfp_gemm("mma", operands, "registers"),
        "dfp16 int16 (CUDA cores)": _dfp_gemm("int16", operands),
        "dfp16 limbs (torch._int_mm)": _dfp_gemm("limbs", operands),
    }
    times, notes = {}, []
    for name, fn in contenders.items():
        try:
            times[name] = median_ms(fn, budget_s, 2 if "limbs" in name else 50)
        except FAILURES as err:  # one failure must not hide the other numbers
            notes.append(f"{name} at {size}: {type(err).__name__}: {err}")
    exact = _exactness(operands)
    rows = []
    for name in contenders:
        if name not in times:
            rows.append([str(size), name, "failed", "-", "-", "-", "-"])
            continue
        ms = times[name]
        rows.append([
            str(size), name, f"{ms:.3f}", f"{ops / ms / 1e9:.1f}",
            _ratio(times, name, "cuBLAS fp16 mm"), _ratio(times, name, "cuBLAS fp32 mm (no TF32)"),
            exact.get(name, "-"),
        ])  # fmt: skip
    return rows, notes


def gemm_table(sizes: tuple[int, ...], budget_s: float) -> list[str]:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, notes = [], []
    for size in sizes:
        size_rows, size_notes = _gemm_rows(size, budget_s)
        rows += size_rows
        notes += size_notes
        torch.cuda.empty_cache()
    headers = ["N", "GEMM (N x N x N)", "ms", "TFLOP/s or TOP/s", "vs fp16 cuBLAS", "vs fp32", "bits = int16 path"]
    return ["## GEMM", "", *table(headers, rows), "", *notes]


def _exactness(operands) -> dict[str, str]:
    """Whether each DFP16 path gives the int16 path's bits on these operands."""
    try:
        want = _dfp_gemm("int16", operands)()
    except FAILURES:
        return {}
    result = {}
    for path, feed, name in (
        ("mma", None, "dfp16 mma (tensor cores)"),
        ("mma", "registers", "dfp16 mma, registers feed"),
        ("limbs", None, "dfp16 limbs (torch._int_mm)"),
    ):
        try:
            result[name] = "yes" if torch.equal(_dfp_gemm(path, operands, feed)(), want) else "**NO**"
        except FAILURES:
            result[name] = "failed"
    return result


def _ratio(times: dict[str, float], name: str, baseline: str) -> str:
    return f"{times[baseline] / times[name]:.2f}x" if name in times and baseline in times else "-"


def quantize_table(budget_s: float) -> list[str]:
    import dfp

    x = torch.randn(8192, 8192, device="cuda")
    copy = torch.empty_like(x)
    copy_ms = median_ms(lambda: copy.copy_(x), budget_s, 50)
    copy_gbs = 2 * x.numel() * 4 / copy_ms / 1e6
    rows = []
    for label, spec in (
        ("tensor, nearest", dfp.DFPSpec()),
        ("tensor, stochastic", dfp.DFPSpec(rounding="stochastic")),
        ("channel, nearest", dfp.DFPSpec(axis=0)),
        ("block 32, nearest", dfp.DFPSpec(axis=1, block=32)),
    ):
        args = (spec.headroom, spec.axis, spec.block, dfp.format.ROUNDINGS.index(spec.rounding), 1234)
        try:
            ms = median_ms(lambda: torch.ops.dfp.quantize(x, *args), budget_s, 50)  # noqa: B023
        except FAILURES as err:
            rows.append([label, "failed", f"{type(err).__name__}: {err}", "-"])
            continue
        gbs = x.numel() * 6 / ms / 1e6  # 4 bytes read, 2 written per element
        rows.append([label, f"{ms:.3f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"])
    rows += _quantize_kernel_rows(x, budget_s, copy_gbs)
    headers = ["8192 x 8192 fp32, headroom 2", "ms", "GB/s (6 B per element)", "of copy bandwidth"]
    note = (
        f"Device-to-device copy: {copy_gbs:.0f} GB/s (bytes read and written). A quantize per tensor or channel "
        "reads x twice (its maximum, then the rounding), per block once in one launch (each group read again from "
        "cache), and syncs once with the host (the NaN/Inf check); the kernel rows time the per-tensor launches "
        "alone, with the bytes each moves."
    )
    return ["## Quantize", "", *table(headers, rows), "", note]


def _quantize_kernel_rows(x: torch.Tensor, budget_s: float, copy_gbs: float) -> list[list[str]]:
    """The per-tensor quantize's two large kernels timed alone: the maximum (reads 4 B per
    element) and the rounding (reads 4, writes 2)."""
    from dfp.cuda import quantize

    flat = x.view(1, -1, 1)
    amax = quantize._group_amax(flat, 0)
    exponent, nonfinite = quantize._exponents(amax, 2)
    mantissa = torch.empty(flat.shape, dtype=torch.int16, device=x.device)
    kernels = (
        ("kernel: max |x| (per tensor)", 4, lambda: quantize._group_amax(flat, 0)),
        ("kernel: rounding (per tensor, nearest)", 6,
         lambda: quantize._quantize_elements(flat, 0, 0, exponent, 2, False, 0, mantissa, nonfinite)),
    )  # fmt: skip
    rows = []
    for label, bytes_per_element, launch in kernels:
        ms = median_ms(launch, budget_s, 50)
        gbs = x.numel() * bytes_per_element / ms / 1e6
        rows.append(
            [label, f"{ms:.3f}", f"{gbs:.0f} ({bytes_per_element} B per element)", f"{100 * gbs / copy_gbs:.0f}%"]
        )
    return rows


def conv_table(layers, budget_s: float) -> list[str]:
    import dfp
    from dfp.cuda.patches import MODES

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    rows, notes = [], []
    for name, batch, channels, size in layers:
        ops = 3 * 2 * batch * channels * channels * 9 * size * size  # forward + two backward products
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).cuda()
        x = torch.randn(batch, channels, size, size, device="cuda")
        layers_by_format = {
            "fp32": (conv, x),
            "fp16 channels_last": (
                torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).cuda().half().to(
                    memory_format=torch.channels_last),
                x.half().contiguous(memory_format=torch.channels_last),
            ),
        }  # fmt: skip
        dfp_layer = dfp.nn.Conv2d(channels, channels, 3, padding=1, bias=False, fmt="dfp16").cuda()
        for mode in sorted(MODES):  # how dfp16 reads its patches (DFP_CUDA_CONV): im2col, implicit
            layers_by_format[f"dfp16 {mode}"] = (dfp_layer, x.contiguous(memory_format=torch.channels_last))
        times = {}
        for fmt, (layer, inp) in layers_by_format.items():
            inp = inp.detach().requires_grad_()

            def step(layer=layer, inp=inp):
                layer(inp).sum().backward()

            try:
                times[fmt] = median_ms(_with_environment(step, DFP_CUDA_CONV=fmt.partition("dfp16 ")[2] or None),
                                       budget_s, 20)  # fmt: skip
            except FAILURES as err:
                notes.append(f"{fmt} {name}: {type(err).__name__}: {err}")
        cells = [f"{times[f]:.2f} ({ops / times[f] / 1e9:.0f})" if f in times else "failed" for f in layers_by_format]
        rows.append([
            f"{name}: {channels}ch {size}x{size}, batch {batch}", *cells,
            _ratio(times, "dfp16 implicit", "fp32"), _ratio(times, "dfp16 implicit", "fp16 channels_last"),
            _ratio(times, "dfp16 implicit", "dfp16 im2col"),
        ])  # fmt: skip
    headers = ["conv 3x3 forward+backward", "fp32 ms (TFLOP/s)", "fp16 cl ms (TFLOP/s)", "dfp16 im2col ms (TOP/s)",
               "dfp16 implicit ms (TOP/s)", "implicit vs fp32", "implicit vs fp16", "implicit vs im2col"]  # fmt: skip
    return ["## Conv layers", "", *table(headers, rows), "", *notes]


STEP_FORMATS = ("fp32", "fp16", "dfp16", "dfp16 implicit")  # dfp16: DFP_CUDA_CONV's default
STEP_GRAPHED = ("fp32", "dfp16", "dfp16 implicit")  # fp16's GradScaler syncs with the host: no capture


def _graph_replay(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after warm-up steps on a side stream, as torch's
    whole-network capture does), as its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def step_table(budget_s: float) -> list[str]:
    """Whole training steps of ResNet-20 (CIFAR-10 shapes, batch 128, channels_last, SGD)
    in fp32, fp16 (autocast + GradScaler, cudnn.benchmark) and dfp16, set up as the
    harness trains them; fp32 and dfp16 also captured in a CUDA graph and replayed (the
    launches without the host's Python: fp16's GradScaler syncs with the host, which a
    capture refuses)."""
    from .step import Step

    times, replays, notes = {}, {}, []
    for fmt in STEP_FORMATS:
        try:
            format_name, _, mode = fmt.partition(" ")
            with _environment(DFP_CUDA_CONV=mode or None):
                step = Step("resnet20", format_name, 128, device="cuda")
                times[fmt] = median_ms(step, budget_s, 30)
                if fmt in STEP_GRAPHED:
                    replays[fmt] = median_ms(_graph_replay(step), budget_s, 30)
        except FAILURES as err:
            notes.append(f"{fmt}: {type(err).__name__}: {err}")
    rows = [[fmt, f"{times[fmt]:.2f}" if fmt in times else "failed", _ratio(times, fmt, "fp32"),
             f"{replays[fmt]:.2f}" if fmt in replays else "-", _ratio(replays, fmt, "fp32")]
            for fmt in STEP_FORMATS]  # fmt: skip
    headers = ["ResNet-20 training step, batch 128", "ms", "speed vs fp32", "CUDA graph replay ms", "speed vs fp32"]
    return ["## Training step", "", *table(headers, rows), "", *notes]


def header() -> str:
    props = torch.cuda.get_device_properties(0)
    return (
        f"**{props.name}** (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB) | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        print(f"gpu_check needs an NVIDIA GPU, but torch {torch.__version__} {why}; nothing was run.", file=sys.stderr)
        return 2
    import dfp.cuda

    try:
        dfp.cuda.ensure_available()
    except RuntimeError as err:
        print(f"gpu_check: dfp.cuda cannot run here: {err}; nothing was run.", file=sys.stderr)
        return 2

    started = time.perf_counter()
    report: list[str] = []

    def emit(section: list[str]) -> None:
        print("\n".join(section), flush=True)
        report.extend(section)

    emit(["# dfp.cuda GPU check", "", header(), ""])
    passed = True
    if not args.skip_tests:
        passed, summary = run_tests()
        verdict = "passed" if passed else "FAILED"
        emit(["## GPU tests", "", f"`pytest {' '.join(GPU_TESTS)}`: {verdict}", "", "```", summary, "```", ""])
    budget = 0.3 if args.quick else 1.0
    emit(gemm_table((4096,) if args.quick else (4096, 8192), budget) + [""])
    emit(quantize_table(budget) + [""])
    emit(conv_table(CONV_LAYERS[1:3] if args.quick else CONV_LAYERS, budget) + [""])
    emit(step_table(budget) + [""])
    emit([f"Total: {time.perf_counter() - started:.0f} s."])
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(report) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
