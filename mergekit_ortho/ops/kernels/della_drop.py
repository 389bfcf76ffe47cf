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
  Rows of at most 2^16 entries sort 32-bit keys instead where few entries need more than the
  magnitude's top 31 - ceil(log2 L) bits (:func:`sorted_columns`; AVX-512 sorts them about twice
  as fast), with the runs those few entries fall in re-sorted by the full key.
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


#: a block takes the 32-bit keys while at most this share of its entries has bits below the key's
#: magnitude prefix (else the fix-up would cost more than the 64-bit sort saves)
DIRTY_MAX = 1 / 32


def sorted_columns(bits: np.ndarray, key_buf: np.ndarray, k32: np.ndarray) -> np.ndarray:
    """Each row's columns in ascending (|x| bit pattern, column) order (:func:`sorted_keys`'
    order), int64 (rows, L), a view of ``key_buf`` (int32 (rows, L, 2)); ``k32`` int32 (rows, L)
    scratch; ``bits`` as for :func:`sorted_keys`.

    Rows of at most 2^16 entries sort 32-bit keys (about twice as fast as 64-bit ones): the
    magnitude's bits above the cb = ceil(log2 L) lowest, then the column. That order is exact
    except inside a run of equal prefixes holding an entry whose cb low bits are not zero (a
    "dirty" entry; task vectors of bf16 models have few: 0.3 % of a 2816 x 1024 one at L = 1024).
    Each dirty entry's run is found by binary search in its sorted row and re-sorted by the full
    64-bit key (row, magnitude, column). Blocks with more than ``DIRTY_MAX`` dirty entries sort
    the 64-bit keys instead."""
    rows, L = bits.shape
    cols = key_buf.view(np.int64).reshape(rows, L)
    cb = max(1, (L - 1).bit_length())
    cmask = (1 << cb) - 1
    if cb <= 16:
        low = key_buf.reshape(-1)[:rows * L].reshape(rows, L)  # scratch until cols is written
        dirty = np.flatnonzero(np.bitwise_and(bits, cmask, out=low))
        if dirty.size <= DIRTY_MAX * bits.size:
            k = k32[:rows]
            np.bitwise_and(bits, 0x7FFFFFFF & ~cmask, out=k)
            np.bitwise_or(k, np.arange(L, dtype=np.int32), out=k)
            k.sort(axis=1)
            if dirty.size:
                _fix_runs(k, bits, dirty // L, dirty % L, cb, cols)
            np.bitwise_and(k, cmask, out=cols)
            return cols
    keys = sorted_keys(bits, key_buf)
    np.bitwise_and(keys, 0xFFFFFFFF, out=keys)
    return keys


def _fix_runs(k: np.ndarray, bits: np.ndarray, dr: np.ndarray, dc: np.ndarray, cb: int, scratch: np.ndarray) -> None:
    """Re-sort, by the full (row, magnitude, column) key, the runs of equal magnitude prefix in
    the sorted 32-bit keys ``k`` that hold a dirty entry (row dr, column dc). ``scratch``: int64
    of k's shape. The runs are found by binary search in one ascending int64 array of
    (row << 32 | key): a few numpy calls a block (the pool threads share the GIL)."""
    rows, L = k.shape
    cmask = (1 << cb) - 1
    flat = np.bitwise_or(k, np.arange(rows, dtype=np.int64)[:, None] << 32, out=scratch).reshape(-1)
    q = (dr.astype(np.int64) << 32) | (bits[dr, dc] & (0x7FFFFFFF & ~cmask))
    first = dr.astype(np.int64) * L
    a = np.searchsorted(flat, q) - first
    b = np.searchsorted(flat, q + (1 << cb)) - first
    long = b - a > 1  # a run of one entry is in order
    if not long.any():
        return
    start, first = np.unique(dr[long].astype(np.int64) * L + a[long], return_index=True)
    lens = (b - a)[long][first]
    mem = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(start - (np.cumsum(lens) - lens), lens)
    kf = k.reshape(-1)
    mr = mem // L
    mc = (kf[mem] & cmask).astype(np.int64)
    full = (mr << (31 + cb)) | ((bits[mr, mc].astype(np.int64) & 0x7FFFFFFF) << cb) | mc
    full.sort()  # runs keep their places: they are ordered by (row, prefix) already
    kf[mem] = (kf[mem] & ~cmask) | (full & cmask).astype(np.int32)


def rank_lookup(cols: np.ndarray, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i, c] = table[rank of column c in row i], from :func:`sorted_columns`' result."""
    return out.scatter_(1, torch.from_numpy(cols), table.expand_as(out))


def _block_(blk: torch.Tensor, bits: np.ndarray, u: torch.Tensor, table: torch.Tensor, key_buf: np.ndarray,
            p_buf: torch.Tensor, k32: np.ndarray) -> None:
    """One block of whole rows (``blk`` (b, L, R), its bits as (b*R, L)): keys, sort, lookup, mask.
    The torch steps go ``GRAIN`` entries (whole rows) at a time: below ATen's parallel grain each
    runs on the calling (pool) thread alone instead of opening a parallel region of its own."""
    b, L, R = blk.shape
    cols = sorted_columns(bits, key_buf[:b * R], k32)  # a copy only when R > 1
    p = p_buf[:b * R]
    sub = max(1, GRAIN // max(L * R, 1))
    for a in range(0, b, sub):
        e = min(a + sub, b)
        q = rank_lookup(cols[a * R:e * R], table, p[a * R:e * R]).view(e - a, R, L).transpose(1, 2)
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
             torch.empty((rows * R, L), dtype=torch.float32), np.empty((rows * R, L), dtype=np.int32))
            for _ in range(lanes)]
    if lanes == 1 or workers() == 1:
        key_buf, u_buf, p_buf, k32 = free[0]
        for a in starts:
            blk = x[a:a + rows]
            u = torch.rand(blk.shape, generator=gen, dtype=torch.float32, out=u_buf[:blk.shape[0]])
            _block_(blk, xi[a:a + rows].reshape(-1, L), u, table, key_buf, p_buf, k32)
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
            fut = pool().submit(_block_, blk, xi[a:a + rows].reshape(-1, L), u, table, bufs[0], bufs[2], bufs[3])
            running.append((fut, bufs))
    finally:
        for fut, _ in running:  # every block finished (or failed) before x is handed back
            fut.result()
    return x
