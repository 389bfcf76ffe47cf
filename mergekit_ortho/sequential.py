"""`merge run` for a fold with a ``reduce`` (OPCM): every model folded per tensor in one pass.

Such a fold's model t depends on the running state of models 1..t-1 of the same tensor only
(``step``), plus global scalars per model over all tensors (``reduce``), which the result is
scaled by at the end (``finish``). So one pass over the tensors folds all T models of each tensor
and sums each model's statistics; the running sums S_T are spilled once (float32, inside the
output's temporary directory, so a crash leaves nothing behind); the scalars are reduced model by
model; a second pass writes base + finish(S_T). Memory: the base, one model's tensor and S of one
tensor at a time. The numbers equal `continual init` + one `add` per model + `export`: the same
folds in the same tensor order, the same float32 state.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable


def run_sequential(plan, out: Path, *, on_tensor: Callable[[str, int], None] | None = None,
                   overwrite: bool = False, inputs=(), force_replace: bool = False) -> Path:
    import torch

    from . import sinks
    from .execute import Work, execute, full_sink, full_work, in_order
    from .inputs import dense_task, model_tensor, stored
    from .sources.checkpoint import CheckpointSource
    from .writer import OutTensor, plan_shards

    fold = plan.op.fold
    f32 = torch.float32
    merged = [i for i in plan.items.values() if i.action == "merge"]
    # the state's own layout (as `continual add` writes it), so statistics sum in its order
    spill_shards = plan_shards([OutTensor(i.name, tuple(i.shape), "float32") for i in merged], 2 * 10**9)
    stats: list[dict[str, float]] = [{} for _ in plan.models]

    def fold_all(name: str):
        shape = plan.items[name].shape
        (bm, bn), sources = plan.sources_of(name)
        base = stored(bm, bn, plan.load_dtype).to(f32)
        task = dense_task(plan, name, base)
        task.dtype = f32
        state = fold.start(task)
        for i, (m, n) in enumerate(sources):
            x = model_tensor(m, n, shape, base, plan.op.reads, f32, load_dtype=plan.load_dtype)
            state, st = fold.step(state, x, i, task)
            del x
            acc = stats[i]
            for k, v in st.items():
                acc[k] = acc.get(k, 0.0) + float(v)
        return state, None

    sink = full_sink(plan, out, card_extra="", overwrite=overwrite, inputs=inputs, force_replace=force_replace)
    with sink:
        spill = sinks.StateVersion(sink.tmp, "sequential-sum", spill_shards, {"format": "pt"})
        n = len(plan.models) + 3
        work = {i.name: Work(i.name, i.read_bytes, i.numel * 4 * n) for i in merged}
        with spill:
            execute(in_order(spill, work), fold_all, spill, peak_bytes=plan.peak_bytes, check_finite=False,
                    on_item=on_tensor)
            spill.finish()
            spill_dir = spill.commit()
        scalars: dict = {}
        for t in range(1, len(plan.models) + 1):
            scalars = fold.reduce(stats[t - 1], scalars, t, plan.params)
        sink.card.extra = f"{len(plan.models)} model(s) folded in order; scalars: {json.dumps(scalars)}"
        sums = CheckpointSource(str(spill_dir), "sequential sum")
        reference = plan.base

        def export(name: str):
            if plan.items[name].action == "copy":
                return reference.source.get(name), None
            (bm, bn), _ = plan.sources_of(name)
            b = stored(bm, bn, plan.load_dtype).to(f32)
            task = dense_task(plan, name, b)
            task.scalars = scalars
            return b + fold.finish(sums.get(name).to(f32), task), None

        try:
            execute(in_order(sink, full_work(plan, merged_read=False)), export, sink, peak_bytes=plan.peak_bytes,
                    on_item=on_tensor, inputs_hint=", ".join(m.ref for m in plan.models))
        finally:
            sums.close()
        shutil.rmtree(spill_dir)
        return sink.commit()
