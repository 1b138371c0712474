"""Buffers the compiled layers reuse between calls (dfp/backends/_buffers.py): one is
handed out again only when nothing holds its storage, never across threads, and what a
user does to a handed-out tensor never reaches the kept one."""

from __future__ import annotations

import threading

import pytest
import torch

import dfp
from dfp import functional as DF
from dfp.backends import _buffers

pytestmark = pytest.mark.skipif(_buffers._ALONE is None, reason="this torch has no storage use count: no reuse")

SHAPE = (64, 3)


@pytest.fixture(autouse=True)
def _empty_pool():
    dfp.empty_cache()
    yield
    dfp.empty_cache()


def test_a_buffer_is_handed_out_again_only_once_nothing_holds_its_storage():
    a = _buffers.empty(SHAPE, torch.float32)
    b = _buffers.empty(SHAPE, torch.float32)
    first = a.data_ptr()
    assert first != b.data_ptr()  # a is still held
    view = a[1:]
    del a
    c = _buffers.empty(SHAPE, torch.float32)
    assert c.data_ptr() not in (first, b.data_ptr())  # a's view still holds its storage
    del view
    again = _buffers.empty(SHAPE, torch.float32)
    assert again.data_ptr() == first and again.shape == SHAPE and again.dtype == torch.float32
    other = _buffers.empty(SHAPE, torch.int16)  # another dtype: another buffer
    assert other.data_ptr() not in (first, b.data_ptr(), c.data_ptr())


def test_what_a_user_does_to_a_handed_out_tensor_stays_with_it():
    first = None
    for _ in range(3):  # a fresh buffer, then the kept one twice
        a = _buffers.empty(SHAPE, torch.float32)
        assert a.data_ptr() == (first or a.data_ptr())
        assert a.shape == SHAPE and a.is_contiguous() and not a.requires_grad
        first = a.data_ptr()
        a.t_()
        a.requires_grad_()
        del a


def test_threads_never_share_a_buffer():
    kept = _buffers.empty(SHAPE, torch.float32)
    first = kept.data_ptr()
    del kept  # free in this thread's pool, which the other thread does not see
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_buffers.empty(SHAPE, torch.float32).data_ptr()))
    thread.start()
    thread.join()
    assert seen and seen[0] != first
    assert _buffers.empty(SHAPE, torch.float32).data_ptr() == first


def test_the_pool_keeps_the_most_recent_shapes_and_empty_cache_drops_them():
    for rows in range(_buffers.MAX_SHAPES + 5):
        _buffers.empty((rows + 1, 2), torch.float32)
    assert len(_buffers._pool.by_shape) == _buffers.MAX_SHAPES
    assert ((1, 2), torch.float32) not in _buffers._pool.by_shape  # the oldest went first
    dfp.empty_cache()
    assert not _buffers._pool.by_shape


def test_a_layer_gives_each_live_output_its_own_storage():
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3)
    y1, y2 = DF.conv2d(x, w, padding=1), DF.conv2d(x * 2, w, padding=1)
    assert y1.data_ptr() != y2.data_ptr()
    assert torch.equal(y1, DF.conv2d(x, w, padding=1))  # y1 kept its values while the others were made


def test_a_strided_layers_input_gradient_is_zero_where_no_tap_reaches_in_a_reused_buffer():
    # a 3x3 stride-2 layer writes every element of its dx; a 1x1 stride-2 layer's dx of the
    # same shape, handed the same storage, must hold zeros at the odd positions
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 8, 8, generator=gen).requires_grad_()
    DF.conv2d(x, torch.randn(8, 16, 3, 3, generator=gen), stride=2, padding=1).sum().backward()
    assert x.grad[:, :, 1::2].any() and x.grad[:, :, :, 1::2].any()
    x.grad = None
    DF.conv2d(x, torch.randn(8, 16, 1, 1, generator=gen), stride=2).sum().backward()
    assert torch.equal(x.grad[:, :, 1::2], torch.zeros_like(x.grad[:, :, 1::2]))
    assert torch.equal(x.grad[:, :, :, 1::2], torch.zeros_like(x.grad[:, :, :, 1::2]))
    assert x.grad[:, :, ::2, ::2].any()
