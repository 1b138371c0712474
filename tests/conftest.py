"""Shared fixtures: every test that takes ``backend`` runs once per backend and, for the
compiled one, once per CPU path this host supports (as Highway runs each target)."""

from __future__ import annotations

import pytest
import torch

from dfp import _errors, backends


def _backend_params():
    params = []
    try:
        from dfp.backends import cpu

        cpu.ensure_available()
        params += [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in cpu.supported_isas()]
    except _errors.BackendUnavailableError as err:
        params.append(pytest.param(("cpu", None), id="cpu", marks=pytest.mark.skip(reason=str(err))))
    try:
        backends.get("numba")
        params.append(pytest.param(("numba", None), id="numba"))
    except _errors.BackendUnavailableError as err:
        params.append(pytest.param(("numba", None), id="numba", marks=pytest.mark.skip(reason=str(err))))
    return params


def use_backend(request, monkeypatch):
    """Selects the backend (and CPU path) ``request.param`` = (name, isa or None) for the
    ops, as DFP_BACKEND / DFP_CPU_ISA would; a fixture's body (yields its id)."""
    name, isa = request.param
    monkeypatch.setenv("DFP_BACKEND", name)
    if isa is None:
        yield name
        return
    from dfp.backends import cpu

    before = cpu.cpu_isa()
    cpu.set_cpu_isa(isa)
    try:
        yield f"{name}-{isa}"
    finally:
        cpu.set_cpu_isa(before)


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch):
    """Selects a backend (and CPU path) for the ops, as DFP_BACKEND / DFP_CPU_ISA would."""
    yield from use_backend(request, monkeypatch)


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("DFP_BACKEND", "reference")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
