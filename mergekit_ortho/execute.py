"""The one execution loop: output items -> gather inputs -> operator -> check -> sink.

``execute`` walks output items in the sink's order; for each it calls ``compute(name)`` (which
gathers the item's inputs through :mod:`.inputs` and calls the operator), checks the merged value
is finite, and hands it to the sink, which casts and writes it; then everything is freed. Peak
memory is bounded by (inputs + a few) x the largest item, never by the model size. On the CPU a
full model's items may be computed several at a time (``lanes``), each on one thread: the same
loop, the same order into the sink, the same bits, the same estimated peak.

``run`` executes a plan into its output (full model, adapter, bundle, or a sequential method's
single pass). ``merge continual add/export`` and ``merge revert`` use the same loop with their own
``compute`` and sink.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UserError, memory_guard
from .ops import registry
from .ops.apply import apply_dense


class NonFinite(UserError):
    pass


@dataclass(frozen=True)
class Work:
    """One output item as the loop sees it: its name, the bytes it reads (progress), the memory
    one step may need (the out-of-memory message; the lanes' admission), and whether its value is
    merged (checked finite) or copied as stored."""

    name: str
    read_bytes: int = 0
    need_bytes: int = 0
    merged: bool = True


def execute(items: Iterable[Work], compute: Callable[[str], tuple[Any, dict | None]], sink, *,
            peak_bytes: int = 0, inputs_hint: str = "", check_finite: bool = True,
            on_item: Callable[[str, int], None] | None = None, lanes: int = 1) -> None:
    """Run every item through ``compute`` into ``sink`` (already entered; the caller commits).

    ``lanes`` > 1: that many items are computed at once, each on its own thread with torch on one
    thread (:func:`_lanes`); the sink still gets them one by one in order."""
    import gc

    from . import buffers

    # the plan, headers and imports are long-lived: keep the collector's full passes off them
    # (one walked them for ~0.1 s during a 1.1B linear run)
    gc.freeze()
    try:
        if lanes > 1:
            _lanes(list(items), compute, sink, peak_bytes, inputs_hint, check_finite, on_item, lanes)
            return
        for work in items:
            with memory_guard(work.name, work.need_bytes, peak_bytes):
                value, report = compute(work.name)
            if check_finite and work.merged:
                _check_finite(work.name, value, inputs_hint)
            sink.put(work.name, value, report)
            del value
            if on_item:
                on_item(work.name, work.read_bytes)
    finally:
        gc.unfreeze()
        buffers.release()  # a long-lived process (the merge server) does not keep the peak between jobs


def _lanes(items: list[Work], compute, sink, peak_bytes: int, inputs_hint: str, check_finite: bool, on_item,
           lanes: int) -> None:
    """The loop with up to ``lanes`` items computing at once and up to ``2 * lanes`` in flight
    (computed or computing, in the sink's order; a finished item waiting behind a slower one does
    not keep its lane idle).

    Why items, not threads inside each operator: most passes are a dozen short torch calls per
    cache-sized block, too short for torch's thread pool (its parallel regions cost more than they
    share, and stall on shared cores), so one item ran on one core while the other idled. Each lane
    runs torch on one thread, so an item's bits do not depend on ``--threads`` (reductions split
    over threads round by their count) and equal a ``--threads 1`` run. Memory: an item starts only
    while the estimated needs of the items computing, its own included, stay within the largest
    single item's (so the estimated peak is the serial loop's, plus the computed outputs waiting
    for the sink: a few tensors in the output dtype): small items overlap, the largest run alone."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from . import buffers
    from .ops.kernels import _chunks

    prepare = getattr(sink, "prepare", None)  # the sink's own conversion (a cast), done in the lane

    def one(work: Work, alone: bool):
        with _chunks.width(lanes if alone else 1):  # an item that runs alone splits its kernels
            value, report = compute(work.name)
        if check_finite and work.merged:
            _check_finite(work.name, value, inputs_hint)
        return (prepare(work.name, value) if prepare is not None else value), report

    limit = max((w.need_bytes for w in items), default=0)
    pending: deque = deque()  # (work, future), in the sink's order
    todo = iter(items)
    state = {"next": next(todo, None), "held": 0}  # held: estimated working bytes of the items not yet collected

    def fill() -> None:
        nxt = state["next"]
        # up to twice the lanes pending: a finished item waiting behind a slower one at the head
        # does not keep its lane idle (the pool runs at most ``lanes`` at once)
        while nxt is not None and len(pending) < 2 * lanes and (state["held"] == 0 or state["held"] + nxt.need_bytes <= limit):
            after = next(todo, None)
            # alone: nothing in flight and the item after it cannot join it, so it has the cores
            alone = state["held"] == 0 and (after is None or nxt.need_bytes + after.need_bytes > limit)
            if state.get("alone") and not alone:
                # the largest tensors (run alone, first) are done: their free buffers would serve
                # the smaller ones only in part, and hold their pages to the end
                buffers.release()
            state["alone"] = alone
            pending.append((nxt, pool.submit(one, nxt, alone)))
            state["held"] += nxt.need_bytes
            nxt = state["next"] = after

    with ThreadPoolExecutor(lanes, thread_name_prefix="lane", initializer=_one_torch_thread) as pool:
        try:
            fill()
            while pending:
                work, fut = pending.popleft()
                with memory_guard(work.name, work.need_bytes, peak_bytes):
                    value, report = fut.result()
                # computed: it holds its result now (the output's bytes, a fraction of its working
                # need), so the next items may start while the sink writes it
                state["held"] -= work.need_bytes
                fill()  # the lanes keep computing while the sink writes this one
                sink.put(work.name, value, report)
                del value, report, fut
                if on_item:
                    on_item(work.name, work.read_bytes)
                fill()
        except BaseException:
            for _, f in pending:
                f.cancel()
            raise


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # this thread's OpenMP/MKL setting only (the main thread keeps its own)


