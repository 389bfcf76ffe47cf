"""What one `merge sweep` reuses across its grid points (issue 18): every input hashed once per
sweep, the prepared parts read from the cache *without reading the inputs again*, and the methods
whose reusable part is not a whole prepared merge (WIDEN's statistics, OPCM's projection SVDs).

Input digests, once per sweep. The cache key of a tensor's prepared part holds a digest of every
input tensor as the operator receives it (:func:`.cache.task_key`). The first time a sweep meets
a tensor it reads and hashes its inputs (as before) and remembers the digests under the tensor's
*derivation* (:func:`dense_sig` / :func:`lora_sig`: the tensor's sources, base, compute and load
dtypes, output format, vocabulary alignment, the LoRA truncation rank: everything but the files'
bytes that decides what the operator receives; method parameters other than the truncation rank
never do). A later point with the same derivation takes the digests from :class:`InputMemo`, so
its key is known before anything is read: on a hit only the base (for a task-vector method) and
the cache entry are read. That is correct only while the files do not change, which
:class:`FileGuard` checks: it records size, mtime, ctime and inode of every input file before the
first point and compares before every point and once after the last; any change stops the sweep
with one line and no output. Between sweeps nothing is remembered: a new sweep hashes the inputs
again, so a changed checkpoint changes the keys and misses the cache.

WIDEN (:func:`widen_fold`): pass 1's statistics (:func:`.ops.widen.stats_tensors`) depend on the
inputs, the base, the compute dtype, the stored-vs-converted input mode and the unit rule, not on
``threshold`` / ``calibration`` / ``temperature``. On a miss the gather hashes each input as it
streams by and stores the statistics under those digests; on a hit pass 1 is skipped (pass 2
still reads every model once).

OPCM (:func:`opcm_svd`): the SVD of the merged update S_{t-1} that P_t projects against, keyed by
the content of S_{t-1} itself (it is in memory when the SVD is due). S_1 = tau_1 is the same for
every ``alpha`` / ``zero_diagonal`` / ``robust``, so step 2's SVDs are always reused; later steps'
when an earlier point reached the same merged update.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cache import FORMAT, Cache, _hash, tensors_digest


class FileGuard:
    """Size, mtime, ctime and inode of every file under the given paths; :meth:`check` raises a
    UserError when any of them changed, appeared or vanished."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self.seen = self._scan()

    def _scan(self) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for p in self.paths:
            files = [p] if not p.is_dir() else [Path(d) / f for d, _, fs in os.walk(p) for f in fs]
            for f in files:
                try:
                    st = f.stat()
                except OSError:
                    out[str(f)] = ("missing",)
                    continue
                out[str(f)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        return out

    def check(self) -> None:
        now = self._scan()
        if now != self.seen:
            changed = sorted(k for k in set(now) | set(self.seen) if now.get(k) != self.seen.get(k))
            raise UserError(f"input {changed[0]} changed during the sweep (cached keys would no longer match "
                            "its contents); no output was written; rerun once the inputs are stable")


class InputMemo:
    """{derivation signature: the input digests} for one sweep (see the module docstring)."""

    def __init__(self) -> None:
        self._d: dict[str, list[str]] = {}
        self.hashed = 0  # tensors hashed (each input of each derivation once per sweep)

    def get(self, sig: str) -> list[str] | None:
        got = self._d.get(sig)
        return list(got) if got is not None else None

    def put(self, sig: str, digests: list[str]) -> None:
        self._d[sig] = list(digests)


def _sig(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=repr)


def dense_sig(plan, name: str) -> str:
    """What decides the inputs a dense operator receives for tensor ``name`` (bytes aside)."""
    from ..planning import VOCABULARY_TENSORS

    op = plan.op
    base_source, sources = plan.sources_of(name)
    return _sig({
        "kind": "dense", "name": name, "out": plan.out_format, "cdt": plan.compute_dtype,
        "load": str(plan.load_dtype), "device": str(plan.device), "reads": op.reads,
        "reads_base": bool(op.reads_base), "raw": bool(op.fold is not None and op.fold.raw_weights
                                                      and not plan.lora_models),
        "vocab": plan.vocab is not None and name in VOCABULARY_TENSORS,
        "base": None if base_source is None else [base_source[0].label, base_source[1]],
        "sources": [[m.label, n] for m, n in sources],
    })


def lora_sig(plan, task) -> str:
    """The same for a low-rank operator's task (its factors: scale folded, or truncated by SVD)."""
    op = plan.op
    rank = task.params[op.dense_rank_param] if op.dense_rank_param else None
    return _sig({"kind": "lora", "name": task.name, "out": plan.out_format, "svd_rank": task.svd_rank,
                 "rank": rank, "output_rank": plan.recipe.output.rank, "models": list(task.model_index),
                 "labels": list(task.model_names)})


def digests_of(memo: InputMemo, sig: str, tensors: list) -> list[str]:
    got = memo.get(sig)
    if got is None or len(got) != len(tensors):
        got = [tensors_digest([t]) for t in tensors]
        memo.hashed += len(tensors)
        memo.put(sig, got)
    return got


# -- the hit path of a prepared method (no input read) ----------------------------------------------


def dense_hit(plan, name: str, prep, cache: Cache, memo: InputMemo, tally: dict):
    """Tensor ``name`` of a full-model output from its cached prepared part, reading only the
    base (task-vector methods); None when it must be merged (unknown digests, a miss, a
    vocabulary-aligned tensor). The same steps as ``execute.merge_tensor`` around ``op.fn``."""
    import torch

    from ..inputs import base_tensor, dense_task
    from ..ops.kernels.convert import add_converted_
    from ..planning import VOCABULARY_TENSORS
    from .cache import task_key

    op = plan.op
    if plan.items[name].action != "merge" or (plan.vocab is not None and name in VOCABULARY_TENSORS) \
            or op.fold is not None:
        return None
    digests = memo.get(dense_sig(plan, name))
    if digests is None:
        return None
    cdt = getattr(torch, plan.compute_dtype)
    task = dense_task(plan, name, None)
    task.dtype, task.raw_inputs = cdt, False
    got = cache.get(task_key(op.name, task, prep.skips, digests), plan.device)
    if got is None:
        return None
    tally["hits"] += 1
    base_source, _ = plan.sources_of(name)
    use_base = base_source is not None and (op.reads_base or bool(plan.lora_models))
    base = base_tensor(plan, base_source, cdt) if use_base else None
    task.base = base
    out = prep.apply(task, got)
    return add_converted_(out, base) if op.reads == "deltas" else out


# -- WIDEN: pass 1's statistics ---------------------------------------------------------------------


def _widen_meta(plan, name: str, sig: str) -> dict:
    from .. import __version__

    p = plan.params_for(name).method
    return {"format": FORMAT, "tool": __version__, "part": "widen-stats", "name": name,
            "embedding_pattern": p["embedding_pattern"], "transpose_pattern": p["transpose_pattern"],
            "n_models": len(plan.params_for(name).models), "sig": sig}


def widen_fold(plan, name: str, cache: Cache, memo: InputMemo, tally: dict):
    """The fold WIDEN runs tensor ``name`` with: pass 1 replaced by the cached statistics (a
    hit), or pass 1 hashing its inputs and storing its result (a miss)."""
    from ..ops import widen

    fold = plan.op.fold
    sig = dense_sig(plan, name)
    meta = _widen_meta(plan, name, sig)
    digests = memo.get(sig)
    key = _hash(meta, digests) if digests is not None else None
    got = cache.get(key, plan.device) if key is not None else None
    if got is not None:
        tally["hits"] += 1
        stats = widen.stats_from_tensors(got)

        def start(task):
            task.stats = stats
            return fold.start(task)

        return dataclasses.replace(fold, gather=None, start=start)
    tally["misses"] += 1
    seen: list[str] = []

    def gather(stats, x, i, task):
        if digests is None:
            if i == 0:
                seen.append("no-base" if task.base is None else tensors_digest([task.base]))
            seen.append(tensors_digest([x]))
        stats = fold.gather(stats, x, i, task)
        if i == len(task.model_params) - 1:
            final = digests
            if final is None:
                memo.hashed += len(seen)
                memo.put(sig, seen)
                final = seen
            cache.put(_hash(meta, final), widen.stats_tensors(stats))
        return stats

    return dataclasses.replace(fold, gather=gather)


# -- OPCM: the projections' SVDs --------------------------------------------------------------------


def opcm_svd(cache: Cache, tally: dict):
    """A thin SVD cached by the content of its matrix (see the module docstring)."""
    from .. import __version__
    from ..ops.opcm import thin_svd

    meta = {"format": FORMAT, "tool": __version__, "part": "opcm-svd"}

    def svd(A):
        key = _hash(meta, [tensors_digest([A])])
        got = cache.get(key, A.device)
        if got is not None:
            tally["hits"] += 1
            return got["U"], got["s"], got["Vh"]
        tally["misses"] += 1
        U, s, Vh = thin_svd(A)
        cache.put(key, {"U": U, "s": s, "Vh": Vh})
        return U, s, Vh

    return svd
