"""dfp.nn.BatchNorm2d: torch's layer, on dfp's kernels where torch's would have two
threads write one cache line (training, channels last, channels not a multiple of 16)."""

import pytest
import torch

import dfp
import dfp.models
from dfp._batch_statistics import hand_over
from dfp.backends import cpu


def channels_last(*shape, scale=3.0, shift=5.0):
    return (torch.randn(*shape) * scale + shift).contiguous(memory_format=torch.channels_last)


def pair(channels, affine=True, track=True, momentum=0.1):
    """A dfp layer and a float64 torch layer with the same parameters."""
    layer = dfp.nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, momentum=momentum)
    reference = torch.nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
            reference.weight.copy_(layer.weight)
            reference.bias.copy_(layer.bias)
    return layer, reference


# norm(x, residual=r, relu=True)'s fused parts: (with a residual, relu)
FUSED = {"relu": (False, True), "residual": (True, False), "residual, relu": (True, True)}

# (channels, threads, handed over): statistics a DFP16 convolution hands over, on either
# thread count, or found by dfp's kernels where torch's would stall
SOURCES = {"handed over, 1 thread": (16, 1, True), "handed over, 2 threads": (16, 2, True), "stalling": (24, 2, False)}


def sqnr_db(got, want):
    return (10 * torch.log10(want.square().sum() / (got.double() - want).square().sum())).item()


