"""Radix top-k: zero all but the k largest magnitudes of a float tensor, in place.

Plain formulation (``sparsify.keep_top_k_plain_``): a stable descending sort of |x| and keep
the first k, so that among equal magnitudes at the threshold the lowest flat indices win; +0 and
-0 are equal, NaN is the largest. :func:`keep_top_k_` keeps exactly that set (bit-equal,
tests/test_kernels.py, tests/test_topk_parallel.py) without a sort: the k-th largest magnitude comes from a radix select over
the IEEE bit patterns (:func:`radix_threshold`) and is applied by an in-place ``hardshrink``,
chunk by chunk. Faster above ~16k entries (``RADIX_MIN_NUMEL``), where the fixed cost of the
histograms stops dominating; far faster on large tensors. :func:`keep_rank_band_` keeps ranks
lo..hi-1 of the same order (breadcrumbs; plain form ``sparsify.keep_rank_band_plain_``) from two
such thresholds, in one chunked pass. The radix select's full-tensor passes (histograms, the
gather, the pivot counts) run on the worker pool by contiguous ranges (``_chunks.split_map``):
bit-identical whatever the number of workers (tests/test_topk_parallel.py).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ._chunks import INT_OF, chunk_len, split_map

# Tensors with at least this many entries (float32/float64, or half types via an exact float32
# copy of the magnitudes) find the top-k threshold by radix select; smaller ones are better
# served by a stable sort. Both give the same kept set; tests lower it to cross-check the two.
RADIX_MIN_NUMEL = 1 << 14
RADIX_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def applies(flat: torch.Tensor) -> bool:
    """Whether :func:`keep_top_k_` is the faster way for ``flat``."""
    return flat.numel() >= RADIX_MIN_NUMEL and flat.dtype in RADIX_DTYPES


PIVOT_MIN = 1 << 16  # smallest level-1 bucket worth a pivot test (also >= 1/32 of the tensor)
# float32: a level-1 bucket holding at least this share of the tensor (and failing the pivot
# test) is resolved by a masked pass over the whole tensor instead of a gather, so that the
# gathered candidates (12 bytes each) never take more than 12 / 32 bytes an entry; tests set it
# to 0 (every bucket masked) or above 1 (none)
MASKED_MIN_SHARE = 1 / 32
# how :func:`threshold` selects on the CPU: "partition" (numpy's select), or "radix" (the passes
# other devices use; tests set it to cover them on the CPU)
CPU_SELECT = "partition"
# larger tensors take the radix select on the CPU too: the partition's temporary (the tensor's
# size) would raise the peak of the few huge tensors (embeddings, heads) where the radix passes,
# split over the workers when the tensor runs alone, cost little more (~100 vs ~70 ms at 33M)
PARTITION_MAX_BYTES = 64 << 20


def _host_counts(digits: torch.Tensor, bins: int) -> np.ndarray:
    """Histogram (on the host) of a 1-D tensor of integers in [0, bins), chunk by chunk: torch's
    bincount takes a (parallel) min and max of its input first."""
    counts = np.zeros(bins, dtype=np.int64)
    step = chunk_len(digits)
    for lo in range(0, digits.numel(), step):
        counts += torch.bincount(digits[lo:lo + step], minlength=bins).cpu().numpy()
    return counts


def _pick(counts: np.ndarray, need: int) -> tuple[int, int, int]:
    """The histogram bin holding the need-th largest value: (bin, rank within it, bin count)."""
    at_or_above = np.cumsum(counts[::-1])[::-1]  # [j] = #values in bins >= j, non-increasing
    j = int(np.count_nonzero(at_or_above >= need)) - 1
    if j + 1 < counts.size:
        need -= int(at_or_above[j + 1])
    return j, need, int(counts[j])


def _level1_counts(top: torch.Tensor, step: int) -> np.ndarray:
    """Histogram of the top 16 bits of every entry, sign bit dropped (``top``: the int16 view of
    each entry's most significant half), over the worker pool by contiguous ranges: torch's
    bincount runs on one thread."""
    def part(a: int, b: int) -> torch.Tensor:
        buf = torch.empty(min(step, b - a), dtype=torch.int16, device=top.device)
        counts = torch.zeros(1 << 15, dtype=torch.int64, device=top.device)
        for lo in range(a, b, step):
            hi = min(lo + step, b)
            counts += torch.bincount(torch.bitwise_and(top[lo:hi], 0x7FFF, out=buf[:hi - lo]), minlength=1 << 15)
        return counts
    return sum(t.cpu().numpy() for t in split_map(part, top.numel(), step))


def _level2_counts32(ibits: torch.Tensor, j: int, step: int) -> np.ndarray:
    """float32: histogram of the low 16 bits of the entries whose magnitude's top 16 bits are
    ``j``, by a masked pass over the whole tensor (no gather): d = |bits| - (j << 16) + 1 is in
    1..65536 exactly for those entries; the rest are clamped into bins 0 and 65537 (int32
    wrap-around of a NaN pattern at j = 0 lands in bin 0 too) and dropped."""
    def part(a: int, b: int) -> torch.Tensor:
        buf = torch.empty(min(step, b - a), dtype=torch.int32, device=ibits.device)
        counts = torch.zeros((1 << 16) + 2, dtype=torch.int64, device=ibits.device)
        for lo in range(a, b, step):
            hi = min(lo + step, b)
            d = torch.bitwise_and(ibits[lo:hi], 0x7FFFFFFF, out=buf[:hi - lo])
            d.sub_((j << 16) - 1).clamp_(0, (1 << 16) + 1)
            counts += torch.bincount(d, minlength=(1 << 16) + 2)
        return counts
    return sum(t.cpu().numpy() for t in split_map(part, ibits.numel(), step))[1:-1]


def _nth_equal(ibits: torch.Tensor, pattern: int, m: int, step: int, per_chunk: list[int] | None = None) -> int:
    """1 + the flat index of the m-th entry (in index order) whose magnitude has bit pattern
    ``pattern``; at least m such entries exist. Counts per chunk on the pool (unless given as
    ``per_chunk``), then one chunk's nonzero."""
    sign_clear = torch.iinfo(ibits.dtype).max

    def part(a: int, b: int) -> list[int]:
        buf = torch.empty(min(step, b - a), dtype=ibits.dtype, device=ibits.device)
        return [int(torch.count_nonzero(torch.bitwise_and(ibits[lo:min(lo + step, b)], sign_clear,
                                                          out=buf[:min(lo + step, b) - lo]) == pattern))
                for lo in range(a, b, step)]
    if per_chunk is None:
        per_chunk = [c for part_counts in split_map(part, ibits.numel(), step) for c in part_counts]
    seen = 0
    for i, cnt in enumerate(per_chunk):
        if seen + cnt >= m:  # the chunk holding the m-th entry equal to the pattern
            lo = i * step
            hit = ibits[lo:lo + step].bitwise_and(sign_clear) == pattern
            return lo + int(hit.nonzero()[m - seen - 1]) + 1
        seen += cnt
    raise AssertionError("unreachable")  # pragma: no cover


def _gather_bucket(top: torch.Tensor, ibits: torch.Tensor, j: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat indices (increasing) and raw bits of the entries in level-1 bucket ``j``,
    gathered on the pool by contiguous ranges (the sign bit is never read later)."""
    def part(a: int, b: int):
        buf = torch.empty(min(step, b - a), dtype=torch.int16, device=top.device)
        idx, cand = [], []
        for lo in range(a, b, step):
            hi = min(lo + step, b)
            sel = (torch.bitwise_and(top[lo:hi], 0x7FFF, out=buf[:hi - lo]) == j).nonzero().view(-1)
            cand.append(ibits[lo:hi][sel])
            idx.append(sel.add_(lo))
        return idx, cand
    parts = split_map(part, top.numel(), step)
    return torch.cat([t for p in parts for t in p[0]]), torch.cat([t for p in parts for t in p[1]])


def radix_threshold(flat: torch.Tensor, k: int) -> tuple[int, int, int, int | None]:
    """Radix select of the k-th largest magnitude of ``flat`` (contiguous 1-D float32/float64).

    For non-negative floats the IEEE bit pattern read as an integer is monotone in the value
    (+0 and -0 both map to 0 once the sign bit is cleared; +inf sits below every NaN), so the
    k-th largest magnitude is the k-th largest of ``bits & 0x7FF...F``. Level 1 histograms the
    top 16 bits of every entry (15 once the sign is dropped; read through an int16 view) and a
    cumulative count from the top picks the bucket that holds the k-th largest. That bucket's
    entries, with their flat indices, become the candidates; each further level resolves the
    next 16 bits among them (2 levels for float32, 4 for float64; candidates stay in increasing
    index order). A bucket holding a large share of the tensor is usually one value repeated
    (task vectors of bf16 checkpoints), and resolving it costs more than testing that value:
    :func:`pivot_threshold` tries it first; when that fails on float32, level 2 histograms the
    bucket's low 16 bits in a masked pass over the whole tensor instead of gathering it, and a
    third pass finds the cut among equal magnitudes if there is one. The full-tensor passes run
    on the worker pool (:func:`._chunks.split_map`, contiguous ranges): the counts are sums and
    the gathered parts are concatenated in range order, so the result does not depend on the
    split. No full-size temporary is allocated.

    Returns ``(t, m, n_eq, c)``: ``t`` the threshold's bit pattern (sign cleared), ``n_eq`` the
    number of entries whose magnitude has exactly that pattern, ``m`` how many of them belong
    to the top k (1 <= m <= n_eq; every entry above t does) and, when m < n_eq, ``c`` = 1 + the
    flat index of the m-th of them in index order (else None).
    """
    n = flat.numel()
    width = flat.element_size() * 8
    ibits = flat.view(INT_OF[flat.element_size()])
    words = flat.view(torch.int16).view(-1, width // 16)
    top = words[:, -1] if sys.byteorder == "little" else words[:, 0]
    step = chunk_len(flat)
    j, need, in_bucket = _pick(_level1_counts(top, step), k)
    if in_bucket >= max(n >> 5, PIVOT_MIN):
        found = pivot_threshold(flat, j, k)
        if found is not None:
            return found
    if width == 32 and in_bucket >= n * MASKED_MIN_SHARE:
        jj, need, n_eq = _pick(_level2_counts32(ibits, j, step), need)
        t = (j << 16) | jj
        return t, need, n_eq, (_nth_equal(ibits, t, need, step) if need < n_eq else None)
    shift = width - 16
    prefix = j << shift
    idx, cand = _gather_bucket(top, ibits, j, step)
    while True:
        shift -= 16
        digits = torch.bitwise_right_shift(cand, shift).bitwise_and_(0xFFFF)
        j, need, n_eq = _pick(_host_counts(digits, 1 << 16), need)
        prefix |= j << shift
        if shift == 0:
            c = int(idx[(digits == j).nonzero()[need - 1]]) + 1 if need < n_eq else None
            return prefix, need, n_eq, c
        sel = (digits == j).nonzero().view(-1)
        idx, cand = idx[sel], cand[sel]
        del sel, digits


def threshold(flat: torch.Tensor, k: int) -> tuple[int, int, int, int | None]:
    """:func:`radix_threshold`'s (t, m, n_eq, c) by the faster way for ``flat``'s device: on the
    CPU numpy's in-place select (:func:`partition_threshold`) up to ``PARTITION_MAX_BYTES``,
    elsewhere the radix select."""
    if flat.device.type == "cpu" and CPU_SELECT == "partition" and flat.numel() * flat.element_size() <= PARTITION_MAX_BYTES:
        return partition_threshold(flat, k)
    return radix_threshold(flat, k)


def partition_threshold(flat: torch.Tensor, k: int) -> tuple[int, int, int, int | None]:
    """:func:`radix_threshold`'s result (the same four integers) by numpy's in-place select of the
    magnitudes' bit patterns instead of histograms (CPU tensors). On x86 numpy's select is
    vectorised (x86-simd-sort) and so are its integer passes: ~1.5 ns an entry in all against ~4.5
    for the radix select, whose ``bincount`` and ``nonzero`` run at a few entries a nanosecond
    (session 31, 2.9M-entry task vectors of the 271M benchmark, one thread). A select finds the
    k-th largest value t, not how many entries equal it or where they sit, so one more chunked
    pass (on the worker pool) counts the entries equal to t per chunk in index order, and the
    cut's index comes from the chunk holding the m-th of them. Costs one temporary of the tensor's
    size (the magnitudes it partitions, from the buffer pool; :mod:`..gta_rows` streams instead)."""
    from ... import buffers

    n = flat.numel()
    ibits = flat.view(INT_OF[flat.element_size()])
    mag = buffers.empty((n,), ibits.dtype)
    np.bitwise_and(ibits.numpy(), torch.iinfo(ibits.dtype).max, out=mag.numpy())
    t, above = select_(mag, k)
    del mag
    step = chunk_len(flat)

    def part(a: int, b: int) -> list[int]:
        return [count_equal(ibits[lo:min(lo + step, b)], t) for lo in range(a, b, step)]
    per_chunk = [c for counts in split_map(part, n, step) for c in counts]
    n_eq = sum(per_chunk)
    m = k - above
    return t, m, n_eq, (None if m == n_eq else _nth_equal(ibits, t, m, step, per_chunk))


def select_(mag: torch.Tensor, k: int) -> tuple[int, int]:
    """(t, above): the k-th largest t of ``mag`` (1-D CPU integer tensor of magnitude bit
    patterns, 1 <= k <= numel; partitioned in place) and how many entries exceed it."""
    order = mag.numpy()
    n = order.size
    order.partition(n - k)  # [n - k] is the k-th largest; everything after it is >= it
    t = int(order[n - k])
    return t, int(np.count_nonzero(order[n - k + 1:] > t))


def count_equal(ibits: torch.Tensor, t: int) -> int:
    """How many entries of ``ibits`` (integer view of a CPU float tensor) have magnitude pattern t."""
    return int(np.count_nonzero((ibits.numpy() & torch.iinfo(ibits.dtype).max) == t))


def pivot_threshold(flat: torch.Tensor, j: int, k: int):
    """Test whether the magnitude of the first entry in level-1 bucket ``j`` is the k-th
    largest: one pass (on the pool) counts the entries above and equal to it. Returns what
    :func:`radix_threshold` returns, or None when it is not."""
    itype = INT_OF[flat.element_size()]
    sign_clear = torch.iinfo(itype).max
    shift = flat.element_size() * 8 - 16
    ibits = flat.view(itype)
    n = flat.numel()
    step = chunk_len(flat)
    pivot = None
    for lo in range(0, n, step):
        hit = torch.bitwise_right_shift(ibits[lo:lo + step].bitwise_and(sign_clear), shift) == j
        if bool(hit.any()):
            pivot = int(ibits[lo + int(hit.view(torch.uint8).argmax())]) & sign_clear  # first hit
            break

    def part(a: int, b: int) -> tuple[int, list[int]]:
        buf = torch.empty(min(step, b - a), dtype=itype, device=flat.device)
        above, equal = 0, []
        for lo in range(a, b, step):
            mag = torch.bitwise_and(ibits[lo:min(lo + step, b)], sign_clear, out=buf[:min(lo + step, b) - lo])
            above += int(torch.count_nonzero(mag > pivot))
            equal.append(int(torch.count_nonzero(mag == pivot)))
        return above, equal
    counts = split_map(part, n, step)
    above = sum(a for a, _ in counts)
    equal = [e for _, part_equal in counts for e in part_equal]  # per chunk, in order
    n_eq = sum(equal)
    if not above < k <= above + n_eq:
        return None
    m = k - above
    return pivot, m, n_eq, (None if m == n_eq else _nth_equal(ibits, pivot, m, step, equal))


def keep_top_k_(flat: torch.Tensor, k: int) -> None:
    """Zero, in place, all but k entries of ``flat`` (contiguous 1-D): every entry whose
    magnitude exceeds the k-th largest magnitude t, then the entries with magnitude t in
    increasing index until k are kept. 1 <= k <= numel; dtype in ``RADIX_DTYPES``."""
    n = flat.numel()
    if k >= n:  # everything is kept
        return
    dt = flat.dtype
    src = flat if dt in (torch.float32, torch.float64) else flat.abs().float()  # exact, monotone
    t, m, n_eq, c = threshold(src, k)
    keep_top_at_(flat, 0, t, n if m == n_eq else c, src)


def keep_top_at_(flat: torch.Tensor, offset: int, t: int, c: int, src: torch.Tensor | None = None) -> None:
    """Zero, in place, the entries of ``flat`` (contiguous 1-D, entries ``offset``.. of the tensor
    whose top-k cut (t, c) this is, :func:`cut`) outside that top set: kept are |x| > t, and
    |x| == t at flat indices below c. ``src``: the float32/float64 magnitudes compared (``flat``
    itself by default; an exact float32 copy of |x| for half types). Elementwise given the cut,
    so any split of the tensor gives :func:`keep_top_k_`'s result (:mod:`..gta_rows`)."""
    n = flat.numel()
    dt = flat.dtype
    src = flat if src is None else src
    c = min(max(c - offset, 0), n)  # local: keep |x| >= t before c, |x| > t from c on
    itype = INT_OF[src.element_size()]
    min_normal, inf = (0x00800000, 0x7F800000) if itype == torch.int32 else (1 << 52, 0x7FF << 52)
    step = chunk_len(flat)
    if src is flat and min_normal < t < inf:
        # hardshrink(x, l) zeroes |x| <= l branch-free, in one pass; with l = the float just
        # below t it zeroes |x| < t. NaN compares false, so it is kept (it counts as largest).
        tf = torch.tensor(t, dtype=itype).view(dt)
        below = float(torch.nextafter(tf, torch.zeros_like(tf)))
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            if lo < c:
                part = flat[lo:min(hi, c)]
                torch.hardshrink(part, below, out=part)
            if hi > c:
                part = flat[max(lo, c):hi]
                torch.hardshrink(part, float(tf), out=part)
        return
    # a zero, subnormal, infinite or NaN threshold, or a half dtype: compare the bit patterns of
    # |x| (exact whatever the denormal mode; NaN patterns sit above +inf), chunk by chunk
    keep_band_at_(flat, 0, None, (t, c), src.view(itype))


def cut(src: torch.Tensor, k: int) -> tuple[int, int]:
    """The top-k set of ``src`` as (t, c): entry i is in it iff |x_i| > t, or |x_i| == t and i < c
    (bit patterns, sign cleared). 1 <= k <= numel."""
    t, m, n_eq, c = threshold(src, k)
    return t, (src.numel() if m == n_eq else c)


def _in_top(mag: torch.Tensor, lo: int, top: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    t, c = top
    s = min(max(c - lo, 0), mag.numel())
    torch.ge(mag[:s], t, out=out[:s])
    torch.gt(mag[s:], t, out=out[s:])
    return out


def keep_band_at_(flat: torch.Tensor, offset: int, lower: tuple[int, int] | None,
                  upper: tuple[int, int] | None, bits: torch.Tensor | None = None) -> None:
    """Zero, in place, the entries of ``flat`` (contiguous 1-D float32/float64, entries
    ``offset``.. of a larger tensor whose cuts these are) that are in the top set ``lower`` or
    outside the top set ``upper`` (None: no such bound): ranks lo..hi-1 when the cuts are the
    tensor's top-lo and top-hi (:func:`cut`). ``bits``: the integer view whose magnitudes are
    compared (default ``flat``'s own). Elementwise given the cuts, so any split of the tensor into
    pieces gives the same result (the bounded-memory path of :mod:`..gta_rows`)."""
    n = flat.numel()
    if bits is None:
        bits = flat.view(INT_OF[flat.element_size()])
    itype = bits.dtype
    step = chunk_len(flat)
    buf = torch.empty(min(step, n), dtype=itype, device=flat.device)
    keep = torch.empty(min(step, n), dtype=torch.bool, device=flat.device)
    drop = torch.empty_like(keep)
    for a in range(0, n, step):
        b = min(a + step, n)
        mag = torch.bitwise_and(bits[a:b], torch.iinfo(itype).max, out=buf[:b - a])
        if lower is not None:
            d = _in_top(mag, offset + a, lower, drop[:b - a])
            if upper is not None:
                d.logical_or_(_in_top(mag, offset + a, upper, keep[:b - a]).logical_not_())
        else:
            d = _in_top(mag, offset + a, upper, drop[:b - a]).logical_not_()
        flat[a:b].masked_fill_(d, 0)


def keep_rank_band_(flat: torch.Tensor, lo: int, hi: int) -> None:
    """Zero, in place, all but the entries of ranks lo..hi-1 (0-based) in :func:`keep_top_k_`'s
    order (decreasing magnitude, equal magnitudes by increasing index): the top hi minus the top
    lo. 0 <= lo < hi <= numel; contiguous 1-D, dtype in ``RADIX_DTYPES``."""
    n = flat.numel()
    if lo == 0:
        if hi < n:
            keep_top_k_(flat, hi)
        return
    src = flat if flat.dtype in (torch.float32, torch.float64) else flat.abs().float()
    upper = cut(src, hi) if hi < n else None
    lower = cut(src, lo)
    keep_band_at_(flat, 0, lower, upper, src.view(INT_OF[src.element_size()]))
