"""dfp.nn: layers that are torch layers in everything but the arithmetic, and
convert / revert that swap them into and out of a model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dfp
import dfp.nn

# name: (torch class, dfp class, constructor arguments, input shape)
LAYERS = {
    "conv": (nn.Conv2d, dfp.nn.Conv2d, {"in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 1}, (2, 3, 9, 9)),
    "conv-strided-no-bias": (
        nn.Conv2d, dfp.nn.Conv2d,
        {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 1), "stride": 2, "padding": (1, 0), "bias": False},
        (2, 4, 9, 8),
    ),
    "conv-same-dilated-grouped-reflect": (
        nn.Conv2d, dfp.nn.Conv2d,
        {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": "same", "dilation": 2, "groups": 2,
         "padding_mode": "reflect"},
        (2, 4, 9, 9),
    ),
    "linear": (nn.Linear, dfp.nn.Linear, {"in_features": 6, "out_features": 5}, (3, 4, 6)),
    "linear-no-bias": (nn.Linear, dfp.nn.Linear, {"in_features": 6, "out_features": 5, "bias": False}, (4, 6)),
}  # fmt: skip

FORMAT_NAMES = ("dfp16", "dfp16-sr", "fp32", "bf16", "fp16")


@pytest.fixture(params=list(LAYERS), ids=list(LAYERS))
def layer_case(request):
    torch.manual_seed(0)
    torch_class, dfp_class, args, input_shape = LAYERS[request.param]
    return torch_class, dfp_class, args, torch.randn(input_shape)


def sqnr_db(reference: torch.Tensor, x: torch.Tensor) -> float:
    """Signal to quantization noise ratio of ``x`` against ``reference``, in dB."""
    reference, x = reference.detach().double(), x.detach().double()
    noise = (x - reference).square().sum()
    return float(10 * torch.log10(reference.square().sum() / noise))


def tiny_cnn() -> nn.Sequential:
    """(N, 1, 8, 8) -> (N, 10): two convolutions and a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def test_state_dict_round_trip(layer_case):
    torch_class, dfp_class, args, _ = layer_case
    original = torch_class(**args)
    layer = dfp_class(**args, fmt="dfp16")
    layer.load_state_dict(original.state_dict(), strict=True)
    back = torch_class(**args)
    back.load_state_dict(layer.state_dict(), strict=True)
    assert list(back.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_matches_torch_layer(layer_case):
    """Every constructor argument reaches the functional op: outputs and all gradients
    agree with the fp64 torch layer to DFP16 precision (about 13 bits per operand, so
    some 70 dB measured; 60 leaves room for cancellation, while a wrong argument such as a
    dropped padding_mode gives about 6)."""
    torch_class, dfp_class, args, x = layer_case
    reference = torch_class(**args).double()
    layer = dfp_class.from_float(copy.deepcopy(reference).float())
    x64 = x.double().requires_grad_()
    x32 = x.clone().requires_grad_()
    out64, out32 = reference(x64), layer(x32)
    assert out32.shape == out64.shape and out32.dtype == torch.float32
    assert sqnr_db(out64, out32) > 60
    grad_out = torch.randn(out64.shape, dtype=torch.float64)
    out64.backward(grad_out)
    out32.backward(grad_out.float())
    assert sqnr_db(x64.grad, x32.grad) > 60
    for (name, p64), p32 in zip(reference.named_parameters(), layer.parameters()):
        assert sqnr_db(p64.grad, p32.grad) > 60, name


def test_from_float_shares_parameters_mode_and_hooks(layer_case):
    torch_class, dfp_class, args, x = layer_case
    original = torch_class(**args).eval()
    seen = []
    original.register_forward_hook(lambda module, inputs, output: seen.append(type(module)))
    layer = dfp_class.from_float(original, fmt="fp32")
    assert type(layer) is dfp_class and layer.fmt == "fp32"
    assert not layer.training
    assert layer.weight is original.weight and layer.bias is original.bias
    layer(x)
    assert seen == [dfp_class]


def test_from_float_refuses_another_layer_class():
    with pytest.raises(TypeError, match="needs a Linear"):
        dfp.nn.Linear.from_float(nn.Conv2d(1, 1, 1))


def test_from_float_refuses_a_parametrized_layer():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="parametrized"):
        dfp.nn.Linear.from_float(layer)


def test_to_float_gives_the_plain_torch_layer(layer_case):
    torch_class, dfp_class, args, _ = layer_case
    layer = dfp_class(**args)
    plain = layer.to_float()
    assert type(plain) is torch_class
    assert plain.weight is layer.weight and plain.bias is layer.bias
    assert repr(plain) == repr(torch_class(**args))


