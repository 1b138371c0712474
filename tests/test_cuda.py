"""dfp.cuda: the loader and dispatch on any machine; on a GPU, every CUDA op bit-exact
(integer parts and float results) against the CPU reference, and conv / linear training
parity with the CPU path. The GPU tests skip, saying why, where there is no CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import PATCH_ROW_CASES, int16_operand, on_reference, wide_range

import dfp
import dfp.cuda
from dfp import DFPSpec, DFPTensor, backends, reference
from dfp import _conv_layout as layout
from dfp._errors import BackendUnavailableError, NonFiniteError
from dfp._patches import output_size
from dfp.cuda import gemm as cuda_gemm
from dfp.cuda import layout as cuda_layout
from dfp.cuda import loader
from dfp.cuda import patches as cuda_patches
from dfp.format import ROUNDINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})"
    try:
        loader.compilers()
    except BackendUnavailableError as err:
        return str(err)
    return None


needs_gpu = pytest.mark.skipif(_no_gpu_reason() is not None, reason=str(_no_gpu_reason()))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---- any machine ------------------------------------------------------------------------


def test_cuda_tensors_go_to_the_cuda_backend_and_import_initialises_nothing():
    done = _python(
        """
        import torch, dfp, dfp.cuda
        from dfp import backends
        print(backends.active(torch.device("cpu")).__name__, torch.cuda.is_initialized())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dfp.backends.cpu", "False"]
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="dfp.cuda needs an NVIDIA GPU"):
            backends.active(torch.device("cuda"))
    else:
        assert backends.active(torch.device("cuda")).__name__ == "dfp.cuda.ops"


def test_the_cuda_backend_has_every_fused_op_the_layers_use_on_it():
    """The layers find a backend's fused ops by name (getattr, None: the generic path): a
    name missing from dfp.cuda.ops silently takes the slow path, with host syncs."""
    import dfp.cuda.ops as cuda_ops

    names = ("quantize3d", "gemm", "quantize3d_marked", "quantize_input", "quantize_gradient", "window",
             "patch_row_exponents", "patches")  # fmt: skip
    for name in names:
        assert callable(getattr(cuda_ops, name, None)), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_without_cuda_ops_fail_clearly():
    assert not dfp.cuda.is_available()
    with pytest.raises(
        BackendUnavailableError, match="dfp.cuda needs an NVIDIA GPU, but torch .* (CPU-only build|sees no)"
    ):
        dfp.cuda.ensure_available()
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        loader.kernel("quantize.cu", "dfp_quantize", 0)


def test_no_compiler_is_a_clear_error(monkeypatch):
    for compiler in loader.COMPILERS:
        monkeypatch.setattr(type(compiler), "available", staticmethod(lambda: False))
    with pytest.raises(BackendUnavailableError, match=r"neither is here.*pip install cupy-cuda12x"):
        loader.compilers()


class _FakeCompiler:
    name = "fake"

    def __init__(self, fail: bool = False):
        self.compiled: list[loader.KernelKey] = []
        self.fail = fail

    def compile(self, key):
        if self.fail:
            raise RuntimeError("error: expected a ';'")
        self.compiled.append(key)
        return lambda grid, block, args: (key, grid, block, args)


def test_kernel_cache_compiles_each_key_once():
    fake = _FakeCompiler()
    cache = loader.KernelCache(lambda: [fake])
    key = loader.KernelKey(0, (8, 0), "gemm_mma.cu", "dfp_gemm_mma")
    first = cache.get(key)
    assert cache.get(loader.KernelKey(0, (8, 0), "gemm_mma.cu", "dfp_gemm_mma")) is first
    cache.get(loader.KernelKey(0, (9, 0), "gemm_mma.cu", "dfp_gemm_mma"))  # another capability
    cache.get(loader.KernelKey(1, (8, 0), "gemm_mma.cu", "dfp_gemm_mma"))  # another device
    cache.get(loader.KernelKey(0, (8, 0), "gemm_mma.cu", "dfp_gemm_mma", (("X", 1),)))  # other options
    assert len(fake.compiled) == len(cache) == 4
    assert first((1, 1, 1), (32, 1, 1), [3])[0] == key


def test_kernel_options_never_include_fast_math():
    key = loader.KernelKey(0, (8, 6), "quantize.cu", "dfp_quantize", (("A", 2), ("B", 3)))
    assert key.options() == ["-std=c++17", "-DA=2", "-DB=3"]


def test_a_failing_compiler_falls_back_to_the_next_and_says_why():
    fallback = _FakeCompiler()
    cache = loader.KernelCache(lambda: [_FakeCompiler(fail=True), fallback])
    with pytest.warns(RuntimeWarning, match=r"compiled dfp_quantize of quantize.cu with fake after: with fake: .*';'"):
        cache.get(loader.KernelKey(0, (8, 6), "quantize.cu", "dfp_quantize"))
    assert len(fallback.compiled) == 1


def test_compile_errors_name_the_kernel_arch_and_every_compiler():
    cache = loader.KernelCache(lambda: [_FakeCompiler(fail=True), _FakeCompiler(fail=True)])
    with pytest.raises(RuntimeError, match=r"dfp_quantize of quantize.cu for sm_86: with fake: .*; with fake: "):
        cache.get(loader.KernelKey(0, (8, 6), "quantize.cu", "dfp_quantize"))


