"""Backends: each implements the semantics of docs/design.md on CPU tensors.

A backend is a module with

    quantize3d(x, mode, block, headroom, stochastic, seed) -> (mantissa, exponent)
        x: contiguous float32 (O, N, I); mode 0 per tensor, 1 per index of N, 2 per
        block of ``block`` along N. mantissa int16 (O, N, I); exponent int32 (1,),
        (N,) or (O, ceil(N/block), I). Raises dfp.NonFiniteError on NaN/Inf.
    gemm(a, ea, ha, b, eb, hb, kblock, bias) -> float32 (M, N)
        a int16 (M, K), b int16 (K, N), any strides; ea int32 (M, KB), eb int32
        (KB, N), KB = ceil(K / kblock); bias float32 (N,) or None.

``DFP_BACKEND`` (cpu, numba, reference) chooses one for CPU tensors; the default is
the compiled ``cpu`` backend. CUDA tensors go to ``dfp.cuda.ops`` (kernels compiled at
run time). There is no silent fallback: when the chosen backend cannot run, the op
raises an error that says what is missing and what to do.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

NAMES = ("cpu", "numba", "reference")
_MODULES = {"cpu": "dfp.backends.cpu", "numba": "dfp.backends.numba", "reference": "dfp.reference"}


# The backends that passed their check, by name: every op asks for its backend, and an
# import and a check on each call were a sizeable part of a small layer's step.
_checked: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    """The backend module called ``name``; a clear error if it cannot be used here."""
    module = _checked.get(name)
    if module is not None:
        return module
    if name not in NAMES:
        raise ValueError(f"unknown dfp backend {name!r}; choose one of {', '.join(NAMES)}")
    module = importlib.import_module(_MODULES[name])
    check = getattr(module, "ensure_available", None)
    if check is not None:
        check()
    _checked[name] = module
    return module


def active(device: torch.device | None = None) -> ModuleType:
    """The backend that runs dfp's ops on ``device`` now: ``dfp.cuda.ops`` for a CUDA
    device, else ``DFP_BACKEND`` or the default."""
    if device is not None and device.type == "cuda":
        module = importlib.import_module("dfp.cuda.ops")
        module.ensure_available()
        return module
    return get(os.environ.get("DFP_BACKEND") or "cpu")
