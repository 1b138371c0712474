"""A DFP16 convolution hands its output's batch statistics to the dfp.nn.BatchNorm2d
behind it (dfp._batch_statistics): the bits the norm would find, so the norm makes no
pass of its own over the output."""

import pytest
import torch

import dfp
import dfp._batch_statistics
import dfp.models
from dfp._batch_statistics import hand_over, handed_over
from dfp.backends import cpu


@pytest.fixture(autouse=True)
def _hand_over_small_outputs(monkeypatch, request):
    if "threshold" not in request.node.name:
        monkeypatch.setattr(dfp._batch_statistics, "MIN_ELEMENTS", 0)


def conv_output(fmt, cin, cout, size, stride, batch, requires_grad=True):
    torch.manual_seed(cout + size)
    conv = dfp.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, fmt=fmt)
    conv.weight.requires_grad_(requires_grad)
    x = (torch.randn(batch, cin, size, size) * 2 + 1).contiguous(memory_format=torch.channels_last)
    return conv(x)


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-tensor"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "cin,cout,size,stride,batch",
    [(16, 16, 32, 1, 19), (3, 16, 16, 1, 4), (16, 24, 15, 2, 9), (64, 64, 8, 1, 33), (8, 3, 5, 1, 2)],
)
def test_they_are_the_bits_of_the_norms_own(fmt, threads, cin, cout, size, stride, batch):
    # batches of 19 and 33 images: the forward's pieces of a few images and the threads'
    # shares of them end inside the norm's tasks
    torch.set_num_threads(threads)
    y = conv_output(fmt, cin, cout, size, stride, batch)
    handed = handed_over(y)
    assert handed is not None
    for got, want in zip(handed, cpu.batch_norm_statistics(y.detach())):
        assert got.dtype == torch.float64 and torch.equal(got, want)


def test_small_outputs_below_the_threshold_are_not_handed_over():
    # the norm's own pass over a small output, in the cache, costs less than the hand-over
    assert handed_over(conv_output("dfp16", 16, 16, 32, 1, 15)) is None  # 245760 elements
    assert handed_over(conv_output("dfp16", 16, 16, 32, 1, 16)) is not None  # 262144


def test_none_where_the_layer_does_not_train():
    with torch.no_grad():
        assert handed_over(conv_output("dfp16", 16, 16, 8, 1, 2)) is None
    assert handed_over(conv_output("dfp16", 16, 16, 8, 1, 2, requires_grad=False)) is None  # a frozen layer
    assert handed_over(conv_output("fp32", 16, 16, 8, 1, 2)) is None


def test_they_hold_until_the_tensor_changes_in_place():
    # (autograd forbids changing a conv's output in place; the version check still guards
    # any tensor they are handed over with)
    torch.set_num_threads(1)
    x = torch.randn(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    norm = dfp.nn.BatchNorm2d(16)
    hand_over(x, torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64) - norm.eps)
    assert torch.allclose(norm(x), x, atol=1e-6)  # mean 0, variance 1: the handed statistics
    x.mul_(2.0)
    assert handed_over(x) is None
    assert torch.equal(norm(x), dfp.nn.BatchNorm2d(16)(x.clone()))


def sqnr_db(got, want):
    return (10 * torch.log10(want.square().sum() / (got.double() - want).square().sum())).item()


@pytest.mark.parametrize("channels,threads", [(16, 1), (16, 2), (64, 2), (24, 2), (24, 1)])
def test_a_norm_behind_the_conv_uses_them_and_follows_float64(monkeypatch, channels, threads):
    # torch's kernels given the statistics (16 and 64 channels, or one thread), dfp's where
    # torch's would stall (24 channels on two threads); the norm finds no statistics itself
    torch.set_num_threads(threads)
    y = conv_output("dfp16", 16, channels, 12, 1, 6)
    y.retain_grad()
    norm = dfp.nn.BatchNorm2d(channels)
    reference = torch.nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
        reference.weight.copy_(norm.weight), reference.bias.copy_(norm.bias)
    y_reference = y.detach().double().requires_grad_()

    def refuse(x):
        raise AssertionError("statistics were handed over")

    monkeypatch.setattr(cpu, "batch_norm_statistics", refuse)
    out = norm(y)
    dy = torch.randn_like(out)
    out.backward(dy)
    out_reference = reference(y_reference)
    out_reference.backward(dy.double())
    pairs = [(out, out_reference), (y.grad, y_reference.grad), (norm.weight.grad, reference.weight.grad)]
    pairs += [(norm.bias.grad, reference.bias.grad), (norm.running_mean, reference.running_mean)]
    pairs += [(norm.running_var, reference.running_var)]
    for got, want in pairs:
        assert sqnr_db(got, want) >= 120


def test_the_models_norms_get_them_in_training(monkeypatch):
    torch.set_num_threads(1)
    model = dfp.convert(dfp.models.resnet20(3, 10), "dfp16").to(memory_format=torch.channels_last)
    calls = []
    monkeypatch.setattr(cpu, "batch_norm_statistics", lambda x: calls.append(x) or None)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    model(x).square().mean().backward()
    assert not calls


def test_a_conv_whose_outputs_no_norm_takes_stops_summing_them_and_gives_the_same_bits():
    # (dfp.convert keeps torch's batch norms, which take nothing)
    torch.manual_seed(0)
    conv = dfp.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    limit = dfp._batch_statistics.Demand.UNTAKEN_LIMIT
    outputs = [conv(x) for _ in range(limit + 2)]
    assert [hasattr(y, dfp._batch_statistics._ATTRIBUTE) for y in outputs] == [True] * (limit + 1) + [False]
    for y in outputs[1:]:
        assert torch.equal(y, outputs[0])
    y = conv(x)  # a norm behind it now finds none, and sums them itself
    assert handed_over(y) is None and torch.equal(y, outputs[0])


@pytest.mark.parametrize("every", [1, 2])
def test_a_conv_keeps_handing_them_over_while_a_norm_takes_them(every):
    # every 2: the layer called twice a step, one output before a dfp norm
    torch.manual_seed(0)
    conv, norm = dfp.nn.Conv2d(16, 16, 3, padding=1, bias=False), dfp.nn.BatchNorm2d(16)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    for i in range(12):
        y = conv(x)
        assert hasattr(y, dfp._batch_statistics._ATTRIBUTE)
        if i % every == 0:
            norm(y)  # takes them
