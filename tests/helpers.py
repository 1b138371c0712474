"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
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


def run_ranks(script, args: list[str], world_size: int, timeout: float, prefix: list[str] = ()) -> list[str]:
    """Run ``script`` as ``world_size`` gloo ranks, as torchrun would, one thread each; wait
    for all and return their output. A rank that dies leaves the others waiting in a
    collective, so they are stopped rather than left to hang; a rank that fails fails
    the test with its output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [*prefix, sys.executable, "-W", "ignore", str(script), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    logs = [p.communicate()[0] for p in procs]
    for r, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(f"rank {r} exited with {p.returncode}:\n{logs[r]}")
    return logs


# Convolutions whose input has exponents per image row and channel block, ex (N, Hp, blocks):
# (ex shape, groups, kernel, stride, dilation, taps per K-block, output width), for the
# patch-row exponents of the generic forward and of dfp.cuda (tests/test_cuda*.py).
PATCH_ROW_CASES = [
    ((2, 10, 1), 1, (3, 3), (1, 1), (1, 1), 3, 8),
    ((3, 9, 4), 2, (3, 3), (2, 2), (1, 1), 1, 3),
    ((2, 12, 2), 1, (3, 1), (1, 1), (2, 1), 1, 9),
    ((2, 11, 2), 2, (5, 3), (2, 1), (1, 1), 3, 9),
]
