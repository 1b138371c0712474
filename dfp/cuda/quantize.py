"""DFP16 quantization and dequantization of CUDA tensors (``csrc/cuda/quantize.cu``),
bit-identical to the CPU backends: same exponents, same rounding, and for stochastic
rounding the same counter-based random bits of every element's flat index."""

from __future__ import annotations

import torch

from .._errors import NonFiniteError
from ..format import DFPTensor, canonical_view, zeros_exponent
from .loader import blocks_for, check_int32, kernel

_FILE = "quantize.cu"
_THREADS = 256  # the kernels' __launch_bounds__ (quantize.cu, DFP_FOUR_PER_SM)
_RESIDENT = 4  # blocks per SM of the grid-stride kernels marked DFP_FOUR_PER_SM: all resident at once
_QUADS_PER_LANE = 4  # quantize.cu's kQuadsPerLane
MAX_ELEMENTS = 2**30 - 1  # the kernels index with C ints and grid-stride loops (see quantize.cu)
_U32 = 0xFFFFFFFF


def _as_int32(u: int) -> int:
    """A 32-bit pattern as the signed C int the launcher passes."""
    return u - 2**32 if u >= 2**31 else u


def _check_size(count: int) -> None:
    if count > MAX_ELEMENTS:
        raise ValueError(
            f"dfp.cuda quantizes tensors of at most {MAX_ELEMENTS} elements, got {count}; quantize it in parts"
        )


