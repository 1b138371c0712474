"""dfp.structure (issue 16): channel removal, Net2WiderNet, Net2DeeperNet, the state that
follows them, the group-lasso regulariser, on torch layers and on dfp layers."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_ranks
from torch import nn

import dfp
from dfp import distributed, models, structure
from dfp.optim import SWALP, WeightAverage
from dfp.structure import ChannelSpace, Reader, Writer

torch.set_num_threads(1)

# None: torch layers; else the format of the dfp layers the model is converted to.
LAYER_FORMATS = (None, "fp32", "bf16", "fp16", "dfp16", "dfp16-sr", "dfp16-tensor")
# How far removing an all-zero channel may move the outputs of layers that round: a float
# GEMM may sum in another order, and a DFP16 input loses the channel that may have set its
# per-tensor exponent (its BN output is not zero), so the others are rounded on a finer
# grid (13-bit mantissas: 1.2e-4 per step). Torch and fp32 layers must agree to 1e-6.
ROUNDING = {"bf16": 1e-2, "fp16": 2e-3, "dfp16": 1e-3, "dfp16-sr": 1e-3, "dfp16-tensor": 1e-3}


class Chain(nn.Module):
    """conv(k)-BN-ReLU-conv(k)-BN-ReLU-flatten-linear: a conv -> conv and a conv -> FC space."""

    def __init__(self, kernel_size: int = 3, widths: tuple[int, int] = (6, 8), image: int = 5) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2 = nn.Conv2d(widths[0], widths[1], kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.fc = nn.Linear(widths[1] * image * image, 4)
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))

    def spaces(self) -> list[ChannelSpace]:
        return [
            ChannelSpace("a", (Writer("conv1", "bn1"),), (Reader("conv2"),)),
            ChannelSpace("b", (Writer("conv2", "bn2"),), (Reader("fc", self.image * self.image),)),
        ]


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial batch norms: beta != 0 (so a zero-weight channel is not a zero
    activation), gamma != 1, running statistics as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 + 0.3 * torch.rand(m.num_features, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def _chain(kernel_size: int = 3, fmt: str | dfp.formats.Format | None = None, seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    model = Chain(kernel_size)
    _randomise_norms(model, seed)
    return model if fmt is None else dfp.convert(model, fmt)


def _resnet(fmt: str | None = None, seed: int = 0) -> models.CifarResNet:
    torch.manual_seed(seed)
    model = models.build("resnet20", 3, 10, 8)
    _randomise_norms(model, seed)
    return model if fmt is None else dfp.convert(model, fmt)


def _zero_channel(model: nn.Module, space: ChannelSpace, channel: int, readers: bool = True) -> None:
    """Zero the writers' output weights (and biases) of ``channel``, and its readers' input
    weights when ``readers``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for writer in space.writers:
            layer = modules[writer.layer]
            layer.weight[channel] = 0
            if layer.bias is not None:
                layer.bias[channel] = 0
        if readers:
            for reader in space.readers:
                f = reader.features_per_channel
                modules[reader.layer].weight[:, channel * f : (channel + 1) * f] = 0


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs in eval mode and in train mode (on a copy: train mode moves the
    running statistics); torch's generator reset before each (dfp16-sr draws from it)."""
    outputs = {}
    for mode in ("eval", "train"):
        replica = copy.deepcopy(model).train(mode == "train")
        torch.manual_seed(1)
        with torch.no_grad():
            outputs[mode] = replica(x)
    return outputs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the largest magnitude of ``b``."""
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _x(shape=(4, 3, 5, 5), seed=3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- spaces


def test_resnet_spaces_join_every_writer_and_reader_of_a_stream():
    model = models.build("resnet20", 3, 10, 8)
    spaces = {space.name: space for space in structure.channel_spaces(model)}
    assert len(spaces) == 12  # 9 inner edges, 3 streams
    stream = spaces["stages.1"]
    assert [w.layer for w in stream.writers] == [
        "stages.1.0.shortcut.0",
        "stages.1.0.conv2",
        "stages.1.1.conv2",
        "stages.1.2.conv2",
    ]
    assert [r.layer for r in stream.readers] == [
        "stages.1.1.conv1",
        "stages.1.2.conv1",
        "stages.2.0.conv1",
        "stages.2.0.shortcut.0",
    ]
    assert [r.layer for r in spaces["stages.2"].readers][-1] == "fc"
    assert structure.widths(model, list(spaces.values()))["stages.0"] == 16


def test_channel_spaces_name_what_they_do_not_know():
    with pytest.raises(TypeError, match="by hand"):
        structure.channel_spaces(nn.Sequential(nn.Conv2d(1, 2, 1)))
    model = _chain()
    with pytest.raises(ValueError, match="disagree"):
        ChannelSpace("bad", (Writer("conv1", "bn1"),), (Reader("fc", 25),)).width(model)
    with pytest.raises(ValueError, match="does not have"):
        ChannelSpace("bad", (Writer("conv9"),), ()).width(model)


# ---------------------------------------------------------------- removal


@pytest.mark.parametrize("fmt", LAYER_FORMATS)
def test_removing_an_all_zero_channel_keeps_the_outputs(fmt):
    model = _chain(fmt=fmt)
    space_a, space_b = model.spaces()
    _zero_channel(model, space_a, 2)
    _zero_channel(model, space_b, 5)
    x = _x()
    before = _outputs(model, x)
    surgery = structure.removal(model, space_a, [0, 1, 3, 4, 5]).merged(
        structure.removal(model, space_b, [0, 1, 2, 3, 4, 6, 7])
    )
    structure.apply(model, surgery)
    assert model.conv1.out_channels == model.bn1.num_features == model.conv2.in_channels == 5
    assert model.fc.in_features == 7 * 25 and isinstance(model.conv2, dfp.nn.Conv2d) == (fmt is not None)
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= ROUNDING.get(fmt, 1e-6), mode


def test_removing_only_the_producers_weights_changes_the_outputs():
    # A zero-weight channel still outputs its batch norm's beta (train) or
    # beta - gamma * mean / std (eval): only the union rule makes removal exact.
    model = _chain()
    space_a = model.spaces()[0]
    _zero_channel(model, space_a, 2, readers=False)
    x = _x()
    before = _outputs(model, x)
    assert structure.dense_channels(model, space_a).tolist() == list(range(6))  # the union keeps it
    structure.apply(model, structure.removal(model, space_a, [0, 1, 3, 4, 5]))
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) > 1e-3, mode


@pytest.mark.parametrize("fmt", [None, "dfp16"])
def test_pruning_a_resnet_join_keeps_the_outputs_and_the_spaces_agree(fmt):
    model = _resnet(fmt)
    spaces = {space.name: space for space in structure.channel_spaces(model)}
    params = structure.parameter_count(model)
    for channel in (0, 7, 30):
        _zero_channel(model, spaces["stages.1"], channel)
    _zero_channel(model, spaces["stages.2.1.conv1"], 4)
    x = _x((4, 3, 8, 8))
    before = _outputs(model, x)
    surgery, widths = structure.pruning(model, list(spaces.values()))
    assert widths == {"stages.1": 29, "stages.2.1.conv1": 63}
    structure.apply(model, surgery)
    new_spaces = structure.channel_spaces(model)
    assert structure.widths(model, new_spaces)["stages.1"] == 29  # width() checks every layer agrees
    assert structure.parameter_count(model) < params
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= ROUNDING.get(fmt, 1e-6), mode
    _, nothing = structure.pruning(model, new_spaces)
    assert nothing == {}


def test_pruning_to_a_multiple_keeps_back_the_strongest_zero_channels():
    """prune_multiple: each width rounded up to a multiple (or the whole width), the zero
    channels kept back the strongest ones; the outputs stay the same."""
    model = _resnet(None)
    spaces = {space.name: space for space in structure.channel_spaces(model)}
    for channel in (0, 7, 30, 31, 12):  # 27 dense channels of 32 -> 32; 29 of 32 -> 32
        _zero_channel(model, spaces["stages.1"], channel)
    for channel in range(40):  # 24 dense channels of 64 -> 24
        _zero_channel(model, spaces["stages.2.1.conv1"], channel)
    for channel in range(9):  # 7 of 16 -> 8: the strongest zero channel, 5, comes back
        _zero_channel(model, spaces["stages.0.0.conv1"], channel)
    with torch.no_grad():
        model.get_submodule(spaces["stages.0.0.conv1"].writers[0].layer).weight[5].fill_(1e-5)
    x = _x((4, 3, 8, 8))
    before = _outputs(model, x)
    surgery, widths = structure.pruning(model, list(spaces.values()), multiple=8)
    assert widths == {"stages.2.1.conv1": 24, "stages.0.0.conv1": 8}
    assert structure.pruning(model, list(spaces.values()))[1]["stages.0.0.conv1"] == 7
    structure.apply(model, surgery)
    space = {space.name: space for space in structure.channel_spaces(model)}["stages.0.0.conv1"]
    assert structure.channel_magnitudes(model, space).min().item() == pytest.approx(1e-5)  # channel 5, not a zero
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= 1e-6, mode
    with pytest.raises(ValueError, match="multiple"):
        structure.pruning(model, list(spaces.values()), multiple=0)


def test_a_space_keeps_its_strongest_channel_and_bad_indices_are_named():
    model = _chain()
    space_a = model.spaces()[0]
    with torch.no_grad():
        model.conv1.weight.mul_(1e-6)
        model.conv2.weight.mul_(1e-6)
        model.conv1.weight[3, 0, 0, 0] = 1e-5  # the largest, still below the threshold
    assert structure.dense_channels(model, space_a).tolist() == [3]
    with pytest.raises(ValueError, match="keep no channel"):
        structure.removal(model, space_a, [])
    with pytest.raises(ValueError, match="0..5"):
        structure.removal(model, space_a, [6])
    with pytest.raises(ValueError, match="repeat"):
        structure.removal(model, space_a, [1, 1])


def test_a_negative_group_is_not_zero():
    # The reference code's signed comparison would count this all-negative channel as zero.
    model = _chain()
    space_a = model.spaces()[0]
    with torch.no_grad():
        model.conv1.weight[2] = -1.0
    magnitudes = structure.channel_magnitudes(model, space_a)
    assert magnitudes[2] == 1.0 and 2 in structure.dense_channels(model, space_a).tolist()


# ---------------------------------------------------------------- optimizer state


def _masked_sgd_step(model, optimizer, x, y, masks: dict[str, torch.Tensor] | None = None):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if masks:
        for name, p in model.named_parameters():
            if name in masks:
                p.grad.mul_(masks[name])
    optimizer.step()
    if masks:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in masks:
                    p.mul_(masks[name])


# dfp16's exponents per channel (and per pixel block), so that the removed channel's
# gradient takes no part in the others' exponents; rounded to nearest, since dithered
# rounding hashes each gradient's flat index, which a removed channel shifts.
DFP16_NEAREST = dataclasses.replace(dfp.formats.resolve("dfp16"), grad_weight_rounding="nearest")


@pytest.mark.parametrize("fmt", [None, DFP16_NEAREST], ids=["torch", "dfp16-nearest"])
def test_one_sgd_step_after_removal_equals_the_masked_step_of_the_full_model(fmt):
    model = _chain(fmt=fmt)
    space_a = model.spaces()[0]
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _masked_sgd_step(model, optimizer, x, y)  # momentum buffers exist
    _zero_channel(model, space_a, 2)
    keep = torch.tensor([0, 1, 3, 4, 5])
    # The full model, its removed channel masked in weights and gradients.
    full = copy.deepcopy(model)
    full_optimizer = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    full_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not sharing the buffers
    mask_rows, mask_cols = torch.ones(6, 1, 1, 1), torch.ones(1, 6, 1, 1)
    mask_rows[2] = mask_cols[0, 2] = 0
    masks = {"conv1.weight": mask_rows, "conv2.weight": mask_cols}
    for name in ("bn1.weight", "bn1.bias"):
        masks[name] = mask_rows.flatten()  # the batch norm of a removed channel does not train either
    old_buffers = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}

    structure.apply(model, structure.removal(model, space_a, keep), optimizer)
    params = dict(model.named_parameters())
    assert torch.equal(optimizer.state[params["conv1.weight"]]["momentum_buffer"], old_buffers["conv1.weight"][keep])
    assert torch.equal(optimizer.state[params["conv2.weight"]]["momentum_buffer"], old_buffers["conv2.weight"][:, keep])
    assert torch.equal(optimizer.state[params["bn1.bias"]]["momentum_buffer"], old_buffers["bn1.bias"][keep])
    assert all(p.grad is None for name, p in params.items() if name.startswith(("conv1", "bn1", "conv2.weight")))

    torch.manual_seed(5)
    _masked_sgd_step(model, optimizer, x, y)
    torch.manual_seed(5)
    _masked_sgd_step(full, full_optimizer, x, y, masks)
    pruned, reference = dict(model.named_parameters()), dict(full.named_parameters())
    gathers = {"conv1.weight": (0, keep), "bn1.weight": (0, keep), "bn1.bias": (0, keep), "conv2.weight": (1, keep)}
    for name, p in pruned.items():
        expected = reference[name]
        if name in gathers:
            expected = expected.index_select(*gathers[name])
        assert (p - expected).abs().max() <= 1e-6 * expected.abs().max(), name


def test_widening_copies_momentum_and_divides_it_on_the_reader_side():
    model = _chain()
    space_a = model.spaces()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _masked_sgd_step(model, optimizer, _x(), torch.tensor([0, 1, 2, 3]))
    old = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}
    mapping = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2])
    structure.apply(model, structure.widening(model, space_a, mapping), optimizer)
    params = dict(model.named_parameters())
    writer = optimizer.state[params["conv1.weight"]]["momentum_buffer"]
    reader = optimizer.state[params["conv2.weight"]]["momentum_buffer"]
    assert torch.equal(writer, old["conv1.weight"][mapping])
    assert torch.allclose(reader[:, [2, 6, 7]], old["conv2.weight"][:, [2, 2, 2]] / 3)
    assert torch.equal(reader[:, 3], old["conv2.weight"][:, 3])


def test_momentum_keeps_its_parameters_layout_through_surgery():
    """A channels-last weight's momentum is channels-last after a widening, as the weight
    itself (the optimizer's update then runs on matching layouts)."""
    model = _chain().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _masked_sgd_step(model, optimizer, _x(), torch.tensor([0, 1, 2, 3]))
    structure.apply(
        model, structure.widening(model, model.spaces()[0], torch.tensor([0, 1, 2, 3, 4, 5, 2, 2])), optimizer
    )
    for name, p in model.named_parameters():
        buffer = optimizer.state[p]["momentum_buffer"]
        assert buffer.shape == p.shape and buffer.stride() == p.stride(), name


def test_swalp_weights_stay_dfp16_and_its_average_follows():
    model = _chain()
    space_a = model.spaces()[0]
    optimizer = SWALP(model.parameters(), lr=0.05, momentum=0.9, seed=0)
    average = WeightAverage(model)
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        _masked_sgd_step(model, optimizer, x, y)
        average.update(model)
    _zero_channel(model, space_a, 4)
    sums_before = {name: total.clone() for name, total in average._sums.items()}
    keep = torch.tensor([0, 1, 2, 3, 5])
    structure.apply(model, structure.removal(model, space_a, keep), optimizer, average)
    for p in model.parameters():  # still DFP16 numbers: rounding them again changes nothing
        assert torch.equal(p, dfp.quantize(p.detach(), dfp.DFPSpec(2)).dequantize())
    assert torch.equal(average._sums["conv1.weight"], sums_before["conv1.weight"][keep])
    assert torch.equal(average._sums["conv2.weight"], sums_before["conv2.weight"][:, keep])
    assert torch.equal(average._sums["bn1.bias"], sums_before["bn1.bias"][keep])
    _masked_sgd_step(model, optimizer, x, y)  # trains on
    average.update(model)
    averaged = average.averaged_model(lambda: [x])
    assert averaged.conv1.out_channels == 5 and averaged.bn1.running_mean.shape == (5,)
    assert averaged(x).shape == (4, 4)


# ---------------------------------------------------------------- Net2WiderNet


@pytest.mark.parametrize("split", structure.SPLITS)
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_widening_preserves_the_function(kernel_size, split):
    model = _chain(kernel_size)
    space_a, space_b = model.spaces()
    x = _x()
    before = _outputs(model, x)
    g = torch.Generator().manual_seed(0)
    surgery = structure.widening(model, space_a, structure.wider_mapping(6, 12, g), generator=g, split=split).merged(
        structure.widening(model, space_b, structure.wider_mapping(8, 11, g), generator=g, split=split)
    )
    structure.apply(model, surgery)
    assert model.conv2.weight.shape == (11, 12, kernel_size, kernel_size) and model.fc.in_features == 11 * 25
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= 1e-5, mode


@pytest.mark.parametrize("split", structure.SPLITS)
@pytest.mark.parametrize("new_width", [24, 32])
def test_widening_a_resnet_join_with_one_mapping_preserves_the_function(new_width, split):
    model = _resnet()
    spaces = {space.name: space for space in structure.channel_spaces(model)}
    x = _x((4, 3, 8, 8))
    before = _outputs(model, x)
    g = torch.Generator().manual_seed(1)
    stream = spaces["stages.0"]
    surgery = structure.widening(model, stream, structure.wider_mapping(16, new_width, g), generator=g, split=split)
    surgery = surgery.merged(
        structure.widening(
            model, spaces["stages.0.1.conv1"], structure.wider_mapping(16, 20, g), generator=g, split=split
        )
    )
    structure.apply(model, surgery)
    assert structure.widths(model, structure.channel_spaces(model))["stages.0"] == new_width
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= 1e-5, mode


def test_a_random_split_shares_weights_and_momentum_alike_and_the_copies_learn_apart():
    model = _chain()
    space_a = model.spaces()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _x(), torch.tensor([0, 1, 2, 3])
    _masked_sgd_step(model, optimizer, x, y)
    old_weight = model.conv2.weight.detach().clone()
    old_momentum = optimizer.state[model.conv2.weight]["momentum_buffer"].clone()
    mapping = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2])
    g = torch.Generator().manual_seed(0)
    structure.apply(model, structure.widening(model, space_a, mapping, generator=g, split="random"), optimizer)
    weight = model.conv2.weight.detach()
    momentum = optimizer.state[model.conv2.weight]["momentum_buffer"]
    copies = [2, 6, 7]
    assert torch.allclose(weight[:, copies].sum(1), old_weight[:, 2], rtol=1e-6, atol=1e-7)
    assert torch.allclose(momentum[:, copies].sum(1), old_momentum[:, 2], rtol=1e-6, atol=1e-7)
    shares = weight[:, copies] / old_weight[:, 2:3]
    assert torch.allclose(momentum[:, copies], old_momentum[:, 2:3] * shares, rtol=1e-5, atol=1e-7)
    assert 1 / 7 <= shares.min() and shares.max() <= 3 / 5 and shares.std() > 0.05  # u in [0.5, 1.5), 3 copies
    assert torch.equal(weight[:, 3], old_weight[:, 3])  # a channel without copies keeps its weights
    # the copies' incoming weights are equal now; their gradients are not
    assert torch.equal(model.conv1.weight[2], model.conv1.weight[6])
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = model.conv1.weight.grad
    assert _relative(grad[6], grad[2]) > 0.05 and _relative(grad[7], grad[6]) > 0.05