def lanes_for(plan) -> int:
    """How many items of a full-model ``plan`` may be computed at once: torch's thread count for a
    dense method on the CPU over safetensors inputs, else 1 (LoRA inputs and pickles keep caches
    that one thread at a time may use; a GPU runs one item's kernels on all of itself)."""
    import torch

    n = torch.get_num_threads()
    if n <= 1 or str(plan.device) != "cpu" or plan.op.input_kind == "lora" or plan.lora_models:
        return 1
    models = [plan.base, *plan.models] if plan.base is not None else list(plan.models)
    if any(getattr(m.source, "format", None) != "safetensors" for m in models):
        return 1
    return n


def _check_finite(name: str, value, inputs_hint: str) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        tensors = [value]
    elif isinstance(value, registry.LoraResult):
        tensors = [value.A, value.B, value.delta]
    elif isinstance(value, registry.BundleEntry):
        tensors = list(value.tensors.values())
    else:
        tensors = []
    for t in tensors:
        # one reduction first: a NaN/Inf anywhere makes the sum non-finite; only then look closer
        # (a finite tensor whose sum overflows passes the full check)
        if t is not None and t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            hint = f" ({inputs_hint})" if inputs_hint else ""
            raise NonFinite(f"merged tensor '{name}' contains NaN or Inf; check the inputs{hint} "
                            "and the method parameters")


def in_order(sink, work: dict[str, Work]) -> list[Work]:
    """The items in the order the sink writes them (a full model's shard order), else the plan's."""
    order = sink.order()
    return [work[n] for n in order] if order else list(work.values())


# --- the operator on one item ----------------------------------------------------------------------