def _group_amax(x: torch.Tensor, mode: int) -> torch.Tensor:
    """int32 bit patterns of max |x| per group: (1,) per tensor (mode 0) or (N,) per
    channel (mode 1); blocks take ``_quantize_blocks``."""
    o, n, i = x.shape
    count = x.numel()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if mode == 0:
        amax = torch.zeros(1, dtype=torch.int32, device=x.device)
        vec4 = int(_in_quads(x, count))
        launch = kernel(_FILE, "dfp_amax_tensor", x.device)
        launch((blocks_for(count, _THREADS, _RESIDENT * sms), 1, 1), (_THREADS, 1, 1), [x, count, vec4, amax])
        return amax
    amax = torch.zeros(n, dtype=torch.int32, device=x.device)
    vec4 = int(_in_quads(x, i))  # a thread's 4 columns in one channel
    column_blocks = -(-n * i // (_THREADS * (4 if vec4 else 1)))  # blocks of _THREADS threads over the (O, N*I) view
    # split the rows over enough blocks to fill the GPU, each block reading whole columns
    row_blocks = min(o, 65535, max(1, (8 * sms) // column_blocks))
    rows_per_block = -(-o // row_blocks)
    launch = kernel(_FILE, "dfp_amax_channel", x.device)
    launch((column_blocks, -(-o // rows_per_block), 1), (_THREADS, 1, 1), [x, o, n, i, rows_per_block, vec4, amax])
    return amax


def _in_quads(x: torch.Tensor, run: int) -> bool:
    """Whether the kernels may read x in 16-byte float4 loads along runs of ``run``
    elements: run % 4 == 0 and x 16-byte aligned (an offset view may not be)."""
    return run % 4 == 0 and x.data_ptr() % 16 == 0


def _exponents(
    amax: torch.Tensor, headroom: int, nonfinite: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group exponents, and a flag (int32, on the device; ``nonfinite`` where given)
    set where a group held NaN/Inf."""
    groups = amax.numel()
    exponent = torch.empty(groups, dtype=torch.int32, device=amax.device)
    if nonfinite is None:
        nonfinite = torch.zeros(1, dtype=torch.int32, device=amax.device)
    kernel(_FILE, "dfp_exponents", amax.device)(
        (blocks_for(groups, _THREADS), 1, 1), (_THREADS, 1, 1), [amax, groups, headroom, exponent, nonfinite]
    )
    return exponent, nonfinite


def _quantize_elements(x, mode, block, exponent, headroom, rounding, seed, mantissa, nonfinite) -> None:
    """mantissa = every element of x rounded with its group's exponent (the third launch);
    all zeros where the flag ``nonfinite`` is set."""
    _, n, i = x.shape
    count = x.numel()
    vec4 = int(_in_quads(x, count if mode == 0 else i))  # a quad in one channel (mode 1)
    seed &= 2**64 - 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = blocks_for(-(-count // 16), _THREADS, _RESIDENT * sms) if vec4 else blocks_for(count, _THREADS, 16 * sms)
    kernel(_FILE, "dfp_quantize", x.device)(
        (grid, 1, 1),
        (_THREADS, 1, 1),
        [x, count, mode, n, i, max(block, 1), exponent, headroom, rounding,
         _as_int32(seed & _U32), _as_int32(seed >> 32), vec4, nonfinite, mantissa],
    )  # fmt: skip


def _quantize_blocks(x, block, headroom, rounding, seed, mantissa) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode 2 in one launch (``dfp_quantize_blocks``, or ``dfp_quantize_blocks_vec4`` for
    blocks along the last axis in whole float4s): every group's maximum, exponent and
    mantissas; the exponents and the non-finite flag, as ``_exponents`` gives them."""
    o, n, i = x.shape
    groups = o * -(-n // block) * i
    exponent = torch.empty(groups, dtype=torch.int32, device=x.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    seed &= 2**64 - 1
    seeds = [_as_int32(seed & _U32), _as_int32(seed >> 32)]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if i == 1 and block % 4 == 0 and _in_quads(x, n):  # every group in whole quads
        lanes = _lanes_per_group(block)
        kernel(_FILE, "dfp_quantize_blocks_vec4", x.device)(
            (blocks_for(groups * lanes, _THREADS, _RESIDENT * sms), 1, 1),
            (_THREADS, 1, 1),
            [x, o, n, block, lanes, headroom, rounding, *seeds, mantissa, exponent, nonfinite],
        )
        return exponent, nonfinite
    threads = groups * (32 if i == 1 else 1)  # a warp per group where blocks run along the last axis
    kernel(_FILE, "dfp_quantize_blocks", x.device)(
        (blocks_for(threads, _THREADS, 8 * sms), 1, 1),
        (_THREADS, 1, 1),
        [x, o, n, i, block, headroom, rounding, *seeds, mantissa, exponent, nonfinite],
    )
    return exponent, nonfinite


def _lanes_per_group(block: int) -> int:
    """dfp_quantize_blocks_vec4's lanes per group of ``block`` elements: a power of two, up
    to a warp, holding _QUADS_PER_LANE quads each, and at least 4 (a group's run of a load
    64 bytes) where the group has 4 quads (H200 timings in quantize.cu)."""
    lanes = 1
    while lanes < 32 and (lanes * _QUADS_PER_LANE * 4 < block or (lanes < 4 and lanes * 4 < block)):
        lanes *= 2
    return lanes


def _quantize3d(x, mode, block, headroom, rounding, seed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize3d``'s mantissas and exponents, and its NaN/Inf flag (int32 (1,), on the device)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise TypeError(
            f"dfp.cuda quantizes contiguous float32 tensors, got {x.dtype} (contiguous: {x.is_contiguous()})"
        )
    o, n, i = x.shape
    count = x.numel()
    _check_size(count)
    check_int32(o=o, n=n, i=i, block=block)
    mantissa = torch.empty((o, n, i), dtype=torch.int16, device=x.device)
    exponent_shape = (1,) if mode == 0 else (n,) if mode == 1 else (o, -(-n // block), i)
    if count == 0:
        exponent = torch.full(exponent_shape, zeros_exponent(headroom), dtype=torch.int32, device=x.device)
        return mantissa, exponent, torch.zeros(1, dtype=torch.int32, device=x.device)
    if mode == 2:  # blocks need no maximum over the tensor: one launch
        exponent, nonfinite = _quantize_blocks(x, block, headroom, rounding, seed, mantissa)
    else:
        amax = _group_amax(x, mode)
        exponent, nonfinite = _exponents(amax, headroom)
        _quantize_elements(x, mode, block, exponent, headroom, rounding, seed, mantissa, nonfinite)
    return mantissa, exponent.view(exponent_shape), nonfinite


def quantize3d(
    x: torch.Tensor, mode: int, block: int, headroom: int, rounding: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend contract (``dfp/backends/__init__.py``) on a CUDA tensor: contiguous
    float32 ``x`` (O, N, I) -> int16 mantissas (O, N, I) and int32 exponents (1,), (N,) or
    (O, ceil(N/block), I). Raises dfp.NonFiniteError on NaN/Inf (after one device sync)."""
    mantissa, exponent, nonfinite = _quantize3d(x, mode, block, headroom, rounding, seed)
    if int(nonfinite.item()):
        raise NonFiniteError(
            "cannot quantize a CUDA tensor that contains NaN/Inf: DFP16 represents finite numbers only; "
            "find where it came from (torch.autograd.detect_anomaly helps in training) or clean it with "
            "torch.nan_to_num"
        )
    return mantissa, exponent


def quantize3d_marked(
    x: torch.Tensor, mode: int, block: int, headroom: int, rounding: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize3d`` for the training layers, without a host sync: NaN/Inf in x gives zero
    mantissas and every exponent ``NONFINITE`` (``dfp._conv_layout``), as the layers'
    generic path makes them from quantize3d's error."""
    mantissa, exponent, nonfinite = _quantize3d(x, mode, block, headroom, rounding, seed)
    # dfp_quantize zeroed the mantissas already where the flag is set; dfp_quantize_blocks cannot (one launch)
    mark_nonfinite(nonfinite, [mantissa] if mode == 2 else [], [exponent])
    return mantissa, exponent


def mark_nonfinite(nonfinite: torch.Tensor, mantissas: list, exponents: list) -> None:
    """In place, where the flag ``nonfinite`` (int32 (1,), on the device) is set: mantissas
    zero and exponents ``NONFINITE``. The flag is read on the device, never by the host."""
    from .._conv_layout import NONFINITE

    bad = nonfinite.bool()
    for m in mantissas:
        m.masked_fill_(bad, 0)
    for e in exponents:
        e.masked_fill_(bad, NONFINITE)


def dequantize(t: DFPTensor) -> torch.Tensor:
    """float32 ``mantissa * 2**exponent`` of a DFPTensor on a CUDA device, in one kernel;
    the same bits as ``DFPTensor.dequantize``."""
    if t.mantissa.device.type != "cuda":
        raise ValueError(f"dfp.cuda.dequantize needs a DFPTensor on a CUDA device, got one on {t.mantissa.device}")
    (_, n, i), mode, block = canonical_view(t.shape, t.spec)
    count = t.mantissa.numel()
    _check_size(count)
    out = torch.empty(t.shape, dtype=torch.float32, device=t.mantissa.device)
    if count == 0:
        return out
    mantissa = t.mantissa.contiguous()
    exponent = t.exponent.contiguous().reshape(-1)
    kernel(_FILE, "dfp_dequantize", mantissa.device)(
        (blocks_for(count, _THREADS), 1, 1),
        (_THREADS, 1, 1),
        [mantissa, count, mode, n, i, max(block, 1), exponent, out],
    )
    return out