def test_fresh_channels_are_drawn_afresh_and_read_with_zero_weights():
    model = _chain()
    space_a = model.spaces()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _masked_sgd_step(model, optimizer, _x(), torch.tensor([0, 1, 2, 3]))
    old_writer, old_reader = model.conv1.weight.detach().clone(), model.conv2.weight.detach().clone()
    old_momentum = optimizer.state[model.conv1.weight]["momentum_buffer"].clone()
    mapping = torch.tensor([0, 1, 2, 3, 4, 5, 2, 2, 0])
    g = torch.Generator().manual_seed(0)
    structure.apply(model, structure.widening(model, space_a, mapping, generator=g, split="fresh"), optimizer)
    writer, reader = model.conv1.weight.detach(), model.conv2.weight.detach()
    assert torch.equal(writer[:6], old_writer) and torch.equal(reader[:, :6], old_reader)  # old channels whole
    assert not reader[:, 6:].any()  # the new channels are read with zero weights
    fresh = writer[6:]
    assert 0.5 < float(fresh.std() / old_writer.std()) < 2  # drawn at the writer's spread, not copied
    assert _relative(fresh[0], old_writer[2]) > 0.5 and _relative(fresh[1], fresh[0]) > 0.5
    momentum = optimizer.state[model.conv1.weight]["momentum_buffer"]
    assert torch.equal(momentum[:6], old_momentum) and not momentum[6:].any()
    assert torch.equal(model.bn1.running_var[6:], model.bn1.running_var[[2, 2, 0]])  # its norm copied


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).norm(dim=1)


