"""Timing shared by the report: interleaved medians and a header naming the machine.

These machines are shared and noisy, so contenders are timed in turns (a burst of load
hits all of them alike) and each is reported as the median of its samples.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from collections.abc import Callable, Mapping
from time import perf_counter


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], repeats: int, min_sample_s: float = 0.02
) -> dict[str, list[float]]:
    """``repeats`` samples of the seconds per call of each function, the functions timed
    in turns: sample ``r`` of every function comes from the same round.

    Each gets a warm-up call (one-time costs: thread pool start, lazy init, page faults)
    and a second, timed one that sets how many calls make one sample: fast calls are
    batched so that a sample spans at least ``min_sample_s`` and perf_counter's
    resolution and Python's call overhead stay negligible.
    """
    batch = {}
    for name, fn in fns.items():
        fn()
        t0 = perf_counter()
        fn()
        batch[name] = max(1, math.ceil(min_sample_s / max(perf_counter() - t0, 1e-9)))
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # Rotate the order so no contender always runs right after the same neighbour
        # (whose caches, clocks and memory traffic it would inherit).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = fns[name], batch[name]
            t0 = perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((perf_counter() - t0) / n)
    return samples


def speedup(times: list[float], baseline: list[float]) -> float:
    """How many times faster than ``baseline``: the median over rounds of
    ``baseline[r] / times[r]``. Pairing the samples of one round cancels load changes
    slower than a round, which a ratio of two medians would keep."""
    return statistics.median(b / t for t, b in zip(times, baseline))


def speedup_cell(times: list[float], baseline: list[float]) -> str:
    """The paired speed-up with the middle half of its rounds' ratios, "1.19x (1.10-1.25)":
    on a shared machine the spread says whether a ratio near a bound is above it in most
    rounds or only in the median (one round: the ratio alone)."""
    ratios = [b / t for t, b in zip(times, baseline)]
    cell = f"{statistics.median(ratios):.2f}x"
    if len(ratios) < 2:
        return cell
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{cell} ({q1:.2f}-{q3:.2f})"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux; empty elsewhere):
    "model name", "vendor_id", "cpu family", "model", "flags", ..."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


# AMD's (family, model range) -> core; a VM often reports only "AMD EPYC" as the model name.
_AMD_CORES = (
    (23, range(0x30), "Zen/Zen+"),
    (23, range(0x30, 0x100), "Zen 2"),
    (25, range(0x10), "Zen 3"),
    (25, range(0x10, 0x20), "Zen 4"),
    (25, range(0x20, 0x60), "Zen 3"),
    (25, range(0x60, 0x80), "Zen 4"),
    (25, range(0xA0, 0xB0), "Zen 4c"),
    (26, range(0x100), "Zen 5"),
)


def core_name(fields: dict[str, str] | None = None) -> str:
    """The core, from vendor, family and model: e.g. "AMD Zen 4, family 25 model 17";
    "" when /proc/cpuinfo says nothing."""
    fields = _cpuinfo() if fields is None else fields
    vendor = fields.get("vendor_id", "")
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return ""
    ids = f"family {family} model {model}"
    if vendor == "AuthenticAMD":
        core = next((name for fam, models, name in _AMD_CORES if fam == family and model in models), None)
        return f"AMD {core}, {ids}" if core else f"AMD, {ids}"
    return f"{'Intel' if vendor == 'GenuineIntel' else vendor}, {ids}"


def flags_class(flags: set[str]) -> str:
    """The class of core for dfp's targets: which int16 and bf16 paths it has."""
    if "avx512_vnni" in flags:
        cls = "AVX-512 VNNI"
        if "avx512_bf16" in flags:
            cls += " + BF16"
        return cls + (" + AMX" if "amx_tile" in flags else "")
    if "avx512bw" in flags:
        return "AVX-512 BW, no VNNI"
    if "avx2" in flags:
        return "AVX2 only" + (" + AVX-VNNI" if "avx_vnni" in flags else "")
    return "no AVX2"


def machine() -> str:
    """The CPU model name, its core and class, the SIMD extensions that matter to int16
    GEMM, and the CPU count."""
    fields = _cpuinfo()
    flags = set(fields.get("flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    core = core_name(fields)
    where = f"core {core}; " if core else ""
    extensions = ", ".join(simd) or platform.machine()
    return f"{cpu} ({where}class {flags_class(flags)}: {extensions}; {os.cpu_count()} logical CPUs)"


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