def merge_tensor(plan, name: str):
    """A dense operator's merged tensor ``name`` (a weight, in the compute dtype, on the device)."""
    import torch

    from .dtypes import MERGEABLE
    from .inputs import base_tensor, dense_task, model_tensor
    from .planning import VOCABULARY_TENSORS
    from .row_merge import by_rows

    op = plan.op
    if op.input_kind == "lora":
        raise RuntimeError(f"LoRA method '{op.name}' reached the dense merge")
    item = plan.items[name]
    cdt = getattr(torch, plan.compute_dtype)
    # folds that prepare their inputs chunk by chunk get the weights, and the base, as stored
    raw = op.fold is not None and op.fold.raw_weights and not plan.lora_models
    base_source, sources = plan.sources_of(name)
    # a weights method (linear) on full checkpoints never reads the base, even when one is given
    use_base = base_source is not None and (op.reads_base or bool(plan.lora_models))
    if plan.vocab is not None and name in VOCABULARY_TENSORS:  # rows re-indexed to the output vocabulary
        from .inputs import aligned_inputs

        base, weights = aligned_inputs(plan, name, base_source if use_base else None, sources, cdt)
        task = dense_task(plan, name, base)
        task.dtype = cdt
        out = apply_dense(op, task, lambda: weights(op.reads == "deltas"))
        return out + base if op.reads == "deltas" else out
    rows = by_rows(plan, name)
    if rows is not None:  # a large tensor of the TIES family: two passes over row blocks
        from .inputs import row_inputs
        from .ops import gta_rows

        task, shape = rows
        return gta_rows.merge_rows(task, op.name, shape, *row_inputs(plan, base_source, sources, shape, cdt), cdt)
    base = base_tensor(plan, base_source, None if raw else cdt) if use_base else None
    task = dense_task(plan, name, base)
    task.dtype, task.raw_inputs = cdt, raw
    if op.reads == "weights" and plan.fp8_out is None and str(item.out_dtype) in MERGEABLE:
        task.out_dtype = getattr(torch, item.out_dtype)  # the result is the output as it is written
    out = apply_dense(op, task, lambda: (model_tensor(m, n, item.shape, base, op.reads, cdt, plan.device, raw,
                                                      plan.load_dtype) for m, n in sources))
    if op.reads == "deltas":
        from .ops.kernels.convert import add_converted_

        out = add_converted_(out, base)  # the base may still be as stored (bf16)
    return out


def module_result(plan, key: str) -> registry.LoraResult:
    """A method's merged low-rank result on one module: LoRA operators get the factors; dense
    operators their exact low-rank form when they have one, else the dense delta."""
    import torch

    from .inputs import dense_task, lora_task, model_tensor, svd_task

    from .inputs import approximations

    op = plan.op
    approx = approximations(plan, key)
    if op.input_kind == "lora":
        from .expert_stack_tasks import stack_result

        stacked = stack_result(plan, key)  # a fused MoE expert stack: the method per expert and part
        if stacked is not None:
            return stacked
        # full fine-tunes (the plan allows them only with the operator's dense_rank_param): their
        # task vectors truncated by SVD to factors (PT-SVD); the operator sees factors either way.
        # Adapter modules that are not LoRA factors are truncated the same way (inputs.approximated_factors)
        errors: dict = {}
        res = op.fn(lora_task(plan, key, all_models=False, errors=errors) if plan.lora_models else svd_task(plan, key))
        if approx:
            res.report["approximated_inputs"] = {
                k: {"type": v, "how": f"dense delta truncated by SVD to {op.dense_rank_param or 'output.rank'}",
                    "relative_error": errors.get(k)} for k, v in approx.items()}
        return res
    if op.lora_fn is not None and not approx:
        return op.lora_fn(lora_task(plan, key, all_models=True))
    base = plan.base.source.get(key).to(torch.float32)
    task = dense_task(plan, key, base)
    out = apply_dense(op, task, lambda: (model_tensor(m, key, base.shape, base, op.reads, torch.float32)
                                         for m in plan.models))
    if op.reads == "weights":
        out = out - base
    res = registry.LoraResult(delta=out.reshape(base.shape[0], -1))
    if approx:  # merged exactly as dense deltas; the LoRA output extracts the result by SVD
        res.report["approximated_inputs"] = {
            k: {"type": v, "how": "merged as its exact dense delta; the result is extracted by SVD at output.rank "
                "(extraction_relative_error)"} for k, v in approx.items()}
    return res


def lowrank_result(plan, key: str) -> tuple[registry.LoraResult, dict]:
    """The module's merged factors at ``output.rank`` (re-factored or truncated), with its report."""
    from .ops import lowrank
    from .sinks import json_safe

    rank = plan.recipe.output.rank
    res = module_result(plan, key)
    rep = json_safe(dict(res.report))
    A, B = res.A, res.B
    if A is None:
        if res.delta is None:
            raise UserError(f"method '{plan.op.name}' gave no result for module '{key}'")
        if rank is None:
            raise UserError(f"method '{plan.op.name}' gives a full-rank delta for '{key}'; set output.rank "
                            "to extract a LoRA, or use output.format full")
        A, B, err = lowrank.factorize(res.delta, rank)
        rep["extraction_relative_error"] = err
    elif rank is not None and A.shape[0] > rank:
        A, B, err = lowrank.truncate(A, B, rank)
        rep["truncation_relative_error"] = err
    rep["rank"] = int(A.shape[0])
    return registry.LoraResult(A=A, B=B), rep