def test_compile_kernel_gets_a_cuda_home_without_a_toolkit(monkeypatch):
    """torch.cuda._compile_kernel raises without $CUDA_HOME; the sources need no CUDA header."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with loader._cuda_home_for_nvrtc():
        assert cpp_extension.CUDA_HOME == str(loader.source_dir())
    assert cpp_extension.CUDA_HOME is None
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/cuda")
    with loader._cuda_home_for_nvrtc():
        assert cpp_extension.CUDA_HOME == "/opt/cuda"


def test_sizes_beyond_int32_are_refused():
    with pytest.raises(ValueError, match=r"k=2147483648 does not fit the kernels' 32-bit sizes"):
        loader.check_int32(k=2**31)


@pytest.mark.parametrize(
    ("capability", "ha", "hb", "want"),
    [
        ((9, 0), 2, 2, "mma"),
        ((7, 5), 3, 1, "mma"),  # chains of 64
        ((8, 0), 1, 1, "int16"),  # chains of 8: shorter than a k tile
        ((8, 0), 0, 5, "int16"),  # headroom 0: beyond the balanced split
        ((7, 0), 2, 2, "int16"),  # Volta: no int8 mma.sync
        ((6, 1), 2, 2, "int16"),  # Pascal
    ],
)
def test_default_gemm_path(monkeypatch, capability, ha, hb, want):
    monkeypatch.delenv("DFP_CUDA_GEMM", raising=False)
    assert cuda_gemm.choose_path(capability, ha, hb) == want


def test_forced_gemm_path_is_checked(monkeypatch):
    monkeypatch.setenv("DFP_CUDA_GEMM", "limbs")
    assert cuda_gemm.choose_path((6, 1), 0, 0) == "limbs"
    monkeypatch.setenv("DFP_CUDA_GEMM", "mma")
    with pytest.raises(ValueError, match=r"DFP_CUDA_GEMM=mma cannot run .* headrooms \(1, 1\).*chain length here 8"):
        cuda_gemm.choose_path((9, 0), 1, 1)
    monkeypatch.setenv("DFP_CUDA_GEMM", "tensor-magic")
    with pytest.raises(ValueError, match="choose one of mma, int16, limbs"):
        cuda_gemm.choose_path((9, 0), 2, 2)


def test_tensor_core_feed_pipelined_from_ampere_where_k_is_not_split_and_checked(monkeypatch):
    monkeypatch.delenv("DFP_CUDA_MMA_FEED", raising=False)
    assert [cuda_gemm.mma_feed(c, False) for c in ((7, 5), (8, 0), (9, 0))] == ["registers", "pipelined", "pipelined"]
    assert cuda_gemm.mma_feed((9, 0), True) == "registers"
    monkeypatch.setenv("DFP_CUDA_MMA_FEED", "pipelined")
    assert cuda_gemm.mma_feed((9, 0), True) == "pipelined"
    monkeypatch.setenv("DFP_CUDA_MMA_FEED", "tma")
    with pytest.raises(ValueError, match="choose one of pipelined, registers"):
        cuda_gemm.mma_feed((9, 0), False)


def test_k_tiles_never_straddle_a_chain():
    tiles = cuda_gemm.k_tiles(200, 48, 32)
    assert tiles[:4] == ((0, 32, 1, 0), (32, 16, 2, 0), (48, 32, 3, 1), (80, 16, 4, 1))  # chain ends count chains
    covered = [k for t0, length, _, _ in tiles for k in range(t0, t0 + length)]
    assert covered == list(range(200))
    long = cuda_gemm.k_tiles(300, 300, 128)
    assert [(t0, n, end) for t0, n, end, _ in long[:5]] == [
        (0, 32, 0),
        (32, 32, 0),
        (64, 32, 0),
        (96, 32, 1),
        (128, 32, 0),
    ]
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda_gemm.k_tiles(100, 100, 8)


@pytest.mark.parametrize(
    ("k", "kblock", "chain", "outputs", "sums_bytes", "parts"),
    [
        (131072, 64, 32, 16 * 144, 2**28, 1),
        (3000, 700, 128, 20 * 24, 2**28, 1),  # 4 tiles per chain, K-block tails
        (4096, 4096, 32, 16 * 40, 16 * 40 * 4 * 20, 7),  # 128 chains, at most 20 per part
    ],
)
def test_split_k_plan_covers_every_chain_once_in_order(k, kblock, chain, outputs, sums_bytes, parts):
    tiles = cuda_gemm.k_tiles(k, kblock, chain)
    starts = [0] + [i + 1 for i, tile in enumerate(tiles) if tile[2]]  # first tile of each chain, then the end
    plan = cuda_gemm.split_k_plan(k, kblock, chain, 1, 132, outputs, sums_bytes)
    assert plan is not None and len(plan) == parts
    covered, next_chain = [], 0
    for c0, count, splits in plan:
        assert c0 == next_chain and count * outputs * 4 <= sums_bytes
        assert splits[0] == starts[c0] and splits[-1] == starts[c0 + count] and len(splits) > 2
        assert set(splits) <= set(starts) and list(splits) == sorted(set(splits))  # whole chains, in order
        covered += range(splits[0], splits[-1])
        next_chain = c0 + count
    assert covered == list(range(len(tiles))) and next_chain == len(starts) - 1


def test_split_k_only_where_the_outputs_leave_the_gpu_idle():
    assert cuda_gemm.split_k_plan(8192, 8192, 32, 66, 132, 66 * 16384, 2**28) is not None
    assert cuda_gemm.split_k_plan(8192, 8192, 32, 67, 132, 67 * 16384, 2**28) is None  # fills half the GPU
    assert cuda_gemm.split_k_plan(64, 64, 32, 1, 132, 16, 2**28) is None  # 2 chains: too few to split


def test_gpu_check_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "gpu_check needs an NVIDIA GPU" in done.stderr and "nothing was run" in done.stderr


def test_gpu_check_reports_a_test_timeout(monkeypatch):
    """The GPU tests running past their limit give a report line and the output so far,
    not a traceback that loses the timings."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def timed_out(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=b"tests/test_cuda.py::test_a PASSED\n")

    monkeypatch.setattr(gpu_check.subprocess, "run", timed_out)
    passed, summary = gpu_check.run_tests()
    assert not passed
    assert summary.splitlines() == [
        f"tests timed out after {gpu_check.TESTS_TIMEOUT_S} s; their output so far:",
        "tests/test_cuda.py::test_a PASSED",
    ]


