"""Generalized task arithmetic on a large tensor in bounded memory: two passes over row blocks
instead of every model's task vector at once.

Spec: ../shared/specs/mergekit_compat.md M15 (the method, :mod:`.gta`); issue 17 (peak RSS of
``ties`` <= 15 % of mergekit's). The in-memory path (:func:`.gta.merge`) holds the n task vectors
of a tensor in the compute dtype together (TinyLlama's 32000 x 2048 embeddings and head: 3 x 262
MB of float32, plus the base). Only two of its steps look at the whole tensor: each model's trim
(the k-th largest magnitude t, with equal magnitudes ordered by flat index: the cut (t, c) of
:func:`.kernels.topk.radix_threshold`, keep |x| > t and |x| == t before flat index c) and the L1
norms of the rescale. Given those, every other step is elementwise:

* pass 1, one model at a time (one task vector in memory, filled block by block): model i's cut -
  :func:`.prepare.ties_cut` for ties (the threshold `merge sweep` caches), :func:`.kernels.topk.cut`
  for breadcrumbs' band (top hi minus top lo) - and, when rescaling, |tau_i|_1 and |tau~_i|_1 (the
  trim applied to that copy), hence s_i = :func:`.sparsify.rescale_factor`. DARE and DELLA read
  nothing here unless they rescale (then they drop with model i's generator, re-seeded for pass 2);
* pass 2 walks blocks of whole rows: each model's task-vector rows are read again, trimmed by its
  cut at their flat offset (:func:`.kernels.topk.keep_top_at_`, ``keep_band_at_``) or dropped
  with the next draws of its generator (flat order, as :func:`.kernels.dare_drop.random_drop_` and
  :func:`.sparsify.della_` draw), scaled by s_i then
  w_i (:func:`.gta._scale_`), combined by the same sign election or sum (:func:`.gta._mix`), and
  the base rows added into the output.

Every entry sees the in-memory path's operations on the same values in the same order, so the
result is bit-identical (tests/test_gta_rows.py). Peak: one task vector in pass 1, then the
output in pass 2 (allocated after pass 1's buffer is freed), plus a block per model: for 3 models
of a 262 MB float32 tensor ~0.3 GB instead of ~1.2 GB (3 task vectors, the base, the result).

Used (:func:`applies`) for ties (``trim_rule: topk``), dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della and della_linear (tensors of 2+ dims: DELLA ranks along dim 1 within each
row, so blocks of whole dim-0 rows see their own ranks, and its draws run in flat order) when the task vectors would take ``n_models x numel x itemsize >=
STREAM_MIN_BYTES`` (128 MiB) together, in float32/float64, on tensors the radix kernel handles;
the executor also needs row reads of every input (:func:`mergekit_ortho.row_merge.by_rows`
decides, :func:`mergekit_ortho.inputs.row_inputs` reads).
Pass 2 reads each input a second time (pass 1 a third for the base): 2-3x the reads of those few
tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import buffers
from . import gta, prepare
from . import sparsify as sp
from .kernels import _chunks, dare_drop, topk
from .kernels._chunks import INT_OF
from .registry import TensorTask, generator

# task vectors of one tensor at least this large together: two passes. 128 MiB takes TinyLlama's
# MLP matrices (3 x 46 MB): 1.1B ties peaks at 0.84 GiB instead of 1.2-1.3 GiB (two lanes of
# in-memory items) for ~10 % more time on those tensors (session 31)
STREAM_MIN_BYTES = 128 << 20
BLOCK = 1 << 21  # entries of one model's rows per block (8 MiB of float32)
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


def applies(variant: str, task: TensorTask, shape, dtype) -> bool:
    """Whether method ``variant`` (a :data:`.gta.VARIANTS` name) on a tensor of ``shape`` in the
    compute ``dtype`` with ``task``'s parameters takes the two-pass path."""
    v = gta.VARIANTS.get(variant)
    numel = math.prod(shape)
    if v is None or v.sparsifier not in SPARSIFIERS or len(shape) == 0 or numel == 0:
        return False
    if dtype not in (torch.float32, torch.float64) or numel < topk.RADIX_MIN_NUMEL:
        return False
    if v.sparsifier == "magnitude" and task.params.trim_rule != "topk":
        return False
    if v.sparsifier == "della_magprune" and len(shape) < 2:  # one row: its ranks span the whole tensor
        return False
    return len(task.model_params) * numel * dtype.itemsize >= STREAM_MIN_BYTES