@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("split", ["even", "random"])
def test_keeping_filter_norms_restores_the_readers_norms_and_keeps_the_function(split, noise):
    model = _resnet()
    spaces = structure.channel_spaces(model)
    x = _x((4, 3, 8, 8))
    before = _outputs(model, x)
    norms = {name: _filter_norms(p) for name, p in model.named_parameters() if p.dim() == 4}
    g = torch.Generator().manual_seed(2)
    surgery, mappings = structure.Surgery(), {}
    for space in spaces:
        width = space.width(model)
        mappings[space.name] = structure.wider_mapping(width, 2 * width, g)
        surgery = surgery.merged(structure.widening(model, space, mappings[space.name], noise, g, split))
    split_only = copy.deepcopy(model)
    structure.apply(split_only, surgery)
    structure.apply(model, structure.keeping_filter_norms(model, spaces, surgery))
    after, split_after = _outputs(model, x), _outputs(split_only, x)
    for mode in ("eval", "train"):  # the split's function, exact but for the batch norms' eps
        assert _relative(after[mode], split_after[mode]) <= 1e-4, mode
        if noise == 0:  # and then the narrow model's
            assert _relative(after[mode], before[mode]) <= 1e-4, mode
    writer_of = {writer.layer: space.name for space in spaces for writer in space.writers}
    for name, p in model.named_parameters():
        if p.dim() == 4 and name != "conv1.weight":  # every conv but the stem reads a widened space
            source = mappings[writer_of[name.removesuffix(".weight")]]
            assert torch.allclose(_filter_norms(p), norms[name][source], rtol=1e-5), name
            split_norms = _filter_norms(dict(split_only.named_parameters())[name])
            assert split_norms.sum() < 0.9 * _filter_norms(p).sum(), name  # the split alone shrank them
    # the classifier feeds no batch norm: it keeps the split, so the logits are unchanged
    assert torch.equal(model.fc.weight, split_only.fc.weight)


