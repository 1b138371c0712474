"""Compiling dfp's CUDA kernels at run time and launching them on torch tensors.

Nothing CUDA is built at install time. On first use a kernel is compiled with NVRTC for
the GPU at hand, through ``torch.cuda._compile_kernel`` where this torch has it (one
compile per kernel: it takes one kernel name), else through ``cupy.RawModule`` (one
compile per file: cupy caches by source), and kept per (device, compute capability,
file, kernel, options). Launches go to torch's current stream and read and write torch
tensors in place (by pointer with torch's compiler, through DLPack with cupy's): no copies.

Kernel arguments are tensors (passed as pointers), Python ints (C ``int``, 32-bit) and
Python floats (C ``double``), which is what ``torch.cuda._compile_kernel``'s launcher
passes; the ``.cu`` files declare their parameters accordingly.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._errors import BackendUnavailableError
from .sources import read_source, source_dir

INT32_MAX = 2**31 - 1
NVRTC_OPTIONS = ("-std=c++17",)  # never --use_fast_math: the contract needs IEEE fp32 without flush to zero
# Where NVIDIA's pip wheels put libnvrtc, inside the ``nvidia`` namespace package: the
# CUDA 13 wheels (what torch >= 2.14 brings by default) in cu13/lib, the CUDA 12 wheels
# (nvidia-cuda-nvrtc-cu12) in cuda_nvrtc/lib.
NVRTC_WHEEL_DIRS = ("cu13/lib", "cuda_nvrtc/lib")

Launch = Callable[[tuple[int, int, int], tuple[int, int, int], Sequence[Any]], None]


@dataclass(frozen=True)
class KernelKey:
    """What identifies one compiled kernel."""

    device: int
    capability: tuple[int, int]
    file: str
    name: str
    defines: tuple[tuple[str, int], ...] = ()

    def options(self) -> list[str]:
        return [*NVRTC_OPTIONS, *(f"-D{name}={value}" for name, value in self.defines)]


class TorchNvrtc:
    """NVRTC through ``torch.cuda._compile_kernel`` (pointers of torch tensors, torch's stream)."""

    name = "torch.cuda._compile_kernel"

    @staticmethod
    def available() -> bool:
        return hasattr(torch.cuda, "_compile_kernel")

    def compile(self, key: KernelKey) -> Launch:
        with torch.cuda.device(key.device), _cuda_home_for_nvrtc():
            kernel = torch.cuda._compile_kernel(
                read_source(key.file),
                key.name,
                compute_capability=f"{key.capability[0]}{key.capability[1]}",
                cuda_include_dirs=[str(source_dir())],
                nvcc_options=key.options(),
            )

        def launch(grid, block, args):
            with torch.cuda.device(key.device):
                kernel(grid=grid, block=block, args=list(args), shared_mem=0, stream=torch.cuda.current_stream())

        return launch


@contextlib.contextmanager
def _cuda_home_for_nvrtc():
    """torch.cuda._compile_kernel passes ``$CUDA_HOME/include`` to NVRTC and raises where no
    CUDA toolkit is installed (a pip-installed torch needs none). dfp's sources include no
    CUDA header, so without a toolkit any directory will do: the sources' own."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is not None:
        yield
        return
    cpp_extension.CUDA_HOME = str(source_dir())
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = None


class CupyNvrtc:
    """NVRTC through ``cupy.RawModule``; tensors cross by DLPack, on torch's current stream.
    cupy keeps compiled modules by source and options (in memory and in its disk cache), not
    by kernel name, so the kernels of one file share one NVRTC compile."""

    name = "cupy.RawModule"

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("cupy") is not None

    def compile(self, key: KernelKey) -> Launch:
        import cupy
        import numpy as np

        with cupy.cuda.Device(key.device):
            module = cupy.RawModule(
                code=read_source(key.file), options=(*key.options(), f"-I{source_dir()}"), backend="nvrtc"
            )
            kernel = module.get_function(key.name)

        def convert(arg):
            if isinstance(arg, torch.Tensor):  # detached: DLPack refuses tensors that require grad
                return cupy.from_dlpack(arg.detach())
            if isinstance(arg, int):  # bool included
                return np.int32(arg)
            if isinstance(arg, float):
                return np.float64(arg)
            raise TypeError(f"unsupported kernel argument of type {type(arg).__name__}")

        def launch(grid, block, args):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(key.device).cuda_stream, key.device)
            with cupy.cuda.Device(key.device), stream:
                kernel(grid, block, tuple(convert(a) for a in args))

        return launch


COMPILERS = (TorchNvrtc(), CupyNvrtc())


def nvrtc_library(nvidia_dirs: Sequence[str | os.PathLike] | None = None) -> str | None:
    """The NVRTC shared library to load: ``$DFP_NVRTC_LIBRARY``, else the first
    ``libnvrtc.so*`` of the NVIDIA wheels (under ``nvidia_dirs``, by default the
    directories of the installed ``nvidia`` package; see NVRTC_WHEEL_DIRS), else the
    system's (by name); None where there is none."""
    if os.environ.get("DFP_NVRTC_LIBRARY"):
        return os.environ["DFP_NVRTC_LIBRARY"]
    for root in _nvidia_package_dirs() if nvidia_dirs is None else nvidia_dirs:
        for sub in NVRTC_WHEEL_DIRS:
            found = sorted(Path(root, sub).glob("libnvrtc.so*"))
            if found:
                return str(found[0])
    return ctypes.util.find_library("nvrtc")


def _nvidia_package_dirs() -> list[str]:
    """The directories of the ``nvidia`` namespace package (the wheels may install it in several)."""
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec is not None else []


def ensure_cuda() -> None:
    """A clear error when there is no CUDA device for dfp's kernels."""
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise BackendUnavailableError(
            f"dfp.cuda needs an NVIDIA GPU, but torch {torch.__version__} {why}. Run on CPU tensors "
            "(the compiled CPU backend), or install a CUDA build of torch on a machine with a GPU."
        )


def compilers() -> list:
    """The run-time compilers this environment has, in order of preference."""
    found = [candidate for candidate in COMPILERS if candidate.available()]
    if not found:
        raise BackendUnavailableError(
            f"dfp.cuda compiles its kernels at run time with NVRTC, through torch.cuda._compile_kernel or cupy, "
            f"and neither is here: torch {torch.__version__} has no torch.cuda._compile_kernel and cupy is not "
            "installed. Install cupy for your CUDA version (`pip install cupy-cuda12x`, or `pip install dfp[cuda]`), "
            "or a torch that has torch.cuda._compile_kernel."
        )
    return found


class KernelCache:
    """Compiled kernels by KernelKey; compiles each once (thread-safe), with the first
    compiler that succeeds."""

    def __init__(self, compilers_fn: Callable[[], list] = compilers):
        self._compilers_fn = compilers_fn
        self._kernels: dict[KernelKey, Launch] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kernels)

    def get(self, key: KernelKey) -> Launch:
        launch = self._kernels.get(key)
        if launch is not None:
            return launch
        with self._lock:
            if key not in self._kernels:
                self._kernels[key] = self._compile(key)
            return self._kernels[key]

    def _compile(self, key: KernelKey) -> Launch:
        errors = []
        for candidate in self._compilers_fn():
            try:
                launch = candidate.compile(key)
            except Exception as err:  # noqa: BLE001 (each compiler has its own error types; all are reported below)
                errors.append(f"with {candidate.name}: {type(err).__name__}: {err}")
                continue
            if errors:  # a fallback works, but the preferred compiler's failure is a bug to report
                warnings.warn(
                    f"dfp.cuda compiled {key.name} of {key.file} with {candidate.name} after: " + "; ".join(errors),
                    RuntimeWarning,
                    stacklevel=3,
                )
            return launch
        raise RuntimeError(
            f"dfp.cuda could not compile kernel {key.name} of {key.file} for sm_{key.capability[0]}"
            f"{key.capability[1]}: " + "; ".join(errors)
        )


_CACHE = KernelCache()


def kernel(file: str, name: str, device: torch.device | int, **defines: int) -> Launch:
    """The launcher of kernel ``name`` of ``file`` for ``device``, compiled on first use."""
    ensure_cuda()
    index = device if isinstance(device, int) else device.index
    if index is None:  # torch.device("cuda"): the current device, as torch's own ops take it
        index = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    return _CACHE.get(KernelKey(index, capability, file, name, tuple(sorted(defines.items()))))


def check_int32(**sizes: int) -> None:
    """Kernel size arguments are C ints: a clear error instead of a silent wrap-around."""
    for name, value in sizes.items():
        if not 0 <= value <= INT32_MAX:
            raise ValueError(
                f"dfp.cuda: {name}={value} does not fit the kernels' 32-bit sizes; split the operation into "
                f"parts below 2**31 elements"
            )


def blocks_for(count: int, threads: int, cap: int = 65535) -> int:
    """Blocks of ``threads`` for ``count`` items, at most ``cap`` (grid-stride loops do the rest)."""
    return max(1, min(cap, -(-count // threads)))
