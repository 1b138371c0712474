"""The DFP16 GEMM of CUDA tensors, bit-identical to ``dfp.reference.gemm``, on one of three
paths (``DFP_CUDA_GEMM`` forces one):

- ``mma``: int8 tensor cores on int16 limbs; sm_75 and newer, chains of at least 32
  products, headroom >= 1 on both operands. From sm_80 the operands are split into limb
  planes in one pass and fed through a cp.async pipeline (``csrc/cuda/gemm_mma_pipelined.cu``);
  on sm_75, or with ``DFP_CUDA_MMA_FEED=registers``, split on chip between the global load
  and the shared store (``csrc/cuda/gemm_mma.cu``).
- ``int16``: CUDA cores, int16 x int16 -> int32 (``csrc/cuda/gemm_int16.cu``); every GPU
  from Pascal on, every chain length and K-block layout. The default where ``mma`` does
  not apply.
- ``limbs``: ``torch._int_mm`` (cuBLASLt's int8 GEMM) on stacked limbs, one call per
  chain (``dfp.cuda.limbs``); slow, the formulation the CPU tests check bit for bit.

Either operand may be a ``dfp.cuda.patches.Gathered`` matrix (a convolution's patches read
in place): both kernels then read both operands through offset tables (their
``DFP_GATHER`` variants), the tensor-core one with the registers feed.

A tensor-core GEMM with too few output tiles to fill the GPU (a convolution's weight
gradient: few outputs, a reduction over every pixel of the batch) splits K across the
grid: each chain's exact int32 sum is stored, then added in order of k (``split_k_plan``).
"""

from __future__ import annotations

import functools
import os

import torch

from ..reference import chain_length
from . import limbs
from .loader import blocks_for, check_int32, kernel
from .patches import Gathered

PATHS = ("mma", "int16", "limbs")
TILE_K = 32  # k per tile of the tensor-core kernel: one m16n8k32 step
_MMA_BLOCK = 128  # rows and columns of C per block of the tensor-core kernel
_INT16_BLOCK = 64
MMA_VARIANTS = ("DFP_MMA_CHAIN_PER_TILE", "DFP_MMA_VEC8", "DFP_MMA_K_BLOCKS", "DFP_MMA_CHAIN_SUMS", "DFP_MMA_GATHER")
PIPELINED_VARIANTS = ("DFP_MMA_CHAIN_PER_TILE", "DFP_MMA_K_BLOCKS", "DFP_MMA_CHAIN_SUMS")  # 0/1 each, as above
INT16_VARIANTS = ("DFP_GATHER",)
FEEDS = ("pipelined", "registers")  # how the tensor-core kernel gets its operands (DFP_CUDA_MMA_FEED)
# The pipelined kernel's tuning (compile-time, see its source): blocks per SM.
PIPELINED_TUNING = {"DFP_MMA_MIN_BLOCKS": 2}
# Split K: each split runs at least this many chains (fewer would store more than they compute),
# the grid gets about this many blocks per multiprocessor, and the int32 chain sums held at
# once take at most this many bytes (a longer K runs in parts, the fp32 sums carried over).
SPLIT_MIN_CHAINS = 8
SPLIT_BLOCKS_PER_SM = 4
CHAIN_SUMS_BYTES = 256 * 2**20
_ADD_CHAINS_ELEMENTS = 32  # output elements per block of dfp_gemm_add_chains
_THREADS = 256  # per block of the small kernels


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
    """``(first k, length, chain end, K-block index)`` of every k tile of the tensor-core
    kernel: chains (docs/design.md) cut into tiles of at most TILE_K, so no tile straddles
    two chains; ``chain`` must be a multiple of TILE_K. The chain end is 0, or for the
    last tile of chain c (in order of k), c + 1."""
    if chain % TILE_K:
        raise ValueError(f"k tiles need chains of a multiple of {TILE_K} products, got {chain}")
    tiles, chains = [], 0
    for blk, block_start in enumerate(range(0, k, kblock)):
        block_stop = min(block_start + kblock, k)
        for c0 in range(block_start, block_stop, chain):
            c1 = min(c0 + chain, block_stop)
            chains += 1
            for t0 in range(c0, c1, TILE_K):
                length = min(TILE_K, c1 - t0)
                tiles.append((t0, length, chains if t0 + length == c1 else 0, blk))
    return tuple(tiles)


