"""Chunking shared by the elementwise kernels."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

# Every full-tensor pass of the TIES/DARE kernels (radix histograms, applying the threshold, the
# DARE mask, the sign election and disjoint mean) walks the tensor in chunks of 256K entries
# (1 MiB of float32): each chunk stays in L2 through all its passes and no full-size temporary
# is allocated. End to end (3 x 271M-entry bf16 models, ties density 0.5, 2 idle cores): 12.4 s
# with 32K-entry chunks (each op below ATen's parallel grain, so on one thread), 8.1 s with 256K,
# 7.7-8.4 s with 1M+. Chunks above the grain run on torch's thread pool; on cores oversubscribed
# by other jobs its parallel regions can stall (seen during development at load ~6: 32K chunks
# were then 10x faster), so set OMP_NUM_THREADS=1 there. On other devices (CUDA) a chunk is the
# whole tensor. Tests lower it to split every pass into many chunks.
CHUNK = (1 << 18) - 1

INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer view of a float


def chunk_len(t: torch.Tensor) -> int:
    """Entries per chunk for tensor t: ``CHUNK`` on the CPU, the whole tensor elsewhere."""
    return CHUNK if t.device.type == "cpu" else max(t.numel(), 1)


# Passes that torch runs on one thread (numpy's sort, torch.bincount, draws from a generator)
# are spread over the cores by splitting them between Python threads: numpy and torch release
# the GIL inside their kernels. One pool for the process, as many workers as torch's intra-op
# threads (``merge --threads``), created on first use; with one thread nothing is submitted.
# The executor's item lanes (execute._lanes) run torch on one thread each and set a width of
# their own: 1 while items share the cores, all of them for an item that runs alone. Every
# kernel split this way gives the same bits for any width (tests/test_topk_parallel.py).
_POOL = None
_local = threading.local()
_pool_lock = threading.Lock()


def workers() -> int:
    """How many threads a kernel may split a serial pass over: the width the calling thread was
    given (:func:`width`), else torch's intra-op thread count."""
    w = getattr(_local, "width", None)
    return w if w is not None else max(1, torch.get_num_threads())


@contextmanager
def width(n: int):
    """Kernels called from this thread inside the block split their passes over ``n`` workers."""
    old = getattr(_local, "width", None)
    _local.width = max(1, n)
    try:
        yield
    finally:
        _local.width = old


def pool():
    """The shared worker pool (at least ``workers()`` threads; a larger one serves as well)."""
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        if _POOL is None or _POOL._max_workers < workers():
            _POOL = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="kernels")
        return _POOL


def split_map(fn, n: int, step: int) -> list:
    """``fn(lo, hi)`` over contiguous ranges covering [0, n) in order, one per worker, each a
    whole number of ``step``-entry chunks (so a chunk loop inside ``fn`` cuts the same chunks as
    one loop over [0, n) would); run on the pool, results in range order. Serial (one range)
    with one worker, one chunk, or when called from a pool thread (no nested waits)."""
    chunks = -(-n // step) if n else 0
    parts = min(workers(), chunks)
    if parts <= 1 or threading.current_thread().name.startswith("kernels"):
        return [fn(0, n)]
    per = -(-chunks // parts) * step
    ranges = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
    return list(pool().map(lambda r: fn(*r), ranges))


def over_ranges(fn, n: int, step: int) -> list:
    """:func:`split_map` of ``fn(lo, hi)`` for a chunk loop whose chunks are independent (each
    reads and writes only its own entries), each range with torch on one thread: the same bits
    as one loop over [0, n), for any number of workers. Results in range order."""
    from .threads import serial

    def one(lo: int, hi: int):
        with serial():
            return fn(lo, hi)
    return split_map(one, n, step)

