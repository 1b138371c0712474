"""dfp.distributed: the DFP16 gradient all-reduce and DDP hook on 2 CPU processes (gloo),
and the torchrun set-up.

The two ranks run tests/distributed_worker.py once per module, started with the environment
torchrun sets; each test below checks one part of what they saved.
"""

from __future__ import annotations

from pathlib import Path

import distributed_worker as worker
import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks
from torch import nn

import dfp
from dfp.distributed import Context, all_reduce_mean, dfp16_compress_hook, setup, teardown, wrap
from dfp.distributed.compress import _decode, _encode, headroom_for, shared_exponent

WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LIMIT = 2**14 - 1  # mantissa bound on 2 ranks: headroom 1, 2**14 - 1 <= floor((2**15 - 1) / 2)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Start the 2 ranks as torchrun would, wait for both, return what each saved."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(WORKER, [str(out)], worker.WORLD_SIZE, timeout=180)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(worker.WORLD_SIZE)]


def _expected_mean(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The hook's result by dfp's numerics contract: each rank's mantissas from dfp.quantize
    at headroom 1 with the exponent set by the largest magnitude over all ranks (appended to
    each rank's values, since dfp.quantize takes its exponent from the largest magnitude),
    summed exactly, times 2**e, halved in fp32."""
    amax = max(x.abs().max() for x in inputs).reshape(1)
    quantized = [dfp.quantize(torch.cat([x, amax]), dfp.DFPSpec(headroom=1)) for x in inputs]
    exponent = int(quantized[0].exponent)
    total = sum(q.mantissa[:-1].to(torch.int64) for q in quantized)
    return (total.double() * 2.0**exponent).float() / 2


def _error_bound(inputs: list[torch.Tensor], reference: torch.Tensor) -> torch.Tensor:
    """Derived bound on |result - exact mean|: half a step, 2**(e-1), where e is the smallest
    exponent with amax * 2**-e <= LIMIT (found here by search, not by the code under test),
    plus two fp32 roundings (of sum * 2**e, then of the halving)."""
    amax = float(max(x.abs().max() for x in inputs))
    if amax == 0:
        return torch.zeros_like(reference)
    e = 200
    while amax * 2.0 ** -(e - 1) <= LIMIT:
        e -= 1
    return 2.0 ** (e - 1) + 2 * (2.0**-24 * reference.abs() + 2.0**-150)


# (a) the averaged values: bit for bit as the contract says, within the derived bound


@pytest.mark.parametrize("name", [c for c in worker.CASES if c not in ("nan", "inf")])
def test_mean_is_the_sum_of_dfp16_mantissas(ranks, name):
    inputs = [worker.case_input(name, r) for r in range(worker.WORLD_SIZE)]
    exact = (inputs[0].double() + inputs[1].double()) / 2
    expected = _expected_mean(inputs)
    for rank in ranks:
        mean = rank["cases"][name][0]
        assert mean.dtype == torch.float32 and mean.shape == inputs[0].shape
        assert torch.equal(mean, expected), name
        assert ((mean.double() - exact).abs() <= _error_bound(inputs, exact)).all(), name


def test_lane_extremes_and_ties(ranks):
    top = worker.case_input("top", 0)
    ties = torch.tensor([LIMIT, 0, 2, 2, 0, -2, -2, 4], dtype=torch.float32)  # half to even; (4 + 4) / 2
    for rank in ranks:
        assert torch.equal(rank["cases"]["top"][0], top)  # lanes summed to +-(2**15 - 2), no carry lost
        assert torch.equal(rank["cases"]["ties"][0], ties)


def test_ddp_gradients(ranks):
    """One DDP backward with the hook: each gradient is the contract's mean of the two ranks'
    half-batch gradients (one bucket, so one exponent for all) and lies within the bound
    of the fp32 DDP gradient."""
    local = [rank["local_grads"] for rank in ranks]
    flat = [torch.cat([g.flatten() for g in grads]) for grads in local]
    expected = _expected_mean(flat)
    for rank in ranks:
        hooked = torch.cat([g.flatten() for g in rank["ddp_grads"]["dfp16"][0]])
        fp32 = torch.cat([g.flatten() for g in rank["ddp_grads"][None][0]])
        assert torch.equal(hooked, expected)
        assert ((hooked - fp32).abs() <= _error_bound(flat, fp32)).all()
        assert not torch.equal(hooked, fp32)  # the gradients did go through the hook


# (b) what goes on the wire


@pytest.mark.parametrize("name", worker.CASES)
def test_collectives(ranks, name):
    n = worker.case_input(name, 0).numel()
    if name in ("nan", "inf"):  # non-finite: the bucket travels in fp32, as without the hook
        wire = [("max", torch.float32, 1), ("sum", torch.float32, n)]
    else:  # two int16 mantissas per int32 word: 16 bits per element
        wire = [("max", torch.float32, 1), ("sum", torch.int32, (n + 1) // 2)]
    for rank in ranks:
        assert rank["cases"][name][1] == wire


def test_ddp_sends_half_the_bytes_of_fp32(ranks):
    params = sum(g.numel() for g in ranks[0]["local_grads"])
    for rank in ranks:
        calls = rank["ddp_grads"]["dfp16"][1]
        assert calls == [("max", torch.float32, 1), ("sum", torch.int32, (params + 1) // 2)]
        assert 4 * calls[1][2] <= 2 * params + 2  # bytes of the int32 words vs 4 * params for fp32


@pytest.mark.parametrize("world_size", [2, 3, 5, 8, 2**13])
def test_words_add_lanes_without_overflow(world_size):
    """Encode extreme mantissas (+-M, same sign in most lanes) on every rank, add the int32
    words rank by rank in int64 (to see any overflow) and decode: each lane is the exact sum,
    and every partial sum fits in int32."""
    headroom = headroom_for(world_size)
    limit = 2 ** (15 - headroom) - 1
    assert limit <= (2**15 - 1) // world_size
    g = torch.Generator().manual_seed(world_size)
    lanes = 10
    signs = torch.ones(world_size, lanes)
    signs[:, 1::3] = -1
    signs[:, 2::3] = torch.randint(0, 2, (world_size, len(range(2, lanes, 3))), generator=g) * 2.0 - 1
    mantissas = signs * limit
    words = _encode(mantissas.flatten(), 0, limit).to(torch.int64).view(world_size, lanes // 2)
    partial = words.cumsum(0)
    assert partial.abs().max() < 2**31
    sums = _decode(partial[-1].to(torch.int32), lanes)
    assert torch.equal(sums.to(torch.int64), mantissas.sum(0).to(torch.int64))


def test_too_many_ranks_is_rejected():
    with pytest.raises(ValueError, match="at most 8192 ranks"):
        headroom_for(2**13 + 1)


@pytest.mark.parametrize("headroom", [0, 1, 2, 5, 13])
def test_shared_exponent_is_dfp_quantize_exponent(headroom):
    top = 2 ** (15 - headroom) - 1
    values = [0.0, 1e-45, 3e-39, 1.0, 0.75, 2.0**-30, top, top + 0.5, 3e38, 2.0**127, float(torch.finfo().max)]
    for amax in values:
        x = torch.tensor([amax], dtype=torch.float32)
        assert shared_exponent(float(x), headroom) == int(dfp.quantize(x, dfp.DFPSpec(headroom=headroom)).exponent)


# (c) training with DDP follows one process on the full batch


@pytest.fixture(scope="module")
def single_process_losses() -> dict[str, list[float]]:
    torch.set_num_threads(1)
    ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return {
        "fp32": worker.train_losses(worker.small_cnn("fp32"), ctx),
        "dfp16": worker.train_losses(worker.small_cnn("dfp16"), ctx),
        # the full batch in the two halves the ranks see: dfp16 layers quantize each half on its own
        "dfp16 halves": worker.train_losses(worker.small_cnn("dfp16"), ctx, micro_batches=2),
    }


def _relative_gaps(curve: list[float], reference: list[float]) -> torch.Tensor:
    return (torch.tensor(curve, dtype=torch.float64) - torch.tensor(reference)).abs() / torch.tensor(reference)


def test_training_learns(single_process_losses):
    """The comparisons below mean something only if the loss moves."""
    losses = single_process_losses["fp32"]
    assert losses[-1] < 0.85 * losses[0]


def test_fp32_ddp_follows_one_process(ranks, single_process_losses):
    """fp32 layers and fp32 all-reduce: only the order of fp32 sums differs (the gradient of
    two halves added by DDP, oneDNN's reduction order per ISA), a few ulp (2**-23) per step.
    Training amplifies such differences: on an AMD Zen 4 the gap grew from 1e-7 at step 13 to
    1.5e-5 at step 27, on a Zen 5 to 1.49e-5. So the first ten steps, before that growth, may
    drift by 8 ulp per step, (t + 1) * 2**-20 (measured at most 2.2e-7, at step 8: bound 8.6e-6);
    every step stays within the bound the dfp16 hook is held to, (t + 1) * 2**-12."""
    steps = torch.arange(worker.TRAIN_STEPS, dtype=torch.float64) + 1
    for rank in ranks:
        gaps = _relative_gaps(rank["losses"][("fp32", None)], single_process_losses["fp32"])
        assert (gaps[:10] <= steps[:10] * 2.0**-20).all(), gaps[:10]
        assert (gaps <= steps * 2.0**-12).all(), gaps


def test_dfp16_ddp_is_gradient_accumulation_over_the_halves(ranks, single_process_losses):
    """dfp16 layers, fp32 all-reduce: each rank quantizes its half batch exactly as one process
    does when it accumulates the gradients of the two halves (loss / 2 only shifts exponents),
    and (g0 + g1) / 2 = g0 / 2 + g1 / 2 in fp32: the same bits."""
    for rank in ranks:
        assert rank["losses"][("dfp16", None)] == single_process_losses["dfp16 halves"]


@pytest.mark.parametrize("reference", ["dfp16 halves", "dfp16"])
def test_dfp16_hook_training_follows_one_process(ranks, single_process_losses, reference):
    """dfp16 layers with the dfp16 hook. Each step the hook moves every gradient by at most
    2**-14 of its bucket's largest magnitude (half a step at headroom 1); against the full
    batch in one piece, the layers also quantize each half with its own exponent (at most
    2**-13 of a tensor's largest magnitude, headroom 2). Together that is a perturbation of
    order 2**-12 relative per step; with no contraction assumed, the gaps add up linearly:
    the loss at step t (0-based) may differ by (t + 1) * 2**-12 relative. Measured: 1e-4."""
    tolerance = (torch.arange(worker.TRAIN_STEPS, dtype=torch.float64) + 1) * 2.0**-12
    for rank in ranks:
        gaps = _relative_gaps(rank["losses"][("dfp16", "dfp16")], single_process_losses[reference])
        assert (gaps <= tolerance).all(), gaps.max()


# (d) non-finite gradients stay non-finite


@pytest.mark.parametrize(("name", "index", "check"), [("nan", 3, torch.isnan), ("inf", 5, torch.isposinf)])
def test_non_finite_reaches_every_rank(ranks, name, index, check):
    inputs = [worker.case_input(name, r) for r in range(worker.WORLD_SIZE)]
    fp32_mean = (inputs[0] + inputs[1]) / 2
    for rank in ranks:
        mean = rank["cases"][name][0]
        assert check(mean[index])
        assert torch.equal(mean.isfinite(), fp32_mean.isfinite())
        finite = mean.isfinite()
        assert torch.equal(mean[finite], fp32_mean[finite])  # the rest averaged in fp32, as DDP would


def test_nan_loss_on_one_rank_poisons_every_rank(ranks):
    for rank in ranks:
        assert not any(rank["nan_grads_finite"])


# (e) the harness's training loop under DDP


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(ranks):
    # Rank 1 alone sees NaN logits at step 2; a rank that stopped alone would leave the other
    # waiting in a collective (the fixture's deadline would fail this test).
    for rank in ranks:
        result = rank["harness"]
        assert result["diverged"] and result["steps"] == worker.POISONED_FORWARD - 1
        assert len(result["epochs"]) == 1 and result["epochs"][0]["train_loss"] is None


def test_ranks_draw_their_own_random_numbers(ranks):
    # dfp16-sr layers round with torch's global generator: one stream per rank.
    assert ranks[0]["draw_after_harness"] != ranks[1]["draw_after_harness"]


# (f) set-up, wrapping, metrics


def test_setup_under_torchrun_environment(ranks):
    for r, rank in enumerate(ranks):
        assert rank["context"] == (r, 2, r, "cpu", r == 0)
        assert rank["initialised"] and not rank["initialised_after_teardown"]
        assert rank["metric_mean"] == 2.0  # mean of 1.0 and 3.0


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_setup_without_torchrun_is_single_process(no_torchrun):
    ctx = setup("cpu")
    assert ctx == Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert ctx.is_main and not dist.is_initialized()
    model = nn.Linear(3, 2)
    assert wrap(model, ctx, compress="dfp16") is model
    assert all_reduce_mean(1.5, ctx) == 1.5
    teardown(ctx)
    assert setup().world_size == 1


def test_torchrun_with_one_process_needs_no_process_group(no_torchrun, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert setup("cpu").world_size == 1 and not dist.is_initialized()


def test_partial_environment_is_rejected(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="not WORLD_SIZE, LOCAL_RANK.*torchrun"):
        setup("cpu")


def test_bad_rank_is_rejected(no_torchrun, monkeypatch):
    for name, value in (("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"RANK must lie in \[0, WORLD_SIZE\)"):
        setup("cpu")


def test_missing_rendezvous_is_rejected(no_torchrun, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not set"):
        setup("cpu")


def test_unknown_device_is_rejected(no_torchrun):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:K', got 'tpu'"):
        setup("tpu")


def test_one_gpu_for_several_processes_is_rejected(no_torchrun, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="names one GPU for all 2 processes; pass device='cuda'"):
        setup("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_says_so(no_torchrun):
    with pytest.raises(RuntimeError, match="needs CUDA.*nccl.*device='cpu'"):
        setup("cuda")


def test_unknown_compression_is_rejected():
    ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="compress must be None .* or one of 'dfp16', got 'fp16'"):
        wrap(nn.Linear(2, 2), ctx, compress="fp16")


def test_wrap_needs_a_process_group():
    ctx = Context(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no process group is initialised"):
        wrap(nn.Linear(2, 2), ctx)


def test_hook_rejects_a_wrong_state():
    with pytest.raises(TypeError, match="ProcessGroup or None"):
        dfp16_compress_hook(object(), None)
