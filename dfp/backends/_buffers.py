"""Output buffers of the compiled layers, reused from one call to the next.

A layer's output, its int16 copy of the input and its input gradient are megabytes each;
a fresh tensor that size comes from the kernel as new pages, which it zeroes on the
first write, on every call (glibc hands large blocks back when they are freed). Keeping
the tensors a layer wrote, and handing one out again once nothing else holds its storage,
took a dfp16 ResNet-20 step alone in its process (batch 128, 1 thread, AMD Zen 4) from
16.6k to 4.5k page faults and 0.935x the time (median of 8 A/B pairs; docs/step.md).
Like torch's CUDA caching allocator, this keeps the memory of the largest step until
``dfp.empty_cache()``.

The pool is per thread, so two threads never hand out the same tensor. Where torch has
no storage use count (``torch._C._storage_Use_Count``), buffers are not reused.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)
MAX_SHAPES = 64  # distinct (shape, dtype) kept, the least recently used dropped first


def _count(t: torch.Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


# The count of a tensor that only its holder references: measured, not assumed, as the
# storage object may or may not count itself depending on the torch version.
_ALONE = _count(torch.empty(1)) if _use_count is not None else None


class _Pool(threading.local):
    def __init__(self) -> None:
        self.by_shape: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()


_pool = _Pool()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, for a caller that overwrites every element:
    the storage of one this thread handed out before and nothing holds any more, else a
    new one. Always a new tensor object, so that what its user does to it (resize_,
    requires_grad_) never reaches the kept one."""
    if _ALONE is None:
        return torch.empty(shape, dtype=dtype)
    key = (tuple(shape), dtype)
    kept = _pool.by_shape.get(key)
    if kept is None:
        kept = _pool.by_shape[key] = []
        if len(_pool.by_shape) > MAX_SHAPES:
            _pool.by_shape.popitem(last=False)
    else:
        _pool.by_shape.move_to_end(key)
        for t in kept:
            if _count(t) == _ALONE:
                return t.detach()
    t = torch.empty(shape, dtype=dtype)
    kept.append(t)
    return t.detach()


def empty_cache() -> None:
    """Let go of the buffers this thread keeps for reuse (those still in use stay alive
    with their users)."""
    _pool.by_shape.clear()
