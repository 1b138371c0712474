"""numba backend: docs/design.md in serial @njit loops, bit-identical to dfp.reference.

A portable fallback for machines without the compiled core. Real integer arithmetic:
int16 products summed in int32 chains, an fp32 accumulator, a uint32 hash. Serial on
purpose: numba's parallel mode would bring a second threading runtime beside torch's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import BackendUnavailableError
from ..reference import DITHER_KEY, DITHER_MASK, NEAREST, STOCHASTIC, chain_length, check_finite

try:
    import numba
except ImportError as error:  # reported by ensure_available(): importing dfp must not fail
    numba = None
    _IMPORT_ERROR = error

_U32 = 0xFFFFFFFF


def ensure_available() -> None:
    """Raise BackendUnavailableError, saying what to do, when numba cannot be imported."""
    if numba is None:
        raise BackendUnavailableError(
            f"the dfp numba backend needs numba, which cannot be imported ({_IMPORT_ERROR}): "
            "install it with `pip install numba`, or choose another backend with "
            "DFP_BACKEND=cpu or DFP_BACKEND=reference"
        )


def _njit(function):
    # Without numba the plain function stays, never called: entry points check first.
    return numba.njit(function) if numba is not None else function


@_njit
def _mix(x):
    # numba widens uint32 products to uint64; np.uint32() wraps them modulo 2**32
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    return np.uint32(x ^ (x >> np.uint32(16)))


@_njit
def _random_bits(index, k0, k1):
    lo = np.uint32(index & _U32)
    hi = np.uint32(index >> 32)
    return np.uint32(_mix(np.uint32(lo ^ k0)) ^ _mix(np.uint32(hi ^ k1))) >> np.uint32(9)


@_njit
def _dither_bits(bits, index):
    low = np.uint32(index & _U32)
    return _mix(np.uint32((bits & np.uint32(DITHER_MASK)) ^ low ^ np.uint32(DITHER_KEY))) >> np.uint32(9)


@_njit
def _group_of(mode, block, o, n, i):
    if mode == 0:
        return 0, 0, 0
    if mode == 1:
        return 0, n, 0
    return o, n // block, i


@_njit
def _quantize_kernel(x, mode, block, headroom, rounding, k0, k1, mantissa, exponent):
    """Fill mantissa (O, N, I) int16 and exponent (one entry per group) int32."""
    size_o, size_n, size_i = x.shape
    digits = 15 - headroom
    amax = np.zeros(exponent.shape, np.float32)
    for o in range(size_o):
        for n in range(size_n):
            for i in range(size_i):
                g = _group_of(mode, block, o, n, i)
                amax[g] = max(amax[g], abs(x[o, n, i]))

    # v = x * 2**-e in fp32: by 2**64, then 2**(-e - 64), when 2**-e is beyond fp32;
    # otherwise by 2**-e, then 1
    scale_first = np.empty(exponent.shape, np.float32)
    scale_second = np.empty(exponent.shape, np.float32)
    for g in np.ndindex(exponent.shape):
        if amax[g] > 0:
            f, big_e = math.frexp(np.float64(amax[g]))
            # one more so |v| <= M, except where the rounded top would be 2^128 (inf)
            e = big_e - digits + (1 if f * 2.0**digits > 2**digits - 1 and big_e < 128 else 0)
        else:
            e = -149 - digits + 1
        exponent[g] = e
        first = 64 if -e > 127 else -e
        scale_first[g] = np.float32(math.ldexp(1.0, first))
        scale_second[g] = np.float32(math.ldexp(1.0, -e - first))

    limit = np.float32(2**digits - 1)
    x_bits = x.view(np.uint32)
    index = 0
    for o in range(size_o):
        for n in range(size_n):
            for i in range(size_i):
                g = _group_of(mode, block, o, n, i)
                v = x[o, n, i] * scale_first[g] * scale_second[g]
                if rounding == NEAREST:
                    q = np.rint(v)  # half to even
                else:
                    floor = np.floor(v)
                    threshold = (v - floor) * np.float32(2.0**23)
                    if rounding == STOCHASTIC:
                        bits = _random_bits(index, k0, k1)
                    else:
                        bits = _dither_bits(x_bits[o, n, i], index)
                    r = np.float32(bits) + np.float32(0.5)
                    q = floor + np.float32(1.0) if r < threshold else floor
                mantissa[o, n, i] = np.int16(min(max(q, -limit), limit))
                index += 1


@_njit
def _gemm_kernel(a, bt, ea, eb, kblock, chain, out):
    """out (M, N) float32 from a (M, K) and bt = B^T (N, K), both int16 and contiguous."""
    size_m, size_k = a.shape
    size_n = bt.shape[0]
    num_blocks = ea.shape[1]
    ra = np.empty(size_m, np.int64)
    rb = np.empty(size_n, np.int64)
    for m in range(size_m):
        ra[m] = ea[m].max()
    for n in range(size_n):
        rb[n] = eb[:, n].max()
    # float32 of an exact power of two (from float64): 0 or subnormal when it underflows
    sa = np.empty((size_m, num_blocks), np.float32)
    sb = np.empty((num_blocks, size_n), np.float32)
    for m in range(size_m):
        for blk in range(num_blocks):
            sa[m, blk] = np.float32(math.ldexp(1.0, ea[m, blk] - ra[m]))
    for blk in range(num_blocks):
        for n in range(size_n):
            sb[blk, n] = np.float32(math.ldexp(1.0, eb[blk, n] - rb[n]))

    for m in range(size_m):
        for n in range(size_n):
            acc = np.float32(0.0)
            for blk in range(num_blocks):
                scale = sa[m, blk] * sb[blk, n]
                stop = min((blk + 1) * kblock, size_k)
                for c0 in range(blk * kblock, stop, chain):
                    chain_sum = np.int32(0)  # cannot overflow: chain * Ma * Mb <= 2**31 - 1
                    for k in range(c0, min(c0 + chain, stop)):
                        chain_sum = np.int32(chain_sum + np.int32(a[m, k]) * np.int32(bt[n, k]))
                    acc = acc + np.float32(chain_sum) * scale  # the product is exact; the sum rounds
            out[m, n] = np.float32(np.float64(acc) * math.ldexp(1.0, ra[m] + rb[n]))


def quantize3d(
    x: torch.Tensor, mode: int, block: int, headroom: int, rounding: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 mantissas (O, N, I) and int32 exponents ((1,), (N,) or (O, ceil(N/block), I))."""
    ensure_available()
    check_finite(x)
    o, n, i = x.shape
    if mode == 2:
        exponent = np.empty((o, -(-n // block), i), np.int32)
    else:
        exponent = np.empty((1, n if mode == 1 else 1, 1), np.int32)
    mantissa = np.empty((o, n, i), np.int16)
    k0, k1 = np.uint32(seed & _U32), np.uint32((seed >> 32) & _U32)
    _quantize_kernel(x.contiguous().numpy(), mode, block, headroom, rounding, k0, k1, mantissa, exponent)
    exponent = torch.from_numpy(exponent)
    return torch.from_numpy(mantissa), exponent if mode == 2 else exponent.reshape(-1)


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
    """float32 (M, N) = A B with int16 A (M, K), B (K, N), exponents ea (M, KB), eb (KB, N)."""
    ensure_available()
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    _gemm_kernel(
        a.contiguous().numpy(),
        b.t().contiguous().numpy(),
        ea.contiguous().numpy(),
        eb.contiguous().numpy(),
        kblock,
        chain_length(ha, hb),
        out,
    )
    result = torch.from_numpy(out)
    return result + bias if bias is not None else result
