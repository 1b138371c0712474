"""The DFP16 GEMM of CUDA tensors, bit-identical to ``dfp.reference.gemm``, on one of three
paths (``DFP_CUDA_GEMM`` forces one):

- ``mma``: int8 tensor cores, int16 limbs split on chip (``csrc/cuda/gemm_mma.cu``);
  sm_75 and newer, chains of at least 32 products, headroom >= 1 on both operands.
- ``int16``: CUDA cores, int16 x int16 -> int32 (``csrc/cuda/gemm_int16.cu``); every GPU
  from Pascal on, every chain length and K-block layout. The default where ``mma`` does
  not apply.
- ``limbs``: ``torch._int_mm`` (cuBLASLt's int8 GEMM) on stacked limbs, one call per
  chain (``dfp.cuda.limbs``); slow, the formulation the CPU tests check bit for bit.
"""

from __future__ import annotations

import functools
import os

import torch

from ..format import exact_pow2
from ..reference import chain_length
from . import limbs
from .loader import check_int32, kernel

PATHS = ("mma", "int16", "limbs")
TILE_K = 32  # k per tile of the tensor-core kernel: one m16n8k32 step
_MMA_BLOCK = 128  # rows and columns of C per block of the tensor-core kernel
_INT16_BLOCK = 64
MMA_VARIANTS = ("DFP_MMA_CHAIN_PER_TILE", "DFP_MMA_VEC8", "DFP_MMA_K_BLOCKS")  # 0/1 each (gemm_mma.cu)


def mma_applies(capability: tuple[int, int], ha: int, hb: int) -> bool:
    """Whether the tensor-core kernel can compute this GEMM exactly: int8 mma (sm_75+),
    balanced limbs (|mantissa| <= 32639: headroom >= 1), chains of at least one k tile."""
    return capability >= (7, 5) and ha >= 1 and hb >= 1 and chain_length(ha, hb) >= TILE_K


def choose_path(capability: tuple[int, int], ha: int, hb: int) -> str:
    """``DFP_CUDA_GEMM`` if set (a clear error if it cannot run this GEMM), else ``mma``
    where it applies, else ``int16``."""
    forced = os.environ.get("DFP_CUDA_GEMM")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"DFP_CUDA_GEMM={forced!r} is not a CUDA GEMM path; choose one of {', '.join(PATHS)}")
        if forced == "mma" and not mma_applies(capability, ha, hb):
            raise ValueError(
                f"DFP_CUDA_GEMM=mma cannot run a GEMM with headrooms ({ha}, {hb}) on "
                f"sm_{capability[0]}{capability[1]}: "
                f"it needs sm_75 or newer, headroom >= 1 on both operands and chains of >= {TILE_K} products "
                f"(chain length here {chain_length(ha, hb)}); use DFP_CUDA_GEMM=int16"
            )
        return forced
    return "mma" if mma_applies(capability, ha, hb) else "int16"


@functools.lru_cache(maxsize=64)
def k_tiles(k: int, kblock: int, chain: int) -> tuple[tuple[int, int, int, int], ...]:
    """``(first k, length, ends a chain, K-block index)`` of every k tile of the tensor-core
    kernel: chains (docs/design.md) cut into tiles of at most TILE_K, so no tile straddles
    two chains; ``chain`` must be a multiple of TILE_K."""
    if chain % TILE_K:
        raise ValueError(f"k tiles need chains of a multiple of {TILE_K} products, got {chain}")
    tiles = []
    for blk, block_start in enumerate(range(0, k, kblock)):
        block_stop = min(block_start + kblock, k)
        for c0 in range(block_start, block_stop, chain):
            c1 = min(c0 + chain, block_stop)
            for t0 in range(c0, c1, TILE_K):
                length = min(TILE_K, c1 - t0)
                tiles.append((t0, length, int(t0 + length == c1), blk))
    return tuple(tiles)


