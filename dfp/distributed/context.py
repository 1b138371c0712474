"""One process per device under torchrun: set-up, model wrapping, metric averaging, teardown.

Under ``torchrun --nproc_per_node=N`` every process reads its place from the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Started without them, a script runs
as a single process and no process group is created, so the same code serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .compress import dfp16_compress_hook

COMPRESSIONS: tuple[str, ...] = ("dfp16",)
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass
class Context:
    """Where this process stands: its rank among ``world_size`` processes, its rank on this
    machine (``local_rank``, which picks the GPU) and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes reports and prints progress."""
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """Join the process group torchrun describes, or run as a single process.

    Args:
        device: ``"cpu"``, ``"cuda"`` (each process takes ``cuda:LOCAL_RANK``), ``"cuda:K"``
            (one process only), or None for CUDA when available, else the CPU. The backend
            follows the device: nccl on CUDA, gloo on the CPU.

    Returns:
        The Context. With world size 1 (no torchrun variables, or torchrun with one process)
        no process group is initialised.
    """
    present = {name: os.environ[name] for name in _RANK_VARS if name in os.environ}
    if not present:
        return Context(rank=0, world_size=1, local_rank=0, device=_resolve_device(device, local_rank=0, world_size=1))
    if len(present) < len(_RANK_VARS):
        missing = [name for name in _RANK_VARS if name not in present]
        raise RuntimeError(
            f"distributed set-up found {', '.join(present)} but not {', '.join(missing)} in the environment: "
            "launch with torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), "
            "or unset them all to run as one process"
        )
    rank, world_size, local_rank = (_int_env(name) for name in _RANK_VARS)
    if not 0 <= rank < world_size or local_rank < 0:
        raise RuntimeError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}; "
            "RANK must lie in [0, WORLD_SIZE) and LOCAL_RANK must be >= 0"
        )
    ctx = Context(rank, world_size, local_rank, _resolve_device(device, local_rank, world_size))
    if world_size > 1:
        _init_process_group(ctx)
    return ctx


def wrap(model: nn.Module, ctx: Context, compress: str | None = None) -> nn.Module:
    """Move ``model`` to ``ctx.device`` and, with several processes, wrap it in
    DistributedDataParallel, which averages gradients across ranks during ``backward``.

    Args:
        model: the module to train, the same architecture on every rank (rank 0's weights
            are broadcast to the others). Batch-norm layers keep per-rank batch statistics,
            as with plain DDP.
        ctx: from :func:`setup`.
        compress: None (fp32 all-reduce) or ``"dfp16"`` (:func:`dfp16_compress_hook`: int16
            mantissas on the wire). Checked even for a single process, where nothing is sent.

    Returns:
        The DDP module (call ``.module`` for the model) or, with one process, ``model``.
    """
    if compress is not None and compress not in COMPRESSIONS:
        raise ValueError(
            f"compress must be None (fp32 gradients) or one of {', '.join(map(repr, COMPRESSIONS))}, got {compress!r}"
        )
    model = model.to(ctx.device)
    if ctx.world_size == 1:
        return model
    if not dist.is_initialized():
        raise RuntimeError(
            f"wrap got a context with world_size {ctx.world_size} but no process group is initialised; "
            "create the context with dfp.distributed.setup()"
        )
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compress == "dfp16":
        ddp.register_comm_hook(None, dfp16_compress_hook)
    return ddp


def all_reduce_mean(value: float, ctx: Context) -> float:
    """The mean of ``value`` over all ranks (for metrics: loss, accuracy, time); every rank
    must call it. NaN on any rank gives NaN."""
    if ctx.world_size == 1:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / ctx.world_size


def teardown(ctx: Context) -> None:
    """Leave the process group (if :func:`setup` created one); call once at the end."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _int_env(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={text!r} is not an integer (torchrun sets it)") from None


def _resolve_device(device: str | None, local_rank: int, world_size: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:K', got {device!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:K', got {device!r}")
    if dev.index is not None and world_size > 1:
        raise ValueError(
            f"device {device!r} names one GPU for all {world_size} processes; pass device='cuda' "
            "and each process takes cuda:LOCAL_RANK"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} needs CUDA (and, with several processes, the nccl backend), but torch "
            f"{torch.__version__} sees no CUDA device; pass device='cpu' to train on the CPU with gloo"
        )
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"this process needs cuda:{index} (LOCAL_RANK={local_rank}) but only {torch.cuda.device_count()} "
            "CUDA devices are visible: start at most that many processes per machine"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _init_process_group(ctx: Context) -> None:
    missing = [name for name in _RENDEZVOUS_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: the processes cannot find each other; launch with torchrun, "
            "which sets them, or set MASTER_ADDR and MASTER_PORT by hand"
        )
    if dist.is_initialized():
        if dist.get_rank() != ctx.rank or dist.get_world_size() != ctx.world_size:
            raise RuntimeError(
                f"a process group is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {ctx.rank} of {ctx.world_size}; call teardown first"
            )
        return
    if ctx.device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError(
                f"device {ctx.device} uses the nccl backend, which this torch {torch.__version__} build lacks; "
                "pass device='cpu' to use gloo"
            )
        dist.init_process_group("nccl", rank=ctx.rank, world_size=ctx.world_size, device_id=ctx.device)
    else:
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world_size)
