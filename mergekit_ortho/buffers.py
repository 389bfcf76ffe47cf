"""Reused CPU buffers for the per-tensor hot path (reads, fold accumulators, output casts).

Every tensor of a merge needs a few large fresh buffers (each model's stored bytes, a float32
accumulator, the output's cast) that live only while that tensor is merged. Fresh memory costs the
kernel a page fault and a page clear per page: at 1.1B parameters that is ~13 GB cleared, about
a fifth of `linear`'s CPU time (``perf``: ``clear_page_erms`` 18 % of the samples). Here a freed
buffer is kept and handed out again instead.

A buffer is free when nothing but this pool references its storage (the storage's use count is 1),
so a tensor handed out stays valid for as long as anything - a view, a numpy array, a later
operator's result - holds it; nothing is ever overwritten in use. Only requests of at least
``MIN_BYTES`` on the CPU come here. Peak memory stays that of the live tensors: a request that no
free buffer fits first releases the free buffers too small for it, so what is kept is what later
requests can use (tensors of a model come in similar sizes): a free buffer more than ``OVERSIZE``
times a request is not handed out for it, and is released when a request allocates after it
has gone unused for a while.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIN_BYTES = 256 * 2**10
# a free buffer serves a request of at least 1/OVERSIZE of its size; a request that no free
# buffer fits also releases the far larger free ones not taken in the last STALE_TAKES requests,
# so that the pages of a model's few huge tensors (embeddings, head) are not kept through the rest
# of the merge, while buffers that alternate with smaller ones (an MLP's beside a k_proj's) stay
OVERSIZE = 4
STALE_TAKES = 256
_tick = 0  # requests so far
_last_used: dict = {}  # id(storage) -> the request that last took it
_ALIGN = 2 * 2**20  # huge-page multiples (64 KiB below): a kept buffer serves slightly larger requests too
_lock = threading.Lock()
_pool: list = []  # UntypedStorage objects, ascending by size


def _use_count(storage) -> int:
    import torch

    return torch._C._storage_Use_Count(storage._cdata)


def empty(shape, dtype: "torch.dtype", device="cpu") -> "torch.Tensor":
    """An uninitialised contiguous tensor, like ``torch.empty(shape, dtype=dtype, device=device)``,
    in a reused buffer when one is free (CPU; other devices have caching allocators of their own)."""
    import torch

    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:  # taken and referenced under the lock: no other thread sees it free meanwhile
        return torch.empty(0, dtype=dtype).set_(_take(nbytes), 0, shape)


def _take(nbytes: int):
    import torch

    global _tick
    _tick += 1
    for s in _pool:  # ascending: the smallest free buffer that fits, unless far too large
        if nbytes <= s.nbytes() <= nbytes * OVERSIZE + _ALIGN and _use_count(s) == 1:
            _last_used[id(s)] = _tick
            return s
    # nothing fits: release the free buffers too small for this request, and the far larger ones
    # that no request has taken for a while (an embedding's, once the per-layer tensors come)
    def kept(s) -> bool:
        if _use_count(s) > 1:
            return True
        if s.nbytes() < nbytes:
            return False
        return s.nbytes() <= nbytes * OVERSIZE + _ALIGN or _tick - _last_used.get(id(s), 0) <= STALE_TAKES
    _pool[:] = [s for s in _pool if kept(s)]
    live = {id(s) for s in _pool}
    for key in [k for k in _last_used if k not in live]:
        del _last_used[key]
    align = _ALIGN if nbytes >= _ALIGN else 2**16
    s = torch.UntypedStorage(-(-nbytes // align) * align)
    _last_used[id(s)] = _tick
    _pool.append(s)
    _pool.sort(key=lambda x: x.nbytes())
    return s


def like(t: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """``t`` converted to ``dtype`` in a reused buffer: the values of ``t.to(dtype)`` (a new tensor
    even when the dtype matches). CPU only; other devices get ``t.to(dtype)``."""
    dtype = dtype or t.dtype
    if t.device.type != "cpu":
        return t.to(dtype)
    return empty(t.shape, dtype).copy_(t)


def release() -> None:
    """Drop every free buffer (``execute.execute`` at the end of its loop)."""
    with _lock:
        _pool[:] = [s for s in _pool if _use_count(s) > 1]
