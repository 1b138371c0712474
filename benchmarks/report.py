"""Markdown tables of dfp's GEMM, quantization, layer and training-step throughput against
torch (and numpy's BLAS), measured in the same run, with the register peaks of the core:
`python -m benchmarks.report [--threads 1 2] [--quick] [--tables ...] [--output FILE.md]`.

Ratios are the numbers to read: absolute rates move with the load of a shared machine.
Each ratio is the median over rounds of the two contenders' times in the same round.
"""

from __future__ import annotations

import os

# Large CPU tensors on transparent huge pages (torch's own switch, read at its first
# allocation): without it every fresh multi-megabyte output is paged in 4 KiB at a time,
# which here cost 3x the whole quantization pass and slows torch's ops as much. It
# applies to dfp and torch alike; THP_MEM_ALLOC_ENABLE=0 shows the default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import subprocess
import sys
from pathlib import Path
from statistics import median

import torch

from . import peaks as peak_probes
from .peaks import bf16_path, bf16_peak, fp32_peak, fraction
from .step import MODELS as STEP_MODELS
from .timing import interleaved_times, machine, speedup_cell, today

FULL = {"sizes": (256, 512, 1024, 2048), "repeats": 7, "min_sample_s": 0.05, "max_call_s": 2.0, "quant_shape": None}
# --quick: a smoke test that must finish in well under a minute on 2 cores.
QUICK = {"sizes": (256, 512, 1024), "repeats": 5, "min_sample_s": 0.005, "max_call_s": 0.25, "quant_shape": (256, 4096)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default: 1 2)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats: a smoke test")
    p.add_argument("--output", metavar="FILE.md", help="also write the tables to this file")
    p.add_argument("--isa", help="force dfp's CPU path (sets DFP_CPU_ISA before importing dfp), e.g. avx2")
    p.add_argument(
        "--tables",
        nargs="+",
        choices=("gemm", "quantize", "layers", "step", "fidelity"),
        default=["gemm", "quantize", "layers", "step"],
        help="fidelity: SQNR against fp64 of every product per format (not timed; not in the default set)",
    )
    p.add_argument(
        "--cifar10",
        metavar="DIR_OR_TAR",
        default=os.environ.get("DFP_CIFAR10"),
        help="a local CIFAR-10 copy for the fidelity table's captured step (default: $DFP_CIFAR10)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=tuple(STEP_MODELS),
        default=list(STEP_MODELS),
        help="the step table's models (default: both)",
    )
    p.add_argument(
        "--max-step-s",
        type=float,
        help="the step table skips bf16 on a model where its rate on the previous model predicts a longer step, "
        "or where its first step took longer (default 20; 2 with --quick)",
    )
    p.add_argument(
        "--step-rounds",
        type=_positive_int,
        help="the step table's rounds, each timing every format once (default 5; 3 with --quick): on a "
        "shared host whose speed drifts, more rounds make the paired medians steadier",
    )
    p.add_argument("--cache-dir", help="where CIFAR-10's decoded images are cached (see dfp.data.load)")
    p.add_argument("--headroom", type=int, default=2, help="DFPSpec headroom of the GEMM operands (default 2)")
    p.add_argument(
        "--int16-peak-gmacs",
        type=float,
        metavar="GMAC/S",
        help="int16 multiply-add peak of one core for dfp's fraction of peak "
        "(default: measured on registers for the path dfp runs, see benchmarks/peaks.py)",
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        help="skip a contender whose call, predicted from its rate on the previous shape, would take longer",
    )
    # Divides every dimension (and the quantized tensor's size): tiny shapes for trying
    # the script on the slow reference backend.
    p.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def speed(times: dict[str, list[float]], name: str, baseline: str) -> str:
    return speedup_cell(times[name], times[baseline]) if name in times and baseline in times else "-"


