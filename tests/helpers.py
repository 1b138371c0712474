"""Small helpers shared by the tests."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


@contextmanager
def backend_env(name: str):
    """Run ops on backend ``name`` inside the block."""
    before = os.environ.get("DFP_BACKEND")
    os.environ["DFP_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["DFP_BACKEND"]
        else:
            os.environ["DFP_BACKEND"] = before


def on_reference(fn, *args, **kwargs):
    """fn(*args) computed by the reference backend (the oracle)."""
    with backend_env("reference"):
        return fn(*args, **kwargs)


def wide_range(shape, seed=0) -> torch.Tensor:
    """Gaussian values with magnitudes spread over many binades (exercises every group)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())


def int16_operand(shape, headroom, seed=0) -> torch.Tensor:
    """Random mantissas over the whole symmetric range of ``headroom``."""
    m = 2 ** (15 - headroom) - 1
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-m, m + 1, shape, generator=g, dtype=torch.int16)


def random_bits(index: int, seed: int) -> int:
    """design.md's 23 random bits of element ``index``, in plain Python integers."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed &= 2**64 - 1
    return (mix((index & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF)) ^ mix((index >> 32) ^ (seed >> 32))) >> 9
