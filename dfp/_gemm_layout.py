"""How DFPTensor exponents map onto the GEMM's (M, KB) x (KB, N) exponent layout."""

from __future__ import annotations

import math

import torch

from .format import DFPTensor


def gemm_exponents(t: DFPTensor, k_axis: int, name: str) -> tuple[torch.Tensor, int | None]:
    """Exponents of a 2-D operand as (rows, KB) for A (k_axis=1) or (KB, cols) for B
    (k_axis=0), and the block length along K (None when constant along K)."""
    if t.mantissa.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    spec, e = t.spec, t.exponent
    other = 1 - k_axis
    if spec.group == "tensor":
        rows_or_cols = t.shape[other]
        return (
            e.reshape(1, 1).expand(rows_or_cols, 1) if k_axis == 1 else e.reshape(1, 1).expand(1, rows_or_cols)
        ), None
    axis = spec.axis % 2
    if spec.group == "channel" and axis == other:
        return e, None
    if spec.group == "block" and axis == k_axis:
        return e, spec.block
    raise ValueError(
        f"{name} has an exponent per {spec.group} along axis {axis}, which varies inside the "
        f"reduction (axis {k_axis}); the GEMM needs exponents per tensor, per "
        f"{'row' if k_axis == 1 else 'column'} (axis={other}), or per block along K "
        f"(axis={k_axis}, block=B)"
    )


def common_kblock(ea: torch.Tensor, ba: int | None, eb: torch.Tensor, bb: int | None, k: int):
    """Both operands' exponents expanded to one K-block length (the gcd of theirs):
    returns contiguous ea (M, KB), eb (KB, N) and the block length."""
    if ba is None and bb is None:
        return ea.contiguous(), eb.contiguous(), max(k, 1)
    g = math.gcd(ba or 0, bb or 0)
    kb = -(-k // g)
    ea = ea.expand(-1, kb) if ba is None else ea.repeat_interleave(ba // g, dim=1)[:, :kb]
    eb = eb.expand(kb, -1) if bb is None else eb.repeat_interleave(bb // g, dim=0)[:kb]
    return ea.contiguous(), eb.contiguous(), g


def gemm_layout(a: DFPTensor, b: DFPTensor, names: tuple[str, str] = ("a", "b")):
    """The backends' view of ``a @ b`` (K >= 1): ea (M, KB), eb (KB, N), block length."""
    ea, ba = gemm_exponents(a, 1, names[0])
    eb, bb = gemm_exponents(b, 0, names[1])
    return common_kblock(ea, ba, eb, bb, a.shape[1])


def matmul_grouping(axis: int | None, block: int | None) -> int:
    """The fused matmul's grouping of x (M, K): 0 per tensor, 1 per row, 2 per block along K."""
    if axis is None:
        return 0
    if axis % 2 == 0 and block is None:
        return 1
    if axis % 2 == 1 and block is not None:
        return 2
    raise ValueError(
        f"x has an exponent per {'block' if block else 'channel'} along axis {axis}, which varies inside the "
        "reduction; dfp.matmul needs axis=None (per tensor), axis=0 (per row of x and column of y) "
        "or axis=1 with block=B (blocks along K)"
    )
