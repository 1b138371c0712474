"""The integer GEMM (dfp.ops.gemm) and dfp.matmul on every backend and CPU path:
bit-exact against the integer reference, exact where the contract says so, and safe
from int32 overflow by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import int16_operand, on_reference, wide_range

import dfp
from dfp import DFPSpec, DFPTensor
from dfp.reference import chain_length


def _dfp(mantissa: torch.Tensor, exponent, spec: DFPSpec) -> DFPTensor:
    return DFPTensor(mantissa, torch.as_tensor(exponent, dtype=torch.int32), spec)


def _random_exponents(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-40, 10, shape, generator=g, dtype=torch.int32)


def _operands(m, k, n, spec_a, spec_b, seed=0):
    """Random DFPTensors a (M, K) and b (K, N) with exponents in the specs' layouts."""
    a = int16_operand((m, k), spec_a.headroom, seed)
    b = int16_operand((k, n), spec_b.headroom, seed + 1)
    ea = _random_exponents(dfp.format.exponent_shape(a.shape, spec_a), seed + 2)
    eb = _random_exponents(dfp.format.exponent_shape(b.shape, spec_b), seed + 3)
    return _dfp(a, ea, spec_a), _dfp(b, eb, spec_b)


SHAPES = [(1, 1, 1), (3, 5, 7), (17, 31, 9), (64, 128, 48), (5, 1, 3), (40, 1000, 21), (2, 4099, 3)]
LAYOUTS = {
    "tensor": (DFPSpec(), DFPSpec()),
    "row-col": (DFPSpec(axis=0), DFPSpec(axis=1)),
    "kblock32": (DFPSpec(axis=1, block=32), DFPSpec(axis=0, block=32)),
    "kblock-odd": (DFPSpec(axis=1, block=7), DFPSpec(axis=1)),
    "kblock-mixed": (DFPSpec(axis=1, block=12), DFPSpec(axis=0, block=8)),
    "headroom-0": (DFPSpec(headroom=0), DFPSpec(headroom=0)),
    "headroom-3-1": (DFPSpec(headroom=3, axis=0), DFPSpec(headroom=1)),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_against_reference(backend, shape, layout):
    a, b = _operands(*shape, *LAYOUTS[layout])
    bias = torch.randn(shape[2])
    got = dfp.ops.gemm(a, b, bias=bias)
    want = on_reference(dfp.ops.gemm, a, b, bias=bias)
    assert got.shape == (shape[0], shape[2]) and got.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)], ids=str)
def test_empty_dimensions(backend, shape):
    m, k, n = shape
    a, b = _operands(m, k, n, DFPSpec(), DFPSpec())
    bias = torch.randn(n)
    out = dfp.ops.gemm(a, b, bias=bias)
    assert out.shape == (m, n)
    assert torch.equal(out, torch.zeros(m, n) + bias)


def test_transposed_and_strided_operands(backend):
    spec_w = DFPSpec(axis=0)  # a weight (N, K) with one exponent per output channel
    w = _dfp(int16_operand((24, 70), 2, 1), _random_exponents((24, 1), 2), spec_w)
    x = _dfp(int16_operand((70, 33), 2, 3)[:, ::2], _random_exponents((), 4), DFPSpec())  # strided columns
    at = _dfp(int16_operand((70, 11), 2, 5), _random_exponents((1, 11), 6), DFPSpec(axis=1)).t()
    for a, b in [(at, x), (x.t(), w.t()), (at, w.t())]:
        got = dfp.ops.gemm(a, b)
        contiguous = (
            DFPTensor(a.mantissa.contiguous(), a.exponent, a.spec),
            DFPTensor(b.mantissa.contiguous(), b.exponent, b.spec),
        )
        assert torch.equal(got, on_reference(dfp.ops.gemm, *contiguous))


@pytest.mark.parametrize("headroom", [0, 1, 2, 3])
def test_one_chain_equals_the_int64_product(backend, headroom):
    k = chain_length(headroom, headroom)
    a = int16_operand((9, k), headroom, 1)
    b = int16_operand((k, 13), headroom, 2)
    out = dfp.ops.gemm(_dfp(a, -3, DFPSpec(headroom)), _dfp(b, 5, DFPSpec(headroom)))
    exact = a.long() @ b.long()
    # one chain: its int32 sum is rounded to fp32 once, then scaled by an exact 2^(ea+eb)
    assert torch.equal(out, exact.float() * 4.0)


