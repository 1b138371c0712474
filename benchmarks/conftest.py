"""pytest-benchmark plumbing: `pytest benchmarks/ --benchmark-only`.

The suites are named bench_*.py so that no test run collects them by accident; this
hook collects them when benchmarks/ is what pytest was asked to run."""

from __future__ import annotations

import pytest
import torch


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(params=(1, 2), ids=lambda t: f"t{t}")
def threads(request):
    """Run the benchmark with torch (and so dfp) using this many threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def run(benchmark):
    """``run(fn, seconds)``: time fn; ``seconds`` is a rough per-call estimate. Calls of
    more than about 50 ms get a few fixed rounds instead of pytest-benchmark's
    calibration, which would spend seconds on each."""

    def _run(fn, seconds: float):
        if seconds > 0.05:
            return benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
        return benchmark(fn)

    return _run
