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


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU model name and flags from /proc/cpuinfo (Linux); empty elsewhere."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def machine() -> str:
    """The CPU model, the SIMD extensions that matter to int16 GEMM, and the CPU count."""
    model, flags = _cpuinfo()
    simd = [f for f in ("avx2", "fma", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    cpu = model or platform.processor() or platform.machine()
    return f"{cpu} ({', '.join(simd) or platform.machine()}; {os.cpu_count()} logical CPUs)"


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