def gemm_table(args, cfg, cases) -> list[str]:
    shapes = [(s, s, s) for s in cfg["sizes"]] + list(cases.CNN_SHAPES)
    shapes = [tuple(max(1, d // args.shrink) for d in shape) for shape in shapes]
    headers = ["M, K, N", "threads", *(f"{c} GOP/s (% of peak)" for c in cases.GEMM_CONTENDERS)]
    ratios = (("dfp gemm", "torch fp32"), ("dfp gemm", "numpy fp32"), ("dfp gemm", "torch bf16"), ("dfp matmul", "torch fp32"))  # fmt: skip
    headers += [f"{a} / {b}" for a, b in ratios]
    # GMAC/s of one core that each contender's instructions reach at best
    peaks = getattr(args, "peaks", {})
    peak_of = {"dfp gemm": args.int16_peak_gmacs, "dfp matmul": args.int16_peak_gmacs}
    peak_of.update({"torch fp32": fp32_peak(peaks), "numpy fp32": fp32_peak(peaks), "torch bf16": bf16_peak(peaks)})
    rows, last_gops, skipped = [], {}, set()
    for shape in shapes:
        ops = cases.gemm_ops(*shape)
        for threads in args.threads:
            torch.set_num_threads(threads)
            # A contender too slow for this shape (torch bf16 without native bf16 runs
            # at about 1 GOP/s: a minute at 2048) is skipped, judged by its last rate.
            names = [
                c for c in cases.GEMM_CONTENDERS
                if ops / (last_gops.get((c, threads), float("inf")) * 1e9) <= cfg["max_call_s"]
            ]  # fmt: skip
            skipped.update(set(cases.GEMM_CONTENDERS) - set(names))
            fns = cases.gemm_contenders(*shape, headroom=args.headroom, names=names)
            times = interleaved_times(fns, cfg["repeats"], cfg["min_sample_s"])
            gops = {c: ops / median(t) / 1e9 for c, t in times.items()}
            last_gops.update({(c, threads): g for c, g in gops.items()})
            row = [", ".join(map(str, shape)), str(threads)]
            row += [
                f"{gops[c]:.3g} ({fraction(gops[c] / 2, peak_of[c], threads)})" if c in gops else "skipped"
                for c in cases.GEMM_CONTENDERS
            ]  # GMAC/s = GOP/s / 2
            row += [speed(times, a, b) for a, b in ratios]
            rows.append(row)
            print(f"  gemm {shape} t{threads} done", file=sys.stderr)
    int16, fp32, bf16 = (f"{p:.1f}" if p else "-" for p in (args.int16_peak_gmacs, fp32_peak(peaks), bf16_peak(peaks)))
    bf16_name = bf16_path(peaks)[0] or "vdpbf16ps"
    note = (
        f"GEMM, GOP/s (2*M*N*K / median time), DFPSpec(headroom={args.headroom}) per tensor. % of peak: of threads x "
        f"one core's register peak of the contender's instructions (dfp: {int16} GMAC/s, the int16 path it runs; "
        f"torch and numpy fp32: the best fp32 FMA, {fp32}; torch bf16: {bf16_name}, {bf16}, '-' without native "
        "bf16). Ratios are paired medians of the same rounds (in brackets their first to third quartile) "
        "against the baseline each column names: torch fp32 = torch.mm (MKL in x86 wheels, vendor-gated on "
        f"AMD), numpy fp32 = {cases.numpy_blas()}, torch bf16 = torch.mm on bf16 (oneDNN)."
    )
    kernel, kernel_gmacs = peak_probes.micro_kernel(args.headroom, args.quick)
    if kernel:
        note += (
            f" dfp's micro-kernel alone ({kernel}, its tile in L1, chains of headroom {args.headroom}) runs at "
            f"{kernel_gmacs:.1f} GMAC/s, {fraction(kernel_gmacs, args.int16_peak_gmacs, 1)} of the int16 peak: "
            "the bound of every dfp GEMM shape at this headroom."
        )
    lines = [note, ""]
    lines += table(headers, rows)
    if skipped:
        lines += ["", f"skipped: predicted over {cfg['max_call_s']} s per call ({', '.join(sorted(skipped))})"]
    return lines


def quantize_table(args, cfg, cases) -> list[str]:
    rows_n, cols = cfg["quant_shape"] or cases.QUANT_SHAPE
    # Columns stay a multiple of 32: the naive per-block chain needs whole blocks.
    shape = (max(1, rows_n // args.shrink), max(32, cols // args.shrink // 32 * 32))
    x = cases.quant_input(shape)
    gbytes = x.numel() * x.element_size() / 1e9
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for group in cases.QUANT_GROUPS:
            for rounding in cases.ROUNDINGS:
                spec = cases.quant_spec(group, rounding, args.headroom)
                times = interleaved_times(cases.quant_contenders(x, spec), cfg["repeats"], cfg["min_sample_s"])
                row = [group, rounding, str(threads)]
                row += [f"{gbytes / median(times[c]):.2f}" for c in ("dfp", "naive torch")]
                rows.append(row + [speed(times, "dfp", "naive torch")])
        print(f"  quantize t{threads} done", file=sys.stderr)
    title = (
        f"Quantize {shape[0]}x{shape[1]} fp32, GB/s of fp32 input (median time), headroom {args.headroom}; "
        "dfp / naive: paired median (first to third quartile)"
    )
    lines = [title, ""]
    headers = ["exponent per", "rounding", "threads", "dfp.quantize GB/s", "naive torch GB/s", "dfp / naive"]
    return lines + table(headers, rows)


def header(dfp) -> str:
    backend = os.environ.get("DFP_BACKEND") or "cpu"
    if backend == "cpu":  # the ISA matters only to the compiled backend
        try:
            backend += f", ISA {dfp.cpu_isa()}, threads of {Path(dfp.backends.cpu.thread_runtime()).name}"
        except dfp.BackendUnavailableError:  # no compiled core: say so, run what can run
            backend += ", compiled core unavailable"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    malloc = "freed memory kept" if dfp.allocator.freed_memory_kept() else "defaults"
    return (
        f"**{machine()}** | torch {torch.__version__} | dfp backend {backend} | THP_MEM_ALLOC_ENABLE={thp} | "
        f"malloc {malloc} | {today()}"
    )


def active_isa(dfp) -> str | None:
    """The CPU path dfp's compiled core runs; None with another backend or without it."""
    if os.environ.get("DFP_BACKEND", "cpu") != "cpu":
        return None
    try:
        return dfp.cpu_isa()
    except dfp.BackendUnavailableError:
        return None


def avx2_rerun(dfp, argv: list[str]) -> list[str]:
    """The GEMM table again with DFP_CPU_ISA=avx2, when the default path is another one
    and this CPU can run AVX2, in a fresh process: the ISA is fixed when dfp loads."""
    if os.environ.get("DFP_BACKEND", "cpu") != "cpu":
        return []
    from dfp.backends.cpu import supported_isas

    try:
        if dfp.cpu_isa() == "avx2" or "avx2" not in supported_isas():
            return []
    except dfp.BackendUnavailableError:
        return []
    # argparse keeps the last value of a repeated option, so these override the user's.
    argv = [*argv, "--isa", "avx2", "--tables", "gemm", "--output", os.devnull]
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.report", *argv]
    done = subprocess.run(cmd, check=False, cwd=root, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return ["", f"(the forced-AVX2 run failed with exit status {done.returncode}; see its errors above)"]
    return ["", *done.stdout.rstrip("\n").splitlines()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.isa:
        os.environ["DFP_CPU_ISA"] = args.isa
    # Imported only now so that DFP_CPU_ISA is set before dfp loads its core.
    import dfp

    from . import cases, fidelity, layers, step

    dfp.keep_freed_memory()  # as the harness trains (see dfp.allocator)

    cfg = {**(QUICK if args.quick else FULL)}
    if args.max_call_s is not None:
        cfg["max_call_s"] = args.max_call_s
    lines = [header(dfp), ""]
    isa = active_isa(dfp)
    args.peaks = peak_probes.measure(args.quick) if {"gemm", "step"} & set(args.tables) else {}
    if args.peaks:
        lines += [peak_probes.describe(args.peaks, isa), ""]
    if not args.int16_peak_gmacs:
        args.int16_peak_gmacs = peak_probes.int16_peak(args.peaks, isa)[1]
    print("\n".join(lines), flush=True)
    tables = (
        ("gemm", gemm_table),
        ("quantize", quantize_table),
        ("layers", lambda a, c, _: layers.layer_table(a, c)),
        ("step", lambda a, c, _: step.step_table(a, a.peaks, isa)),
        ("fidelity", lambda a, c, _: fidelity.report(a)),
    )
    for name, make in tables:
        if name in args.tables:
            part = make(args, cfg, cases) + [""]
            print("\n" + "\n".join(part), flush=True)
            lines += part
    if not args.isa and "gemm" in args.tables:
        part = avx2_rerun(dfp, argv)
        print("\n".join(part), flush=True)
        lines += part
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines).rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