def bundle_result(plan, key: str) -> tuple[registry.BundleEntry, dict]:
    """A bundle method's module: its bundle tensors (the result's typed field) and its report."""
    res = module_result(plan, key)
    if res.bundle is None:
        raise RuntimeError(f"method '{plan.op.name}' writes a bundle but gave no bundle tensors for '{key}'")
    return res.bundle, dict(res.report)


def full_item(plan) -> Callable[[str], tuple[Any, dict | None]]:
    """``compute`` for a full-model output of ``plan``: merged items through the operator (a LoRA
    method's result applied to the base), copied items as stored."""
    import torch

    from . import blockwise

    reference = plan.base or plan.models[0]

    def compute(name: str):
        item = plan.items[name]
        if item.action == "copy":
            m, n = item.base_source or (item.sources[0] if item.sources else (reference, name))
            return m.source.get(n), None
        if plan.op.input_kind != "lora":
            if blockwise.applies(plan, name):  # in cache-sized blocks, into the output dtype
                return blockwise.merge(plan, name), None
            return merge_tensor(plan, name), None
        res = module_result(plan, name)
        out = plan.base.source.get(name).to(torch.float32)
        out.add_((res.delta if res.delta is not None else res.B @ res.A).reshape(out.shape))
        return out, res.report

    return compute


# --- a plan's full-model output ---------------------------------------------------------------------


def full_sink(plan, out: Path, *, card_extra: str = "", overwrite: bool = False, inputs=(),
              force_replace: bool = False, staged: dict[str, Path] | None = None):
    """The model directory a plan's full output goes to (merge run, continual export, revert);
    ``staged``: its shards already written by the units of a sharded run (`merge finalize`)."""
    from . import sinks
    from .plan import donor_dir

    recipe = plan.recipe
    dtypes = {i.out_dtype for i in plan.items.values() if i.action == "merge"}
    card = sinks.Card(plan.op.name, plan.base.ref if plan.base else None, [(m.label, m.ref) for m in plan.models],
                      sinks.recipe_yaml(recipe), card_extra)
    return sinks.FullModel(out, plan.shards, sinks.merge_metadata(recipe, plan.op.name), card,
                           donor=donor_dir(plan),
                           config_dtype=dtypes.pop() if len(dtypes) == 1 and not plan.keep_config_dtype else None,
                           config_updates=plan.config_updates, chat_template=plan.chat_template,
                           vocab=plan.vocab if recipe.output.copy_files else None,
                           overwrite=overwrite, inputs=inputs, force_replace=force_replace,
                           report_head={"method": plan.op.name}, staged=staged, fp8=plan.fp8_out)


def full_work(plan, merged_read: bool = True) -> dict[str, Work]:
    """Every item of a full-model plan; ``merged_read=False``: merged items were read already."""
    n = len(plan.models) + 2
    return {i.name: Work(i.name, i.read_bytes if (merged_read or i.action != "merge") else 0, i.numel * 4 * n,
                         i.action == "merge") for i in plan.items.values()}


def write_full_model(plan, out: Path, compute, *, card_extra: str = "", on_tensor=None, overwrite: bool = False,
                     inputs=(), force_replace: bool = False, lanes: int | None = None) -> Path:
    """A full model directory from ``compute`` over the plan's items (``lanes``: see :func:`fill_full`)."""
    sink = full_sink(plan, out, card_extra=card_extra, overwrite=overwrite, inputs=inputs,
                     force_replace=force_replace)
    with sink:
        fill_full(plan, sink, compute, on_tensor, lanes)
        return sink.commit()


def fill_full(plan, sink, compute, on_tensor=None, lanes: int | None = None) -> None:
    """The loop over the items ``sink`` orders (a full model: all; a unit of a sharded run: its
    shards' items) of a full-model plan. ``lanes``: items computed at once (None: :func:`lanes_for`;
    a caller whose ``compute`` keeps state across items passes 1)."""
    execute(in_order(sink, full_work(plan)), compute, sink, peak_bytes=plan.peak_bytes,
            inputs_hint=", ".join(m.ref for m in plan.models), on_item=on_tensor,
            lanes=lanes_for(plan) if lanes is None else lanes)
