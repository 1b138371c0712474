"""Register peaks of one core for every multiply-add path it has, and the fraction of
them that a measured rate reaches: the yardstick for dfp and for every baseline.

The probes (``dfp._C.peak_gmacs``, csrc/cpu/peak_*.cpp) run loops of independent
multiply-adds on registers only, each in a file compiled with its own ISA's flags and
called only when cpuid reports the ISA: fp32 FMA on ymm and zmm, int16 vpmaddwd+vpaddd on
ymm and zmm, vpdpwssd on zmm, bf16 vdpbf16ps on zmm, and the AMX tile products (int8
tdpbssd, bf16 tdpbf16ps) where the core has them. The best of many short runs is
kept: another process on the core can only make a probe slower.
"""

from __future__ import annotations

import os

FP32 = ("fp32 vfmadd231ps ymm", "fp32 vfmadd231ps zmm")
BF16 = "bf16 vdpbf16ps zmm"
# oneDNN runs bf16 convolutions and matmuls on AMX tiles where the core has them (Intel
# from Sapphire Rapids), at about 30x vdpbf16ps's rate: there, the bf16 baseline's peak.
BF16_AMX = "bf16 tdpbf16ps amx"
# dfp's CPU path -> the probe of the instructions its micro-kernel runs.
INT16_OF_ISA = {
    "avx512_vnni": "int16 vpdpwssd zmm",
    "avx512bw": "int16 vpmaddwd+vpaddd zmm",
    "avx2": "int16 vpmaddwd+vpaddd ymm",
}


def _compiled_core():
    """dfp._C where the compiled CPU backend is the one in use, else None."""
    if os.environ.get("DFP_BACKEND", "cpu") != "cpu":
        return None
    try:
        from dfp import _C
    except ImportError:
        return None
    return _C


def measure(quick: bool = False) -> dict[str, float]:
    """GMAC/s of one core per path, best of a few probes; {} without the compiled core
    (or with another dfp backend)."""
    _C = _compiled_core()
    if _C is None:
        return {}
    # The probes run on the calling thread alone, about 10 ms each: many short runs, so
    # that on a shared machine the best of them still finds the core to itself.
    if hasattr(_C, "peak_gmacs"):
        runs = [dict(_C.peak_gmacs(2_000_000)) for _ in range(5 if quick else 20)]
    elif hasattr(_C, "peak_gmacs_avx2"):  # an older build of the core
        runs = [dict(zip(("int16 vpmaddwd+vpaddd ymm", FP32[0]), _C.peak_gmacs_avx2())) for _ in range(5)]
    else:
        return {}
    return {name: max(run[name] for run in runs) for name in runs[0]}


def micro_kernel(headroom: int, quick: bool = False) -> tuple[str, float] | tuple[None, None]:
    """(name, GMAC/s) of dfp's wide micro-kernel alone on one core, its tile in L1 and its
    chains as long as ``headroom`` allows (``dfp._C.micro_kernel_gmacs``), best of a few
    runs: what no GEMM shape can exceed here; (None, None) without the compiled core."""
    _C = _compiled_core()
    if _C is None or not hasattr(_C, "micro_kernel_gmacs"):  # none, or an older build
        return None, None
    runs = [_C.micro_kernel_gmacs(headroom) for _ in range(5 if quick else 20)]
    return max(runs, key=lambda run: run[1])


def fp32_peak(peaks: dict[str, float]) -> float | None:
    """The best fp32 FMA peak (ymm or zmm): what an fp32 GEMM can reach at best."""
    return max((peaks[name] for name in FP32 if name in peaks), default=None)


def bf16_path(peaks: dict[str, float]) -> tuple[str, float] | tuple[None, None]:
    """(probe, GMAC/s) of the bf16 instructions torch's oneDNN runs: AMX tiles where the
    core has them, else vdpbf16ps; (None, None) on cores without native bf16."""
    name = next((n for n in (BF16_AMX, BF16) if n in peaks), None)
    return (name, peaks[name]) if name else (None, None)


def bf16_peak(peaks: dict[str, float]) -> float | None:
    """The peak of bf16_path; None on cores without native bf16 dot products."""
    return bf16_path(peaks)[1]


def int16_peak(peaks: dict[str, float], isa: str | None) -> tuple[str, float] | tuple[None, None]:
    """(probe, GMAC/s) of the int16 instructions that dfp's path ``isa`` runs."""
    name = INT16_OF_ISA.get(isa or "")
    return (name, peaks[name]) if name in peaks else (None, None)


def fraction(gmacs: float, peak_gmacs: float | None, threads: int) -> str:
    """``gmacs`` (GMAC/s on ``threads`` threads) as a percentage of ``threads`` cores' peak."""
    return f"{100 * gmacs / (peak_gmacs * threads):.0f}%" if peak_gmacs else "-"


def describe(peaks: dict[str, float], isa: str | None) -> str:
    """One line: every measured peak and the ratios that bound dfp's speed-ups."""
    if not peaks:
        return "Register peaks: not measured (no compiled dfp core)."
    cells = ", ".join(f"{name} {value:.1f}" for name, value in peaks.items())
    line = f"Register peaks of one core, measured now (GMAC/s): {cells}."
    fp32 = fp32_peak(peaks)
    name, int16 = int16_peak(peaks, isa)
    if fp32 and int16:
        line += f" dfp's path ({isa}) runs {name}: {int16 / fp32:.2f}x the fp32 peak"
        bf16_name, bf16 = bf16_path(peaks)
        line += f", {int16 / bf16:.2f}x the bf16 peak ({bf16_name})." if bf16 else "; no native bf16."
    return line