def test_repr_shows_the_format():
    assert repr(dfp.nn.Conv2d(3, 8, 3)) == "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), fmt='dfp16')"
    assert repr(dfp.nn.Linear(4, 2, fmt="bf16")) == "Linear(in_features=4, out_features=2, bias=True, fmt='bf16')"
    spec = dfp.DFPSpec(headroom=3)
    assert repr(dfp.nn.Linear(4, 2, fmt=spec)).endswith(f"fmt={spec!r})")


def test_unknown_format_fails_early():
    with pytest.raises(ValueError, match="dfp16"):
        dfp.nn.Conv2d(1, 1, 1, fmt="dfp8")
    layer = dfp.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="dfp16"):
        layer.fmt = "int8"
    assert layer.fmt == "dfp16"
    with pytest.raises(ValueError, match="dfp16"):
        dfp.convert(nn.Sequential(nn.ReLU()), "fp8")


@pytest.mark.parametrize("fmt", [*FORMAT_NAMES, dfp.DFPSpec(headroom=3), dfp.DFPSpec(axis=0)], ids=str)
def test_every_format_trains(fmt):
    torch.manual_seed(0)
    model = dfp.convert(tiny_cnn(), fmt)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_convert_swaps_the_chosen_layers_in_place():
    model = nn.Sequential(tiny_cnn(), nn.Linear(10, 3))
    params = list(model.parameters())
    names = []

    def keep_first_conv(name, module):
        names.append(name)
        return name != "0.0"

    assert dfp.convert(model, "dfp16", filter_fn=keep_first_conv) is model
    assert names == ["0.0", "0.2", "0.5", "1"]
    assert [type(m) for m in (model[0][0], model[0][2], model[0][5], model[1])] == [
        nn.Conv2d, dfp.nn.Conv2d, dfp.nn.Linear, dfp.nn.Linear
    ]  # fmt: skip
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def test_an_optimizer_built_before_convert_keeps_training_the_model():
    torch.manual_seed(0)
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dfp.convert(model)
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_convert_again_changes_the_format():
    model = dfp.convert(tiny_cnn(), "dfp16")
    weight = model[0].weight
    dfp.convert(model, "bf16")
    assert model[0].fmt == "bf16" and model[0].weight is weight


def test_convert_leaves_layer_subclasses_alone():
    """nn.MultiheadAttention reads out_proj.weight itself: swapping the layer would do nothing."""
    attention = nn.MultiheadAttention(8, 2)
    dfp.convert(attention)
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_convert_keeps_a_shared_layer_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    dfp.convert(model)
    assert type(model[0]) is dfp.nn.Linear and model[2] is model[0]
    dfp.revert(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]


def test_convert_and_revert_a_bare_layer_return_the_replacement():
    layer = nn.Linear(3, 2)
    converted = dfp.convert(layer, "fp16")
    assert type(converted) is dfp.nn.Linear and converted.weight is layer.weight
    assert type(dfp.revert(converted)) is nn.Linear


def test_revert_restores_the_torch_model():
    torch.manual_seed(0)
    model = tiny_cnn()
    x = torch.randn(2, 1, 8, 8)
    expected, state = model(x), copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    dfp.revert(dfp.convert(model))
    assert all(type(m).__module__.startswith("torch.") for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert torch.equal(model(x), expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_torch_checkpoint_loads_into_a_converted_model_and_back():
    source, target = tiny_cnn(), dfp.convert(tiny_cnn())
    target.load_state_dict(source.state_dict(), strict=True)
    back = tiny_cnn()
    back.load_state_dict(target.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), source.state_dict().values()))


def test_autocast_does_not_change_a_dfp_layer():
    """Under autocast a DFP16 layer still computes in DFP16 and returns float32, also
    when it is fed the bf16 output of a torch layer that autocast runs in bf16."""
    torch.manual_seed(0)
    model = dfp.convert(tiny_cnn())
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)

    dfp.revert(model)
    dfp.convert(model, filter_fn=lambda name, module: name != "0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[0](x)
        out = model[1:](hidden)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compile_fullgraph_matches_eager():
    """aot_eager traces forward and backward through the ops' fake kernels as inductor
    does, without inductor's C++ compile (about 20 s here; inductor matches too, up to
    the order of the float bias-gradient sum)."""
    torch.manual_seed(0)
    model = dfp.convert(tiny_cnn())
    x = torch.randn(4, 1, 8, 8)
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        results.append([out, *(p.grad for p in model.parameters())])
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(compiled, eager)
