"""The exact DFP16 GEMM from int8 x int8 -> int32 products (``torch._int_mm``).

Tensor cores multiply int8, not int16, so each int16 mantissa is cut into two int8
limbs and one int16 product becomes four int8 products. This module does it with
plain torch ops, so the same code runs on CPU (where the tests check it bit for bit
against ``dfp.reference``) and on CUDA (where ``torch._int_mm`` is cuBLASLt's int8
GEMM). The tensor-core kernel (``csrc/cuda/gemm_mma.cu``) splits on chip instead, with a
balanced split that needs no corrections but excludes headroom 0 (see ``dfp_cuda.h``).

The split (the "offset" scheme, valid for every headroom, 0 included)
----------------------------------------------------------------------
For an int16 ``x`` in [-32767, 32767]::

    h = x >> 8            (arithmetic shift: floor(x / 256)), in [-128, 127]
    l = (x & 255) - 128   (the unsigned low byte moved to the signed range), in [-128, 127]
    x = 256 h + l + 128

Both limbs are int8. Write ``x^ = 256 h + l = x - 128``. For a chain of products
``k = 1..n`` (one row ``a`` of A, one column ``b`` of B)::

    sum a b = sum (a^ + 128)(b^ + 128) = sum a^ b^ + 128 sum a^ + 128 sum b
    sum a^ b^ = 65536 sum ha hb + 256 (sum ha lb + sum la hb) + sum la lb

so the four int8 GEMMs give ``sum a^ b^`` and two vectors (row sums of ``a^``, column
sums of ``b``, over the chain's own k) correct the offset.

The four int8 GEMMs are one ``torch._int_mm`` per chain: the limbs are stacked,
``[ha; la]`` (2M rows) times ``[hb, lb]`` (2N columns), whose four (M, N) quadrants are
the four sums.

Why nothing overflows
---------------------
- Every int8 product is at most ``128 * 128 = 2**14`` in magnitude, and one
  ``torch._int_mm`` call sums at most ``SEGMENT = 2**16`` of them (zero padding adds
  nothing), so each int32 result is at most ``2**16 * 2**14 = 2**30 < 2**31``. This
  matters: at headroom 8 the chain length is ``2**17``, and a zero mantissa has
  ``l = -128``, so a chain of zeros would sum ``2**17 * 2**14 = 2**31`` in one int32.
  Chains longer than SEGMENT are cut into segments whose results are added in int64.
- The recombination runs in int64, where every term is below ``2**48``.
- The chain sum itself is ``|S| <= L * Ma * Mb <= 2**31 - 1`` by the choice of ``L``
  (docs/design.md), so converting the int64 ``S`` to float32 rounds exactly as the
  reference's int64 chain sum does.

The float steps (chain sums times block scales added in order of increasing k, the
epilogue) are the reference's own torch ops, so the result is bit-identical to
``dfp.reference.gemm``.

torch._int_mm's limits on CUDA (cuBLASLt): more than 16 rows, K and N multiples of 8
(and at least 8). Chains are zero-padded to multiples of 8 along K, the stacked B to a
multiple of 8 columns, and the stacked A to at least 17 rows (the fallback for
``M <= 8``, where ``2M <= 16``). The CPU path gets the same padding, so the tests
exercise it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..format import exact_pow2
from ..reference import chain_length

SEGMENT = 2**16  # most int8 products summed by one torch._int_mm call (see above)
_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
_ALIGN = 8  # and K, N multiples of 8


def split_limbs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 ``x`` -> int8 ``(h, l)`` with ``x = 256 h + l + 128``, both in [-128, 127]."""
    x32 = x.to(torch.int32)
    high = x32 >> 8
    low = (x32 & 255) - 128
    return high.to(torch.int8), low.to(torch.int8)


def chain_segments(k: int, kblock: int, chain: int, segment: int = SEGMENT) -> list[tuple[int, int, bool]]:
    """``(start, stop, ends_chain)`` over ``[0, k)``: each K-block of ``kblock`` cut into chains
    of ``chain`` products from its first element (design.md), each chain into segments of at
    most ``segment`` products; ``ends_chain`` marks the last segment of a chain."""
    out = []
    for block_start in range(0, k, kblock):
        block_stop = min(block_start + kblock, k)
        for c0 in range(block_start, block_stop, chain):
            c1 = min(c0 + chain, block_stop)
            for s0 in range(c0, c1, segment):
                s1 = min(s0 + segment, c1)
                out.append((s0, s1, s1 == c1))
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _segment_major(limbs: torch.Tensor, segments: list[tuple[int, int, bool]], width: int) -> torch.Tensor:
    """int8 (R, K) -> (S, R, width): segment s's columns, zero-padded to ``width``."""
    index = torch.full((len(segments), width), limbs.shape[1], dtype=torch.int64)
    for s, (s0, s1, _) in enumerate(segments):
        index[s, : s1 - s0] = torch.arange(s0, s1)
    padded = torch.cat([limbs, limbs.new_zeros(limbs.shape[0], 1)], dim=1)  # column K reads as 0
    return padded[:, index.to(limbs.device)].permute(1, 0, 2).contiguous()


