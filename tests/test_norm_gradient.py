"""A dfp.nn.BatchNorm2d behind a DFP16 convolution hands its input gradient to the
convolution's backward unwritten (dfp._norm_gradient): the convolution's quantization makes
it a block at a time. Every gradient keeps the bits of the norm writing it."""

import gc

import pytest
import torch

import dfp
import dfp._batch_statistics
import dfp._norm_gradient
import dfp.models
import dfp.nn.batch_norm


@pytest.fixture(autouse=True)
def _hand_over_small_outputs(monkeypatch):
    monkeypatch.setattr(dfp._batch_statistics, "MIN_ELEMENTS", 0)


@pytest.fixture
def taken(monkeypatch):
    """How many times a convolution's backward took the norm's gradient unwritten."""
    count = [0]
    take = dfp._norm_gradient.Pending.take

    def counting(self, grad):
        made, grad = take(self, grad)
        count[0] += made is not None
        return made, grad

    monkeypatch.setattr(dfp._norm_gradient.Pending, "take", counting)
    return count


def block(fmt, cin, cout, stride, residual, size=16, seed=0):
    """A conv -> norm (+ residual) -> ReLU block and its input (size x size), channels-last."""
    torch.manual_seed(seed)
    conv = dfp.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, fmt=fmt)
    norm = dfp.nn.BatchNorm2d(cout)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, cin, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = (size + 2 - 3) // stride + 1
    r = torch.randn(6, cout, out, out).contiguous(memory_format=torch.channels_last) if residual else None
    return conv, norm, x, r


def gradients(conv, norm, x, r, then=lambda z, y: y.square().sum()):
    for t in (conv.weight, norm.weight, norm.bias, x, r):
        if t is not None:
            t.grad = None
    if r is not None:
        r.requires_grad_()
    z = conv(x)
    then(z, norm(z, residual=r, relu=True)).backward()
    return [t.grad.clone() for t in (conv.weight, norm.weight, norm.bias, x, r) if t is not None]


def unwritten_off(monkeypatch):
    monkeypatch.setattr(dfp.nn.batch_norm, "hands_over", lambda x: False)


@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-sr"])
@pytest.mark.parametrize("threads", [1, 2])
# sizes: output rows of 16 pixels split the 32-pixel blocks of grad_weight's dY, which
# the quantization makes one at a time; rows of 12 do not, and it makes dY whole first
@pytest.mark.parametrize(
    "cin,cout,stride,residual,size",
    [(16, 16, 1, False, 16), (8, 24, 2, True, 32), (3, 16, 1, True, 16), (16, 8, 1, False, 12)],
)
def test_every_gradient_keeps_its_bits(monkeypatch, taken, fmt, threads, cin, cout, stride, residual, size):
    torch.set_num_threads(threads)
    layers = block(fmt, cin, cout, stride, residual, size)
    torch.manual_seed(1)  # stochastic rounding's seed
    handed = gradients(*layers)
    assert taken[0] == 1
    unwritten_off(monkeypatch)
    torch.manual_seed(1)
    written = gradients(*layers)
    assert taken[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(handed, written, strict=True))


def test_a_model_steps_with_the_same_bits(monkeypatch, taken):
    def step():
        torch.manual_seed(0)
        model = dfp.convert(dfp.models.resnet20(3, 10), "dfp16").to(memory_format=torch.channels_last)
        x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        torch.nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
        return [p.grad for p in model.parameters()]

    handed = step()
    assert taken[0] == 19  # every norm behind a conv but the shortcuts' (no ReLU: torch's kernels)
    unwritten_off(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(handed, step(), strict=True))


@pytest.mark.parametrize(
    "then",
    [
        lambda z, y: y.square().sum() + (z * z.detach()).sum(),  # the conv's output read twice
        lambda z, y: y.square().sum() + z.sum(),  # a gradient that the placeholder's sum must carry
    ],
)
def test_where_the_convs_output_has_other_consumers_their_gradients_add(monkeypatch, taken, then):
    layers = block("dfp16", 16, 16, 1, False)
    handed = gradients(*layers, then=then)
    assert taken[0] == 0  # the norm's gradient written and added to the others'
    unwritten_off(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(handed, gradients(*layers, then=then), strict=True))


def test_a_hook_or_retain_grad_on_the_convs_output_sees_the_gradient(monkeypatch, taken):
    conv, norm, x, _ = block("dfp16", 16, 16, 1, False)
    seen = {}
    z = conv(x)
    z.register_hook(lambda g: seen.setdefault("hook", g.clone()))
    norm(z, relu=True).square().sum().backward()
    z2 = conv(x)
    z2.retain_grad()
    norm(z2, relu=True).square().sum().backward()
    assert taken[0] == 0
    unwritten_off(monkeypatch)
    z3 = conv(x)
    z3.retain_grad()
    norm(z3, relu=True).square().sum().backward()
    assert torch.equal(seen["hook"], z3.grad) and torch.equal(z2.grad, z3.grad)


def test_a_non_finite_gradient_reaches_the_same_gradients(monkeypatch, taken):
    def nan_where_relu_passes(z, y):  # NaN where the ReLU lets it through
        return (y * torch.where(y > 0, float("nan"), 1.0)).sum()

    layers = block("dfp16", 16, 16, 1, False)
    handed = gradients(*layers, then=nan_where_relu_passes)
    assert taken[0] == 1 and all(g.isnan().any() for g in handed)
    unwritten_off(monkeypatch)
    for a, b in zip(handed, gradients(*layers, then=nan_where_relu_passes), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_gradient_the_conv_never_takes_is_freed_with_the_graph():
    # torch.autograd.grad for the norm's weight alone: the norm hands its gradient over and
    # the convolution's backward never runs
    conv, norm, x, _ = block("dfp16", 16, 16, 1, False)
    y = norm(conv(x), relu=True)
    torch.autograd.grad(y.square().sum(), [norm.weight])
    del y
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is dfp._norm_gradient.Pending]