def test_keeping_filter_norms_scales_momentum_and_running_statistics_with_the_weights():
    model = _chain()
    space_a = model.spaces()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _masked_sgd_step(model, optimizer, _x(), torch.tensor([0, 1, 2, 3]))
    split_only = copy.deepcopy(model)
    split_optimizer = torch.optim.SGD(split_only.parameters(), lr=0.1, momentum=0.9)
    split_optimizer.load_state_dict(optimizer.state_dict())
    mapping = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])  # every channel doubled: norms / sqrt(2)
    surgery = structure.widening(model, space_a, mapping)
    structure.apply(split_only, surgery, split_optimizer)
    structure.apply(model, structure.keeping_filter_norms(model, model.spaces(), surgery), optimizer)
    scale = 2**0.5
    assert torch.allclose(model.conv2.weight, split_only.conv2.weight * scale)
    momentum = optimizer.state[model.conv2.weight]["momentum_buffer"]
    split_momentum = split_optimizer.state[split_only.conv2.weight]["momentum_buffer"]
    assert torch.allclose(momentum, split_momentum * scale)
    assert torch.allclose(model.bn2.running_mean, split_only.bn2.running_mean * scale)
    assert torch.allclose(model.bn2.running_var, split_only.bn2.running_var * 2)
    # the writer of the widened space and the classifier are not readers behind a batch norm
    kept, split = model.state_dict(), split_only.state_dict()
    for name in ("conv1.weight", "bn1.weight", "bn1.running_var", "fc.weight"):
        assert torch.equal(kept[name], split[name]), name


