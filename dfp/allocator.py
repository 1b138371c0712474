"""glibc's malloc told to keep the memory a training step frees, for the next step.

Every step allocates and frees the same tensors. By default glibc hands large freed
blocks back to the kernel (a block above its mmap threshold is unmapped, the top of the
heap trimmed), so the next step gets fresh pages, which the kernel maps and zeroes on
first touch: page faults inside whichever op writes a tensor first (batch norm, ReLU,
add). How many depends on how the heap happens to lie, so it varies from process to
process. Measured on an Intel Xeon (2 cores, torch 2.13.0, batch 128, medians of 2-3
processes per variant, docs/step.md): ResNet-20 steps 1.07-1.10x faster in fp32 and in
dfp16, ResNet-18-CIFAR steps 1.40x (fp32) and 1.22x (dfp16, one process each), and the
spread between processes of the same format 8 % -> 2 %.

This changes the whole process, so the library never does it on import: the harness and
the benchmarks call it (``--system-malloc`` leaves the defaults), and a training script
may.
"""

from __future__ import annotations

import ctypes

# mallopt(3)'s parameters, as glibc numbers them
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_kept = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process for reuse: no trimming of
    the heap, no large block mapped on its own. The process then holds on to its largest
    step's memory until it ends. Returns whether it applied: False where the C library is
    not glibc (musl, macOS, Windows), which is left as it is."""
    global _kept
    try:
        libc = ctypes.CDLL(None)  # the C library the process runs on
    except (OSError, TypeError):  # TypeError: Windows, which has no such handle
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt's parameters above are glibc's
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # -1 turns trimming off (mallopt(3)); no mmap'd blocks: large ones come from the heap too
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, -1)) and bool(mallopt(_M_MMAP_MAX, 0))
    return _kept


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` applied in this process."""
    return _kept
