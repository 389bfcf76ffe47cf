"""`merge run` for a fold with a ``reduce`` (OPCM): every model folded per tensor in one pass.

Such a fold's model t depends on the running state of models 1..t-1 of the same tensor only
(``step``), plus global scalars per model over all tensors (``reduce``), which the result is
scaled by at the end (``finish``). So one pass over the tensors folds all T models of each tensor
and records each model's statistics per tensor; the running sums S_T are spilled once (float32,
inside the output's temporary directory, so a crash leaves nothing behind); the statistics are
summed in the spill order and the scalars reduced model by model; a second pass writes
base + finish(S_T). Memory: the base, one model's tensor and S of one tensor at a time. The
numbers equal `continual init` + one `add` per model + `export`: the same folds in the same tensor
order, the same float32 state.

The three steps are separate functions (``fold_items`` → ``reduce_scalars`` → ``export_items``)
so that a sharded run (:mod:`.schedule`) maps the fold over units, reduces in `merge finalize`
in the serial order, and maps the export: map → reduce → map, bit-identical to one process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable


def spill_shards(plan, names: list[str]):
    """The float32 layout the running sums of ``names`` are spilled in (as `continual add` writes a
    state), whose order is the order statistics are summed in."""
    from .writer import OutTensor, plan_shards

    return plan_shards([OutTensor(n, tuple(plan.items[n].shape), "float32") for n in names], 2 * 10**9)


def merged_names(plan) -> list[str]:
    return [i.name for i in plan.items.values() if i.action == "merge"]


def fold_items(plan, names: list[str], sink, *, on_tensor=None) -> dict[str, list[dict[str, float]]]:
    """Fold every model into each tensor of ``names`` (in ``sink``'s order), ``put`` S_T into
    ``sink``; returns each tensor's statistics per model (floats)."""
    import torch

    from .execute import Work, execute, in_order
    from .inputs import dense_task, model_tensor, stored

    fold = plan.op.fold
    f32 = torch.float32
    per_tensor: dict[str, list[dict[str, float]]] = {}

    def fold_all(name: str):
        shape = plan.items[name].shape
        (bm, bn), sources = plan.sources_of(name)
        base = stored(bm, bn, plan.load_dtype).to(f32)
        task = dense_task(plan, name, base)
        task.dtype = f32
        state = fold.start(task)
        got = []
        for i, (m, n) in enumerate(sources):
            x = model_tensor(m, n, shape, base, plan.op.reads, f32, load_dtype=plan.load_dtype)
            state, st = fold.step(state, x, i, task)
            del x
            got.append({k: float(v) for k, v in st.items()})
        per_tensor[name] = got
        return state, None

    n = len(plan.models) + 3
    work = {nm: Work(nm, plan.items[nm].read_bytes, plan.items[nm].numel * 4 * n) for nm in names}
    execute(in_order(sink, work), fold_all, sink, peak_bytes=plan.peak_bytes, check_finite=False, on_item=on_tensor)
    return per_tensor


def reduce_scalars(plan, per_tensor: dict[str, list[dict[str, float]]]) -> dict:
    """Each model's statistics summed over every merged tensor in the spill order, then reduced
    model by model into the global scalars."""
    order = [t.name for s in spill_shards(plan, merged_names(plan)) for t in s]
    stats: list[dict[str, float]] = [{} for _ in plan.models]
    for name in order:
        for acc, st in zip(stats, per_tensor[name]):
            for k, v in st.items():
                acc[k] = acc.get(k, 0.0) + v
    scalars: dict = {}
    for t in range(1, len(plan.models) + 1):
        scalars = plan.op.fold.reduce(stats[t - 1], scalars, t, plan.params)
    return scalars


def card_note(plan, scalars: dict) -> str:
    return f"{len(plan.models)} model(s) folded in order; scalars: {json.dumps(scalars)}"


def export_items(plan, sink, sums, scalars: dict, *, on_tensor=None) -> None:
    """base + finish(S_T) for merged items (``sums.get(name)``), copies as stored, into ``sink``."""
    import torch

    from .execute import execute, full_work, in_order
    from .inputs import dense_task, stored

    fold = plan.op.fold
    f32 = torch.float32
    reference = plan.base

    def export(name: str):
        if plan.items[name].action == "copy":
            return reference.source.get(name), None
        (bm, bn), _ = plan.sources_of(name)
        b = stored(bm, bn, plan.load_dtype).to(f32)
        task = dense_task(plan, name, b)
        task.scalars = scalars
        return b + fold.finish(sums.get(name).to(f32), task), None

    execute(in_order(sink, full_work(plan, merged_read=False)), export, sink, peak_bytes=plan.peak_bytes,
            on_item=on_tensor, inputs_hint=", ".join(m.ref for m in plan.models))


def run_sequential(plan, out: Path, *, on_tensor: Callable[[str, int], None] | None = None,
                   overwrite: bool = False, inputs=(), force_replace: bool = False) -> Path:
    from . import sinks
    from .execute import full_sink
    from .sources.checkpoint import CheckpointSource

    names = merged_names(plan)
    sink = full_sink(plan, out, card_extra="", overwrite=overwrite, inputs=inputs, force_replace=force_replace)
    with sink:
        spill = sinks.StateVersion(sink.tmp, "sequential-sum", spill_shards(plan, names), {"format": "pt"})
        with spill:
            per_tensor = fold_items(plan, names, spill, on_tensor=on_tensor)
            spill.finish()
            spill_dir = spill.commit()
        scalars = reduce_scalars(plan, per_tensor)
        sink.card.extra = card_note(plan, scalars)
        sums = CheckpointSource(str(spill_dir), "sequential sum")
        try:
            export_items(plan, sink, sums, scalars, on_tensor=on_tensor)
        finally:
            sums.close()
        shutil.rmtree(spill_dir)
        return sink.commit()