def _segment_sums(x: torch.Tensor, segments: list[tuple[int, int, bool]], dim: int) -> torch.Tensor:
    """int64 sums of ``x`` along ``dim`` (the K axis) over each segment: (S, other)."""
    x64 = x.to(torch.int64)
    return torch.stack([x64.narrow(dim, s0, s1 - s0).sum(dim) for s0, s1, _ in segments])


class LimbOperands:
    """A (M, K) and B (K, N) int16 cut into stacked, segment-major int8 limbs for one
    GEMM: ``a[s]`` (rows, width) is ``[ha; la]`` over segment s, ``bt[s]`` (cols, width)
    is ``[hb, lb]`` transposed (so ``bt[s].t()`` is the column-major B cuBLASLt takes),
    plus the offset corrections of every segment, (S, M) and (S, N) in int64."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, segments: list[tuple[int, int, bool]]):
        (m, _), n = a.shape, b.shape[1]
        width = _round_up(max(s1 - s0 for s0, s1, _ in segments), _ALIGN)
        ha, la = split_limbs(a)
        hb, lb = split_limbs(b.t())
        rows = max(2 * m, _MIN_ROWS)
        cols = _round_up(2 * n, _ALIGN)
        stacked_a = torch.cat([ha, la, ha.new_zeros(rows - 2 * m, a.shape[1])])
        stacked_bt = torch.cat([hb, lb, hb.new_zeros(cols - 2 * n, b.shape[0])])
        self.m, self.n = m, n
        self.a = _segment_major(stacked_a, segments, width)
        self.bt = _segment_major(stacked_bt, segments, width)
        lengths = torch.tensor([s1 - s0 for s0, s1, _ in segments], dtype=torch.int64, device=a.device)
        # 128 * (sum of a^ = a - 128) and 128 * (sum of b) over each segment
        self.row_offset = 128 * (_segment_sums(a, segments, 1) - 128 * lengths[:, None])
        self.col_offset = 128 * _segment_sums(b, segments, 0)

    def segment_sum(self, s: int) -> torch.Tensor:
        """The exact int64 (M, N) sum of the int16 products over segment ``s``."""
        m, n = self.m, self.n
        p = torch._int_mm(self.a[s], self.bt[s].t()).to(torch.int64)  # |entries| <= 2**30
        hh, hl = p[:m, :n], p[:m, n : 2 * n]
        lh, ll = p[m : 2 * m, :n], p[m : 2 * m, n : 2 * n]
        return 65536 * hh + 256 * (hl + lh) + ll + self.row_offset[s][:, None] + self.col_offset[s][None, :]


def chain_sums(a: torch.Tensor, b: torch.Tensor, kblock: int, chain: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(block, S)`` for every chain of ``a @ b`` in order of increasing k: S the exact int64
    (M, N) sum of the chain's int16 products, block its K-block's index. int16 A (M, K),
    B (K, N), K >= 1; chains as in ``chain_segments``."""
    segments = chain_segments(a.shape[1], kblock, chain)
    ops = LimbOperands(a, b, segments)
    running = None
    for s, (s0, _, ends_chain) in enumerate(segments):
        part = ops.segment_sum(s)
        running = part if running is None else running + part
        if ends_chain:
            yield s0 // kblock, running
            running = None


def gemm(
    a: torch.Tensor,
    ea: torch.Tensor,
    ha: int,
    b: torch.Tensor,
    eb: torch.Tensor,
    hb: int,
    kblock: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The backends' GEMM contract (``dfp/backends/__init__.py``) on int8 limbs: float32
    (M, N) = A B for int16 A (M, K >= 1), B (K, N), int32 exponents ea (M, KB) and eb
    (KB, N), bias float32 (N,) or None; on the device of the inputs."""
    ra = ea.amax(dim=1, keepdim=True)
    rb = eb.amax(dim=0, keepdim=True)
    sa = exact_pow2(ea - ra).float()
    sb = exact_pow2(eb - rb).float()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for blk, chain_sum in chain_sums(a, b, kblock, chain_length(ha, hb)):
        # exact: |chain_sum| < 2**31, so its float32 rounds as the reference's does
        acc = acc + chain_sum.float() * (sa[:, blk, None] * sb[None, blk, :])
    out = (acc.double() * exact_pow2(ra + rb)).float()
    return out + bias if bias is not None else out