def test_writer_biases_follow_their_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1))
    space = ChannelSpace("hidden", (Writer("0"),), (Reader("2"),))
    x = _x()
    before = model(x)
    structure.apply(model, structure.widening(model, space, torch.tensor([0, 1, 2, 3, 4, 3])))
    assert torch.equal(model[0].bias[5], model[0].bias[3]) and model[0].out_channels == 6
    assert _relative(model(x), before) <= 1e-6
    _zero_channel(model, space, 1)
    before = model(x)
    structure.apply(model, structure.removal(model, space, [0, 2, 3, 4, 5]))
    assert model[0].bias.shape == (5,) and _relative(model(x), before) <= 1e-6


def test_widening_with_noise_changes_the_function_a_little():
    model = _chain()
    space_a = model.spaces()[0]
    x = _x()
    before = _outputs(model, x)
    g = torch.Generator().manual_seed(0)
    mapping = structure.wider_mapping(6, 9, g)
    structure.apply(model, structure.widening(model, space_a, mapping, noise=0.05, generator=g))
    after = _outputs(model, x)
    assert 0 < _relative(after["eval"], before["eval"]) < 0.1


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-tensor", "bf16"])
def test_widening_dfp_layers_changes_the_function_only_by_their_rounding(fmt):
    model = _chain(fmt=fmt)
    space_a = model.spaces()[0]
    x = _x()
    before = _outputs(model, x)
    structure.apply(model, structure.widening(model, space_a, torch.tensor([0, 1, 2, 3, 4, 5, 1, 1, 4])))
    assert isinstance(model.conv1, dfp.nn.Conv2d) and model.conv1.fmt == fmt
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= 2e-2, mode