@pytest.mark.parametrize("pattern", ["all+max", "all-max", "alternating", "alternating-b"])
@pytest.mark.parametrize("headroom", [0, 2, 3])
def test_worst_case_operands_do_not_overflow(backend, pattern, headroom):
    """Sums that overflow a naive int32 accumulator stay exact in every chain."""
    k, big = 4096, 2 ** (15 - headroom) - 1
    # every product is +big^2 or every product is -big^2: the largest chain sums
    signs = {
        "all+max": torch.ones(k, dtype=torch.int16),
        "all-max": -torch.ones(k, dtype=torch.int16),
    }.get(pattern, torch.tensor([1, -1], dtype=torch.int16).repeat(k // 2))
    a_row = signs * big
    b_col = -signs * big if pattern in ("all-max", "alternating-b") else signs * big
    a = a_row.expand(5, k).contiguous()
    b = b_col.unsqueeze(1).expand(k, 6).contiguous()
    naive = np.sum(a[0].numpy().astype(np.int32) * b[:, 0].numpy().astype(np.int32), dtype=np.int32)
    exact = int((a[0].long() * b[:, 0].long()).sum())
    assert int(naive) != exact, "the operands must overflow a naive int32 accumulator"
    out = dfp.ops.gemm(_dfp(a, 0, DFPSpec(headroom)), _dfp(b, 0, DFPSpec(headroom)))
    # every chain sum L * big^2 is exact in int32 and in fp32 (a power of two times big^2
    # rounded once); the fp32 sum of K / L equal terms is exact while it fits 24 bits
    chain = chain_length(headroom, headroom) * big * big * (1 if exact > 0 else -1)
    chains = k // chain_length(headroom, headroom)
    want = np.float32(0)
    for _ in range(chains):
        want = np.float32(want + np.float32(chain))
    assert torch.equal(out, torch.full((5, 6), float(want)))
    assert abs(float(want) - exact) <= abs(exact) * chains * 2**-24


def test_large_k(backend):
    a, b = _operands(3, 70001, 4, DFPSpec(axis=0), DFPSpec(axis=1), seed=9)
    assert torch.equal(dfp.ops.gemm(a, b), on_reference(dfp.ops.gemm, a, b))


def test_result_independent_of_thread_count(backend):
    a, b = _operands(300, 700, 200, DFPSpec(axis=1, block=64), DFPSpec(axis=0, block=64), seed=4)
    torch.set_num_threads(1)
    one = dfp.ops.gemm(a, b)
    torch.set_num_threads(2)
    assert torch.equal(one, dfp.ops.gemm(a, b))


MATMUL_SPECS = [
    DFPSpec(),
    DFPSpec(axis=0),
    DFPSpec(axis=1, block=32),
    DFPSpec(axis=1, block=5),
    DFPSpec(headroom=3, axis=0, rounding="stochastic"),
    DFPSpec(axis=1, block=64, rounding="stochastic"),
]


@pytest.mark.parametrize("spec", MATMUL_SPECS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (19, 77, 23), (130, 300, 70)], ids=str)
def test_matmul_equals_quantize_then_gemm(backend, shape, spec):
    """The fused path (quantization into packed panels) is the unfused one, bit for bit."""
    m, k, n = shape
    x, y = wide_range((m, k), 1), wide_range((k, n), 2)
    got = dfp.matmul(x, y, spec, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    xq = on_reference(dfp.quantize, x, spec, generator=g)
    yq = on_reference(dfp.quantize, y, dfp.format.mirrored(spec), generator=g)
    assert torch.equal(got, on_reference(dfp.ops.gemm, xq, yq))


def test_matmul_accuracy_sqnr(backend):
    x, y = torch.randn(256, 512), torch.randn(512, 128)
    exact = x.double() @ y.double()
    out = dfp.matmul(x, y).double()
    # Gaussian data, headroom 2: the step is about amax / 6000 ~ 4.5 sigma / 6000, so each
    # operand has an SQNR near 73 dB and the product near 70 dB (measured: 68 dB).
    assert _sqnr(out, exact) > 60
    # Against the product of the quantized values only the fp32 sums of chains differ.
    xq, yq = dfp.quantize(x), dfp.quantize(y)
    assert _sqnr(out, xq.dequantize().double() @ yq.dequantize().double()) > 120


def _sqnr(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float(10 * torch.log10(exact.pow(2).sum() / (out - exact).pow(2).sum()))


def test_non_finite_matmul_raises(backend):
    x = torch.randn(4, 8)
    y = torch.randn(8, 3)
    y[5, 1] = float("nan")
    with pytest.raises(dfp.NonFiniteError):
        dfp.matmul(x, y)


def test_bad_inputs():
    a, b = _operands(3, 4, 5, DFPSpec(), DFPSpec())
    with pytest.raises(ValueError, match="inner dimensions"):
        dfp.ops.gemm(a, a)
    with pytest.raises(TypeError, match="b must be a DFPTensor"):
        dfp.ops.gemm(a, torch.ones(4, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        dfp.ops.gemm(a, b, bias=torch.ones(4))
    k_channel = _dfp(int16_operand((3, 4), 2), torch.zeros(1, 4), DFPSpec(axis=1))
    with pytest.raises(ValueError, match="varies inside the reduction"):
        dfp.ops.gemm(k_channel, b)
    with pytest.raises(ValueError, match="varies inside the reduction"):
        dfp.matmul(torch.randn(3, 4), torch.randn(4, 5), DFPSpec(axis=1))
    with pytest.raises(TypeError, match="y must be float32"):
        dfp.matmul(torch.randn(3, 4), torch.randn(4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="inner dimensions"):
        dfp.matmul(torch.randn(3, 4), torch.randn(5, 5))


def test_opcheck_gemm_and_matmul():
    a, b = _operands(5, 40, 6, DFPSpec(axis=1, block=8), DFPSpec(axis=0, block=8))
    ea, eb = a.exponent, b.exponent
    torch.library.opcheck(torch.ops.dfp.gemm.default, (a.mantissa, ea, 2, b.mantissa, eb, 2, 8, torch.randn(6)))
    torch.library.opcheck(torch.ops.dfp.gemm.default, (a.mantissa, ea, 2, b.mantissa, eb, 2, 8, None))
    x, y = torch.randn(5, 40), torch.randn(40, 6)
    torch.library.opcheck(torch.ops.dfp.matmul.default, (x, y, 2, None, None, False, 0, 0))
    torch.library.opcheck(torch.ops.dfp.matmul.default, (x, y, 2, 1, 8, True, 1, 2))


def test_eager_calls_give_the_registered_ops_bits():
    """Eager calls on plain tensors run the ops' bodies (dfp._ops.plain_eager): the same
    bits as through torch's dispatcher; traced calls (fake tensors) take the registered op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b = _operands(5, 40, 6, DFPSpec(axis=1, block=8), DFPSpec(axis=0, block=8))
    bias = torch.randn(6)
    through_op = torch.ops.dfp.gemm(a.mantissa, a.exponent, 2, b.mantissa, b.exponent, 2, 8, bias)
    assert torch.equal(dfp.ops.gemm(a, b, bias=bias), through_op)
    x, y = torch.randn(5, 40), torch.randn(40, 6)
    assert torch.equal(dfp.matmul(x, y, DFPSpec(axis=1, block=8)), torch.ops.dfp.matmul(x, y, 2, 1, 8, 0, 0, 0))
    with FakeTensorMode():
        assert dfp.matmul(torch.empty(4, 40), torch.empty(40, 3)).shape == (4, 3)


@pytest.mark.parametrize("ea,eb", [(-100, -60), (-120, -75), (90, 40), (60, -200)])
def test_extreme_exponents_round_once(backend, ea, eb):
    """Scales beyond the fp32 range: results are subnormal, zero or Inf exactly as the
    double-precision epilogue of the contract gives them."""
    a, b = _operands(7, 50, 9, DFPSpec(axis=0), DFPSpec(), seed=5)
    a = _dfp(a.mantissa, torch.full((7, 1), ea).index_put_((torch.tensor([0]),), torch.tensor([[ea - 10]])), a.spec)
    b = _dfp(b.mantissa, eb, b.spec)
    assert torch.equal(dfp.ops.gemm(a, b), on_reference(dfp.ops.gemm, a, b))


@pytest.mark.parametrize("m", [6, 13, 37])
def test_rows_of_one_exponent_mixed_with_rows_of_many(backend, m):
    """A's K-blocks mostly of one exponent per row, as a layer's rows are: the compiled
    GEMM runs the tiles whose rows all have one exponent without chain scales, the
    others (and the last tile, past M) with them, and both give the reference's bits."""
    a, b = _operands(m, 96, 20, DFPSpec(axis=1, block=32), DFPSpec(axis=1), seed=9)
    ea = a.exponent[:, :1].expand(-1, 3).contiguous()  # every row's blocks one exponent
    ea[4::5, 1] -= 3  # but every fifth row's middle block
    a = _dfp(a.mantissa, ea, a.spec)
    assert torch.equal(dfp.ops.gemm(a, b), on_reference(dfp.ops.gemm, a, b))


def test_subnormal_chain_sums_are_added_exactly(backend):
    """K-blocks 140 binades below a block of zeros, of small mantissas: each chain's
    scaled sum is subnormal, and exact (an integer times a power of two >= 2^-149), so
    the compiled kernel's fused multiply-add gives the contract's bits."""
    m, n, block = 16, 16, 32
    a = torch.randint(-40, 41, (m, 3 * block), generator=torch.Generator().manual_seed(3), dtype=torch.int16)
    a[:, :block] = 0
    ea = torch.tensor([0, -140, -141], dtype=torch.int32).expand(m, 3)
    b = _dfp(int16_operand((3 * block, n), 2, 4), 0, DFPSpec())
    a = _dfp(a, ea, DFPSpec(axis=1, block=block))
    got = dfp.ops.gemm(a, b)
    assert torch.equal(got, on_reference(dfp.ops.gemm, a, b))
    assert ((got != 0) & (got.abs() < 2**-126)).any()