@dataclass
class _Trim:
    """Model i's sparsification as found in pass 1: ``zero`` (nothing kept), ``random`` (DARE
    drop at ``density``), ``della`` (MAGPRUNE at ``density`` +/- ``epsilon``: ranks within each
    row along dim 1, so a block of whole dim-0 rows is sparsified as in the whole tensor), else keep the band between the cuts ``lower`` (exclusive; None: from
    the top) and ``upper`` (None: to the bottom); then times ``scale`` (the L1 ratio) and w_i."""

    zero: bool = False
    random: bool = False
    della: bool = False
    density: float = 1.0
    epsilon: float = 0.0
    lower: tuple[int, int] | None = None
    upper: tuple[int, int] | None = None
    scale: float = 1.0
    # a top-k cut whose index is found in pass 2 (blocks in flat order, one thread): keep |x| > t
    # and the first ``equal_left`` entries with |x| == t (:func:`_streamed_cut` without its count)
    t: int | None = None
    equal_left: int = 0

    def apply_(self, x: torch.Tensor, offset: int, gen, draws: torch.Tensor | None, rest=()) -> None:
        """Sparsify ``x`` (1-D contiguous, flat entries ``offset``.. of the tensor, whole rows of
        shape ``rest``) in place."""
        if self.zero:
            x.zero_()
        elif self.della:
            sp.della_(x.view(-1, *rest), self.density, self.epsilon, gen)
        elif self.random:
            u = torch.rand(x.shape, generator=gen, dtype=torch.float32, device=x.device, out=draws[:x.numel()])
            dare_drop.keep_below_(x, u, self.density)
        elif self.t is not None:  # ties, the cut's index found here: the blocks come in flat order
            itype = INT_OF[x.element_size()]
            hit = np.flatnonzero((x.view(itype).numpy() & torch.iinfo(itype).max) == self.t)
            if self.equal_left >= hit.size:
                c, self.equal_left = offset + x.numel(), self.equal_left - hit.size
            else:
                c = offset + (int(hit[self.equal_left - 1]) + 1 if self.equal_left else 0)
                self.equal_left = 0
            topk.keep_top_at_(x, offset, self.t, c)
        elif self.lower is None and self.upper is not None:  # ties: the radix kernel's own pass
            topk.keep_top_at_(x, offset, *self.upper)
        elif self.lower is not None:
            topk.keep_band_at_(x, offset, self.lower, self.upper)


def _gen(task: TensorTask, i: int):
    return generator(task.params.seed, f"{task.name}\x00{i}")


def _find_trim(task: TensorTask, v: gta.Variant, i: int, x: torch.Tensor, shape) -> _Trim:
    """Model i's trim from its whole task vector x (1-D, owned: overwritten when rescaling) of
    the tensor's ``shape``."""
    mp = task.model_params[i]
    d = mp.density
    rescale = task.params.rescale
    before = sp.l1_norm(x) if rescale else 0.0
    n = x.numel()
    if v.sparsifier == "random":
        trim = _Trim(random=True, density=d)
        if rescale:
            sp.random_(x, d, _gen(task, i))
    elif v.sparsifier == "della_magprune":
        trim = _Trim(della=True, density=d, epsilon=mp.epsilon)
        if rescale:
            trim.apply_(x, 0, _gen(task, i), None, shape[1:])
    else:
        if v.sparsifier == "magnitude":
            lo, hi = 0, (max(int(d * n), 1) if d > 0.0 else 0)
        else:  # magnitude_outliers (sparsify.outliers_)
            n_keep, n_top = int(d * n), int(mp.gamma * n)
            n_top = min(n_top, n - n_keep)
            lo, hi = n_top, n_top + n_keep
        if hi <= lo:
            trim = _Trim(zero=True)
        elif v.sparsifier == "magnitude":
            found = prepare.ties_cut(x, i, task).get("cut")
            trim = _Trim(upper=None if found is None else (int(found[0]), int(found[1])))  # None: k >= n
        else:
            trim = _Trim(lower=topk.cut(x, lo) if lo > 0 else None, upper=topk.cut(x, hi) if hi < n else None)
        if rescale:
            trim.apply_(x, 0, None, None)
    if rescale:
        trim.scale = sp.rescale_factor(before, sp.l1_norm(x))
    return trim


