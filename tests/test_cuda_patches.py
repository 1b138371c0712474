"""The implicit-GEMM convolutions of dfp.cuda without a GPU: the offset tables that the
CUDA kernels read a convolution's patches through (dfp.cuda.patches) give exactly the
im2col matrix, and the layout facts their loads rely on hold for the tables. (The
launches, with the kernels stood in for on the CPU: tests/test_cuda_host.py; the kernels'
gathered variants compile in tests/test_cuda_compile.py; on a GPU tests/test_cuda.py runs
them.)"""

from __future__ import annotations

import pytest
import torch
from helpers import int16_operand

from dfp._patches import im2col
from dfp.cuda import patches as cuda_patches
from dfp.cuda.patches import Gathered

# (N, Hp, Wp, C, groups, kernel, stride, dilation)
IMAGES = {
    "3x3": (2, 10, 9, 16, 1, (3, 3), (1, 1), (1, 1)),
    "1x1": (2, 4, 5, 8, 1, (1, 1), (1, 1), (1, 1)),
    "5x5-strided": (1, 13, 12, 8, 1, (5, 5), (2, 2), (1, 1)),
    "groups-dilated": (3, 8, 11, 6, 2, (2, 3), (1, 2), (2, 1)),
    "depthwise-strided": (2, 8, 10, 6, 6, (3, 3), (2, 1), (1, 1)),
    "stem": (2, 9, 9, 3, 1, (3, 3), (1, 1), (1, 1)),
    "batch-0": (0, 5, 5, 4, 1, (3, 3), (1, 1), (1, 1)),
}


@pytest.fixture
def implicit(monkeypatch):
    monkeypatch.setenv("DFP_CUDA_CONV", "implicit")


def _image(case, seed=0):
    n, hp, wp, c, groups, kernel, stride, dilation = case
    return int16_operand((n, hp, wp, c), 2, seed), kernel, stride, dilation, groups


def _assert_layout_facts(t: Gathered) -> None:
    """What the kernels' loads are told about a table holds for it."""
    rows, columns = t.rows.long(), t.columns.long()
    if t.unit_rows and rows.numel() > 1:
        assert torch.equal(rows.diff(), torch.ones_like(rows[1:]))
    if t.runs_of_8:
        assert columns.numel() % 8 == 0 and t.data.data_ptr() % 16 == 0
        assert bool((rows % 8 == 0).all()) and bool((columns[::8] % 8 == 0).all())
        runs = columns.view(-1, 8)
        assert torch.equal(runs - runs[:, :1], torch.arange(8).expand_as(runs))


@pytest.mark.parametrize("name", IMAGES)
def test_gathered_patches_are_the_im2col_matrix(implicit, name):
    x, kernel, stride, dilation, groups = _image(IMAGES[name])
    got = cuda_patches.patches(x, kernel, stride, dilation, groups)
    want = im2col(x, kernel, stride, dilation, groups)
    assert len(got) == groups
    for g, operand in enumerate(got):
        assert isinstance(operand, Gathered) and operand.shape == tuple(want[g].shape)
        assert torch.equal(operand.materialize(), want[g])
        assert torch.equal(operand.t().materialize(), want[g].t())
        _assert_layout_facts(operand)
        cg = x.shape[3] // groups
        if operand.unit_columns:  # neighbours along a tap's channels
            columns = operand.columns.long().view(-1, cg)
            assert torch.equal(columns - columns[:, :1], torch.arange(cg).expand_as(columns))


def test_patches_read_aligned_runs_of_8_where_the_channels_allow():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFP_CUDA_CONV", "implicit")
        wide = cuda_patches.patches(int16_operand((1, 6, 6, 16), 2), (3, 3), (1, 1), (1, 1), 2)
        narrow = cuda_patches.patches(int16_operand((1, 6, 6, 12), 2), (3, 3), (1, 1), (1, 1), 1)
    assert all(t.runs_of_8 for t in wide) and not narrow[0].runs_of_8


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(48, dtype=torch.int16).view(6, 8),
        lambda: torch.arange(48, dtype=torch.int16).view(8, 6).t(),
        lambda: torch.arange(200, dtype=torch.int16).view(10, 20)[2:7, 3:19],
        lambda: torch.arange(16, dtype=torch.int16).view(4, 4)[:, :1].expand(4, 5),
        lambda: torch.zeros((0, 3), dtype=torch.int16),
    ],
    ids=["rows", "transposed", "sliced", "broadcast", "empty"],
)
def test_a_strided_operand_as_tables(make):
    t = make()
    got = Gathered.of(t)
    assert got.shape == tuple(t.shape) and torch.equal(got.materialize(), t)
    assert got.unit_columns == (t.stride(1) == 1) and got.unit_rows == (t.stride(0) == 1)
    _assert_layout_facts(got)


def test_an_unknown_patch_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DFP_CUDA_CONV", "unfold")
    with pytest.raises(ValueError, match="DFP_CUDA_CONV='unfold' .* choose one of implicit, im2col"):
        cuda_patches.patches(int16_operand((1, 4, 4, 2), 2), (3, 3), (1, 1), (1, 1), 1)


def test_im2col_mode_is_the_materialised_matrix(monkeypatch):
    monkeypatch.setenv("DFP_CUDA_CONV", "im2col")
    x = int16_operand((2, 6, 6, 4), 2)
    assert torch.equal(cuda_patches.patches(x, (3, 3), (1, 1), (1, 1), 2), im2col(x, (3, 3), (1, 1), (1, 1), 2))
