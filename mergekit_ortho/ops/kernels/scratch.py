"""Full-size scratch kept between tensors, so that its pages are not faulted in afresh each time.

A freshly allocated CPU buffer of more than a few MiB comes from new pages (glibc maps blocks above
its mmap threshold, at most 32 MiB, and returns them on free): the first write of each 4 KiB page
costs a page fault, measured 42 ms for 131 MB (32000 x 1024 float32) against 3.7 ms to rewrite
the same buffer once mapped, i.e. about 0.3 s per model's worth of float32 entries. An operator
whose full-size temporary never leaves it (sce's variance, model_stock's sum of unit vectors)
takes it with :func:`take` and hands it back with :func:`give` when done; the next tensor then
reuses those pages. One buffer per (dtype, device) is kept, the largest handed back, so a merge
holds at most one such buffer beyond what its largest tensor needed anyway. Contents are
uninitialised (as ``torch.empty``); values never depend on this module.

Only the thread that took a buffer uses it; the lock guards the hand-over (merges may run
operators on several threads).
"""
from __future__ import annotations

import threading

import torch

_FREE: dict[tuple[torch.dtype, str], torch.Tensor] = {}
_LOCK = threading.Lock()


def take(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A contiguous 1-D tensor of ``numel`` uninitialised entries: a view of the kept buffer when it
    is large enough (it then stays taken until :func:`give`), else a new one."""
    key = (dtype, str(torch.device(device)))
    with _LOCK:
        buf = _FREE.get(key)
        if buf is not None and buf.numel() >= numel:
            del _FREE[key]
            return buf[:numel]
    return torch.empty(numel, dtype=dtype, device=device)


def give(t: torch.Tensor) -> None:
    """Hand back a tensor from :func:`take` (or any contiguous tensor nothing else refers to):
    its whole storage is kept for later :func:`take` calls if it is the largest so far. CPU only
    (other devices have caching allocators)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return
    n = t.untyped_storage().nbytes() // t.element_size()
    buf = t.new_empty(0).set_(t.untyped_storage(), 0, (n,))
    key = (t.dtype, str(t.device))
    with _LOCK:
        held = _FREE.get(key)
        if held is None or held.numel() < n:
            _FREE[key] = buf


def release() -> None:
    """Drop the kept buffers (their memory goes back to the system)."""
    with _LOCK:
        _FREE.clear()
