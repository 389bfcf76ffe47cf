"""DELLA's MAGPRUNE drop in place: keep-probability lookup by row rank, then the DARE-style mask.

Plain formulation (``sparsify.della_plain``): ranks r = the inverse of a stable ascending sort of
|x| along each row, p = ``della_keep_prob(r)``, u = ``torch.rand(x.shape, generator=gen)``,
``where(u < p, x, +0)``. Here, block by block of whole rows:

* p comes from a table: ``table[r] = della_keep_prob(r)`` for r = 0 .. L-1, computed once by the
  same float32 operations, so ``table[rank]`` is bit-equal to the elementwise p. No rank tensor
  is formed: each row's int64 keys (|x|'s bit pattern in the high word - sign cleared, monotone
  in the magnitude, NaN above +inf - and the column in the low word; distinct, so numpy's
  unstable vectorised sort orders them as the stable sort does) are sorted, and the table is
  scattered to the columns the sorted low words name: p[i, col(i, r)] = table[r]. The keys are
  written in one strided pass from x's bits (no |x|, no shifts); the rank scatter, int64 rank
  tensor and its float conversion of the previous kernel (``row_rank.row_ranks``) are gone.
* the draws are taken block by block from ``gen`` in flat order (the same numbers as one
  full-size draw) and the mask is the sign bit of u - p (:func:`.dare_drop.keep_below_`).
* inside a block the lookups and masks go 2^15 entries at a time: on a pool thread a larger
  torch op opens its own OpenMP team (threads x threads on the cores), and on cores shared with
  other jobs each such parallel region can wait for a descheduled thread.
* the sort is most of the time (~0.2 s of ~0.45 s for 4096 x 4096 on one core; the draws
  ~0.08 s). Both are serial passes (numpy's sort, torch's generator), so the blocks' sorts run
  on the kernel worker pool (numpy's sort releases the GIL) while the calling thread draws the
  next blocks' u in order: the same draws, the same result, both cores busy.

Bit-equal to the plain form (tests/test_kernels.py).
"""
from __future__ import annotations

import sys
from collections import deque

import numpy as np
import torch

from ._chunks import chunk_len, pool, workers
from .dare_drop import keep_below_

#: entries per torch step inside a pool thread: ATen's parallel grain (at::internal::GRAIN_SIZE); ops
#: on at most this many entries run serially on the calling thread
GRAIN = 1 << 15

_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)  # int32 words of an int64 key


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`della_drop_` takes ``x`` ((A, L, R)): contiguous float32 on the CPU, rows
    shorter than 2**31 (the column is an int32 word of the key)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.shape[1] < 2 ** 31


def sorted_keys(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Each row's keys (|x| bit pattern << 32 | column) sorted ascending, as an int64 (rows, L)
    view of ``out`` (an int32 (rows, L, 2) buffer); ``bits`` the (rows, L) int32 bit patterns
    of x (any strides)."""
    rows, L = bits.shape
    np.bitwise_and(bits, 0x7FFFFFFF, out=out[:, :, _HI])
    out[:, :, _LO] = np.arange(L, dtype=np.int32)
    keys = out.view(np.int64).reshape(rows, L)
    keys.sort(axis=1)
    return keys


def rank_lookup(keys: np.ndarray, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i, c] = table[rank of column c in row i], from :func:`sorted_keys`'s result (consumed:
    its words become int64 column indices)."""
    cols = torch.from_numpy(keys).bitwise_and_(0xFFFFFFFF)
    return out.scatter_(1, cols, table.expand_as(out))


def _block_(blk: torch.Tensor, bits: np.ndarray, u: torch.Tensor, table: torch.Tensor, key_buf: np.ndarray,
            p_buf: torch.Tensor) -> None:
    """One block of whole rows (``blk`` (b, L, R), its bits as (b*R, L)): keys, sort, lookup, mask.
    The torch steps go ``GRAIN`` entries (whole rows) at a time: below ATen's parallel grain each
    runs on the calling (pool) thread alone instead of opening a parallel region of its own."""
    b, L, R = blk.shape
    keys = sorted_keys(bits, key_buf[:b * R])  # a copy only when R > 1
    p = p_buf[:b * R]
    sub = max(1, GRAIN // max(L * R, 1))
    for a in range(0, b, sub):
        e = min(a + sub, b)
        q = rank_lookup(keys[a * R:e * R], table, p[a * R:e * R]).view(e - a, R, L).transpose(1, 2)
        keep_below_(blk[a:e], u[a:e], q)


def della_drop_(x: torch.Tensor, table: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry of x (viewed as (A, L, R), ranks along L; :func:`applies`) iff its draw
    from ``gen`` is < table[its rank in its row]; in place, returns x. ``table``: float32 (L,).

    The calling thread draws every block's u from ``gen`` in flat order (the draws are serial);
    the blocks' keys, sorts, lookups and masks run on the worker pool (:func:`._chunks.pool`),
    each block on its own buffers, so the sorts of two blocks and the next draws overlap."""
    A, L, R = x.shape
    rows = min(A, max(1, chunk_len(x) // max(L * R, 1)))
    xi = x.view(torch.int32).numpy().transpose(0, 2, 1)  # (A, R, L): one key row per (a, r)
    starts = range(0, A, rows)
    lanes = 1 if len(starts) == 1 else workers() + 1  # blocks in flight, each with its buffers
    free = [(np.empty((rows * R, L, 2), dtype=np.int32), torch.empty((rows, L, R), dtype=torch.float32),
             torch.empty((rows * R, L), dtype=torch.float32)) for _ in range(lanes)]
    if lanes == 1 or workers() == 1:
        key_buf, u_buf, p_buf = free[0]
        for a in starts:
            blk = x[a:a + rows]
            u = torch.rand(blk.shape, generator=gen, dtype=torch.float32, out=u_buf[:blk.shape[0]])
            _block_(blk, xi[a:a + rows].reshape(-1, L), u, table, key_buf, p_buf)
        return x
    running: deque = deque()
    try:
        for a in starts:
            if not free:
                fut, bufs = running.popleft()
                fut.result()
                free.append(bufs)
            bufs = free.pop()
            blk = x[a:a + rows]
            u = torch.rand(blk.shape, generator=gen, dtype=torch.float32, out=bufs[1][:blk.shape[0]])
            fut = pool().submit(_block_, blk, xi[a:a + rows].reshape(-1, L), u, table, bufs[0], bufs[2])
            running.append((fut, bufs))
    finally:
        for fut, _ in running:  # every block finished (or failed) before x is handed back
            fut.result()
    return x