def _streams_cut(task: TensorTask, v: gta.Variant, i: int) -> bool:
    """Whether model i's trim is a plain top-k cut found from its magnitudes alone (ties without
    rescale): pass 1 then streams them (:func:`_streamed_cut`) instead of holding the task vector."""
    return v.sparsifier == "magnitude" and not task.params.rescale and 0.0 < task.model_params[i].density < 1.0


def _streamed_cut(rows, i: int, blocks, row_len: int, numel: int, k: int, dtype, split: bool, count_now: bool = True):
    """Model i's trim: the top-k cut (t, c) that :func:`.prepare.ties_cut` finds from the whole
    task vector, holding only its magnitudes: each block of rows is read into its part of one
    integer buffer and its sign cleared there, the buffer is partitioned in place
    (:func:`.kernels.topk.select_`), and (``count_now``) the entries equal to t are counted in
    index order by reading the rows again, block by block (the select has scrambled the buffer),
    which gives c. Without ``count_now`` the trim keeps t and how many equal entries to keep, and
    pass 2, walking the blocks in flat order on one thread, cuts at the same index. Holds one
    tensor's worth of integers, where :func:`.prepare.ties_cut` would need the task vector and a
    copy of its magnitudes."""
    itype = INT_OF[dtype.itemsize]
    sign_clear = torch.iinfo(itype).max
    mag = buffers.empty((numel,), itype)  # pooled: pass 2's output then takes the same pages

    def fill(b0: int, b1: int) -> None:
        for r0, r1 in blocks[b0:b1]:
            part = mag[r0 * row_len:r1 * row_len]
            rows(i, r0, r1, part.view(dtype))
            np.bitwise_and(part.numpy(), sign_clear, out=part.numpy())
    _over_blocks(fill, len(blocks), split)
    t, above = topk.select_(mag, k)
    del mag
    m = k - above
    if not count_now:  # pass 2 finds the index, block by block in flat order
        return _Trim(t=t, equal_left=m)
    per = blocks[0][1] - blocks[0][0]

    def read(r0: int, r1: int, x: torch.Tensor) -> torch.Tensor:
        x = x[:(r1 - r0) * row_len]
        rows(i, r0, r1, x)
        return x.view(itype)

    def count(b0: int, b1: int) -> list[int]:
        x = buffers.empty((per * row_len,), dtype)
        return [topk.count_equal(read(r0, r1, x), t) for r0, r1 in blocks[b0:b1]]
    counts = [c for part in _over_blocks(count, len(blocks), split) for c in part]
    if m == sum(counts):
        return _Trim(upper=(t, numel))
    seen = 0
    for (r0, r1), cnt in zip(blocks, counts):
        if seen + cnt >= m:  # the block holding the m-th entry equal to t: read once more
            x = read(r0, r1, torch.empty((r1 - r0) * row_len, dtype=dtype))
            hit = np.flatnonzero((x.numpy() & sign_clear) == t)
            return _Trim(upper=(t, r0 * row_len + int(hit[m - seen - 1]) + 1))
        seen += cnt
    raise AssertionError("unreachable")  # pragma: no cover


def _over_blocks(fn, n_blocks: int, split: bool) -> list:
    """``fn(b0, b1)`` over contiguous ranges of block indices covering [0, n_blocks): split over the
    kernel workers (torch on one thread in each) when ``split`` (the blocks are independent), else
    one range on this thread. Results in range order."""
    return _chunks.over_ranges(fn, n_blocks, 1) if split else [fn(0, n_blocks)]


