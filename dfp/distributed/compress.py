"""DFP16 gradient compression for DistributedDataParallel: every rank's gradients travel as
int16 mantissas that share one power-of-two exponent per bucket, agreed across ranks.

Steps for one bucket (a flat float tensor of n gradients) on W ranks:

1. all-reduce MAX of the bucket's largest magnitude (one number), so every rank picks the
   same exponent from the same ``amax``;
2. quantize with the rule of docs/design.md (as ``dfp.quantize`` does with
   ``DFPSpec(headroom=s)``, nearest rounding, half to even), at headroom
   ``s = ceil(log2 W)``;
3. all-reduce SUM of the mantissas, exactly, in integers;
4. mantissa sums times ``2**e``, divided by W (DDP averages gradients).

Bit budget: mantissas lie in ``[-M, M]`` with ``M = 2**(15 - s) - 1 <= floor((2**15 - 1) / W)``,
so the sum of any k <= W of them, and so every partial sum a ring or tree reduction forms,
stays within ``[-(2**15 - 1), 2**15 - 1]``: no overflow.

Wire format: neither gloo ("Invalid scalar type") nor NCCL (no 16-bit integer type) can
reduce int16 tensors, so two mantissas travel in one int32 word, ``hi * 2**16 + lo``. Adding
words adds both lanes at once: the sum is ``sum(hi) * 2**16 + sum(lo)``, below ``2**31`` in
magnitude because each lane's sum fits in int16, and ``sum(lo)`` is recovered from the low 16
bits (sign-extended), ``sum(hi)`` from the rest. So 16 bits per gradient go on the wire, half
of fp32, on both backends.

Error: nearest rounding puts each rank's value within half a step ``2**(e-1)`` of
``q * 2**e``; the integer sum is exact; so the mean is within ``2**(e-1)`` (plus the fp32
rounding of the final division when W is not a power of two). Since ``e`` is the smallest
exponent with ``amax * 2**-e <= M``, ``2**(e-1) < amax / M``: about ``2**-14 * amax`` for W = 2.

Non-finite gradients: DFP16 has no NaN or Inf. If any rank's bucket holds one, every rank
sees an infinite MAX and that bucket is averaged in fp32 instead, exactly as DDP does without
a hook, so NaN and Inf reach the gradients and ``torch.amp.GradScaler`` skips the step.
"""

# no `from __future__ import annotations`: DDP compares the hook's annotations with the
# real dist.GradBucket and Future[Tensor] objects and rejects strings
import math

import torch
import torch.distributed as dist

from ..format import MAX_HEADROOM

_LANE = 2**16
_HALF_LANE = 2**15


def headroom_for(world_size: int) -> int:
    """Headroom bits ``ceil(log2 world_size)``: the sum of ``world_size`` mantissas fits in int16."""
    headroom = (world_size - 1).bit_length()
    if headroom > MAX_HEADROOM:
        raise ValueError(
            f"dfp16 gradient compression supports at most {2**MAX_HEADROOM} ranks (got {world_size}): "
            "more would leave under 2 mantissa bits; use DDP's default fp32 all-reduce (compress=None)"
        )
    return headroom


def shared_exponent(amax: float, headroom: int) -> int:
    """The DFP16 exponent of a group whose largest magnitude is ``amax`` (docs/design.md):
    ``e = E - (15 - s)`` for ``amax = f * 2**E``, ``f`` in [0.5, 1), plus one when
    ``amax * 2**-e`` would exceed ``M = 2**(15 - s) - 1``; a zero group gets the exponent of
    the smallest positive float32."""
    digits = 15 - headroom
    if amax == 0:
        return -149 - digits + 1
    f, big_e = math.frexp(amax)
    # no raise for amax >= 2**127, whose rounded top would be 2**128 (inf in fp32)
    return big_e - digits + int(f * 2**digits > 2**digits - 1 and big_e < 128)


def _times_pow2(x: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 ``x * 2**k``. ``2**k`` leaves the fp32 range for ``k > 127`` (tiny buckets) and
    ``k < -126`` (decoding them); then the first of two factors is the one whose product is
    exact here (a tiny x times 2**64, an int16 sum times 2**(k+64)) and only the last rounds."""
    if k > 127:
        return x * 2.0**64 * 2.0 ** (k - 64)
    if k < -126:
        return x * 2.0 ** (k + 64) * 2.0**-64
    return x * 2.0**k


def _encode(x: torch.Tensor, exponent: int, limit: int) -> torch.Tensor:
    """fp32 (n,) -> int32 words (ceil(n / 2),), each holding two mantissas ``hi * 2**16 + lo``."""
    q = torch.round(_times_pow2(x, -exponent))  # half to even, as dfp.quantize
    q = q.clamp_(-limit, limit).to(torch.int32)  # the clamp never acts (|v| <= limit); a guard
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return q[1::2] * _LANE + q[0::2]


def _decode(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 summed words (ceil(n / 2),) -> the n int32 mantissa sums, lanes in order."""
    lo = ((words + _HALF_LANE) & (_LANE - 1)) - _HALF_LANE
    hi = (words - lo) >> 16
    return torch.stack([lo, hi], dim=1).flatten()[:n]


def dfp16_all_reduce_mean(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.futures.Future[torch.Tensor]:
    """Average ``tensor`` over the ranks of ``group`` (None: the default group), sending DFP16.

    Args:
        tensor: a non-empty float tensor, the same shape on every rank; it receives the mean
            in place (like DDP's bucket buffers). The exponent is shared by all its elements.
        group: the process group.

    Returns:
        A future completed with ``tensor`` once it holds the mean. The one-number MAX
        all-reduce runs before this returns (the exponent must be known to quantize); the
        mantissa all-reduce runs asynchronously. See the module docstring for the error bound.
    """
    if tensor.numel() == 0:
        raise ValueError("dfp16_all_reduce_mean needs a non-empty tensor (DDP buckets always are)")
    world_size = dist.get_world_size(group)
    headroom = headroom_for(world_size)
    x = tensor.reshape(-1).float()

    amax = x.abs().amax().reshape(1)
    # a comparison with NaN is false, so MAX could drop a NaN; +inf always wins
    amax = torch.where(torch.isfinite(amax), amax, torch.inf)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    amax_all = float(amax.item())

    if not math.isfinite(amax_all):
        fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
        return fut.then(lambda done: done.value()[0].div_(world_size))

    exponent = shared_exponent(amax_all, headroom)
    words = _encode(x, exponent, 2 ** (15 - headroom) - 1)
    fut = dist.all_reduce(words, group=group, async_op=True).get_future()

    def decode(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        sums = _decode(done.value()[0], tensor.numel()).float()  # |sum| < 2**15: exact in fp32
        mean = _times_pow2(sums, exponent).div_(world_size)
        return tensor.copy_(mean.view(tensor.shape))

    return fut.then(decode)


def dfp16_compress_hook(state: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket's gradients across ranks, sent as DFP16.

    Register with ``ddp_model.register_comm_hook(state, dfp16_compress_hook)``, where
    ``state`` is a process group or None for the default group. One exponent per bucket;
    ``headroom = ceil(log2 world_size)`` bits, so 15 - headroom mantissa bits (14 on 2 ranks).
    """
    if state is not None and not isinstance(state, dist.ProcessGroup):
        raise TypeError(
            f"dfp16_compress_hook's state must be a torch.distributed.ProcessGroup or None "
            f"(the default group), got {type(state).__name__}"
        )
    return dfp16_all_reduce_mean(bucket.buffer(), state)
