"""The compiled backend: dfp._C on CPU tensors (AVX-512 VNNI, AVX-512BW, AVX2 or
portable C++, chosen at run time; ``DFP_CPU_ISA`` forces one)."""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

from .._errors import BackendUnavailableError, NonFiniteError
from .._gemm_layout import matmul_grouping
from .._patches import output_size
from . import _buffers

_BUILD_HINT = (
    "Build it from the repository root with `pip install -e .` (needs a C++17 compiler; "
    "pybind11 is fetched by the build), or choose a backend that needs no build with "
    "DFP_BACKEND=numba or DFP_BACKEND=reference."
)


@functools.cache
def _core():
    try:
        core = importlib.import_module("dfp._C")
    except ImportError as err:
        raise BackendUnavailableError(
            f"dfp's compiled core (dfp._C) could not be loaded: {err}. {_BUILD_HINT}"
        ) from err
    _check_forced_isa(core)
    return core


def _check_forced_isa(core) -> None:
    """DFP_CPU_ISA checked when the core is first used, in Python: the core's own check
    throws from whichever kernel call comes first, deep inside torch's dispatcher."""
    forced = os.environ.get("DFP_CPU_ISA")
    if forced and forced not in core.supported_isas():
        raise BackendUnavailableError(
            f"DFP_CPU_ISA={forced!r} is not a path this CPU supports; choose one of: "
            f"{', '.join(core.supported_isas())}, or unset DFP_CPU_ISA to take the fastest"
        )


def ensure_available() -> None:
    _core()


def cpu_isa() -> str:
    """The CPU path the compiled kernels take: avx512_vnni, avx512bw, avx2 or scalar."""
    return _core().isa()


def thread_runtime() -> str:
    """Whose threads run the kernels' parallel loops: the file of the OpenMP runtime that
    torch loaded (they share its threads), or "dfp's own threads" where there is none
    or ``DFP_THREAD_POOL=own`` is set."""
    return _core().thread_runtime()


def supported_isas() -> list[str]:
    """The CPU paths this machine can run, fastest first."""
    return _core().supported_isas()


def set_cpu_isa(name: str) -> None:
    """Force a CPU path (as ``DFP_CPU_ISA`` does); ValueError names the available ones."""
    _core().set_isa(name)


def _address(t: torch.Tensor | None) -> int:
    """t's data pointer; 0 (null: the core writes or reads nothing there) for None or an
    empty tensor."""
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _nonfinite(name: str) -> NonFiniteError:
    return NonFiniteError(
        f"{name} contains NaN or Inf, which DFP16 cannot represent; find where it came from "
        "(torch.autograd.detect_anomaly helps in training) or clean it with torch.nan_to_num"
    )