def test_a_bad_mapping_is_refused():
    model = _chain()
    with pytest.raises(ValueError, match="every one of its 6 channels"):
        structure.widening(model, model.spaces()[0], torch.tensor([0, 1, 2, 3, 4, 4, 4]))
    with pytest.raises(ValueError, match="width <= new_width"):
        structure.wider_mapping(6, 4)


# ---------------------------------------------------------------- Net2DeeperNet


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("fmt", [None, "dfp16"])
def test_an_identity_conv_after_a_relu_is_exact(kernel_size, fmt):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    if fmt is not None:
        conv = dfp.nn.Conv2d.from_float(conv, fmt)
    x = _x((2, 3, 7, 7))
    y = torch.relu(conv(x))
    identity = structure.identity_conv(6, kernel_size, like=conv)
    assert type(identity) is type(conv)
    with torch.no_grad():
        deeper = torch.relu(identity(y))
    # A dfp layer rounds y to its 13-bit mantissas (its products are exact).
    assert _relative(deeper, y) <= (2**-13 if fmt else 1e-6)
    with pytest.raises(ValueError, match="odd kernel size"):
        structure.identity_conv(6, 4)


def test_a_batch_norm_set_to_undo_itself_is_exact_in_eval_mode():
    x = _x((8, 6, 5, 5)) * 3 + 1
    norm = nn.BatchNorm2d(6)
    structure.undo_norm(norm, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))
    with torch.no_grad():
        assert _relative(norm.eval()(x), x) <= 1e-6
        assert _relative(norm.train()(x), x) <= 1e-5  # on the very batch it was measured on


