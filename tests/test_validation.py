"""Bad inputs to the public API: a clear error (what was wrong, what to do) or the right
answer, never a silent wrong result. Hand-built DFPTensors, strided and expanded biases,
3-D operands, wrong specs, inputs that require grad, torch.func transforms."""

from __future__ import annotations

import pytest
import torch
from helpers import int16_operand, on_reference

import dfp
from dfp import DFPSpec, DFPTensor


def _operands():
    gen = torch.Generator().manual_seed(0)
    return dfp.quantize(torch.randn(3, 40, generator=gen)), dfp.quantize(torch.randn(40, 3, generator=gen))


@pytest.mark.parametrize(
    "bias", [torch.arange(6.0)[::2], torch.tensor([7.0]).expand(3), torch.arange(8.0)[5:]], ids=str
)
def test_a_strided_or_expanded_bias_is_read_as_its_values(backend, bias):
    a, b = _operands()
    want = on_reference(dfp.ops.gemm, a, b) + bias.contiguous()
    assert torch.equal(dfp.ops.gemm(a, b, bias=bias), want)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda a: DFPTensor(a.mantissa.int(), a.exponent, a.spec), TypeError, "mantissa must be torch.int16"),
        (lambda a: DFPTensor(a.mantissa.float(), a.exponent, a.spec), TypeError, "mantissa must be torch.int16"),
        (lambda a: DFPTensor(a.mantissa, a.exponent.long(), a.spec), TypeError, "exponent must be torch.int32"),
        (lambda a: DFPTensor(a.mantissa.numpy(), a.exponent, a.spec), TypeError, "mantissa must be a torch.Tensor"),
        (lambda a: DFPTensor(a.mantissa, a.exponent, "dfp16"), TypeError, "spec must be a dfp.DFPSpec"),
    ],
)
def test_a_dfptensor_of_the_wrong_types_is_refused_where_it_is_built(build, error, message):
    a, _ = _operands()
    with pytest.raises(error, match=message):
        build(a)


ZERO = torch.tensor(0, dtype=torch.int32)  # an exponent per tensor


def _per_row(mantissa, exponent, headroom=2):
    return DFPTensor(mantissa, exponent, DFPSpec(headroom, axis=0))


@pytest.mark.parametrize(
    ("operand", "message"),
    [
        # one exponent short of the rows: the kernels would read past its end
        (_per_row(int16_operand((3, 40), 2), torch.zeros(2, 1, dtype=torch.int32)), r"needs \(3, 1\)"),
        (_per_row(int16_operand((3, 40), 2), torch.zeros(3, dtype=torch.int32)), r"has shape \(3,\)"),
        (DFPTensor(int16_operand((3, 40), 2), torch.zeros(2, dtype=torch.int32), DFPSpec()), r"needs \(\)"),
        # mantissas beyond the headroom's range would overflow the int32 chains
        (DFPTensor(torch.full((3, 40), 32767, dtype=torch.int16), ZERO, DFPSpec()), "outside -8191..8191"),
        (DFPTensor(torch.full((3, 40), -32768, dtype=torch.int16), ZERO, DFPSpec(0)), "outside -32767"),
        (DFPTensor(int16_operand((3, 40), 2), torch.tensor(2**30, dtype=torch.int32), DFPSpec()), "-511..511"),
        (DFPTensor(int16_operand((2, 3, 40), 2), ZERO, DFPSpec()), "2-D DFPTensor"),
    ],
)
def test_a_hand_built_operand_the_kernels_cannot_read_is_a_clear_error(backend, operand, message):
    _, b = _operands()
    with pytest.raises(ValueError, match=message):
        dfp.ops.gemm(operand, b)


def test_a_one_element_exponent_of_any_shape_is_one_per_tensor(backend):
    a, b = _operands()
    for exponent in (a.exponent.reshape(1), a.exponent.reshape(1, 1)):
        assert torch.equal(dfp.ops.gemm(DFPTensor(a.mantissa, exponent, a.spec), b), dfp.ops.gemm(a, b))


def test_the_registered_gemm_checks_dtypes_and_exponent_shapes():
    a, b = int16_operand((3, 40), 2), int16_operand((40, 5), 2)
    ea, eb = torch.zeros(3, 1, dtype=torch.int32), torch.zeros(1, 5, dtype=torch.int32)
    torch.ops.dfp.gemm(a, ea, 2, b, eb, 2, 40, None)
    with pytest.raises(ValueError, match="a and b must be int16"):
        torch.ops.dfp.gemm(a.int(), ea, 2, b, eb, 2, 40, None)
    with pytest.raises(ValueError, match="ea and eb must be int32"):
        torch.ops.dfp.gemm(a, ea[:2], 2, b, eb, 2, 40, None)
    with pytest.raises(ValueError, match=r"bias must be float32 \(5,\)"):
        torch.ops.dfp.gemm(a, ea, 2, b, eb, 2, 40, torch.zeros(4))


def test_quantize_names_what_a_spec_is():
    with pytest.raises(TypeError, match=r"spec must be a dfp.DFPSpec, got str 'dfp16'.*dfp.DFPSpec\(\)"):
        dfp.quantize(torch.randn(3), "dfp16")
    with pytest.raises(TypeError, match="spec must be a dfp.DFPSpec"):
        dfp.matmul(torch.randn(2, 3), torch.randn(3, 2), "dfp16")


@pytest.mark.parametrize("field", ["headroom", "axis", "block"])
def test_a_bool_is_not_an_int_in_a_spec(field):
    options = {"axis": 0, field: True}
    with pytest.raises(ValueError, match=f"DFPSpec.{field} must be"):
        DFPSpec(**options)


def test_matmul_refuses_inputs_that_require_grad_and_points_to_linear():
    x, y = torch.randn(3, 4, requires_grad=True), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"dfp.matmul has no backward.*dfp.functional.linear\(x, y.t\(\)\)"):
        dfp.matmul(x, y)
    with pytest.raises(RuntimeError, match="y requires grad"):
        dfp.matmul(y.t(), x.t())
    with torch.no_grad():
        assert torch.equal(dfp.matmul(x, y), dfp.matmul(x.detach(), y))
    # the suggested layer computes the same product (per tensor, as matmul), with gradients
    out = dfp.functional.linear(x, y.t(), fmt="dfp16-tensor")
    assert torch.equal(out.detach(), dfp.matmul(x.detach(), y))
    out.sum().backward()
    assert x.grad is not None


def test_gemm_refuses_a_bias_that_requires_grad():
    a, b = _operands()
    with pytest.raises(RuntimeError, match="dfp.ops.gemm has no backward, and bias requires grad"):
        dfp.ops.gemm(a, b, bias=torch.zeros(3, requires_grad=True))


def test_vmap_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(dfp.quantize)(torch.randn(4, 3))
    with pytest.raises(NotImplementedError, match="torch.vmap"):
        torch.vmap(dfp.matmul, in_dims=(0, None))(torch.randn(2, 3, 4), torch.randn(4, 5))