def quantize3d(x, mode, block, headroom, rounding, seed):
    o, n, i = x.shape
    mantissa = _buffers.empty((o, n, i), torch.int16)
    groups = (1, n, o * -(-n // block) * i if block else 0)[mode]
    exponent = torch.empty(groups, dtype=torch.int32)
    ok = _core().quantize3d(
        x.data_ptr(), o, n, i, mode, block, headroom, rounding, seed & (2**64 - 1),
        mantissa.data_ptr(), exponent.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if not ok:
        raise _nonfinite("the tensor to quantize")
    return mantissa, exponent.view((1,) if mode == 0 else (n,) if mode == 1 else (o, -(-n // block), i))


def quantize_gradient(x, headroom, block, group_rows, rounding, seed, group_cols=0):
    """Contiguous float32 x (rows, cols) per block of ``block`` rows and column (none
    where ``block`` is 0) and per group of ``group_rows`` rows (none where 0) and
    ``group_cols`` columns (0: all), reading x twice in all; ``rounding``: (blocks',
    groups') rounding codes. Returns ((mantissa, exponent (blocks, cols)) or None,
    (mantissa, exponent (groups, cols / group_cols) or (groups,)) or None)."""
    rows, cols = x.shape

    def outputs(exponent_shape):
        return _buffers.empty((rows, cols), torch.int16), torch.empty(exponent_shape, dtype=torch.int32)

    blocks = outputs((-(-rows // block), cols)) if block else None
    row_groups = -(-rows // group_rows) if group_rows else 0
    groups = outputs((row_groups, cols // group_cols) if group_cols else row_groups) if group_rows else None
    ok = _core().quantize_gradient(
        x.data_ptr(), rows, cols, headroom, seed & (2**64 - 1),
        blocks[0].data_ptr() if blocks else 0, blocks[1].data_ptr() if blocks else 0, block, rounding[0],
        groups[0].data_ptr() if groups else 0, groups[1].data_ptr() if groups else 0, group_rows, group_cols,
        rounding[1], torch.get_num_threads(),
    )  # fmt: skip
    if not ok:
        raise _nonfinite("the tensor to quantize")
    return blocks, groups


def quantize_padded(x, headroom, padding, channels):
    """Per tensor, nearest: contiguous float32 x (N, H, W, C) -> its mantissas zero-padded
    to (N, H + 2*ph, W + 2*pw, channels), and the 0-d exponent; one pass, no copy."""
    n, h, w, c = x.shape
    (ph, pw) = padding
    out = _buffers.empty((n, h + 2 * ph, w + 2 * pw, channels), torch.int16)
    exponent = torch.empty((), dtype=torch.int32)
    ok = _core().quantize_padded(
        x.data_ptr(), n, h, w, c, ph, pw, channels, headroom, out.data_ptr(), exponent.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if not ok:
        raise _nonfinite("the tensor to quantize")
    return out, exponent


def quantize_input(x, headroom, padding, channels, row_block, group_samples, for_weight=True):
    """Contiguous float32 x (N, H, W, C) -> the forward's padded mantissas (N, Hp, Wp,
    channels) with exponents per image row and block of ``row_block`` channels
    (N, Hp, channels / row_block), and grad_weight's with exponents per group of
    ``group_samples`` samples and channel, written for each sample (N, channels), or
    None, None where not ``for_weight``; one read of x per group of samples."""
    n, h, w, c = x.shape
    (ph, pw) = padding
    shape = (n, h + 2 * ph, w + 2 * pw, channels)
    q_rows = _buffers.empty(shape, torch.int16)
    e_rows = torch.empty((n, shape[1], channels // row_block), dtype=torch.int32)
    q_channels = _buffers.empty(shape, torch.int16) if for_weight else None
    e_channels = torch.empty((n, channels), dtype=torch.int32) if for_weight else None
    ok = _core().quantize_input(
        x.data_ptr(), n, h, w, c, ph, pw, channels, headroom, q_rows.data_ptr(), e_rows.data_ptr(), row_block,
        _address(q_channels), _address(e_channels), group_samples, torch.get_num_threads(),
    )  # fmt: skip
    if not ok:
        raise _nonfinite("the tensor to quantize")
    return q_rows, e_rows, q_channels, e_channels


def window(x, rows, columns, channels):
    """Rows [r0, r1), columns [c0, c1) of the int16 image x (N, H, W, C) with ``channels``
    channels, zeros past its edges: one pass, each element written once."""
    x = x.contiguous()
    n, h, w, c = x.shape
    (r0, r1), (c0, c1) = rows, columns
    out = _buffers.empty((n, r1 - r0, c1 - c0, channels), torch.int16)
    _core().copy_window(
        x.data_ptr(), n, h, w, c, r0, r1, c0, c1, channels, out.data_ptr(), torch.get_num_threads()
    )  # fmt: skip
    return out


def gemm(a, ea, ha, b, eb, hb, kblock, bias):
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty((m, n), dtype=torch.float32)
    # The core takes the mantissas' strides but reads exponents and bias as dense arrays:
    # a strided or expanded (zero-stride) view would read the wrong memory.
    ea, eb = ea.contiguous(), eb.contiguous()
    bias = None if bias is None else bias.contiguous()
    _core().gemm_int16(
        a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1), m, n, k,
        ea.data_ptr(), eb.data_ptr(), kblock, ha, hb, 0 if bias is None else bias.data_ptr(),
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def matmul(x, y, headroom, axis, block, rounding, seed_x, seed_y):
    """Fused: quantization writes the packed panels the GEMM reads."""
    x, y = x.contiguous(), y.contiguous()
    (m, k), n = x.shape, y.shape[1]
    grouping = matmul_grouping(axis, block)
    out = torch.empty((m, n), dtype=torch.float32)
    mask = 2**64 - 1
    ok = _core().matmul_float(
        x.data_ptr(), y.data_ptr(), m, n, k, headroom, grouping, block or 0, rounding,
        seed_x & mask, seed_y & mask, 0, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if not ok:
        raise _nonfinite("x or y")
    return out


def _geometry(x, groups, kernel, stride, dilation):
    n, hp, wp, c = x.shape
    return _core().ConvGeometry(n, hp, wp, c, groups, *kernel, *stride, *dilation)


def conv_gemm(x, ex, hx, w, ew, hw, kblock, kernel, stride, dilation, bias):
    """Patches gathered per cache block straight from the padded image (csrc/cpu/conv.cpp)."""
    groups, _, nout = w.shape
    n, hp, wp, _ = x.shape
    oh, ow = (output_size(size, k, s, 0, d) for size, k, s, d in zip((hp, wp), kernel, stride, dilation))
    y = _buffers.empty((n, oh, ow, groups * nout), torch.float32)
    x, ew, ex = x.contiguous(), ew.contiguous(), ex.contiguous()
    bias = None if bias is None else bias.contiguous()
    channel_block = x.shape[3] // ex.shape[2] if ex.dim() == 3 else 0
    _core().conv_gemm_int16(
        x.data_ptr(), _geometry(x, groups, kernel, stride, dilation), ex.data_ptr(), ex.numel(), channel_block, hx,
        w.data_ptr(), *w.stride(), nout, ew.data_ptr(), kblock, hw, 0 if bias is None else bias.data_ptr(),
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y


@functools.lru_cache(maxsize=1024)
def _layer(sizes: tuple[int, ...], weight_strides: tuple[int, ...], headroom: int, weight_channel: bool):
    """The core's description of a layer, made once per shape (a call builds none)."""
    return _core().ConvLayer(sizes, weight_strides, headroom, weight_channel)


class LayerForward(NamedTuple):
    """A layer's forward in one call (csrc/cpu/layer.cpp) for one shape, the core's
    arguments made once (``forward_plan``): a call makes only the tensors the core writes.
    Called with float32 x (N, C, H, W) channels-last and weight (Cout, C/groups, KH, KW)
    (and bias or None), it gives (y (N, OH, OW, Cout), the padded int16 input (N, Hp, Wp,
    C') for grad_weight, its exponents), as ``dfp::conv2d`` makes them step by step: one
    exponent (0-d) where ``input_groups`` is (0, 0), else x per image row and channel
    block in the forward and per group of samples and channel for grad_weight, whose copy
    is made only where asked (else empty tensors). None where NaN/Inf is met (the
    caller's steps then give the results). With ``statistics``, also y's per channel
    mean and biased variance (float64), as ``batch_norm_statistics`` finds them; else
    None in their place."""

    layer: object  # the core's ConvLayer
    input_groups: tuple[int, int]  # (row_block, group_samples)
    y_shape: tuple[int, ...]  # (N, OH, OW, Cout)
    kept_shape: tuple[int, ...] | None  # the padded int16 input's, None where it is not made
    exponent_shape: tuple[int, ...]
    channel_planes: bool  # the padded input kept as channel planes (``kept_input_channel_major``)

    def __call__(self, x, weight, bias, statistics: bool = False):
        y = _buffers.empty(self.y_shape, torch.float32)  # the core writes every element of each
        cout = self.y_shape[-1]
        mean, variance = (torch.empty(cout, dtype=torch.float64) for _ in range(2)) if statistics else (None, None)
        if self.kept_shape is None:  # the forward reads a copy of its own
            x_padded, exponent = torch.empty(0, dtype=torch.int16), torch.empty(0, dtype=torch.int32)
        else:
            x_padded = _kept_buffer(self.kept_shape, self.channel_planes)
            exponent = torch.empty(self.exponent_shape, dtype=torch.int32)
        ok = _core().conv_forward(
            x.data_ptr(), weight.data_ptr(), _address(bias), self.layer, *self.input_groups, self.channel_planes,
            _address(x_padded), _address(exponent), y.data_ptr(), _address(mean), _address(variance),
            torch.get_num_threads(),
        )  # fmt: skip
        return (y, x_padded, exponent, statistics and (mean, variance)) if ok else None


def _kept_buffer(shape: tuple[int, ...], channel_planes: bool) -> torch.Tensor:
    """A reused int16 buffer (N, Hp, Wp, C), laid out as channel planes (a permuted view of
    (N, C, Hp, Wp)) where asked."""
    if not channel_planes:
        return _buffers.empty(shape, torch.int16)
    n, hp, wp, c = shape
    return _buffers.empty((n, c, hp, wp), torch.int16).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=1024)
def kept_input_channel_major(kept_shape, weight_shape, stride, dilation, groups) -> bool:
    """Whether a layer keeps grad_weight's padded input (N, Hp, Wp, C') with exponents per
    sample as channel planes, a permuted view of (N, C', Hp, Wp): where grad_weight reads
    the image so (16 to 64 output channels, stride 1), the forward writes it so, and the
    backward transposes nothing (a ResNet-20 step spent 2 % of its time transposing)."""
    n, hp, wp, channels = kept_shape
    cout, _, kh, kw = weight_shape
    geometry = _core().ConvGeometry(n, hp, wp, channels, groups, kh, kw, *stride, *dilation)
    return bool(_core().grad_weight_reads_channel_major(geometry, cout))


def kept_input(x_padded, weight_shape, stride, dilation, groups) -> torch.Tensor:
    """grad_weight's padded input (N, Hp, Wp, C') with exponents per sample, laid out as
    the one-call forward keeps it (``kept_input_channel_major``): a transposed copy where
    that is channel planes (the steps' forward, e.g. of an NCHW input), else ``x_padded``."""
    if not kept_input_channel_major(tuple(x_padded.shape), weight_shape, stride, dilation, groups):
        return x_padded
    n, hp, wp, c = x_padded.shape
    planes = torch.empty((n, c, hp, wp), dtype=torch.int16)
    _core().to_channel_major(
        x_padded.contiguous().data_ptr(), n, hp * wp, c, planes.data_ptr(), torch.get_num_threads()
    )  # fmt: skip
    return planes.permute(0, 2, 3, 1)


def _channel_planes(x_padded: torch.Tensor) -> bool:
    """Whether the padded int16 input (N, Hp, Wp, C) lies as channel planes (``_kept_buffer``);
    else it is contiguous."""
    return x_padded.dim() == 4 and x_padded.shape[3] > 1 and x_padded.stride(3) != 1


@functools.lru_cache(maxsize=1024)
def forward_plan(
    x_shape, weight_shape, weight_strides, geometry, headroom, weight_channel, channels, input_groups, for_weight
) -> LayerForward:
    """``LayerForward`` for a layer of these shapes (tuples), consistent as
    ``dfp::conv2d`` checks them; geometry: (stride, padding, dilation, groups), the first
    three pairs; input_groups: (row_block, group_samples); C' = channels."""
    (stride, padding, dilation, groups), (n, c, h, w), (cout, _, kh, kw) = geometry, x_shape, weight_shape
    oh, ow = (output_size(*args) for args in zip((h, w), (kh, kw), stride, padding, dilation))
    sizes = (n, h, w, c, cout, groups, kh, kw, *stride, *padding, *dilation, channels)
    row_block = input_groups[0]
    kept = None if row_block and not for_weight else (n, h + 2 * padding[0], w + 2 * padding[1], channels)
    planes = (
        bool(row_block) and kept is not None and kept_input_channel_major(kept, weight_shape, stride, dilation, groups)
    )
    layer = _layer(sizes, weight_strides, headroom, weight_channel)
    return LayerForward(layer, input_groups, (n, oh, ow, cout), kept, (n, channels) if row_block else (), planes)


def conv2d_grad_input(dy, ey, weight, input_shape, stride, padding, dilation, groups, headroom, weight_channel, block):
    """dx (N, H, W, C) of a layer in one call (csrc/cpu/grad_input.cpp): int16 dy
    (N, OH, OW, Cout) contiguous with exponents ey, 0-d, (N,) or per image row and
    channel block (N, OH, B); the float32 weight, quantized here per tensor or
    (``weight_channel``) per ``block`` output channels, as ``dfp.autograd`` does. None
    where NaN/Inf is met."""
    n, c, h, w = input_shape
    cout, _, kh, kw = weight.shape
    dx = _buffers.empty((n, h, w, c), torch.float32)
    sizes = (n, h, w, c, cout, groups, kh, kw, *stride, *padding, *dilation, c)
    ey = ey.contiguous()
    channel_block = cout // ey.shape[2] if ey.dim() == 3 else 0
    ok = _core().conv_grad_input(
        dy.data_ptr(), ey.data_ptr(), ey.numel(), channel_block, weight.data_ptr(), block,
        _layer(sizes, weight.stride(), headroom, weight_channel), dx.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dx if ok else None


def conv2d_grad_weight(dy, ey, x_padded, ex, weight_shape, stride, dilation, groups, headroom, kblock, channels_last):
    """dW (Cout, C/groups, KH, KW) in one call (csrc/cpu/layer.cpp), channels-last where
    asked: int16 dy (N, OH, OW, Cout) with exponents ey, 0-d or one per block of
    ``kblock`` output pixels and channel; the padded int16 input and its exponents from
    ``dfp::conv2d``, 0-d or (N, C). None where NaN/Inf is met."""
    n, hp, wp, channels = x_padded.shape
    cout, cin_g, kh, kw = weight_shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    dw = torch.empty(weight_shape, dtype=torch.float32, memory_format=memory_format)
    sizes = (n, hp, wp, cin_g * groups, cout, groups, kh, kw, *stride, 0, 0, *dilation, channels)
    ok = _core().conv_grad_weight(
        dy.data_ptr(), ey.data_ptr(), ey.numel(), kblock, x_padded.data_ptr(), ex.data_ptr(), ex.dim() > 0,
        _channel_planes(x_padded), _layer(sizes, dw.stride(), headroom, False), dw.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dw if ok else None


class LayerBackward(NamedTuple):
    """A layer's backward in one call (csrc/cpu/layer.cpp) for one shape, its
    arguments made once (``backward_plan``): float32 dy (N, Cout, OH, OW) quantized for
    both products, then dx (N, H, W, C) and dW in the weight's layout, as the three
    calls make them. blocks: (grad_input's weight block or 0, grad_weight's dy block,
    grad_input's dy channel block for row groups or 0); rounding: (grad_input's dy
    groups as a code of ``dfp.formats.GRAD_INPUT_EXPONENTS``, dy blocks' rounding code,
    grad_input's)."""

    layer: object  # the core's ConvLayer
    blocks: tuple[int, int, int]
    rounding: tuple[int, int, int]  # (grad_input's dy groups, dy blocks' rounding, grad_input's)
    dx_shape: tuple[int, ...] | None  # None where not asked
    dw: tuple[tuple[int, ...], torch.memory_format] | None

    def __call__(self, dy, weight, x_padded, ex, seed: int, dy_made: NormInputGradient | None = None):
        """(dx or None, dW or None), where not asked; None where NaN/Inf is met. ex:
        x_padded's exponents, 0-d or (N, C). dy_made: dy is that batch norm's input
        gradient, made as it is read (dy then unread)."""
        dw = None if self.dw is None else torch.empty(self.dw[0], dtype=torch.float32, memory_format=self.dw[1])
        dx = None if self.dx_shape is None else _buffers.empty(self.dx_shape, torch.float32)
        pixels = None if dy_made else dy.permute(0, 2, 3, 1).contiguous()  # no copy where dy is channels-last
        (weight_block, dy_block, row_block), (input_groups, blocks_rounding, groups_rounding) = (
            self.blocks,
            self.rounding,
        )
        ok = _core().conv_backward(
            _address(pixels), weight.data_ptr(), _address(x_padded if dw is not None else None),
            _address(ex if dw is not None else None), dw is not None and ex.dim() > 0,
            dw is not None and _channel_planes(x_padded), self.layer, dy_block,
            input_groups, row_block, blocks_rounding, groups_rounding, seed & (2**64 - 1), weight_block,
            _address(dx), _address(dw), torch.get_num_threads(), *([dy_made.core] if dy_made else []),
        )  # fmt: skip
        return (dx, dw) if ok else None


@functools.lru_cache(maxsize=1024)
def backward_plan(
    input_shape,
    weight_shape,
    weight_strides,
    geometry,
    channels,
    headroom,
    weight_channel,
    blocks,
    rounding,
    need,
    weight_last,
) -> LayerBackward | None:
    """``LayerBackward`` for a layer of these shapes (tuples); geometry: (stride, padding,
    dilation, groups); channels: x_padded's (C' where dW is asked); need: (dx, dW), dW
    channels-last where ``weight_last``. None where dW's strides would not be the weight's."""
    (stride, padding, dilation, groups), (need_input, need_weight) = geometry, need
    n, c, h, w = input_shape
    cout, _, kh, kw = weight_shape
    memory_format = torch.channels_last if weight_last else torch.contiguous_format
    if need_weight and torch.empty(weight_shape, device="meta", memory_format=memory_format).stride() != weight_strides:
        return None
    sizes = (n, h, w, c, cout, groups, kh, kw, *stride, *padding, *dilation, channels)
    layer = _layer(sizes, weight_strides, headroom, weight_channel)
    dx_shape = (n, h, w, c) if need_input else None
    return LayerBackward(layer, blocks, rounding, dx_shape, (weight_shape, memory_format) if need_weight else None)


def conv_grad_weight_gemm(dy, ey, hy, x, ex, hx, kernel, stride, dilation, groups, kblock):
    """dy's exponents ey (KB, Cout): one per block of ``kblock`` output pixels and channel;
    x's ex 0-d or (N, C), one per sample and channel."""
    dy, x, ey, ex = dy.contiguous(), x.contiguous(), ey.contiguous(), ex.contiguous()
    cout = dy.shape[-1]
    dw = torch.empty((cout, kernel[0] * kernel[1] * x.shape[-1] // groups), dtype=torch.float32)
    _core().conv_grad_weight_int16(
        dy.data_ptr(), cout, ey.data_ptr(), kblock, hy, x.data_ptr(), _geometry(x, groups, kernel, stride, dilation),
        ex.data_ptr(), ex.dim() > 0, hx, dw.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return dw


# Batch normalisation in training, on channels-last float32 or bfloat16 (n, c, h, w)
# tensors, whose memory is rows x channels (dfp.nn.BatchNorm2d). Vectors are float32.


def batch_norm_statistics(x):
    """Per channel mean and biased variance of x, float64."""
    images, channels = x.shape[:2]
    mean = torch.empty(channels, dtype=torch.float64)
    variance = torch.empty(channels, dtype=torch.float64)
    _core().batch_norm_statistics(
        x.data_ptr(), images, x[0, 0].numel(), channels, mean.data_ptr(), variance.data_ptr(),
        x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return mean, variance


def batch_norm_train_forward(x, mean, variance, eps, weight=None, bias=None, residual=None, relu=False):
    """(x - mean) * invstd * weight + bias per channel, + residual, then ReLU where relu, in
    x's layout and dtype (residual has them too), from the batch's mean and biased variance
    (float64); with the vectors (mean32, invstd float64, scale, shift) the backward takes."""
    channels = x.shape[1]
    out = torch.empty_like(x)
    mean32, scale, shift = (torch.empty(channels) for _ in range(3))
    invstd = torch.empty(channels, dtype=torch.float64)
    _core().batch_norm_train_forward(
        x.data_ptr(), mean.data_ptr(), variance.data_ptr(), eps, _address(weight), _address(bias), _address(residual),
        relu, x.numel() // channels, channels, out.data_ptr(), mean32.data_ptr(), invstd.data_ptr(), scale.data_ptr(),
        shift.data_ptr(), x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return out, mean32, invstd, scale, shift


def batch_norm_train_backward(dy, x, mean32, invstd, weight=None, gate=(None, None, None), needs=(True, True, True)):
    """(dx, the weight's gradient, the bias's, g) of ``batch_norm_train_forward``, each None
    where ``needs`` does not ask for it; g = dy gated by a fused ReLU: ``gate`` is (scale,
    shift, None) to recompute the forward's output from x, (None, None, out) to read it (g
    then returned: the gradient of a residual added before the ReLU), all None for no gate.
    dy has x's dtype and layout."""
    channels = x.shape[1]
    dx = torch.empty_like(x) if needs[0] else None
    grad_weight, grad_bias = (torch.empty(channels) if need else None for need in needs[1:])
    gated = torch.empty_like(x) if gate[2] is not None else None
    _core().batch_norm_train_backward(
        dy.data_ptr(), x.data_ptr(), mean32.data_ptr(), invstd.data_ptr(), _address(weight), *map(_address, gate),
        x.numel() // channels, channels, _address(dx), _address(grad_weight), _address(grad_bias), _address(gated),
        x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return dx, grad_weight, grad_bias, gated


def batch_norm_backward_scales(dy, x, mean32, invstd, weight=None, gate=(None, None, None), needs=(True, True)):
    """``batch_norm_train_backward`` but its pass over dx: (the weight's gradient, the
    bias's, g, dx unwritten as a ``NormInputGradient``), the gradients None where ``needs``
    does not ask for them. float32."""
    channels = x.shape[1]
    x_scale, dy_scale, shift = (torch.empty(channels) for _ in range(3))
    grad_weight, grad_bias = (torch.empty(channels) if need else None for need in needs)
    gated = torch.empty_like(x) if gate[2] is not None else None
    _core().batch_norm_backward_scales(
        dy.data_ptr(), x.data_ptr(), mean32.data_ptr(), invstd.data_ptr(), _address(weight), *map(_address, gate),
        x.numel() // channels, channels, x_scale.data_ptr(), dy_scale.data_ptr(), shift.data_ptr(),
        _address(grad_weight), _address(grad_bias), _address(gated), torch.get_num_threads(),
    )  # fmt: skip
    # where the gate read the output, dx reads the gated dy ungated
    source, source_gate = (gated, (None, None)) if gated is not None else (dy, gate[:2])
    return grad_weight, grad_bias, gated, NormInputGradient.of(x, source, mean32, x_scale, dy_scale, shift, source_gate)


class NormInputGradient(NamedTuple):
    """A batch norm's float32 input gradient, not written (csrc/cpu/batch_norm.h): the
    tensors it reads, kept alive, and the core's description of it."""

    tensors: tuple[torch.Tensor | None, ...]
    core: object

    @staticmethod
    def of(x, dy, mean, x_scale, dy_scale, shift, gate) -> NormInputGradient:
        tensors = (x, dy, mean, x_scale, dy_scale, shift, *gate)
        return NormInputGradient(tensors, _core().NormInputGradient(*map(_address, tensors), x.shape[1]))

    def written(self) -> torch.Tensor:
        """The gradient itself, in x's shape and layout."""
        x = self.tensors[0]
        dx = torch.empty_like(x)
        self.core.write(x.numel() // x.shape[1], dx.data_ptr(), torch.get_num_threads())
        return dx
