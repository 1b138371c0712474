"""What a measurement ran on: library versions, the dfp CPU path, threads and device.

Nothing that names the machine (no hostname, no user): the results files are meant to be
shared.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import torch

import dfp
from dfp import allocator
from dfp.backends import cpu as cpu_backend


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from ``cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def dfp_version() -> str:
    try:
        return importlib.metadata.version("dfp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (dfp is not installed as a package)"


def dfp_isa() -> str:
    """``dfp.cpu_isa()``, or why it is unavailable (the compiled core missing)."""
    try:
        return dfp.cpu_isa()
    except dfp.BackendUnavailableError as err:
        return f"unavailable: {err}"


def dfp_threads() -> str:
    """The file name of the OpenMP runtime whose threads dfp's kernels share, or why none."""
    try:
        return Path(cpu_backend.thread_runtime()).name
    except dfp.BackendUnavailableError as err:
        return f"unavailable: {err}"


def collect(device: torch.device, threads: int, world_size: int) -> dict[str, Any]:
    """The environment of a run on ``device`` with ``threads`` torch threads per process
    and ``world_size`` processes."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_model()
    return {
        "torch": torch.__version__,
        "dfp": dfp_version(),
        "dfp_cpu_isa": dfp_isa(),
        "python": platform.python_version(),
        "threads": threads,
        "dfp_threads_on": dfp_threads(),
        "device": device.type,
        "device_name": device_name,
        "cpu_model": cpu_model(),
        "world_size": world_size,
        "malloc": "glibc, freed memory kept" if allocator.freed_memory_kept() else "the C library's defaults",
    }
