"""Run-time dispatch and failing late: DFP_CPU_ISA, DFP_BACKEND, a missing compiled core,
and an import that never initialises CUDA. Each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dfp


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cpu_isa_reports_a_supported_path():
    from dfp.backends import cpu

    assert dfp.cpu_isa() in cpu.supported_isas()
    assert cpu.supported_isas()[-1] == "scalar"


def test_env_forces_a_path():
    done = _run("import dfp; print(dfp.cpu_isa())", DFP_CPU_ISA="scalar")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "scalar"


def test_unknown_isa_is_a_clear_error_listing_the_paths():
    done = _run("import dfp, torch; dfp.matmul(torch.ones(2, 2), torch.ones(2, 2))", DFP_CPU_ISA="avx9000")
    assert done.returncode != 0
    assert "DFP_CPU_ISA='avx9000' is not a path this CPU supports" in done.stderr
    assert "scalar" in done.stderr
    _assert_short(done.stderr)


def _assert_short(stderr: str) -> None:
    """An error of a bad environment switch comes from where dfp checks it, before torch's
    dispatcher: a short traceback, its last line the message, no chained C++ exception."""
    assert len(stderr.splitlines()) <= 20, stderr
    assert "During handling" not in stderr and "The above exception" not in stderr, stderr


def test_unknown_backend_is_a_clear_error():
    done = _run("import dfp, torch; dfp.quantize(torch.ones(3))", DFP_BACKEND="gpu-magic")
    assert done.returncode != 0
    assert "unknown dfp backend 'gpu-magic'" in done.stderr
    gemm = "dfp.ops.gemm(dfp.quantize(torch.ones(2, 2)), dfp.quantize(torch.ones(2, 2)))"
    for call in ("dfp.matmul(torch.ones(2, 2), torch.ones(2, 2))", gemm):
        for switch in ({"DFP_BACKEND": "gpu-magic"}, {"DFP_CPU_ISA": "avx9000"}):
            done = _run(f"import dfp, torch; {call}", **switch)
            assert done.returncode != 0 and next(iter(switch.values())) in done.stderr.splitlines()[-1]
            _assert_short(done.stderr)


def test_import_without_the_compiled_core_fails_late_and_clearly():
    code = """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "dfp._C":
                    raise ImportError("simulated: no compiled core")
        sys.meta_path.insert(0, Block())
        import dfp, torch
        try:
            dfp.matmul(torch.ones(2, 2), torch.ones(2, 2))
        except dfp.BackendUnavailableError as err:
            print("ERROR:", err)
    """
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "ERROR: dfp's compiled core (dfp._C) could not be loaded" in done.stdout
    assert "pip install -e ." in done.stdout and "DFP_BACKEND=numba" in done.stdout


def test_import_does_not_initialise_cuda():
    done = _run("import torch, dfp; print(torch.cuda.is_initialized())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["cpu", "numba", "reference"])
def test_backends_by_name(name, monkeypatch):
    monkeypatch.setenv("DFP_BACKEND", name)
    import torch

    x, y = torch.randn(5, 6), torch.randn(6, 7)
    assert dfp.matmul(x, y).shape == (5, 7)


# Two threads through every parallel loop (quantize, packing, the GEMMs, the conv
# gathers); prints the thread runtime, then a digest of every output's bits.
_TWO_THREAD_STEP = """
    import hashlib, torch, dfp
    from dfp.backends import cpu
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 12, 12, generator=gen).requires_grad_()
    w = torch.randn(16, 16, 3, 3, generator=gen).requires_grad_()
    a, b = torch.randn(300, 200, generator=gen), torch.randn(200, 70, generator=gen)
    y = dfp.functional.conv2d(x, w, padding=1, fmt="dfp16")
    y.square().sum().backward()
    digest = hashlib.sha256()
    for t in (y, x.grad, w.grad, dfp.matmul(a, b)):
        digest.update(t.detach().numpy().tobytes())
    print(cpu.thread_runtime())
    print(digest.hexdigest())
"""


def test_kernels_run_on_torchs_openmp_threads_with_the_same_bits_as_their_own():
    shared = _run(_TWO_THREAD_STEP)
    own = _run(_TWO_THREAD_STEP, DFP_THREAD_POOL="own")
    assert shared.returncode == 0, shared.stderr
    assert own.returncode == 0, own.stderr
    runtime, digest = shared.stdout.splitlines()[-2:]
    assert own.stdout.splitlines()[-2:] == ["dfp's own threads", digest]
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert Path(runtime).name.startswith(("libgomp", "libiomp5", "libomp")), runtime


def test_unknown_thread_pool_is_a_clear_error():
    done = _run("import dfp, torch; dfp.matmul(torch.ones(64, 64), torch.ones(64, 64))", DFP_THREAD_POOL="mine")
    assert done.returncode != 0
    assert "DFP_THREAD_POOL='mine' is not a choice" in done.stderr


def test_kernels_pick_torchs_openmp_runtime_when_another_was_loaded_first():
    pytest.importorskip("sklearn")
    done = _run("""
        import os
        import sklearn.utils._openmp_helpers  # scikit-learn's wheels load a libgomp of their own
        import torch, dfp
        from dfp.backends import cpu
        maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
        print(cpu.thread_runtime())
        print(len({line.split()[-1] for line in maps.splitlines() if "libgomp" in line}))
    """)
    assert done.returncode == 0, done.stderr
    runtime, count = done.stdout.splitlines()[-2:]
    if int(count) < 2:
        pytest.skip("scikit-learn did not load a second OpenMP runtime here")
    assert "scikit_learn" not in runtime and "sklearn" not in runtime, runtime
