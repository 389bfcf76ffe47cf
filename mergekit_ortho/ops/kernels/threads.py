"""One-thread sections for chunked kernels on shared cores.

A chunked kernel that calls torch once per cache-sized chunk opens one parallel region per call
when torch has several threads. On cores shared with other jobs such a region waits whenever one
of its threads is descheduled, so many short regions cost far more than their work (measured on
the 2-core dev box at load 5-10: a 2^18-entry ``torch.dot`` took 4.5 ms on 2 threads against
37 us on one). Reductions split over threads also round by the thread count (MKL's dot
product, torch's float64 sums): on one thread the result is the same whatever ``merge
--threads`` says. :func:`serial` runs a block on one thread; memory-bound passes lose little.
"""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def serial():
    """torch's CPU ops on one thread inside the block (the caller's thread count restored after).
    Only the calling thread's OpenMP / MKL settings change (each thread has its own); the merge
    runs its tensor math on the main thread."""
    import torch

    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
