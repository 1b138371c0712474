"""A convolution's patch matrix on CUDA without the matrix (implicit GEMM): the GEMM
kernels read each group's patches in place from the zero-padded channels-last image
through two int32 offset tables, one entry per patch row (output pixel (n, oh, ow)) and
one per column (tap (kh, kw), channel), element (m, k) at ``rows[m] + columns[k]``
(``DFP_GATHER`` in csrc/cuda/gemm_int16.cu, ``DFP_MMA_GATHER`` in gemm_mma.cu). The
generic convolution code (``dfp._ops``) takes the patches from here and hands them to
``dfp.cuda.gemm``, with its exponents, chains and K-blocks, so the bits are those of the
im2col matrix.

``DFP_CUDA_CONV`` chooses: ``implicit``, or ``im2col`` (the same matrix materialised,
then the plain GEMM). The default stays ``im2col`` until the implicit kernels have run on
a GPU: they compile without warnings here, their offset tables give the im2col matrix
(tests/test_cuda_patches.py), and their launches, the kernels stood in for by the
reference's arithmetic on the CPU, give the reference's bits (tests/test_cuda_host.py).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from .._patches import im2col, output_size
from .loader import check_int32

MODES = ("implicit", "im2col")
DEFAULT_MODE = "im2col"


def mode() -> str:
    """``DFP_CUDA_CONV`` if set (checked), else the default."""
    chosen = os.environ.get("DFP_CUDA_CONV") or DEFAULT_MODE
    if chosen not in MODES:
        raise ValueError(f"DFP_CUDA_CONV={chosen!r} is not a way to read a convolution's patches; choose one of "
                         f"{', '.join(MODES)}")  # fmt: skip
    return chosen


class Gathered(NamedTuple):
    """An int16 matrix read in place: element (i, j) is ``data[rows[i] + columns[j]]``.
    It answers ``dtype``, ``shape``, ``device``, ``dim()`` and ``t()`` as a 2-D tensor
    does, so the GEMM's checks take it as one. What the kernels' loads need to know of the
    layout is known from the shapes that made the tables (reading them would stall the
    host): which axis has neighbouring elements side by side, and whether each row's
    columns come in runs of 8 neighbours that start 16 bytes aligned."""

    data: torch.Tensor  # int16, read flat
    rows: torch.Tensor  # int32 (rows,)
    columns: torch.Tensor  # int32 (columns,)
    unit_rows: bool  # rows[i + 1] = rows[i] + 1
    unit_columns: bool  # columns[j + 1] = columns[j] + 1 (within runs of a tap's channels, for patches)
    runs_of_8: bool  # every row offset and every 8th column offset a multiple of 8, the 7 after it following

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.numel(), self.columns.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return 2

    def t(self) -> Gathered:
        return Gathered(self.data, self.columns, self.rows, self.unit_columns, self.unit_rows, False)

    def materialize(self) -> torch.Tensor:
        """The matrix itself (contiguous): what the kernels read."""
        return self.data.view(-1)[self.rows.long().view(-1, 1) + self.columns.long().view(1, -1)]

    @staticmethod
    def of(t: torch.Tensor) -> Gathered:
        """A strided 2-D tensor as offset tables over its memory (the plain operand of a
        GEMM whose other operand is gathered)."""
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
        check_int32(operand_extent=extent)
        data = t.as_strided((extent,), (1,), t.storage_offset())
        rows, columns = (
            _recorded(_stride_offsets(size, stride, t.device)) for size, stride in zip(t.shape, t.stride())
        )
        runs = t.stride(1) == 1 and t.shape[1] % 8 == 0 and t.stride(0) % 8 == 0 and data.data_ptr() % 16 == 0
        return Gathered(data, rows, columns, t.stride(0) == 1, t.stride(1) == 1, runs)


def patches(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], groups: int
) -> list[Gathered] | torch.Tensor:
    """The patch matrix (N*OH*OW, KH*KW*C/G) of each group of the contiguous padded image
    x (N, Hp, Wp, C), K ordered (kh, kw, ci) as ``dfp._patches.im2col``: read in place
    (implicit), or that matrix (``DFP_CUDA_CONV=im2col``)."""
    if mode() == "im2col":
        return im2col(x, kernel, stride, dilation, groups)
    x = x.contiguous()  # the offsets are those of the packed (N, Hp, Wp, C) layout
    check_int32(image=x.numel())
    cg = x.shape[3] // groups
    operands = []
    for g in range(groups):
        tables = _offsets(tuple(x.shape), tuple(kernel), tuple(stride), tuple(dilation), groups, g, x.device)
        rows, columns = (_recorded(t) for t in tables)
        # a row's offset is a multiple of C; its columns run along a tap's C/G channels
        runs = x.shape[3] % 8 == 0 and cg % 8 == 0 and x.data_ptr() % 16 == 0
        operands.append(Gathered(x.reshape(-1), rows, columns, False, cg > 1, runs))
    return operands


def _recorded(table: torch.Tensor) -> torch.Tensor:
    """A cached table, marked as used on the current stream: the cache may drop it (LRU)
    while a launch still reads it."""
    if table.is_cuda:
        table.record_stream(torch.cuda.current_stream(table.device))
    return table


@functools.lru_cache(maxsize=64)
def _stride_offsets(size: int, stride: int, device: torch.device) -> torch.Tensor:
    """(size,) int32: i * stride, made on ``device``."""
    return torch.arange(size, dtype=torch.int32, device=device) * stride


@functools.lru_cache(maxsize=64)
def _offsets(shape, kernel, stride, dilation, groups, g, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Group g's offset tables (int32, made on ``device``: no host copy, no sync): a patch
    row's first element, and a column's distance from it."""
    n, hp, wp, c = shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = output_size(hp, kh, sh, 0, dh), output_size(wp, kw, sw, 0, dw)
    cg = c // groups

    def axis(count: int, step: int, at: int) -> torch.Tensor:  # along dimension `at` of three
        return _stride_offsets(count, step, device).view([count if d == at else 1 for d in range(3)])

    rows = axis(n, hp * wp * c, 0) + axis(oh, sh * wp * c, 1) + axis(ow, sw * c, 2)
    columns = axis(kh, dh * wp * c, 0) + axis(kw, dw * c, 1) + axis(cg, 1, 2)
    return rows.reshape(-1), (columns + g * cg).reshape(-1)