@pytest.mark.parametrize("fmt", [None, "dfp16"])
def test_an_inserted_zero_gamma_block_is_exact_and_joins_the_optimizer(fmt):
    model = _resnet(fmt)
    optimizer = SWALP(model.parameters(), lr=0.05, seed=0) if fmt else torch.optim.SGD(model.parameters(), lr=0.05)
    average = WeightAverage(model)
    average.update(model)
    x = _x((4, 3, 8, 8))
    before = _outputs(model, x)
    block = structure.insert_block(model, 1, 0, optimizer, average)
    assert len(model.stages[1]) == 4 and model.stages[1][1] is block
    assert isinstance(block.conv1, dfp.nn.Conv2d) == (fmt is not None)
    assert [id(p) for p in optimizer.param_groups[-1]["params"]] == [id(p) for p in block.parameters()]
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= 1e-6, mode
    spaces = {space.name: space for space in structure.channel_spaces(model)}
    assert "stages.1.1.conv1" in [r.layer for r in spaces["stages.1"].readers]
    assert len(spaces) == 13
    averaged = average.averaged_model(lambda: [x])
    assert len(averaged.stages[1]) == 4
    # The renamed blocks keep their sums.
    assert torch.equal(averaged.stages[1][2].conv1.weight, dict(model.named_parameters())["stages.1.2.conv1.weight"])
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert block.bn2.weight.grad.abs().max() > 0  # the block learns at once
    optimizer.step()


# ---------------------------------------------------------------- grow, then prune


def test_grow_then_prune_round_trip():
    model = _chain()
    space_a = model.spaces()[0]
    x = _x()
    before = _outputs(model, x)
    mapping = torch.tensor([0, 1, 2, 3, 4, 5, 2, 4])
    structure.apply(model, structure.widening(model, space_a, mapping))
    with torch.no_grad():
        # Zero copy 6 of channel 2 in its writer and readers, and put its share of the
        # division back on the survivor (channel 4 keeps both copies).
        model.conv2.weight[:, 2] *= 2
    _zero_channel(model, space_a, 6)
    surgery, widths = structure.pruning(model, [space_a])
    assert widths == {"a": 7}
    structure.apply(model, surgery)
    after = _outputs(model, x)
    for mode in ("eval", "train"):
        assert _relative(after[mode], before[mode]) <= 1e-5, mode


def test_narrowing_keeps_the_first_channels():
    model = _resnet()
    spaces = structure.channel_spaces(model)
    structure.apply(model, structure.narrowing(model, spaces, {"stages.0": 8, "stages.2.0.conv1": 40}))
    models.initialise(model)
    assert structure.widths(model, structure.channel_spaces(model))["stages.0"] == 8
    assert model(_x((2, 3, 8, 8))).shape == (2, 10)
    with pytest.raises(ValueError, match="no channel spaces named"):
        structure.narrowing(model, structure.channel_spaces(model), {"stages.9": 1})


# ---------------------------------------------------------------- regulariser and cost


def test_group_lasso_matches_a_brute_force_loop():
    model = _chain()
    spaces = model.spaces()
    expected = 0.0
    conv1, conv2, fc = (layer.weight.detach() for layer in (model.conv1, model.conv2, model.fc))
    for w in (conv1, conv2):
        expected += sum(float((w[k].square().sum() + 1e-8).sqrt()) for k in range(w.shape[0]))
    for c in range(6):  # conv2's input channels
        expected += float((conv2[:, c].square().sum() + 1e-8).sqrt())
    for c in range(8):  # the classifier's 25 features of each channel
        expected += float((fc[:, 25 * c : 25 * c + 25].square().sum() + 1e-8).sqrt())
    assert abs(structure.group_lasso(model, spaces).item() - expected) <= 1e-5 * expected


def test_weights_scale_each_layers_groups_in_the_penalty():
    model = _chain()
    spaces = model.spaces()
    weights = {"conv1": 2.0, "conv2": 0.5, "fc": 3.0}
    expected = sum(
        weights[name] * structure.group_lasso(model, spaces, {**dict.fromkeys(weights, 0.0), name: 1.0}).item()
        for name in weights
    )
    assert abs(structure.group_lasso(model, spaces, weights).item() - expected) <= 1e-5 * expected
    assert expected != pytest.approx(structure.group_lasso(model, spaces).item(), rel=1e-3)
    with pytest.raises(ValueError, match="no layer 'fc'"):
        structure.group_lasso(model, spaces, {"conv1": 1.0, "conv2": 1.0})