# ---- on a GPU ---------------------------------------------------------------------------

QUANTIZE_CASES = {
    "tensor": ((33, 70), DFPSpec()),
    "tensor, aligned": ((64, 32), DFPSpec(headroom=3)),
    "channel rows": ((9, 40), DFPSpec(axis=0)),
    "channel columns": ((40, 9), DFPSpec(axis=1, headroom=1)),
    "channel 4-D": ((2, 3, 5, 7), DFPSpec(axis=1)),
    "block 32": ((6, 100), DFPSpec(axis=1, block=32)),
    "block 7 inner": ((5, 23, 4), DFPSpec(axis=1, block=7, headroom=0)),
}


@needs_gpu
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_quantize_bit_exact(case, rounding):
    shape, spec = QUANTIZE_CASES[case]
    x = wide_range(shape, seed=1)
    x.view(-1)[:2] = torch.tensor([0.0, 2.0**-149])
    seed = -(2**63) + 977
    args = (spec.headroom, spec.axis, spec.block, ROUNDINGS.index(rounding), seed)
    got_m, got_e = torch.ops.dfp.quantize(x.cuda(), *args)
    want_m, want_e = on_reference(torch.ops.dfp.quantize, x, *args)
    assert got_m.is_cuda and torch.equal(got_m.cpu(), want_m)
    assert torch.equal(got_e.cpu(), want_e)