def merge_rows(task: TensorTask, variant: str, shape, rows: Callable[[int, int, int], torch.Tensor],
               base_rows: Callable[[int, int], torch.Tensor] | None, dtype) -> torch.Tensor:
    """The merged tensor of ``shape`` (``dtype``): the in-memory path's merged delta plus the base.

    ``rows(i, r0, r1, out)``: model i's task vector rows r0..r1 (along dim 0) in ``dtype``,
    written into ``out`` (1-D, their size); ``base_rows(r0, r1)``: the base's rows in ``dtype`` (None: the
    delta alone); both callable from several threads at once. :func:`applies` holds. The blocks
    of a pass are split over the kernel workers (:func:`._chunks.workers`: all of them when the
    executor runs this tensor alone) wherever they are independent: every pass but DARE's and
    DELLA's draws, which follow one generator in flat order."""
    v = gta.VARIANTS[variant]
    gta._check(task, v)  # della's density +/- epsilon, before anything is read
    n_models = len(task.model_params)
    R = shape[0]
    row_len = math.prod(shape[1:])
    numel = R * row_len
    per = max(1, BLOCK // max(row_len, 1))
    blocks = [(r0, min(R, r0 + per)) for r0 in range(0, R, per)]

    split = _chunks.workers() > 1  # several kernel workers: the executor runs this tensor alone
    # pass 1: one task vector at a time
    trims: list[_Trim] = []
    buf = None
    for i, mp in enumerate(task.model_params):
        if mp.density >= 1.0:  # every sparsifier leaves tau as it is (gta._sparsify_one)
            trims.append(_Trim())
            continue
        if v.sparsifier in gta.RANDOM and not task.params.rescale:  # nothing to find: the draws come in pass 2
            trims.append(_Trim(random=v.sparsifier == "random", della=v.sparsifier != "random",
                               density=mp.density, epsilon=mp.epsilon if v.sparsifier != "random" else 0.0))
            continue
        if _streams_cut(task, v, i):
            k = max(int(mp.density * numel), 1)  # magnitude_'s count, as prepare.ties_cut
            # one thread: pass 2 walks the blocks in order and finds the cut's index on the way,
            # so the rows are not read a second time here to count the entries equal to t
            trims.append(_Trim() if k >= numel else
                         _streamed_cut(rows, i, blocks, row_len, numel, k, dtype, split, count_now=split))
            continue
        if buf is None:
            buf = buffers.empty((numel,), dtype)

        def fill(b0: int, b1: int, i=i) -> None:
            for r0, r1 in blocks[b0:b1]:
                rows(i, r0, r1, buf[r0 * row_len:r1 * row_len])
        _over_blocks(fill, len(blocks), split)
        trims.append(_find_trim(task, v, i, buf, shape))
    del buf

    # pass 2: row blocks of every model at once
    drawn = any(t.random or t.della for t in trims)
    weights = [mp.weight for mp in task.model_params]
    out = buffers.empty(shape, dtype)  # pass 1's buffer, free again: its pages are already faulted in
    flat = out.view(-1)

    def merge_blocks(b0: int, b1: int) -> None:
        gens = [_gen(task, i) if t.random or t.della else None for i, t in enumerate(trims)]
        # pooled: buffers freed by threads of the kernel pool would otherwise linger in their malloc arenas
        draws = buffers.empty((per * row_len,), torch.float32) if any(t.random for t in trims) else None
        blk = [buffers.empty((per * row_len,), dtype) for _ in range(n_models)]
        for r0, r1 in blocks[b0:b1]:
            g0, g1 = r0 * row_len, r1 * row_len
            parts = []
            for i in range(n_models):
                x = blk[i][:g1 - g0]
                rows(i, r0, r1, x)
                trims[i].apply_(x, g0, gens[i], draws, shape[1:])
                gta._scale_(x, trims[i].scale, weights[i])
                parts.append(x)
            mixed = gta._mix(task, parts, v.consensus)
            if base_rows is None:
                flat[g0:g1].copy_(mixed)
            else:
                torch.add(mixed, base_rows(r0, r1).reshape(-1), out=flat[g0:g1])
            del parts, mixed
    # draws: one generator per model, in flat order; deferred cuts: their index in flat order
    _over_blocks(merge_blocks, len(blocks), split and not drawn and all(t.t is None for t in trims))
    return out