@pytest.mark.parametrize("channels,size", [(8, 32), (24, 16), (56, 8), (3, 5), (1, 7), (40, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_products_and_running_statistics_follow_float64(channels, size, affine):
    # fp32 rounds at 2^-24 (144 dB); the sums run in blocks of at most 256 values, so
    # every output keeps at least 120 dB against float64
    torch.manual_seed(channels)
    torch.set_num_threads(2)
    layer, reference = pair(channels, affine)
    x = channels_last(6, channels, size, size)
    assert layer._on_dfp_kernels(x)
    dy = torch.randn_like(x)
    xa, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    for _ in range(2):  # the running statistics over two updates
        y = layer(xa)
        y.backward(dy)
        yr = reference(xr)
        yr.backward(dy.double())
    assert y.is_contiguous(memory_format=torch.channels_last)
    outputs = [(y, yr), (xa.grad, xr.grad), (layer.running_mean, reference.running_mean)]
    outputs.append((layer.running_var, reference.running_var))
    if affine:
        outputs += [(layer.weight.grad, reference.weight.grad), (layer.bias.grad, reference.bias.grad)]
    for got, want in outputs:
        assert sqnr_db(got, want) >= 120
    assert layer.num_batches_tracked.item() == 2


def bf16_ulps(got, want):
    """|got - want| in units of bfloat16's last place at want (8 significant bits)."""
    place = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    return (got.double() - want).abs() / place


@pytest.mark.parametrize("channels,size", [(8, 32), (24, 16), (56, 8)])
def test_bfloat16_outputs_are_float64_rounded_once(channels, size):
    # bf16 autocast hands a batch norm bf16; the sums run in float and double as for
    # float32 inputs, so y and dx are the float64 result rounded to bf16 (one rounding
    # from float: off by one place only next to a tie), the other outputs float32
    torch.manual_seed(channels)
    torch.set_num_threads(2)
    layer, reference = pair(channels)
    x = channels_last(6, channels, size, size).bfloat16()
    assert layer._on_dfp_kernels(x)
    dy = torch.randn_like(x)
    xa, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y = layer(xa)
    y.backward(dy)
    yr = reference(xr)
    yr.backward(dy.double())
    assert y.dtype == xa.grad.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    for got, want in [(y, yr), (xa.grad, xr.grad)]:
        assert bf16_ulps(got, want).max() <= 1
        assert (got == want.bfloat16()).float().mean() >= 0.995
    for got, want in [(layer.running_mean, reference.running_mean), (layer.running_var, reference.running_var)]:
        assert got.dtype == torch.float32 and sqnr_db(got, want) >= 120
    for got, want in [(layer.weight.grad, reference.weight.grad), (layer.bias.grad, reference.bias.grad)]:
        assert got.dtype == torch.float32 and sqnr_db(got, want) >= 120


def test_under_bf16_autocast_the_models_norms_run_dfps_kernels():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    conv, norm = torch.nn.Conv2d(3, 8, 3, padding=1), dfp.nn.BatchNorm2d(8)
    x = channels_last(4, 3, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16 and norm._on_dfp_kernels(h)
        y = norm(h)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert conv.weight.grad.isfinite().all() and norm.weight.grad.isfinite().all()


def test_momentum_none_is_a_cumulative_average():
    torch.set_num_threads(2)
    layer, reference = pair(8, momentum=None)
    for seed in range(3):
        torch.manual_seed(seed)
        x = channels_last(4, 8, 6, 6)
        layer(x)
        reference(x.double())
    assert sqnr_db(layer.running_mean, reference.running_mean) >= 120
    assert sqnr_db(layer.running_var, reference.running_var) >= 120


def test_without_running_statistics_every_mode_uses_the_batch():
    torch.set_num_threads(2)
    layer, reference = pair(8, track=False)
    x = channels_last(4, 8, 6, 6)
    for mode in (True, False):
        layer.train(mode), reference.train(mode)
        assert layer._on_dfp_kernels(x)
        assert sqnr_db(layer(x), reference(x.double())) >= 120


@pytest.mark.parametrize(
    "case",
    ["one thread", "16 channels", "contiguous", "eval", "float64", "one value per channel"],
)
def test_elsewhere_it_is_torchs_layer_bit_for_bit(case):
    torch.manual_seed(0)
    torch.set_num_threads(1 if case == "one thread" else 2)
    channels = 16 if case == "16 channels" else 8
    layer = dfp.nn.BatchNorm2d(channels)
    x = channels_last(
        1 if case == "one value per channel" else 4, channels, *((1, 1) if case == "one value per channel" else (6, 6))
    )
    if case == "contiguous":
        x = x.contiguous()
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "eval":
        layer(x)  # running statistics from a batch, on dfp's kernels
        layer.eval()
    torch_layer = torch.nn.BatchNorm2d(channels).to(x.dtype)
    torch_layer.load_state_dict(layer.state_dict())
    torch_layer.train(layer.training)
    assert not layer._on_dfp_kernels(x)
    if case == "one value per channel":  # torch's own message
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(x)
        return
    assert torch.equal(layer(x), torch_layer(x))


@pytest.mark.parametrize("fused", ["none", *FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_stays_in_its_channel(dtype, fused):
    # a fused ReLU keeps NaN (as torch.relu) and its gate lets dy through where y is NaN
    with_residual, relu = FUSED.get(fused, (False, False))
    torch.set_num_threads(2)
    layer = dfp.nn.BatchNorm2d(8)
    x = channels_last(4, 8, 6, 6).to(dtype).requires_grad_()
    with torch.no_grad():
        x[1, 3, 2, 2] = float("nan")
    y = layer(x, residual=torch.zeros_like(x) if with_residual else None, relu=relu)
    y.sum().backward()
    assert y[:, 3].isnan().all() and y[:, [0, 1, 2, 4, 5, 6, 7]].isfinite().all()
    assert x.grad[:, 3].isnan().all() and x.grad[:, [0, 1, 2, 4, 5, 6, 7]].isfinite().all()
    assert layer.running_mean[3].isnan() and layer.running_mean[[0, 1, 2, 4, 5, 6, 7]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_the_same_bits_on_any_number_of_threads(dtype):
    torch.manual_seed(0)
    x = channels_last(32, 24, 16, 16).to(dtype)  # 8192 rows: several tasks
    dy, residual = torch.randn_like(x), torch.randn_like(x)
    weight, bias = torch.rand(24), torch.randn(24)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        mean, variance = cpu.batch_norm_statistics(x)
        y, mean32, invstd, scale, shift = cpu.batch_norm_train_forward(x, mean, variance, 1e-5, weight, bias,
                                                                        residual, relu=True)  # fmt: skip
        results.append((mean, variance, y, cpu.batch_norm_train_forward(x, mean, variance, 1e-5)[0]))
        for gate in [(None, None, None), (scale, shift, None), (None, None, y)]:
            results[-1] += tuple(
                t for t in cpu.batch_norm_train_backward(dy, x, mean32, invstd, weight, gate) if t is not None
            )
    for first, second in zip(*results):
        assert torch.equal(first, second)


def every_kernel_output(x, dy, residual, weight, bias):
    """What each batch-norm kernel writes for these tensors: statistics, forwards and
    backwards with every gate, and (float32) the input gradient a convolution makes."""
    mean, variance = cpu.batch_norm_statistics(x)
    out = [mean, variance]
    for r, relu in [(None, False), (None, True), (residual, False), (residual, True)]:
        y, mean32, invstd, scale, shift = cpu.batch_norm_train_forward(x, mean, variance, 1e-5, weight, bias, r, relu)
        out.append(y)
        for gate in [(None, None, None), (scale, shift, None), (None, None, y)]:
            out += [t for t in cpu.batch_norm_train_backward(dy, x, mean32, invstd, weight, gate) if t is not None]
            if x.dtype == torch.float32:
                *grads, made = cpu.batch_norm_backward_scales(dy, x, mean32, invstd, weight, gate)
                out += [t for t in grads if t is not None] + [made.written()]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3, 16, 24, 70])
def test_every_cpu_path_gives_the_same_bits(dtype, channels):
    # the loops are compiled once per instruction set (csrc/cpu/batch_norm_rows.h)
    torch.manual_seed(channels)
    x = (channels_last(5, channels, 9, 7) * 3 + 1).to(dtype)
    tensors = (x, torch.randn_like(x), torch.randn_like(x), torch.rand(channels) + 0.5, torch.randn(channels))
    before = cpu.cpu_isa()
    try:
        cpu.set_cpu_isa("scalar")
        portable = every_kernel_output(*tensors)
        for isa in cpu.supported_isas():
            cpu.set_cpu_isa(isa)
            assert all(torch.equal(a, b) for a, b in zip(portable, every_kernel_output(*tensors), strict=True)), isa
    finally:
        cpu.set_cpu_isa(before)


@pytest.mark.parametrize("affine", [True, False])
def test_the_per_channel_vectors_are_torchs_formula_in_float64(affine):
    # one C++ call makes them, not torch's ops: the bits of those ops
    torch.manual_seed(1)
    x = channels_last(4, 24, 5, 5)
    weight, bias = (torch.rand(24) + 0.5, torch.randn(24)) if affine else (None, None)
    mean, variance = cpu.batch_norm_statistics(x)
    variance[0] = 0.0  # a constant channel: 1 / sqrt(eps)
    _, mean32, invstd, scale, shift = cpu.batch_norm_train_forward(x, mean, variance, 1e-5, weight, bias)
    want_invstd = (variance + 1e-5).rsqrt()
    assert torch.equal(mean32, mean.float()) and torch.equal(invstd, want_invstd)
    assert torch.equal(scale, (want_invstd if weight is None else want_invstd * weight.double()).float())
    assert torch.equal(shift, torch.zeros(24) if bias is None else bias)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_residual_and_relu_follow_float64(fused, source, dtype):
    # norm(x, residual=r, relu=True) = relu(norm(x) + r) in one pass, on dfp's kernels,
    # the backward gating dy where the output was <= 0 (recomputed from x, or read from
    # the output where r was added): every output as close to float64 as the norm alone
    with_residual, relu = FUSED[fused]
    channels, threads, hand = SOURCES[source]
    torch.manual_seed(channels + threads)
    torch.set_num_threads(threads)
    layer, reference = pair(channels)
    x, r = channels_last(6, channels, 9, 9).to(dtype), channels_last(6, channels, 9, 9, shift=0.0).to(dtype)
    assert layer._on_dfp_kernels(x, hand)
    xa, ra, xr, rr = (t.clone().requires_grad_() for t in (x, r, x.double(), r.double()))
    if hand:
        hand_over(xa, *cpu.batch_norm_statistics(x))
    y = layer(xa, residual=ra if with_residual else None, relu=relu)
    yr = reference(xr) + (rr if with_residual else 0)
    yr = torch.relu(yr) if relu else yr
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    if relu:  # the gate does cut
        assert 0.2 < (y > 0).float().mean() < 0.8
    pairs = [(y, yr), (xa.grad, xr.grad)] + ([(ra.grad, rr.grad)] if with_residual else [])
    for got, want in pairs:
        if dtype == torch.float32:
            assert sqnr_db(got, want) >= 120
        else:  # the float result rounded once: off by a place only next to a tie
            assert (got == want.bfloat16()).float().mean() >= 0.99
    for got, want in [(layer.weight.grad, reference.weight.grad), (layer.bias.grad, reference.bias.grad)]:
        assert sqnr_db(got, want) >= (120 if dtype == torch.float32 else 40)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusing_gives_the_bits_of_torchs_relu_and_add_behind_the_norm(fused, dtype):
    # the same float operations in the same order, and the backward's gate is exactly
    # torch's threshold_backward on the forward's output (recomputed or read)
    with_residual, relu = FUSED[fused]
    if dtype == torch.bfloat16 and with_residual:
        pytest.skip("torch rounds the norm's bf16 output before adding; fused, the sum is rounded once")
    torch.manual_seed(1)
    torch.set_num_threads(2)
    x, r = channels_last(4, 8, 7, 7).to(dtype), channels_last(4, 8, 7, 7, shift=0.0).to(dtype)
    dy = torch.randn_like(x)
    results = []
    for fuse in (True, False):
        torch.manual_seed(2)
        layer, _ = pair(8)
        xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
        residual = ra if with_residual else None
        if fuse:
            y = layer(xa, residual=residual, relu=relu)
        else:
            y = layer(xa)
            y = y + residual if with_residual else y
            y = torch.relu(y) if relu else y
        y.backward(dy)
        results.append([y, xa.grad, layer.weight.grad, layer.bias.grad] + ([ra.grad] if with_residual else []))
    for fused_result, unfused in zip(*results):
        assert torch.equal(fused_result, unfused)


def test_a_residual_dfps_kernels_cannot_add_is_added_by_torch():
    # another shape (broadcast), dtype or layout: the norm on dfp's kernels, then torch's add
    torch.set_num_threads(2)
    layer, reference = pair(8)
    x = channels_last(4, 8, 6, 6)
    for residual in [torch.randn(1, 8, 1, 1), torch.randn(4, 8, 6, 6), channels_last(4, 8, 6, 6).double()]:
        y = layer(x, residual=residual, relu=True)
        assert y.dtype == torch.promote_types(x.dtype, residual.dtype)
        assert sqnr_db(y, torch.relu(reference(x.double()) + residual.double())) >= 120


@pytest.mark.parametrize("fused", FUSED)
def test_elsewhere_a_fused_residual_and_relu_are_torchs_ops(fused):
    with_residual, relu = FUSED[fused]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layer = dfp.nn.BatchNorm2d(8)
    x, r = channels_last(4, 8, 6, 6), channels_last(4, 8, 6, 6)
    torch_layer = torch.nn.BatchNorm2d(8)
    torch_layer.load_state_dict(layer.state_dict())
    assert not layer._on_dfp_kernels(x)
    want = torch_layer(x) + r if with_residual else torch_layer(x)
    assert torch.equal(layer(x, residual=r if with_residual else None, relu=relu), torch.relu(want) if relu else want)


def test_the_models_train_with_it():
    model = dfp.models.resnet20(3, 10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, dfp.nn.BatchNorm2d) for m in norms)


def test_the_models_run_with_torchs_norms_swapped_in():
    # norm_relu falls back to torch's ReLU and add behind any other norm: on one thread in
    # fp32 dfp's layer is torch's, so both models give the same bits
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = dfp.models.resnet20(3, 10).to(memory_format=torch.channels_last)
    swapped = dfp.models.resnet20(3, 10).to(memory_format=torch.channels_last)
    swapped.load_state_dict(model.state_dict())
    for module in list(swapped.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, dfp.nn.BatchNorm2d):
                plain = torch.nn.BatchNorm2d(child.num_features)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    x = channels_last(4, 3, 16, 16)
    outputs = []
    for net in (model, swapped):
        out = net(x)
        out.square().sum().backward()
        outputs.append([out] + [p.grad for p in net.parameters()])
    assert not any(isinstance(m, dfp.nn.BatchNorm2d) for m in swapped.modules())
    for got, want in zip(*outputs):
        assert torch.equal(got, want)