@needs_gpu
@pytest.mark.parametrize("axis, block", [(None, None), (1, 4), (0, 2)], ids=["tensor", "blocks, last axis", "blocks"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantize_refuses_non_finite(value, axis, block):
    x = torch.randn(5, 7, device="cuda")
    x[3, 2] = value
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        torch.ops.dfp.quantize(x, 2, axis, block, False, 0)


def _on_gpu(x: torch.Tensor, aligned: bool = True) -> torch.Tensor:
    """x on the GPU, contiguous; not aligned: 4 bytes into its storage, so that the kernels
    cannot read it in 16-byte float4 loads."""
    if aligned:
        return x.cuda()
    base = torch.empty(x.numel() + 1, device="cuda")
    view = base[1:].view(x.shape)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view.copy_(x)


LAST_AXIS_BLOCKS = {  # (rows, row length), block, aligned: blocks along the last axis
    "block 4": ((9, 64), 4, True),
    "block 32": ((7, 256), 32, True),
    "block 32, ragged tail": ((5, 100), 32, True),  # the last group of a row 4 long
    "block 64, ragged tail": ((6, 200), 64, True),
    "block 128": ((3, 512), 128, True),
    "block 256, ragged tail": ((4, 600), 256, True),  # 16 lanes, 4 quads each; a tail of 88
    "block 1024, ragged tail": ((3, 2600), 1024, True),  # quads beyond a lane's registers read again
    "block 12 (3 quads, 4 lanes, one idle)": ((5, 60), 12, True),
    "block 48 (12 quads, 4 lanes)": ((3, 200), 48, True),
    "block 384 (32 lanes, 3 quads each)": ((2, 1536), 384, True),
    "block 32, row length not a multiple of 4": ((5, 99), 32, True),  # the scalar kernel
    "block 32, unaligned": ((6, 128), 32, False),  # the scalar kernel
    "block 30": ((4, 120), 30, True),  # the scalar kernel
    "block 32, many sweeps of the grid": ((1100, 4096), 32, True),
}


@needs_gpu
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("case", LAST_AXIS_BLOCKS)
def test_quantize_blocks_along_the_last_axis_bit_exact(case, rounding):
    """dfp_quantize_blocks_vec4 (whole float4s: lanes per group, the maximum by shuffles, the
    values kept in registers) and the scalar kernel where it cannot run: the reference's
    bits, with a group of zeros, a ragged last group per row, and tiny and huge values."""
    shape, block, aligned = LAST_AXIS_BLOCKS[case]
    if shape[0] * shape[1] > 10**6 and rounding != "nearest":
        pytest.skip("the large case runs once, with nearest rounding")
    x = wide_range(shape, seed=5)
    x[0, :block] = 0.0  # a group of zeros
    x[-1, :3] = torch.tensor([2.0**-149, -(2.0**100), 2.0**-140])  # subnormal, huge (its group's scale)
    seed = -(2**63) + 4242
    args = (2, 1, block, ROUNDINGS.index(rounding), seed)
    got_m, got_e = torch.ops.dfp.quantize(_on_gpu(x, aligned), *args)
    want_m, want_e = on_reference(torch.ops.dfp.quantize, x, *args)
    assert torch.equal(got_e.cpu(), want_e)
    assert torch.equal(got_m.cpu(), want_m)


@needs_gpu
@pytest.mark.parametrize("block", [4, 32, 64, 128, 256])
@pytest.mark.parametrize("aligned", [True, False], ids=["float4", "scalar"])
def test_quantize_blocks_along_the_last_axis_flag_nonfinite_groups(block, aligned):
    """NaN in one group and Inf in another: the flag set, exponent 0 in those two groups, and
    every other group as the reference quantizes it (their mantissas are left unwritten:
    dfp.quantize raises, quantize3d_marked zeros them)."""
    from dfp.cuda import quantize as cuda_quantize

    x = wide_range((3, 2 * block + 8), seed=6)
    x[0, block + 1] = float("nan")
    x[2, 2] = float("inf")
    mantissa, exponent, nonfinite = cuda_quantize._quantize3d(_on_gpu(x, aligned).view(3, -1, 1), 2, block, 2, 0, 0)
    assert int(nonfinite.item()) == 1
    bad = torch.zeros(exponent.shape, dtype=torch.bool)
    bad[0, 1, 0] = bad[2, 0, 0] = True
    clean = x.clone().view(3, -1, 1)
    clean[0, block + 1] = clean[2, 2] = 0.0
    want_m, want_e = reference.quantize3d(clean, 2, block, 2, 0, 0)
    assert torch.equal(exponent.cpu()[bad], torch.zeros(2, dtype=torch.int32))
    assert torch.equal(exponent.cpu()[~bad], want_e[~bad])
    groups_ok = ~bad.repeat_interleave(block, dim=1)[:, : x.shape[1]]
    assert torch.equal(mantissa.cpu()[groups_ok], want_m[groups_ok])
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        torch.ops.dfp.quantize(_on_gpu(x, aligned), 2, 1, block, 0, 0)


PER_TENSOR_AND_CHANNEL = {  # shape, axis, aligned, the flat index of the largest |x|
    "tensor, the max in the 4-load loop": ((1024, 2048 + 4), None, True, 12345),
    "tensor, the max in the tail": ((1024, 2048 + 4), None, True, -1),
    "tensor, count % 4 != 0": ((1023, 2049), None, True, -1),
    "tensor, unaligned": ((512, 1028), None, False, -2),
    "channel, inner % 4 == 0": ((6, 7, 44), 1, True, -1),
    "channel rows, long rows": ((300, 4096), 0, True, 77),
    "channel, inner % 4 != 0": ((6, 7, 45), 1, True, -1),
    "channel, unaligned": ((6, 7, 44), 1, False, -1),
}


@needs_gpu
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("case", PER_TENSOR_AND_CHANNEL)
def test_quantize_per_tensor_and_channel_bit_exact(case, rounding):
    """The float4 paths of dfp_amax_tensor, dfp_amax_channel and dfp_quantize (and the scalar
    ones where the count, the inner size or the alignment rule them out): the largest |x|
    placed where a missed load would lose it."""
    shape, axis, aligned, at = PER_TENSOR_AND_CHANNEL[case]
    x = wide_range(shape, seed=7)
    x.view(-1)[at] = 2.0**30
    seed = -(2**62) + 99
    args = (2, axis, None, ROUNDINGS.index(rounding), seed)
    got_m, got_e = torch.ops.dfp.quantize(_on_gpu(x, aligned), *args)
    want_m, want_e = on_reference(torch.ops.dfp.quantize, x, *args)
    assert torch.equal(got_e.cpu(), want_e)
    assert torch.equal(got_m.cpu(), want_m)


@needs_gpu
@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_dequantize_bit_exact(case):
    shape, spec = QUANTIZE_CASES[case]
    q = on_reference(dfp.quantize, wide_range(shape, seed=2), spec)
    on_gpu = DFPTensor(q.mantissa.cuda(), q.exponent.cuda(), q.spec)
    assert torch.equal(dfp.cuda.dequantize(on_gpu).cpu(), q.dequantize())


def _gemm_operands(m, k, n, ha, hb, kblock, values="random", seed=0):
    if values == "extremes":
        g = torch.Generator().manual_seed(seed)
        a = ((torch.randint(0, 2, (m, k), generator=g) * 2 - 1) * (2 ** (15 - ha) - 1)).to(torch.int16)
        b = ((torch.randint(0, 2, (k, n), generator=g) * 2 - 1) * (2 ** (15 - hb) - 1)).to(torch.int16)
    else:
        a, b = int16_operand((m, k), ha, seed), int16_operand((k, n), hb, seed + 1)
    kb = -(-k // kblock)
    g = torch.Generator().manual_seed(seed + 2)
    ea = torch.randint(-40, 10, (m, kb), generator=g, dtype=torch.int32)
    eb = torch.randint(-40, 10, (kb, n), generator=g, dtype=torch.int32)
    return a, ea, ha, b, eb, hb, kblock, torch.randn(n, generator=g)


GEMM_CASES = {
    "odd shape": (3, 5, 7, 2, 2, 5, "random"),
    "one tile, bias": (130, 64, 129, 2, 2, 64, "random"),
    "K not a multiple of 8": (70, 100, 33, 2, 2, 100, "random"),
    "kblock 48": (40, 200, 50, 2, 2, 48, "random"),
    "kblock 7": (17, 60, 9, 2, 2, 7, "random"),
    "chains of 128": (64, 700, 72, 3, 3, 700, "random"),
    "chains of 8": (20, 50, 20, 1, 1, 50, "random"),
    "headroom 0": (20, 40, 24, 0, 0, 40, "random"),
    "extremes, headroom 2": (129, 256, 131, 2, 2, 256, "extremes"),
    "extremes, headroom 1 x 3": (64, 160, 64, 1, 3, 160, "extremes"),
    "M 1 (small-M fallback)": (1, 96, 40, 2, 2, 96, "random"),
}


@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm_cases_build_on_any_machine(case):
    """The GPU tests' operands, checked where they cannot run: shapes and headrooms as named."""
    m, k, n, ha, hb, kblock, values = GEMM_CASES[case]
    a, ea, _, b, eb, _, _, bias = _gemm_operands(*GEMM_CASES[case])
    assert a.shape == (m, k) and b.shape == (k, n) and bias.shape == (n,)
    assert ea.shape == (m, -(-k // kblock)) and eb.shape == (-(-k // kblock), n)
    assert a.abs().max() <= 2 ** (15 - ha) - 1 and b.abs().max() <= 2 ** (15 - hb) - 1
    if values == "extremes":
        assert set(a.abs().unique().tolist()) == {2 ** (15 - ha) - 1}


def _paths_for(ha: int, hb: int) -> list[str]:
    """Every GEMM path that can run these headrooms here, the tensor-core one with each
    operand feed ("mma/pipelined", "mma/registers"); ``_use`` selects one."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    paths = [p for p in cuda_gemm.PATHS if p != "mma" or cuda_gemm.mma_applies(capability, ha, hb)]
    return [f"mma/{feed}" for feed in cuda_gemm.FEEDS] * ("mma" in paths) + [p for p in paths if p != "mma"]


@pytest.fixture(params=cuda_patches.MODES)
def conv_mode(request, monkeypatch):
    """Each way the convolutions read their patches on CUDA (DFP_CUDA_CONV)."""
    monkeypatch.setenv("DFP_CUDA_CONV", request.param)
    return request.param


def _use(monkeypatch, path: str) -> None:
    monkeypatch.setenv("DFP_CUDA_GEMM", path.split("/")[0])
    if "/" in path:
        monkeypatch.setenv("DFP_CUDA_MMA_FEED", path.split("/")[1])


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["b row-major", "b transposed"])
@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm_bit_exact_on_every_path(monkeypatch, case, transposed):
    a, ea, ha, b, eb, hb, kblock, bias = _gemm_operands(*GEMM_CASES[case])
    want = on_reference(torch.ops.dfp.gemm, a, ea, ha, b, eb, hb, kblock, bias)
    b_gpu = b.t().contiguous().cuda().t() if transposed else b.cuda()
    for path in _paths_for(ha, hb):
        _use(monkeypatch, path)
        got = torch.ops.dfp.gemm(a.cuda(), ea.cuda(), ha, b_gpu, eb.cuda(), hb, kblock, bias.cuda())
        assert torch.equal(got.cpu(), want), path


def _single_tile(pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 A (16, 32) and B (32, 8), headroom 2: one m16n8k32 mma tile, one chain."""
    m, k, n = torch.arange(16)[:, None], torch.arange(32), torch.arange(8)
    if pattern == "ramp":  # small entries, all 128 sums distinct: a misplaced row, column or k shows
        a, b = 1 + m + 16 * k[None, :], 1 + 17 * n[None, :] + 8 * k[:, None]
    else:  # "bytes": both limbs of every entry vary, signs mixed, up to the headroom's max 8191
        a = (m * 32 + k[None, :]) * 331 % 16383 - 8191
        b = (k[:, None] * 8 + n[None, :]) * 197 % 16383 - 8191
    return a.to(torch.int16), b.to(torch.int16)


def _wrong_positions(got: torch.Tensor, want: torch.Tensor) -> str:
    """Every (m, n) where got differs, with the (m', n') whose wanted value it holds, if any
    (a fragment-layout bug writes a neighbour's sum): "(m,n)<-(m',n')"."""
    found = []
    for m, n in (got != want).nonzero().tolist():
        source = (want == got[m, n]).nonzero().tolist()
        found.append(f"({m},{n})" + (f"<-({source[0][0]},{source[0][1]})" if source else ""))
    return " ".join(found)


@needs_gpu
@pytest.mark.parametrize("pattern", ["ramp", "bytes"])
def test_gemm_single_tile_names_wrong_positions(monkeypatch, pattern):
    """M=16, N=8, K=32: one mma tile. A failure lists the wrong (m, n) on its first line, so
    one GPU run locates a fragment-layout bug."""
    a, b = _single_tile(pattern)
    ea, eb = torch.zeros(16, 1, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32)
    want = on_reference(torch.ops.dfp.gemm, a, ea, 2, b, eb, 2, 32, None)
    for path in _paths_for(2, 2):
        _use(monkeypatch, path)
        got = torch.ops.dfp.gemm(a.cuda(), ea.cuda(), 2, b.cuda(), eb.cuda(), 2, 32, None).cpu()
        wrong = _wrong_positions(got, want)
        count = (got != want).sum().item()
        assert not wrong, f"{path} path: {count} of 128 wrong at (m,n) {wrong}\ngot\n{got}\nwant\n{want}"


SPLIT_K_CASES = {  # (M, K, N, ha, hb, kblock, values), bytes of chain sums per part (None: the default)
    "weight gradient 16 x 144, K-blocks of 64": ((16, 8192, 144, 2, 2, 64, "random"), None),
    "chains of 128 and K-block tails": ((20, 3000, 24, 3, 3, 700, "random"), None),
    "extremes, one K-block": ((64, 4096, 72, 2, 2, 4096, "extremes"), None),
    "in parts (fp32 sums carried over)": ((16, 4096, 40, 2, 2, 256, "random"), 16 * 40 * 4 * 20),
}


@needs_gpu
@pytest.mark.parametrize("case", SPLIT_K_CASES)
def test_split_k_gemm_bit_exact(monkeypatch, case):
    """A GEMM with too few outputs to fill the GPU splits K (chain sums stored, then added in
    order of k): the reference's bits, in one part or several."""
    shape, sums_bytes = SPLIT_K_CASES[case]
    if sums_bytes is not None:
        monkeypatch.setattr(cuda_gemm, "CHAIN_SUMS_BYTES", sums_bytes)
    a, ea, ha, b, eb, hb, kblock, bias = _gemm_operands(*shape)
    (m, k), n = a.shape, b.shape[1]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = cuda_gemm.split_k_plan(k, kblock, reference.chain_length(ha, hb), -(-m // 128) * -(-n // 128), sms, m * n,
                                  cuda_gemm.CHAIN_SUMS_BYTES)  # fmt: skip
    assert plan is not None and (len(plan) > 1) == (sums_bytes is not None)
    want = on_reference(torch.ops.dfp.gemm, a, ea, ha, b, eb, hb, kblock, bias)
    for feed in cuda_gemm.FEEDS:
        _use(monkeypatch, f"mma/{feed}")
        got = torch.ops.dfp.gemm(a.cuda(), ea.cuda(), ha, b.cuda(), eb.cuda(), hb, kblock, bias.cuda())
        assert torch.equal(got.cpu(), want), feed


@needs_gpu
def test_gemm_takes_expanded_exponents(monkeypatch):
    """A stride-0 exponent (one per image, expanded as dfp._ops does for convolutions) gives
    the bits of the same exponents made contiguous, on every path."""
    a, _, ha, b, eb, hb, kblock, bias = _gemm_operands(70, 96, 24, 2, 2, 32)
    ea = torch.tensor(-13, dtype=torch.int32, device="cuda").reshape(1, 1).expand(70, eb.shape[0])
    assert ea.stride() == (0, 0)  # made on the device: .cuda() would copy it contiguous
    want = on_reference(torch.ops.dfp.gemm, a, ea.cpu(), ha, b, eb, hb, kblock, bias)
    for path in _paths_for(ha, hb):
        _use(monkeypatch, path)
        got = torch.ops.dfp.gemm(a.cuda(), ea, ha, b.cuda(), eb.cuda(), hb, kblock, bias.cuda())
        assert torch.equal(got.cpu(), want), path


@needs_gpu
def test_gemm_opcheck():
    a, ea, ha, b, eb, hb, kblock, bias = _gemm_operands(40, 96, 24, 2, 2, 32)
    args = (a.cuda(), ea.cuda(), ha, b.cuda(), eb.cuda(), hb, kblock, bias.cuda())
    torch.library.opcheck(torch.ops.dfp.gemm.default, args)


@needs_gpu
@pytest.mark.parametrize(
    "spec", [DFPSpec(), DFPSpec(axis=0), DFPSpec(axis=1, block=32, rounding="stochastic")], ids=str
)
def test_matmul_bit_exact(spec):
    x, y = wide_range((50, 130), seed=3), wide_range((130, 20), seed=4)
    args = (spec.headroom, spec.axis, spec.block, ROUNDINGS.index(spec.rounding), 11, -12)
    got = torch.ops.dfp.matmul(x.cuda(), y.cuda(), *args)
    assert torch.equal(got.cpu(), on_reference(torch.ops.dfp.matmul, x, y, *args))


# (N, Hp, Wp, C, groups, kernel, stride, dilation, Nout per group, K-block or None: K)
CONV_CASES = {
    "3x3": (2, 8, 7, 16, 1, (3, 3), (1, 1), (1, 1), 12, None),
    "groups, stride, dilation": (2, 9, 11, 6, 2, (2, 3), (2, 1), (2, 2), 7, None),
    "K-blocks of 16": (2, 7, 7, 8, 1, (3, 3), (1, 1), (1, 1), 9, 16),
    "K-blocks of 5, depthwise": (2, 8, 8, 9, 3, (3, 1), (1, 1), (1, 1), 4, 5),
}


def _conv_operands(name: str, seed: int = 0):
    """CPU arguments of dfp::conv_gemm and dfp::conv_grad_weight_gemm for CONV_CASES[name]
    (as tests/test_conv_gemm.py builds them: w strided, as the layers pass it)."""
    n, hp, wp, c, groups, kernel, stride, dilation, nout, kblock = CONV_CASES[name]
    k = kernel[0] * kernel[1] * c // groups
    kblock = kblock or k
    x = int16_operand((n, hp, wp, c), 2, seed)
    w = int16_operand((groups, nout, k), 2, seed + 1).transpose(1, 2)
    g = torch.Generator().manual_seed(seed + 2)
    ew = torch.randint(-30, -5, (groups, -(-k // kblock), nout), generator=g, dtype=torch.int32)
    ex, ey = torch.tensor(-13, dtype=torch.int32), torch.tensor(-9, dtype=torch.int32)
    bias = torch.randn(groups * nout, generator=g)
    oh, ow = (output_size(size, kernel[a], stride[a], 0, dilation[a]) for a, size in enumerate((hp, wp)))
    dy = int16_operand((n, oh, ow, groups * nout), 2, seed + 3)
    forward = (x, ex, 2, w, ew, 2, kblock, list(kernel), list(stride), list(dilation), bias)
    weight = (dy, ey, 2, x, ex, 2, list(kernel), list(stride), list(dilation), groups)
    return forward, weight


def _to_cuda(args: tuple) -> tuple:
    return tuple(arg.cuda() if isinstance(arg, torch.Tensor) else arg for arg in args)


@needs_gpu
@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_gemms_bit_exact_against_cpu(monkeypatch, name, conv_mode):
    forward, weight = _conv_operands(name)
    for op, args in ((torch.ops.dfp.conv_gemm, forward), (torch.ops.dfp.conv_grad_weight_gemm, weight)):
        want = on_reference(op, *args)
        for path in _paths_for(2, 2):
            _use(monkeypatch, path)
            got = op(*_to_cuda(args))
            assert got.is_cuda and torch.equal(got.cpu(), want), f"{op} on the {path} path, {conv_mode}"


@needs_gpu
@pytest.mark.parametrize("name", ["groups, stride, dilation", "K-blocks of 5, depthwise"])
def test_conv_gemms_opcheck_on_cuda(name, conv_mode):
    forward, weight = _conv_operands(name)
    torch.library.opcheck(torch.ops.dfp.conv_gemm.default, _to_cuda(forward))
    torch.library.opcheck(torch.ops.dfp.conv_grad_weight_gemm.default, _to_cuda(weight))


def _train(device: str, steps: int = 3):
    """A few steps of a small dfp16-sr conv net on ``device``; its losses and final weights.

    Everything outside dfp's integer GEMMs is made device-independent, so the two runs
    can agree bit for bit: no biases (their gradients are torch reductions, summed in
    another order on a GPU), the loss and its gradient on the CPU, plain SGD with a
    power-of-two learning rate (the product is exact, so a fused multiply-add rounds as a
    multiply and an add do), and the gradients' stochastic-rounding seeds from torch's CPU
    generator, reseeded every step.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 5, bias=False),
    )
    model = dfp.convert(model, "dfp16-sr").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0**-4)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 10, 10, generator=g)
        target = torch.randint(0, 5, (4,), generator=g)
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(model(x.to(device)).cpu(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu() for p in model.parameters()]


@needs_gpu
def test_conv_layer_bit_exact_against_cpu(conv_mode):
    torch.manual_seed(0)
    conv = dfp.nn.Conv2d(4, 6, 3, padding=1, fmt="dfp16")
    conv_gpu = dfp.nn.Conv2d(4, 6, 3, padding=1, fmt="dfp16").cuda()
    conv_gpu.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    x_gpu = x.detach().cuda().requires_grad_()
    y, y_gpu = conv(x), conv_gpu(x_gpu)
    assert torch.equal(y_gpu.detach().cpu(), y.detach())  # the bias is added in the GEMM epilogue
    grad = torch.randn_like(y)
    y.backward(grad)
    y_gpu.backward(grad.cuda())
    assert torch.equal(x_gpu.grad.cpu(), x.grad)
    assert torch.equal(conv_gpu.weight.grad.cpu(), conv.weight.grad)
    # the bias gradient is torch's own reduction on each device
    assert torch.equal(conv_gpu.bias.grad, grad.cuda().sum(dim=(0, 2, 3)))


@needs_gpu
@pytest.mark.parametrize("fmt", ["dfp16", "dfp16-sr"])
@pytest.mark.parametrize("stride", [1, 2])
def test_wide_conv_layer_bit_exact_against_cpu(fmt, stride, conv_mode):
    """16 -> 32 channels: the default format's exponents per image row and channel block
    (dfp.cuda.layout's quantize_input, quantize_gradient and window on the GPU)."""
    torch.manual_seed(0)
    conv = dfp.nn.Conv2d(16, 32, 3, stride=stride, padding=1, bias=False, fmt=fmt)
    conv_gpu = dfp.nn.Conv2d(16, 32, 3, stride=stride, padding=1, bias=False, fmt=fmt).cuda()
    conv_gpu.load_state_dict(conv.state_dict())
    x = (torch.randn(3, 16, 10, 9) * torch.exp2(torch.randint(-8, 8, (3, 1, 10, 1)).float())).to(
        memory_format=torch.channels_last)  # fmt: skip
    _assert_same_training_bits(conv, conv_gpu, x)


def _assert_same_training_bits(layer, layer_gpu, x):
    """The layer's output and both gradients on the GPU: the CPU's bits (stochastic
    rounding's seeds drawn alike)."""
    x = x.requires_grad_()
    x_gpu = x.detach().cuda().requires_grad_()
    y, y_gpu = layer(x), layer_gpu(x_gpu)
    assert torch.equal(y_gpu.detach().cpu(), y.detach())
    grad = torch.randn_like(y)
    torch.manual_seed(3)
    y.backward(grad)
    torch.manual_seed(3)
    y_gpu.backward(grad.cuda())
    assert torch.equal(x_gpu.grad.cpu(), x.grad)
    assert torch.equal(layer_gpu.weight.grad.cpu(), layer.weight.grad)


@needs_gpu
@pytest.mark.parametrize("where", ["x", "weight", "output gradient"])
def test_wide_layer_marks_nonfinite_without_a_host_sync(where, conv_mode):
    """NaN/Inf in a layer's operand gives NaN where fp32 would (as on the CPU), and the
    training ops never wait for the GPU to find out: no host sync in forward or backward."""
    torch.manual_seed(0)
    conv = dfp.nn.Conv2d(16, 32, 3, padding=1, bias=False, fmt="dfp16").cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 32, 8, 8, device="cuda")
    conv(x.clone().requires_grad_()).backward(grad)  # kernels compiled, tables made
    conv.weight.grad = None
    if where == "x":
        x[0, 3, 1, 1] = float("nan")
    elif where == "weight":
        with torch.no_grad():
            conv.weight[0, 0, 1, 1] = float("inf")
    else:
        grad[1, 5, 2, 2] = float("inf")
    x.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = conv(x)
        y.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.isnan().all() == (where != "output gradient") and y.isfinite().all() == (where == "output gradient")
    assert x.grad.isnan().all() == (where != "x") and x.grad.isfinite().all() == (where == "x")
    assert conv.weight.grad.isnan().all() == (where != "weight")
    assert conv.weight.grad.isfinite().all() == (where == "weight")


LAYOUT_INPUTS = {  # (N, C, H, W), padding, channels, row_block, group_samples, for_weight
    "16 channels, a sample per group": ((4, 16, 8, 8), (1, 1), 16, 16, 1, True),
    "32 channels in blocks of 16, groups of 3 samples (one short)": ((5, 32, 6, 7), (1, 2), 32, 16, 3, True),
    "no weight copy, no padding": ((2, 64, 4, 5), (0, 0), 64, 32, 1, False),
    "a padding channel": ((3, 15, 5, 4), (1, 1), 16, 16, 2, True),
}


def _layout_outputs(fn, *args):
    """Each tensor of fn(*args) on the CPU (None where fn gives none)."""
    return tuple(None if t is None else t.cpu() for t in fn(*args))


@needs_gpu
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "NaN"])
@pytest.mark.parametrize("case", LAYOUT_INPUTS)
def test_quantize_input_bit_exact(case, nonfinite):
    shape, padding, channels, row_block, group_samples, for_weight = LAYOUT_INPUTS[case]
    t = wide_range((shape[0], shape[2], shape[3], shape[1])).permute(0, 3, 1, 2)  # channels-last
    if nonfinite:
        t[1, 2, 3, 1] = float("nan")
    args = (padding, channels, row_block, group_samples, for_weight)
    want = on_reference(_layout_outputs, layout.quantize_input, t, 2, *args)
    got = _layout_outputs(layout.quantize_input, t.cuda(), 2, *args)
    assert len(got) == len(want) and all(
        (g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want, strict=True)
    )


LAYOUT_GRADIENTS = {  # (N, C, H, W), block, grad_input groups, channel_block, roundings
    "row groups, dithered blocks": ((4, 16, 8, 8), 64, "row", 16, (2, 0)),
    "sample groups, stochastic": ((3, 32, 5, 6), 64, "sample", 0, (1, 1)),
    "per tensor, blocks straddle samples": ((2, 64, 4, 5), 32, "tensor", 0, (2, 2)),
    "row groups of 32 channels, no blocks": ((3, 64, 4, 5), 0, "row", 32, (0, 1)),
    "blocks only": ((2, 16, 3, 3), 64, None, 0, (2, 0)),
}


@needs_gpu
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "Inf"])
@pytest.mark.parametrize("case", LAYOUT_GRADIENTS)
def test_quantize_gradient_bit_exact(case, nonfinite):
    shape, block, groups, channel_block, rounding = LAYOUT_GRADIENTS[case]
    t = wide_range((shape[0], shape[2], shape[3], shape[1])).permute(0, 3, 1, 2)
    if nonfinite:
        t[0, 1, 2, 2] = float("inf")
    args = (2, block, groups, rounding, 1234567890123, channel_block)
    want = on_reference(_layout_outputs, layout.quantize_gradient, t, *args)
    got = _layout_outputs(layout.quantize_gradient, t.cuda(), *args)
    assert all((g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want, strict=True))


@needs_gpu
@pytest.mark.parametrize(
    ("ex_shape", "groups", "kernel", "stride", "dilation", "taps_per_block", "ow"), PATCH_ROW_CASES
)
def test_patch_row_exponents_match_the_generic_path(ex_shape, groups, kernel, stride, dilation, taps_per_block, ow):
    from dfp import _ops

    ex = torch.randint(-50, 0, ex_shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    oh = output_size(ex_shape[1], kernel[0], stride[0], 0, dilation[0])
    rows = ex_shape[0] * oh * ow
    for g in range(groups):
        want = _ops._patch_row_exponents(ex, g, groups, kernel, stride, dilation, rows, taps_per_block)
        got = cuda_layout.patch_row_exponents(ex.cuda(), g, groups, kernel, stride, dilation, rows, taps_per_block)
        assert torch.equal(got.cpu(), want)


@needs_gpu
def test_window_bit_exact():
    x = int16_operand((2, 5, 6, 3), 2)
    for rows, columns, channels in [((-1, 6), (-2, 7), 4), ((1, 4), (0, 6), 3), ((-2, 8), (-1, 7), 3)]:
        want = on_reference(layout.window, x, rows, columns, channels)
        assert torch.equal(layout.window(x.cuda(), rows, columns, channels).cpu(), want)


@needs_gpu
def test_linear_layer_bit_exact_against_cpu():
    torch.manual_seed(0)
    linear = dfp.nn.Linear(40, 24, bias=False, fmt="dfp16-sr")
    linear_gpu = dfp.nn.Linear(40, 24, bias=False, fmt="dfp16-sr").cuda()
    linear_gpu.load_state_dict(linear.state_dict())
    _assert_same_training_bits(linear, linear_gpu, torch.randn(3, 7, 40))


@needs_gpu
def test_training_parity_with_cpu(conv_mode):
    cpu_losses, cpu_weights = _train("cpu")
    gpu_losses, gpu_weights = _train("cuda")
    assert gpu_losses == cpu_losses
    assert all(torch.equal(g, c) for g, c in zip(gpu_weights, cpu_weights))


@needs_gpu
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_fp16_layers_run_in_half_with_fp32_master_weights(layer):
    """fmt="fp16" on CUDA: cuDNN / cuBLAS in float16 (tensor cores), the weights and their
    gradients float32, the result in the input's dtype."""
    torch.manual_seed(0)
    if layer == "conv":
        module = dfp.nn.Conv2d(16, 32, 3, padding=1, fmt="fp16").cuda()
        x = torch.randn(4, 16, 12, 12, device="cuda").contiguous(memory_format=torch.channels_last)
        float_op = torch.nn.functional.conv2d
        args = {"padding": 1}
    else:
        module = dfp.nn.Linear(64, 48, fmt="fp16").cuda()
        x = torch.randn(5, 64, device="cuda")
        float_op, args = torch.nn.functional.linear, {}
    y = module(x)
    want = float_op(x.half(), module.weight.half(), module.bias.half(), **args).float()
    assert y.dtype == torch.float32 and torch.equal(y, want)
    y.sum().backward()
    assert module.weight.dtype == module.weight.grad.dtype == torch.float32
    assert torch.isfinite(module.weight.grad).all() and module.weight.grad.abs().sum() > 0