@functools.lru_cache(maxsize=64)
def _tile_table(k: int, kblock: int, chain: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The k tiles as an int32 (T * 4,) tensor on ``device`` (kept: it is the same for every
    GEMM of this K layout), and whether every tile starts at a multiple of 8. Callers on any
    stream must ``record_stream`` it: the cache may free it (LRU) while a launch still reads it."""
    tiles = k_tiles(k, kblock, chain)
    table = torch.tensor(tiles, dtype=torch.int32).reshape(-1).to(device)  # a fresh allocation: 16-byte aligned
    assert table.data_ptr() % 16 == 0  # the kernel reads each tile as one int4
    return table, all(t0 % 8 == 0 for t0, _, _, _ in tiles)


def _scales(ea: torch.Tensor, eb: torch.Tensor):
    """Epilogue shifts ra (M,), rb (N,) and fp32 block scales sa (M, KB), sb (KB, N) (exact
    powers of two, subnormal or 0 where they underflow), as the reference computes them."""
    ra = ea.amax(dim=1, keepdim=True)
    rb = eb.amax(dim=0, keepdim=True)
    sa = exact_pow2(ea - ra).float().contiguous()
    sb = exact_pow2(eb - rb).float().contiguous()
    return ra.reshape(-1).int().contiguous(), rb.reshape(-1).int().contiguous(), sa, sb


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A 2-D int16 operand with unit stride along its last (K) axis (a copy if needed)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _gemm_mma(a, b, ra, rb, sa, sb, kb, kblock, chain, bias, has_bias, out):
    (m, k), n = a.shape, b.shape[1]
    a = _k_contiguous(a)
    bt = _k_contiguous(b.t())
    table, tiles_aligned = _tile_table(k, kblock, chain, a.device)
    table.record_stream(torch.cuda.current_stream(a.device))  # not reused before this launch is done
    tile_count = table.numel() // 4
    vec8 = (
        k % 8 == 0
        and tiles_aligned
        and a.stride(0) % 8 == 0
        and bt.stride(0) % 8 == 0
        and a.data_ptr() % 16 == 0
        and bt.data_ptr() % 16 == 0
    )
    check_int32(lda=a.stride(0), ldb=bt.stride(0))
    grid = (-(-m // _MMA_BLOCK), -(-n // _MMA_BLOCK), 1)
    variant = dict(zip(MMA_VARIANTS, (int(chain == TILE_K), int(vec8), int(kb > 1)), strict=True))
    kernel("gemm_mma.cu", "dfp_gemm_mma", a.device, **variant)(
        grid, (256, 1, 1),
        [a, a.stride(0), bt, bt.stride(0), m, n, table, tile_count, sa, sb, kb, ra, rb, bias, has_bias, out],
    )  # fmt: skip


def _gemm_int16(a, b, ra, rb, sa, sb, kb, kblock, chain, bias, has_bias, out):
    (m, k), n = a.shape, b.shape[1]
    check_int32(a_rows=a.stride(0), a_k=a.stride(1), b_k=b.stride(0), b_cols=b.stride(1))
    grid = (-(-m // _INT16_BLOCK), -(-n // _INT16_BLOCK), 1)
    kernel("gemm_int16.cu", "dfp_gemm_int16", a.device)(
        grid, (256, 1, 1),
        [a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), m, n, k, kblock, chain,
         sa, sb, kb, ra, rb, bias, has_bias, out],
    )  # fmt: skip


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
    """The backends' GEMM contract on CUDA tensors: float32 (M, N) = A B for int16 A (M, K),
    B (K, N) (any strides), int32 exponents ea (M, KB), eb (KB, N), bias float32 (N,) or None."""
    (m, k), n = a.shape, b.shape[1]
    check_int32(m=m, n=n, k=k, kblock=kblock)
    path = choose_path(torch.cuda.get_device_capability(a.device), ha, hb)
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # no chains: zeros, plus the bias
        out.zero_()
        return out + bias if bias is not None else out
    if path == "limbs":
        return limbs.gemm(a, ea, ha, b, eb, hb, kblock, bias)
    if -(-n // _INT16_BLOCK) > 65535:  # the grid's y dimension counts column tiles
        raise ValueError(f"dfp.cuda.gemm takes at most {65535 * _INT16_BLOCK} columns, got N={n}; split B")
    ra, rb, sa, sb = _scales(ea, eb)
    kb = ea.shape[1]
    has_bias = int(bias is not None)
    bias_arg = bias.float().contiguous() if bias is not None else out  # never read without a bias
    run = _gemm_mma if path == "mma" else _gemm_int16
    run(a, b, ra, rb, sa, sb, kb, kblock, chain_length(ha, hb), bias_arg, has_bias, out)
    return out
