"""Schedulers over units of work: `merge run --shard i/N --stage DIR` and `merge finalize`.

A unit of work is a run of whole output shards (``Plan.units``: one output shard each). With S
shards and ``--shard i/N`` (0 <= i < N <= S; i is 0-based, as Kubernetes' JOB_COMPLETION_INDEX and
``sbatch --array=0-(N-1)``), unit i is the contiguous shards ``floor(i*S/N) .. floor((i+1)*S/N)-1``:
every unit has at least one shard, and the assignment depends on (S, N) alone, so every process
computes the same one. A unit runs the one loop (:func:`.execute.execute`) over its items only —
the scheduler selects items, the loop is the serial run's — into a :class:`.sinks.UnitShards`, and
its directory is committed atomically with its receipt (:mod:`.stage`). `merge finalize` verifies
every receipt against the plan, links the shards into the output, writes the index, config,
tokenizer files, card and report, and commits the output atomically: bit-identical to a serial run.

Methods with per-model scalars over all tensors (a fold with ``reduce``: OPCM) run map -> reduce ->
map: each unit folds its tensors and stages the running sums S_T with each tensor's statistics
(phase ``fold``); `merge finalize` sums the statistics in the serial order, reduces the scalars,
and runs the second map (base + finish(S_T), reading the base and the staged sums, no model) into
the output itself.

An adapter or bundle output (``plan.module_mode``: one file that depends on every module) splits
into runs of whole modules instead: each unit stages its modules' factors, and `merge finalize`
packs the output from them through the serial run's sink (:mod:`.module_units`).

A plan's per-unit estimate (``unit_estimate``: bytes read, bytes written, peak memory) sizes the
resources of a distributed executor's tasks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    m = _SHARD.match(text or "")
    if not m:
        raise UserError(f"--shard {text}: write i/N, e.g. --shard 0/4 (i counts from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: i must be 0..N-1 (i counts from 0)")
    return i, n


def check_shardable(plan, n: int) -> None:
    if plan.module_mode:
        from . import module_units

        module_units.check(plan, n)
        return
    if plan.fp8_out is not None:
        raise UserError("not supported yet: --shard with an FP8 out_dtype (block scales are written beside their "
                        "weights by one writer); run it without --shard / --stage")
    if n > len(plan.shards):
        raise UserError(f"--shard .../{n}: the output has {len(plan.shards)} shard(s), so at most {len(plan.shards)} "
                        "units; use a smaller N or a smaller output.shard_size")


def unit_shards(plan, i: int, n: int) -> list[int]:
    """The indices of the output shards of unit ``i`` of ``n``."""
    s = len(plan.shards)
    return list(range(i * s // n, (i + 1) * s // n))


def unit_total(plan) -> int:
    """How many units the plan has at most: output shards, or modules of an adapter or bundle."""
    return len(plan.module_keys) if plan.module_mode else len(plan.shards)


def describe_unit(plan, i: int, n: int) -> str:
    """``output shard(s) a..b of S`` / ``module(s) a..b of M``: what unit ``i`` of ``n`` computes."""
    if plan.module_mode:
        from .module_units import describe

        return describe(plan, i, n)
    shards = unit_shards(plan, i, n)
    return f"output shard(s) {shards[0] + 1}..{shards[-1] + 1} of {len(plan.shards)}"


@dataclass(frozen=True)
class UnitEstimate:
    read_bytes: int
    write_bytes: int
    peak_bytes: int


def unit_estimate(plan, i: int, n: int) -> UnitEstimate:
    if plan.module_mode:
        from .module_units import unit_keys

        read = sum(plan.module_read_bytes(k) for k in unit_keys(plan, i, n))
        return UnitEstimate(read, read // max(1, len(plan.models)), plan.peak_bytes)
    names = [t.name for si in unit_shards(plan, i, n) for t in plan.shards[si]]
    return UnitEstimate(sum(plan.items[x].read_bytes for x in names),
                        sum(t.nbytes for si in unit_shards(plan, i, n) for t in plan.shards[si]), plan.peak_bytes)


def _reduces(plan) -> bool:
    return not plan.op.merges_one_tensor_alone


def unit_items(plan, i: int, n: int) -> list[str]:
    """The items unit ``i`` of ``n`` computes (a fold's unit: the merged ones; copies wait for
    finalize's second map)."""
    if plan.module_mode:
        from .module_units import unit_keys

        return unit_keys(plan, i, n)
    names = [t.name for si in unit_shards(plan, i, n) for t in plan.shards[si]]
    return [x for x in names if plan.items[x].action == "merge"] if _reduces(plan) else names


# --- planning a unit on hub ids ------------------------------------------------------------------


def plan_unit(recipe, i: int, n: int, device: str = "cpu"):
    """The plan of unit ``i`` of ``n``: planned on the hub models' headers, downloading only the
    weight files the unit's own items read (``sources.hub_plan``); its plan hash is the plan hash
    of every other unit and of finalize, whatever each downloaded."""
    from .sources import hub_plan

    def reads(plan):
        check_shardable(plan, n)
        return hub_plan.files_read(plan, unit_items(plan, i, n))

    return hub_plan.build_plan(recipe, device=device, reads=reads)


def plan_finalize(recipe, device: str = "cpu"):
    """The plan `merge finalize` verifies and commits with: headers only, except a fold's second
    map, which reads the base (and copies) itself."""
    from .sources import hub_plan

    def reads(plan):
        return hub_plan.files_read(plan, base_only=True) if _reduces(plan) else {}

    return hub_plan.build_plan(recipe, device=device, reads=reads)


def _retry(recipe_path, i: int, n: int, stage: Path) -> str:
    return f"merge run {recipe_path or 'RECIPE'} --shard {i}/{n} --stage {stage}"


# --- one unit ------------------------------------------------------------------------------------


def run_unit(plan, i: int, n: int, stage: Path, *, on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Compute unit ``i`` of ``n`` of ``plan`` into ``stage`` (replacing only that unit's directory)."""
    from . import sequential, sinks, stage as stage_mod
    from .execute import fill_full, full_item
    from .plan import input_paths
    from .sinks import merge_metadata
    from .writer import shard_names
    from .placement import AtomicDirectory

    check_shardable(plan, n)
    stage = Path(stage).absolute()
    digest = stage_mod.plan_hash(plan)
    chosen = unit_shards(plan, i, n)
    atomic = AtomicDirectory(stage / stage_mod.unit_dir_name(i, n), overwrite=True, inputs=input_paths(plan))
    receipt = {"plan_hash": digest, "unit": i, "units": n, "device": plan.device,
               "inputs": stage_mod.input_identities(plan),
               "shards": chosen, "recipe": str(plan.recipe._source_path or "")}
    with atomic as tmp:
        if plan.module_mode:
            from . import module_units

            receipt.update(module_units.compute_unit(plan, i, n, tmp, on_tensor))
        elif _reduces(plan):
            names = [t.name for si in chosen for t in plan.shards[si] if plan.items[t.name].action == "merge"]
            spill = sequential.spill_shards(plan, names)
            sink = sinks.UnitShards(tmp, spill, shard_names(len(spill), "sums"), {"format": "pt"})
            with sink:
                stats = sequential.fold_items(plan, names, sink, on_tensor=on_tensor)
                receipt.update(phase="fold", files=sink.finish(), stats=stats)
        else:
            all_names = shard_names(len(plan.shards))
            sink = sinks.UnitShards(tmp, [plan.shards[si] for si in chosen], [all_names[si] for si in chosen],
                                      merge_metadata(plan.recipe, plan.op.name))
            with sink:
                fill_full(plan, sink, full_item(plan), on_tensor)
                receipt.update(phase="shards", files=sink.finish(), reports=sink.reports)
        stage_mod.write_receipt(tmp, receipt)
        atomic.commit()
    return atomic.target


# --- finalize ------------------------------------------------------------------------------------


class _StagedSums:
    """``get(name)``: a tensor's staged running sum, from whichever unit holds it."""

    def __init__(self, dirs: list[Path]):
        from .sources.checkpoint import CheckpointSource

        self.sources, self.where = [], {}
        for d in dirs:
            if not any(d.glob("sums*.safetensors")):
                continue
            files = sorted(d.glob("sums*.safetensors"))
            for f in files:
                src = CheckpointSource(str(f), f"staged sums {d.name}")
                self.sources.append(src)
                for name in src.infos:
                    self.where[name] = src

    def get(self, name: str):
        return self.where[name].get(name)

    def close(self) -> None:
        for s in self.sources:
            s.close()


def stage_count(stage: Path, recipe_path) -> int:
    from .stage import staged_counts

    counts = staged_counts(stage)
    if not counts:
        raise UserError(f"no unit in stage {stage}; run `merge run {recipe_path or 'RECIPE'} --shard i/N --stage "
                        f"{stage}` for every i first")
    if len(counts) > 1:
        raise UserError(f"stage {stage} holds units of several runs (--shard .../{', .../'.join(map(str, sorted(counts)))}); "
                        "remove the stale unit directories")
    return counts.pop()


def finalize(plan, stage: Path, target: Path, *, overwrite: bool = False, force_replace: bool = False,
             on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Verify every unit in ``stage`` against ``plan`` and commit the output at ``target``."""
    from . import sequential, stage as stage_mod
    from .execute import full_sink
    from .plan import input_paths
    from .sinks import merge_metadata
    from .writer import shard_names
    from .placement import check_output

    stage = Path(stage).absolute()
    rpath = plan.recipe._source_path
    n = stage_count(stage, rpath)
    check_shardable(plan, n)
    inputs = input_paths(plan) + [stage]
    check_output(target, overwrite, inputs, force_replace)
    digest = stage_mod.plan_hash(plan)
    idents = stage_mod.input_identities(plan)
    guard = dict(overwrite=overwrite, inputs=inputs, force_replace=force_replace)
    dirs = [stage / stage_mod.unit_dir_name(i, n) for i in range(n)]
    if plan.module_mode:
        from . import module_units

        receipts = [stage_mod.verify_modules(stage, i, n, digest, module_units.PHASE, module_units.PART,
                                             module_units.unit_keys(plan, i, n), _retry(rpath, i, n, stage),
                                             inputs=idents) for i in range(n)]
        return module_units.commit(plan, dirs, receipts, target, guard, on_tensor)
    all_names = shard_names(len(plan.shards))
    meta = merge_metadata(plan.recipe, plan.op.name)
    receipts = []
    for i in range(n):
        chosen = unit_shards(plan, i, n)
        if _reduces(plan):
            names = [t.name for si in chosen for t in plan.shards[si] if plan.items[t.name].action == "merge"]
            spill = sequential.spill_shards(plan, names)
            files = [(f, s, {"format": "pt"}) for f, s in zip(shard_names(len(spill), "sums"), spill)]
            phase = "fold"
        else:
            files, phase = [(all_names[si], plan.shards[si], meta) for si in chosen], "shards"
        receipts.append(stage_mod.verify_unit(stage, i, n, digest, phase, files, _retry(rpath, i, n, stage),
                                              inputs=idents))
    if _reduces(plan):
        stats = {}
        for r in receipts:
            stats.update(r["stats"])
        scalars = sequential.reduce_scalars(plan, stats)
        sink = full_sink(plan, target, **guard)
        sink.card.extra = sequential.card_note(plan, scalars)
        sums = _StagedSums(dirs)
        try:
            with sink:
                sequential.export_items(plan, sink, sums, scalars, on_tensor=on_tensor)
                return sink.commit()
        finally:
            sums.close()
    staged = {f["name"]: d / f["name"] for d, r in zip(dirs, receipts) for f in r["files"]}
    sink = full_sink(plan, target, staged=staged, **guard)
    with sink:
        for r in receipts:
            sink.reports.update(r.get("reports") or {})
        return sink.commit()
