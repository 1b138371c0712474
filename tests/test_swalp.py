"""SWALP: SGD whose weights stay DFP16 numbers, with unbiased stochastic rounding, and
the fp32 weight average with recomputed batch-norm statistics."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import dfp
from dfp.optim import SWALP, WeightAverage


def is_dfp16(x: torch.Tensor, headroom: int) -> bool:
    """Whether ``x`` holds a DFP16 number: re-quantizing it (to nearest) changes no bit."""
    return torch.equal(dfp.quantize(x.detach(), dfp.DFPSpec(headroom)).dequantize(), x.detach())


def step_size(x: torch.Tensor, headroom: int) -> float:
    """The quantization step (2**exponent) of the DFP16 tensor ``x``."""
    return 2.0 ** dfp.quantize(x.detach(), dfp.DFPSpec(headroom)).exponent.item()


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    optimizer.zero_grad()
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def snapshot(model: nn.Module, optimizer: SWALP) -> list[torch.Tensor]:
    state = [p.detach().clone() for p in model.parameters()]
    return state + [s["momentum_buffer"].clone() for s in optimizer.state.values()]


@pytest.mark.parametrize("headroom", [2, 5])
def test_parameters_and_momentum_are_dfp16_numbers_after_every_step(headroom):
    torch.manual_seed(0)
    model = tiny_net()
    assert not all(is_dfp16(p, headroom) for p in model.parameters())  # fp32 initial values
    optimizer = SWALP(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, headroom=headroom)
    assert all(is_dfp16(p, headroom) for p in model.parameters())  # rounded by the constructor
    for batch in batches(4):
        before = [p.detach().clone() for p in model.parameters()]
        train_step(model, optimizer, batch)
        for (name, p), old in zip(model.named_parameters(), before):
            if name != "0.bias":  # batch norm cancels the conv bias: its gradient is rounding noise
                assert not torch.equal(p, old), name
            assert is_dfp16(p, headroom), name  # 1-D batch-norm weights and biases included
            assert is_dfp16(optimizer.state[p]["momentum_buffer"], headroom), name


def test_each_step_is_sgd_to_within_one_quantization_step():
    """One SWALP step from any state is torch's SGD step (momentum, weight decay) up to
    the rounding of the momentum buffer and of the new weights."""
    torch.manual_seed(0)
    model = tiny_net()
    lr, momentum, weight_decay = 0.1, 0.9, 1e-2
    optimizer = SWALP(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for batch in batches(3):
        twin = copy.deepcopy(model)
        sgd = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for p, q in zip(model.parameters(), twin.parameters()):
            if p in optimizer.state:
                sgd.state[q]["momentum_buffer"] = optimizer.state[p]["momentum_buffer"].clone()
        train_step(model, optimizer, batch)
        train_step(twin, sgd, batch)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            bound = step_size(p, 2) + lr * step_size(optimizer.state[p]["momentum_buffer"], 2)
            assert (p - q).abs().max().item() <= bound, name
            assert not torch.equal(p, q), name  # rounded: not simply SGD


def test_stochastic_rounding_is_unbiased_below_one_quantization_step():
    """Updates of a quarter step: nearest rounding would never move the weights; SWALP
    moves them by a quarter step per update on average."""
    weights = torch.full((4097,), 0.5)
    weights[0] = 1.5  # fixes the exponent: amax in [1, 2) gives a step of 2**-12 at headroom 2
    parameter = nn.Parameter(weights)
    optimizer = SWALP([parameter], lr=1.0, momentum=0.0)
    step = 2.0**-12
    assert step_size(parameter, 2) == step
    gradient = torch.full_like(weights, step / 4)
    gradient[0] = 0
    updates = 8
    for _ in range(updates):
        parameter.grad = gradient.clone()
        optimizer.step()
    moved = (0.5 - parameter.detach()[1:].double()) / step
    assert torch.equal(moved, moved.round())  # on the grid
    assert len(moved.unique()) >= 4  # each element rounds on its own
    # Mean of 4096 elements whose variance is at most 8 * 3/16 step^2: standard error 0.02 step.
    assert abs(moved.mean().item() - updates / 4) < 0.1, moved.mean().item()
    assert parameter.detach()[0] == 1.5


def least_squares(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(256, 8, generator=g)
    b = a @ torch.randn(8, generator=g) + 0.1 * torch.randn(256, generator=g)
    solution = torch.linalg.lstsq(a.double(), b.double().unsqueeze(1)).solution.squeeze(1)
    return a, b, solution


@pytest.mark.parametrize("headroom", [2, 8])
def test_converges_and_the_average_beats_every_low_precision_point(headroom):
    """Least squares: the DFP16 iterates reach the solution to within a few quantization
    steps; the mean of the last 100 lies closer to it than the nearest DFP16 number does
    (the point of SWALP)."""
    a, b, solution = least_squares()
    torch.manual_seed(0)
    model = nn.Linear(8, 1, bias=False)
    optimizer = SWALP(model.parameters(), lr=0.05, momentum=0.9, headroom=headroom)
    average = WeightAverage(model)
    for iteration in range(300):
        optimizer.zero_grad()
        (0.5 * (model(a).squeeze(1) - b).square().mean()).backward()
        optimizer.step()
        if iteration >= 200:
            average.update(model)
    assert average.count == 100
    nearest = dfp.quantize(solution.float(), dfp.DFPSpec(headroom))
    step = 2.0 ** nearest.exponent.item()
    last_error = (model.weight.detach().double().squeeze(0) - solution).norm().item()
    average_weight = average.averaged_model(list).weight.detach().double().squeeze(0)
    average_error = (average_weight - solution).norm().item()
    nearest_error = (nearest.dequantize().double() - solution).norm().item()
    assert last_error < 6 * step, (last_error, step)
    assert average_error < 0.75 * nearest_error, (average_error, nearest_error)
    assert average_error < 0.5 * last_error, (average_error, last_error)


def test_state_dict_round_trip_reproduces_the_next_step_bit_for_bit():
    torch.manual_seed(0)
    model = tiny_net()
    optimizer = SWALP(model.parameters(), lr=0.1, seed=7)
    data = batches(4)
    for batch in data[:3]:
        train_step(model, optimizer, batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train_step(model, optimizer, data[3])
    expected = [p.detach().clone() for p in model.parameters()]

    def restored(generator_state: torch.Tensor | None = None) -> list[torch.Tensor]:
        torch.manual_seed(1)
        twin = tiny_net()
        twin_optimizer = SWALP(twin.parameters(), lr=0.1, seed=123)
        buffer.seek(0)
        saved = torch.load(buffer)
        if generator_state is not None:
            saved["optimizer"]["generator_state"] = generator_state
        twin.load_state_dict(saved["model"])
        twin_optimizer.load_state_dict(saved["optimizer"])
        train_step(twin, twin_optimizer, data[3])
        return [p.detach() for p in twin.parameters()]

    assert all(torch.equal(p, q) for p, q in zip(restored(), expected))
    other_generator = torch.Generator().manual_seed(7).get_state()  # the state at construction
    assert not all(torch.equal(p, q) for p, q in zip(restored(other_generator), expected))


def test_load_state_dict_needs_the_generator_state():
    model = tiny_net()
    optimizer = SWALP(model.parameters(), lr=0.1)
    state = optimizer.state_dict()
    del state["generator_state"]
    with pytest.raises(KeyError, match="no 'generator_state'"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_non_finite_gradient_raises_and_changes_nothing(momentum):
    torch.manual_seed(0)
    model = tiny_net()
    optimizer = SWALP(model.parameters(), lr=0.1, momentum=momentum)
    data = batches(3)
    train_step(model, optimizer, data[0])
    twin = copy.deepcopy(model)
    twin_optimizer = SWALP(twin.parameters(), lr=0.1, momentum=momentum)
    twin_optimizer.load_state_dict(optimizer.state_dict())

    before = snapshot(model, optimizer)
    optimizer.zero_grad()
    x, y = data[1]
    nn.functional.cross_entropy(model(x), y).backward()
    model[4].weight.grad[0, 0] = float("nan")  # a late parameter: the new values of the earlier ones are computed
    with pytest.raises(
        dfp.NonFiniteError,
        match=r"parameter 4 of group 0 \(shape \(3, 64\)\) is not finite: its gradient holds NaN.*No parameter",
    ):
        optimizer.step()
    assert all(torch.equal(t, u) for t, u in zip(snapshot(model, optimizer), before))

    # The failed step consumed no random numbers: the next steps match a twin that never saw it.
    for batch in data[2:]:
        train_step(model, optimizer, batch)
        train_step(twin, twin_optimizer, batch)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_an_overflowing_update_raises():
    parameter = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = SWALP([parameter], lr=1e30, momentum=0.0)
    parameter.grad = torch.tensor([1e10, 0.0])
    with pytest.raises(dfp.NonFiniteError, match="parameter 0 of group 0 .* not finite: the update overflowed"):
        optimizer.step()
    assert parameter.tolist() == [1.0, -2.0]


def test_bad_arguments_are_refused():
    with pytest.raises(dfp.NonFiniteError, match="initial value of parameter 1 of group 0"):
        SWALP([nn.Parameter(torch.ones(2)), nn.Parameter(torch.tensor([float("inf")]))], lr=0.1)
    with pytest.raises(TypeError, match=r"torch.float64.*call model.float\(\)"):
        SWALP([nn.Parameter(torch.ones(2, dtype=torch.float64))], lr=0.1)
    with pytest.raises(ValueError, match="momentum must be in"):
        SWALP([nn.Parameter(torch.ones(2))], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SWALP([nn.Parameter(torch.ones(2))], lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        SWALP([nn.Parameter(torch.ones(2))], lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="headroom"):
        SWALP([nn.Parameter(torch.ones(2))], lr=0.1, headroom=14)


def test_parameter_groups_keep_their_own_headroom():
    coarse, fine = nn.Parameter(torch.randn(64)), nn.Parameter(torch.randn(64))
    optimizer = SWALP([{"params": [coarse], "headroom": 9}, {"params": [fine]}], lr=0.1)
    for p in (coarse, fine):
        p.grad = torch.randn(64)
    optimizer.step()
    assert is_dfp16(coarse, 9) and is_dfp16(fine, 2)
    assert not is_dfp16(fine, 9)


# WeightAverage


def set_parameters(model: nn.Module, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def test_the_average_is_the_exact_mean_in_any_order():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    shapes = [p.shape for p in model.parameters()]
    snapshots = [[dfp.quantize(torch.randn(s), dfp.DFPSpec()).dequantize() for s in shapes] for _ in range(7)]

    def averaged(order: list[int]) -> list[torch.Tensor]:
        average = WeightAverage(model)
        for k in order:
            set_parameters(model, snapshots[k])
            average.update(model)
        assert average.count == len(order)
        return [p.detach() for p in average.averaged_model(list).parameters()]

    for i, mean in enumerate(averaged(list(range(7)))):
        expected = torch.stack([s[i].double() for s in snapshots]).mean(0).float()
        assert torch.equal(mean, expected)
    assert all(torch.equal(p, q) for p, q in zip(averaged(list(range(7))), averaged([3, 6, 0, 5, 1, 4, 2])))

    set_parameters(model, [torch.full(s, 1.0) for s in shapes])
    average = WeightAverage(model)
    for value in (1.0, 2.0, 6.0):
        set_parameters(model, [torch.full(s, value) for s in shapes])
        average.update(model)
    assert all(torch.equal(p, torch.full(p.shape, 3.0)) for p in average.averaged_model(list).parameters())


def test_batch_norm_statistics_are_recomputed_for_the_mean_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)  # stale statistics of the live model
        model[1].running_var.fill_(7.0)
    average = WeightAverage(model)
    snapshots = [[torch.randn(p.shape) for p in model.parameters()] for _ in range(2)]
    for values in snapshots:
        set_parameters(model, values)
        average.update(model)
    data = [(torch.randn(n, 2, 5, 5), torch.zeros(n, dtype=torch.long)) for n in (5, 7, 4)]
    averaged = average.averaged_model(lambda: iter(data))

    conv = nn.Conv2d(2, 3, 3)
    set_parameters(conv, [(a + b) / 2 for a, b in zip(snapshots[0][:2], snapshots[1][:2])])
    with torch.no_grad():
        outputs = [conv(x).transpose(0, 1).flatten(1) for x, _ in data]  # (channels, values) per batch
    expected_mean = torch.stack([o.mean(1) for o in outputs]).mean(0)  # each batch counts equally
    expected_var = torch.stack([o.var(1, correction=1) for o in outputs]).mean(0)
    bn = averaged[1]
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 3 and bn.momentum == model[1].momentum
    assert not averaged.training
    # The averaged model normalises with its new statistics.
    x = data[0][0]
    with torch.no_grad():
        expected = (conv(x) - expected_mean.view(1, 3, 1, 1)) / (expected_var.view(1, 3, 1, 1) + bn.eps).sqrt()
        expected = expected * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(averaged(x), expected, rtol=1e-4, atol=1e-5)


def test_the_live_model_is_untouched_and_other_buffers_follow_it():
    torch.manual_seed(0)
    model = tiny_net()
    model.register_buffer("temperature", torch.tensor(1.0))
    optimizer = SWALP(model.parameters(), lr=0.1)
    average = WeightAverage(model)
    for batch in batches(3):
        train_step(model, optimizer, batch)
        average.update(model)
    model.temperature.fill_(2.5)
    average.update(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = average.averaged_model(lambda: batches(2, seed=1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    assert averaged.temperature.item() == 2.5
    assert not torch.equal(averaged[1].running_mean, model[1].running_mean)
    with torch.no_grad():
        next(averaged.parameters()).add_(1.0)
    assert torch.equal(next(model.parameters()), before["0.weight"])


def test_a_model_without_batch_norm_reads_no_data():
    average = WeightAverage(nn.Linear(3, 2))
    average.update(nn.Linear(3, 2))

    def unreadable():
        raise AssertionError("the data were read")
        yield

    assert isinstance(average.averaged_model(unreadable), nn.Linear)


def test_weight_average_errors():
    average = WeightAverage(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="nothing averaged yet"):
        average.averaged_model(list)
    with pytest.raises(ValueError, match="unexpected"):
        average.update(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"parameter 'weight' has shape \(2, 4\)"):
        average.update(nn.Linear(4, 2))