@pytest.mark.parametrize(
    ("fmt", "weights"), [(None, None), ("dfp16", None), (None, {"conv1": 2.0, "conv2": 0.5, "fc": 3.0})]
)
def test_the_proximal_step_shrinks_every_group_and_zeroes_those_under_the_threshold(fmt, weights):
    """Group soft-thresholding, writers' groups first, then readers': a group of norm n
    is scaled by max(0, 1 - t / n), in whatever memory format the weight is; with
    weights, a layer's groups by t times its weight."""
    model = _chain(fmt=fmt)
    model.conv1.weight.data = model.conv1.weight.data.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model.conv1.weight[2] *= 1e-3  # an output group far under the threshold
        model.conv2.weight[:, 4] *= 1e-3  # an input group of conv2
    t = 0.05
    conv1, conv2, fc = (m.weight.detach().clone() for m in (model.conv1, model.conv2, model.fc))

    def shrunk(w, norms, layer):  # norms broadcast along the group's axis
        return w * (1 - t * (weights or {}).get(layer, 1.0) / norms).clamp_min(0)

    conv1 = shrunk(conv1, conv1.flatten(1).norm(dim=1).view(-1, 1, 1, 1), "conv1")  # writer of space A
    conv2 = shrunk(conv2, conv2.flatten(1).norm(dim=1).view(-1, 1, 1, 1), "conv2")  # writer of space B
    conv2 = shrunk(conv2, conv2.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, 1, 1), "conv2")  # reader of A
    fc_channels = fc.view(fc.shape[0], 8, 25)
    fc = shrunk(fc_channels, fc_channels.square().sum(dim=(0, 2)).sqrt().view(1, 8, 1), "fc").view(fc.shape)
    structure.shrink_groups(model, model.spaces(), t, weights)
    assert not model.conv1.weight[2].any() and not model.conv2.weight[:, 4].any()
    for got, want in ((model.conv1.weight, conv1), (model.conv2.weight, conv2), (model.fc.weight, fc)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="threshold >= 0"):
        structure.shrink_groups(model, model.spaces(), -1.0)


def test_the_penalty_ratio_holds_at_the_first_step():
    model = _resnet()
    x, y = _x((4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])
    cross_entropy = nn.functional.cross_entropy(model(x), y).item()
    penalty = structure.group_lasso(model, structure.channel_spaces(model)).item()
    lam = structure.coefficient(cross_entropy, penalty, 0.2)
    assert abs(lam * penalty / (cross_entropy + lam * penalty) - 0.2) < 1e-6
    with pytest.raises(ValueError, match="penalty ratio"):
        structure.coefficient(cross_entropy, penalty, 1.0)


def test_forward_flops_of_a_small_network():
    model = dfp.convert(_chain(), "dfp16")
    # conv1: 6 x 25 outputs x 27 MACs; conv2: 8 x 25 x 54; fc: 4 x 200
    assert structure.forward_flops(model, (3, 5, 5)) == 2 * (6 * 25 * 27 + 8 * 25 * 54 + 4 * 200)
    assert isinstance(model.conv1, dfp.nn.Conv2d)  # measured on a copy


def test_output_positions_count_each_weights_multiply_adds_per_image():
    assert structure.output_positions(dfp.convert(_chain(), "dfp16"), (3, 5, 5)) == {"conv1": 25, "conv2": 25, "fc": 1}
    positions = structure.output_positions(_resnet(), (3, 8, 8))
    assert positions["conv1"] == positions["stages.0.2.conv2"] == 64  # 8 x 8
    assert positions["stages.1.0.conv1"] == positions["stages.1.0.shortcut.0"] == 16  # stride 2
    assert positions["stages.2.2.conv1"] == 4 and positions["fc"] == 1


# ---------------------------------------------------------------- DistributedDataParallel


def test_ranks_stay_identical_after_surgery_and_a_new_wrapper(tmp_path):
    """2 gloo processes (pinned to one core where taskset exists): prune, widen with a
    seeded mapping, wrap again, two steps on different batches; bitwise equal replicas."""
    worker = Path(__file__).with_name("structure_worker.py")
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if shutil.which("taskset") else []
    run_ranks(worker, [str(tmp_path)], 2, timeout=120, prefix=pin)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["pruned"] == {"stages.1": 31} and ranks[0]["widths"]["stages.2"] == 80
    assert ranks[0]["widths"] == ranks[1]["widths"]
    for kind in ("parameters", "momentum"):
        for name, tensor in ranks[0][kind].items():
            assert torch.equal(tensor, ranks[1][kind][name]), (kind, name)


@pytest.mark.parametrize("fmt", [None, "dfp16"])
def test_a_compiled_model_compiles_again_after_surgery(fmt):
    """torch.compile around a model whose shapes a removal changed: after
    ``rewrap(compiled=True)`` the new compiled module traces the new shapes once and
    computes what the eager model does, forward and backward (Dynamo's eager backend: the
    same torch ops, and dfp's registered ops against its eager path, bit for bit)."""
    model = _chain(fmt=fmt).eval()
    x = _x()
    torch.compile(model, backend="eager")(x)  # the old shapes, compiled
    structure.apply(model, structure.removal(model, model.spaces()[0], [0, 2, 3, 5]))
    eager = copy.deepcopy(model)
    compiled = torch.compile(structure.rewrap(model, distributed.setup("cpu"), compiled=True), backend="eager")
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    y = compiled(x)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames + 1  # one trace, no graph break
    assert torch.equal(y, model(x))
    y.square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
