"""buffers.py: a freed large buffer is handed out again, never one still referenced (by a view, a
numpy array, a later result); a request no free buffer fits releases the free ones too small for it;
small requests and other devices get plain torch.empty."""
from __future__ import annotations

import torch

from mergekit_ortho import buffers

N = buffers.MIN_BYTES // 4  # float32 entries of the smallest pooled request


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_a_freed_buffer_is_reused_and_a_referenced_one_never():
    buffers.release()
    a = buffers.empty((N,), torch.float32)
    pa = _ptr(a)
    view = a[10:20]
    arr = a.numpy()
    del a
    b = buffers.empty((N,), torch.float32)  # a's storage is still held by the view and the array
    assert _ptr(b) != pa
    del view
    c = buffers.empty((N,), torch.float32)  # the array still holds it
    assert _ptr(c) not in (pa, _ptr(b))
    del arr, b
    d = buffers.empty((N // 2, 2), torch.bfloat16)  # free again: the smallest that fits
    assert _ptr(d) in (pa,) or d.untyped_storage().nbytes() >= N
    assert d.shape == (N // 2, 2) and d.dtype == torch.bfloat16 and d.is_contiguous()


def test_like_has_the_values_of_to():
    x = torch.randn(N, dtype=torch.float32).to(torch.bfloat16)
    y = buffers.like(x, torch.float32)
    assert torch.equal(y, x.to(torch.float32)) and y.dtype == torch.float32
    z = buffers.like(y, torch.bfloat16)
    assert torch.equal(z, y.to(torch.bfloat16)) and _ptr(z) != _ptr(y)


def test_a_larger_request_releases_the_free_buffers_too_small_for_it():
    buffers.release()
    small = [buffers.empty((N,), torch.float32) for _ in range(3)]
    del small
    assert len(buffers._pool) == 3
    big = buffers.empty((8 * N,), torch.float32)
    assert [s.nbytes() >= big.numel() * 4 for s in buffers._pool] == [True]
    del big
    buffers.release()
    assert buffers._pool == []


def test_small_requests_are_not_pooled():
    buffers.release()
    t = buffers.empty((16,), torch.float32)
    assert t.shape == (16,) and buffers._pool == []


def test_a_far_larger_free_buffer_serves_no_small_request_and_goes_once_stale(monkeypatch):
    buffers.release()
    monkeypatch.setattr(buffers, "STALE_TAKES", 3)
    big = buffers.empty((64 * N,), torch.float32)  # 64x the small requests (beyond the 2 MiB slack)
    pbig = _ptr(big)
    del big
    small = buffers.empty((N,), torch.float32)
    assert _ptr(small) != pbig  # not handed the far larger buffer
    assert pbig in {s.data_ptr() for s in buffers._pool}  # recently used: kept (it may come back)
    held = [small]
    for _ in range(4):  # misses, until the big one has gone unused for more than STALE_TAKES requests
        held.append(buffers.empty((N,), torch.float32))
    assert pbig not in {s.data_ptr() for s in buffers._pool}
    same = buffers.empty((64 * N,), torch.float32)  # a fresh one now
    assert same.numel() == 64 * N
    buffers.release()