@functools.lru_cache(maxsize=64)
def split_k_plan(
    k: int, kblock: int, chain: int, output_tiles: int, sms: int, outputs: int, sums_bytes: int
) -> tuple[tuple[int, int, tuple[int, ...]], ...] | None:
    """How a tensor-core GEMM with ``output_tiles`` blocks of outputs (``outputs`` = M*N
    elements) splits K on a GPU of ``sms`` multiprocessors, or None where it runs whole
    (its blocks fill at least half the GPU, or K is too short to split). Else its parts,
    each ``(first chain, chains, splits)``, whose int32 chain sums take at most
    ``sums_bytes`` where one chain per part allows: ``splits`` lists the first k tile of
    each split and the part's end (tile indices of ``k_tiles``; every split whole chains)."""
    if 2 * output_tiles > sms:
        return None
    tiles = k_tiles(k, kblock, chain)
    starts = [0] + [i + 1 for i, tile in enumerate(tiles) if tile[2]]  # first tile of chain c; then the end
    chains = len(starts) - 1
    part_count = -(-chains // max(1, sums_bytes // (4 * outputs)))
    per_part = -(-chains // part_count)
    per_split = max(SPLIT_MIN_CHAINS, -(-per_part // -(-SPLIT_BLOCKS_PER_SM * sms // output_tiles)))
    if chains < 2 * per_split:
        return None
    parts = []
    for c0 in range(0, chains, per_part):
        c1 = min(c0 + per_part, chains)
        parts.append((c0, c1 - c0, (*(starts[c] for c in range(c0, c1, per_split)), starts[c1])))
    return tuple(parts)


@functools.lru_cache(maxsize=64)
def _split_tensors(k, kblock, chain, output_tiles, sms, outputs, sums_bytes, device: torch.device):
    """The parts of ``split_k_plan`` with their splits as int32 tensors on ``device``, and the
    K-block of every chain (int32, in order). Kept, like ``_tile_table``'s: callers
    ``record_stream`` them."""
    plan = split_k_plan(k, kblock, chain, output_tiles, sms, outputs, sums_bytes)
    blocks = [tile[3] for tile in k_tiles(k, kblock, chain) if tile[2]]
    chain_blocks = torch.tensor(blocks, dtype=torch.int32).to(device)
    parts = [(c0, count, torch.tensor(splits, dtype=torch.int32).to(device)) for c0, count, splits in plan]
    return parts, chain_blocks


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    powers of two, subnormal or 0 where they underflow), as the reference computes them:
    one launch of ``dfp_gemm_scales`` per operand."""
    (m, kb), n = ea.shape, eb.shape[1]
    check_int32(ea_rows=ea.stride(0), ea_blocks=ea.stride(1), eb_blocks=eb.stride(0), eb_columns=eb.stride(1))
    ra = torch.empty(m, dtype=torch.int32, device=ea.device)
    rb = torch.empty(n, dtype=torch.int32, device=ea.device)
    sa = torch.empty((m, kb), dtype=torch.float32, device=ea.device)
    sb = torch.empty((kb, n), dtype=torch.float32, device=ea.device)
    launch = kernel("exponents.cu", "dfp_gemm_scales", ea.device)
    # a line: a row of ea, a column of eb; (line stride, block stride) of the exponents and of the scales
    for e, lines, r, s, strides, s_strides in (
        (ea, m, ra, sa, (ea.stride(0), ea.stride(1)), (kb, 1)),
        (eb, n, rb, sb, (eb.stride(1), eb.stride(0)), (1, n)),
    ):
        grid = (blocks_for(32 * lines, _THREADS), 1, 1)  # a warp per line
        launch(grid, (_THREADS, 1, 1), [e, lines, kb, *strides, r, s, *s_strides])
    return ra, rb, sa, sb


def mma_feed(capability: tuple[int, int], splits_k: bool) -> str:
    """``DFP_CUDA_MMA_FEED`` if set, else ``pipelined`` from sm_80 (cp.async) for a GEMM that
    runs whole, ``registers`` otherwise: a GEMM that splits K has few outputs, so the limb
    planes' extra pass over its operands is not paid back (a 16 x 131072 x 144 weight
    gradient: 0.91x the registers feed on an H200; 4096^3: 1.31x, 8192^3: 1.64x)."""
    forced = os.environ.get("DFP_CUDA_MMA_FEED")
    if forced:
        if forced not in FEEDS:
            raise ValueError(
                f"DFP_CUDA_MMA_FEED={forced!r} is not a feed of the tensor-core GEMM; choose one of {', '.join(FEEDS)}"
            )
        return forced
    return "pipelined" if capability >= (8, 0) and not splits_k else "registers"


def _limb_planes(x: torch.Tensor, table: torch.Tensor, tile_count: int) -> torch.Tensor:
    """The int8 limb planes (2, rows, tile_count * TILE_K) of the int16 operand x (rows, K),
    any strides: high, then low, tile t of ``table`` at columns [TILE_K t, TILE_K (t + 1))."""
    rows = x.shape[0]
    planes = torch.empty((2, rows, tile_count * TILE_K), dtype=torch.int8, device=x.device)
    check_int32(limbs=planes[0].numel(), x_rows=x.stride(0), x_k=x.stride(1))
    pieces = rows * tile_count * (TILE_K // 8)  # one thread per 8 limbs of each plane
    kernel("gemm_mma_pipelined.cu", "dfp_split_limbs", x.device)(
        (blocks_for(pieces, _THREADS), 1, 1), (_THREADS, 1, 1),
        [x, rows, x.stride(0), x.stride(1), table, tile_count, planes[0], planes[1]],
    )  # fmt: skip
    return planes


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A 2-D int16 operand with unit stride along its last (K) axis (a copy if needed)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _gathered(a, b) -> tuple[Gathered, Gathered] | None:
    """Both operands as offset tables where either is gathered, else None."""
    if not isinstance(a, Gathered) and not isinstance(b, Gathered):
        return None
    return tuple(t if isinstance(t, Gathered) else Gathered.of(t) for t in (a, b))


def _gemm_mma(a, b, ra, rb, sa, sb, kb, kblock, chain, bias, has_bias, out):
    (m, k), n = a.shape, b.shape[1]
    table, tiles_aligned = _tile_table(k, kblock, chain, a.device)
    table.record_stream(torch.cuda.current_stream(a.device))  # not reused before this launch is done
    tile_count = table.numel() // 4
    grid = (-(-m // _MMA_BLOCK), -(-n // _MMA_BLOCK))
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    split = (k, kblock, chain, grid[0] * grid[1], _multiprocessors(device), m * n, CHAIN_SUMS_BYTES)
    plan = split_k_plan(*split)
    scales = [sa, sb, kb, ra, rb, bias, has_bias, out]
    gathered = _gathered(a, b.t())
    if gathered is not None:  # the registers feed gathers on chip; limb planes would be an im2col
        ga, gbt = gathered
        vec8 = tiles_aligned and ga.runs_of_8 and gbt.runs_of_8
        check_int32(a_data=ga.data.numel(), bt_data=gbt.data.numel())
        operands = [ga.data, 0, gbt.data, 0, m, n, table, tile_count, *scales]
        tables = [ga.rows, ga.columns, gbt.rows, gbt.columns]

        def mma_kernel(sums: int):
            flags = (int(chain == TILE_K), int(vec8), int(kb > 1), sums, 1)
            return kernel("gemm_mma.cu", "dfp_gemm_mma", a.device, **dict(zip(MMA_VARIANTS, flags, strict=True)))
    elif mma_feed(torch.cuda.get_device_capability(a.device), plan is not None) == "pipelined":
        a_planes, b_planes = _limb_planes(a, table, tile_count), _limb_planes(b.t(), table, tile_count)
        operands = [*a_planes, *b_planes, m, n, table, tile_count, *scales]
        tables = []  # this kernel reads its operands from the planes

        def mma_kernel(sums: int):
            flags = dict(zip(PIPELINED_VARIANTS, (int(chain == TILE_K), int(kb > 1), sums), strict=True))
            return kernel("gemm_mma_pipelined.cu", "dfp_gemm_mma_pipelined", a.device, **flags, **PIPELINED_TUNING)
    else:
        a, bt = _k_contiguous(a), _k_contiguous(b.t())
        vec8 = (
            k % 8 == 0
            and tiles_aligned
            and a.stride(0) % 8 == 0
            and bt.stride(0) % 8 == 0
            and a.data_ptr() % 16 == 0
            and bt.data_ptr() % 16 == 0
        )
        check_int32(lda=a.stride(0), ldb=bt.stride(0))
        operands = [a, a.stride(0), bt, bt.stride(0), m, n, table, tile_count, *scales]
        tables = [table] * 4  # offset tables: not read without DFP_MMA_GATHER

        def mma_kernel(sums: int):
            flags = (int(chain == TILE_K), int(vec8), int(kb > 1), sums, 0)
            return kernel("gemm_mma.cu", "dfp_gemm_mma", a.device, **dict(zip(MMA_VARIANTS, flags, strict=True)))

    if plan is None:
        mma_kernel(0)((*grid, 1), (256, 1, 1), [*operands, table, 0, out, *tables])  # no splits: table, 0, out not read
        return
    mma = mma_kernel(1)
    add_chains = kernel("gemm_mma.cu", "dfp_gemm_add_chains", a.device)
    parts, chain_blocks = _split_tensors(*split, a.device)
    chain_blocks.record_stream(torch.cuda.current_stream(a.device))
    acc = torch.empty((m, n), dtype=torch.float32, device=a.device) if len(parts) > 1 else out
    for i, (c0, count, splits) in enumerate(parts):
        splits.record_stream(torch.cuda.current_stream(a.device))
        sums = torch.empty((count, m, n), dtype=torch.int32, device=a.device)
        mma((*grid, splits.numel() - 1), (256, 1, 1), [*operands, splits, c0, sums, *tables])
        add_chains(
            (-(-m * n // _ADD_CHAINS_ELEMENTS), 1, 1), (256, 1, 1),
            [sums, count, chain_blocks[c0:], m, n, sa, sb, kb, ra, rb, bias, has_bias, int(i == 0),
             int(i == len(parts) - 1), acc, out],
        )  # fmt: skip


def _gemm_int16(a, b, ra, rb, sa, sb, kb, kblock, chain, bias, has_bias, out):
    (m, k), n = a.shape, b.shape[1]
    gathered = _gathered(a, b)
    if gathered is None:
        check_int32(a_rows=a.stride(0), a_k=a.stride(1), b_k=b.stride(0), b_cols=b.stride(1))
        operands = [a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1)]
        tables = [out] * 4  # not read without DFP_GATHER
    else:  # the strides only choose the axis along which consecutive threads load
        ga, gb = gathered
        check_int32(a_data=ga.data.numel(), b_data=gb.data.numel())
        # 1 where neighbours are side by side: consecutive threads load along that axis
        operands = [ga.data, int(ga.unit_rows), int(ga.unit_columns), gb.data, int(gb.unit_rows), int(gb.unit_columns)]
        tables = [ga.rows, ga.columns, gb.rows, gb.columns]
    grid = (-(-m // _INT16_BLOCK), -(-n // _INT16_BLOCK), 1)
    kernel("gemm_int16.cu", "dfp_gemm_int16", a.device, DFP_GATHER=int(gathered is not None))(
        grid, (256, 1, 1),
        [*operands, m, n, k, kblock, chain, sa, sb, kb, ra, rb, bias, has_bias, out, *tables],
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
    B (K, N) (any strides, or ``Gathered``), int32 exponents ea (M, KB), eb (KB, N), bias
    float32 (N,) or None."""
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
        a, b = (t.materialize() if isinstance(t, Gathered) else t for t in (a, b))
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
