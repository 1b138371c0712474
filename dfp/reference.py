"""Pure-torch, integer-exact reference backend: the oracle of every test.

Implements docs/design.md step by step, readability first: fp32 steps are done on
fp32 tensors (so they round exactly as the design says), integer steps in int64 (so
they are exact), uint32 arithmetic in int64 with explicit masks.
"""

from __future__ import annotations

import math

import torch

from ._errors import NonFiniteError
from .format import ROUNDINGS, exact_pow2, zeros_exponent

_INT32_MAX = 2**31 - 1
_U32 = 0xFFFFFFFF
NEAREST, STOCHASTIC = ROUNDINGS.index("nearest"), ROUNDINGS.index("stochastic")


def check_finite(x: torch.Tensor) -> None:
    """Raise NonFiniteError if ``x`` holds NaN or Inf (shared by the Python backends)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise NonFiniteError(
            f"cannot quantize a tensor that contains NaN/Inf: {bad} of its {x.numel()} values "
            "are not finite, and DFP16 represents finite numbers only"
        )


def chain_length(ha: int, hb: int) -> int:
    """The largest power of two L with ``L * Ma * Mb <= 2**31 - 1`` (``Ma = 2**(15-ha) - 1``):
    the number of int16 products an int32 chain can sum without overflow."""
    bound = _INT32_MAX // ((2 ** (15 - ha) - 1) * (2 ** (15 - hb) - 1))
    return 1 << (bound.bit_length() - 1)


def _group_amax(x: torch.Tensor, mode: int, block: int) -> torch.Tensor:
    """max |x| per group, shaped (1, 1, 1), (1, N, 1) or (O, ceil(N/block), I)."""
    a = x.abs()
    o, n, i = a.shape
    if mode == 2:
        nb = -(-n // block)
        # zero padding cannot change a maximum of absolute values
        padded = torch.cat([a, a.new_zeros(o, nb * block - n, i)], dim=1)
        return padded.view(o, nb, block, i).amax(dim=2)
    dims = (0, 1, 2) if mode == 0 else (0, 2)
    shape = (1, 1, 1) if mode == 0 else (1, n, 1)
    return a.amax(dim=dims, keepdim=True) if a.numel() else a.new_zeros(shape)


def _group_exponent(amax: torch.Tensor, headroom: int) -> torch.Tensor:
    """e = E - (15 - s) with amax = f * 2**E, f in [0.5, 1), plus one when amax * 2**-e =
    f * 2**(15 - s) > M (so every |v| <= M) and E < 128; a zero group gets the exponent of the
    smallest positive float32, which never dominates a maximum over groups."""
    digits = 15 - headroom
    f, big_e = torch.frexp(amax)
    # f * 2**digits is exact; no raise for amax >= 2**127, whose rounded top would be 2**128 (inf)
    e = big_e - digits + ((f * 2**digits > 2**digits - 1) & (big_e < 128)).int()
    return torch.where(amax > 0, e, zeros_exponent(headroom))


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for x in [0, 2**32), in two halves of c so int64 never overflows."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _U32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _random_bits(shape: tuple[int, ...], seed: int, device: torch.device | None = None) -> torch.Tensor:
    """The 23-bit random integer r of every element (as int64): a counter-based hash of
    its row-major flat index and the 64-bit seed."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    lo, hi = index & _U32, index >> 32
    return (_mix(lo ^ k0) ^ _mix(hi ^ k1)) >> 9


DITHER_MASK, DITHER_KEY = 0x807FFFFF, 0x9E3779B9  # csrc/cpu/numerics.h


def _dither_bits(x: torch.Tensor) -> torch.Tensor:
    """The 23-bit integer r of dithered rounding (as int64) of contiguous ``x``: a hash of
    each element's sign and significand bits (not its exponent field, so that a
    power-of-two scale leaves the rounding as it is) and the low half of its flat index."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape) & _U32
    return _mix((x.view(torch.int32).to(torch.int64) & DITHER_MASK) ^ index ^ DITHER_KEY) >> 9


def quantize3d(
    x: torch.Tensor, mode: int, block: int, headroom: int, rounding: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 mantissas (O, N, I) and int32 exponents ((1,), (N,) or (O, ceil(N/block), I))."""
    check_finite(x)
    n = x.shape[1]
    group_exponent = _group_exponent(_group_amax(x, mode, block), headroom)
    e = group_exponent.repeat_interleave(block, dim=1)[:, :n] if mode == 2 else group_exponent
    mantissa = round_to_exponents(x, e, headroom, rounding, seed)
    exponent = group_exponent if mode == 2 else group_exponent.reshape(-1)
    return mantissa, exponent.to(torch.int32)


def group_exponents(amax: torch.Tensor, headroom: int) -> torch.Tensor:
    """The int32 exponents of groups whose maxima of absolute values are ``amax``."""
    return _group_exponent(amax, headroom).to(torch.int32)


def round_to_exponents(x: torch.Tensor, e: torch.Tensor, headroom: int, rounding: int, seed: int) -> torch.Tensor:
    """int16 mantissas of finite, contiguous ``x`` against the exponents ``e`` (broadcast
    to x), each element's random bits from its row-major flat index in x; torch ops on
    x's device."""
    # v = x * 2**-e in fp32. 2**-e leaves the fp32 range when -e > 127 (tiny groups):
    # then multiply by 2**64 first and by 2**(-e - 64) after, both exact; otherwise
    # the second factor is 1.
    first = torch.where(-e > 127, 64, -e)
    v = x * exact_pow2(first).float() * exact_pow2(-e - first).float()

    if rounding == NEAREST:
        q = torch.round(v)  # half to even
    else:
        floor = torch.floor(v)
        threshold = (v - floor) * 2.0**23
        bits = _random_bits(tuple(x.shape), seed, x.device) if rounding == STOCHASTIC else _dither_bits(x.contiguous())
        q = floor + ((bits.float() + 0.5) < threshold).float()
    limit = 2 ** (15 - headroom) - 1
    return q.clamp(-limit, limit).to(torch.int16)


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
    k = a.shape[1]
    chain = chain_length(ha, hb)
    ra = ea.amax(dim=1, keepdim=True)
    rb = eb.amax(dim=0, keepdim=True)
    # float32 of an exact power of two: 0 or subnormal when it underflows
    sa = exact_pow2(ea - ra).float()
    sb = exact_pow2(eb - rb).float()
    a64, b64 = a.to(torch.int64), b.to(torch.int64)

    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
    for blk, start in enumerate(range(0, k, kblock)):
        stop = min(start + kblock, k)
        scale = sa[:, blk, None] * sb[None, blk, :]
        for c0 in range(start, stop, chain):
            c1 = min(c0 + chain, stop)
            chain_sum = a64[:, c0:c1] @ b64[c0:c1, :]  # exact: |sum| < 2**31 by construction
            # the product is exact (an integer of 24 bits times a power of two >= 2**-149
            # or 0), so only the sum rounds
            acc = acc + chain_sum.float() * scale

    out = (acc.double() * exact_pow2(ra + rb)).float()
    return out + bias if bias is not None else out
