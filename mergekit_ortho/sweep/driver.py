"""`merge sweep`'s loop (issue 18): every grid point planned and merged as `merge run` would, with
the operator's prepared part (:mod:`mergekit_ortho.ops.prepare`) read from or written to the cache
(:mod:`.cache`), optionally scored by an ``--eval`` command.

Per point: the recipe mapping with the point's values (:func:`.grid.point_recipe`), validated
like a recipe file, planned (``plan.build_plan``), its operator replaced by one whose ``fn`` is
``apply(task, cached prepare(task))``, and run into ``OUT/<point>`` (:func:`run_point`): for a
full-model output a tensor whose key the sweep already knows (:mod:`.reuse`: inputs hashed once per
sweep) and whose entry is cached is finished from the entry and the base alone, without reading
the models; WIDEN and OPCM run with their cached statistics / SVDs. A method without any of these
runs unchanged (no cache). All points are written inside one atomic output
directory: any error (a bad value, a failing ``--eval``) leaves no output at all.

``--eval "CMD {out}"``: run through the shell with ``{out}`` replaced by the point's directory
(quoted); its score is the last number it prints on stdout. With ``keep="best"`` only the best
point's merge is kept (higher is better unless ``minimize``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from . import grid
from .cache import Cache, input_tensors, part_key, task_key
from .reuse import FileGuard, InputMemo, dense_hit, dense_sig, digests_of, lora_sig, opcm_svd, widen_fold

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class PointResult:
    index: int
    name: str
    values: dict[str, Any]
    seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    part_hits: int = 0  # per-model parts (ties' thresholds) reused on a miss
    cached: bool = True  # the method has a prepare/apply split
    score: float | None = None
    kept: bool = True


@dataclass
class SweepResult:
    out: Path
    points: list[PointResult] = field(default_factory=list)
    best: int | None = None
    corrupt: int = 0
    skipped: int = 0
    cache_bytes: int = 0
    hashed: int = 0  # input tensors hashed (each once per sweep)


def _counted(plan, op, prep, cache: Cache, memo: InputMemo, tally: dict, use_parts: bool = True) -> Callable:
    from ..ops.registry import LoraTask

    def fn(task):
        tensors = input_tensors(task)
        device = tensors[0].device if tensors else "cpu"
        sig = lora_sig(plan, task) if isinstance(task, LoraTask) else dense_sig(plan, task.name)
        digests = digests_of(memo, sig, tensors)
        key = task_key(op.name, task, prep.skips, digests)
        got = cache.get(key, device)
        if got is None:
            tally["misses"] += 1
            parts = (_parts(op, prep, cache, task, digests, device, tally)
                     if prep.part is not None and use_parts else None)
            got = prep.run(task, parts)
            cache.put(key, got)  # stored before apply may scale it in place
        else:
            tally["hits"] += 1
        return prep.apply(task, got)

    fn.__name__ = fn.__qualname__ = f"{op.name}_sweep"
    return fn


def _parts(op, prep, cache: Cache, task, digests: list[str], device, tally: dict) -> list:
    """Each model's per-model part, from the cache or computed (and stored)."""
    part = prep.part
    out = []
    for i, x in enumerate(task.inputs):
        key = part_key(op.name, task, i, part.reads, part.model_reads, digests[i])
        got = cache.get(key, device)
        if got is None:
            got = part.compute(x, i, task)
            if got:
                cache.put(key, got)
        else:
            tally["part_hits"] += 1
        out.append(got)
    return out


def reuses(method: str) -> bool:
    """Whether `merge sweep` reuses anything of ``method`` across points."""
    from ..ops.prepare import preparation

    return preparation(method) is not None or method in ("widen", "opcm")


def parts_help(axes) -> bool:
    """Whether per-model parts (ties' cuts) can be reused by a grid over ``axes``: not when every
    axis is lambda (the whole merge before lambda is reused) or a density of every model (each
    point changes every model's cut); computing them costs a separate top-k pass."""
    return any(not (a.name == "lambda" or (a.name == "density" and a.model is None)) for a in axes)


def run_point(plan, target: Path, cache: Cache, memo: InputMemo, tally: dict, use_parts: bool = True) -> None:
    """Merge one point's ``plan`` into ``target`` as `merge run` would, reusing what the cache and
    the memo hold (:mod:`.reuse`); ``use_parts``: compute and reuse per-model parts. One item at a
    time (lanes=1): the cache, the memo, the tally and the swapped ``plan.op`` are shared state."""
    from .. import outputs
    from ..execute import full_item, write_full_model
    from ..ops.opcm import fold_with_svd
    from ..ops.prepare import preparation
    from ..plan import input_paths

    op = plan.op
    prep = preparation(op.name)
    full_dense = plan.out_format == "full" and op.input_kind != "lora" and op.merges_one_tensor_alone
    if op.name == "opcm":
        plan.op = dataclasses.replace(op, fold=fold_with_svd(opcm_svd(cache, tally)))
    elif prep is not None:
        plan.op = dataclasses.replace(op, fn=_counted(plan, op, prep, cache, memo, tally, use_parts))
        if full_dense:
            plain = full_item(plan)

            def compute(name: str):
                hit = dense_hit(plan, name, prep, cache, memo, tally)
                return (hit, None) if hit is not None else plain(name)

            write_full_model(plan, target, compute, inputs=input_paths(plan), lanes=1)
            return
    elif op.name == "widen" and full_dense:
        plain = full_item(plan)

        def compute(name: str):
            if plan.items[name].action != "merge":
                return plain(name)
            plan.op = dataclasses.replace(op, fold=widen_fold(plan, name, cache, memo, tally))
            try:
                return plain(name)
            finally:
                plan.op = op

        write_full_model(plan, target, compute, inputs=input_paths(plan), lanes=1)
        return
    outputs.run(plan, target, lanes=1)


def parse_score(stdout: str) -> float | None:
    found = [float(x) for x in _NUMBER.findall(stdout)]
    found = [x for x in found if math.isfinite(x)]
    return found[-1] if found else None


def evaluate(command: str, out: Path, label: str) -> float:
    cmd = command.replace("{out}", shlex.quote(str(out)))
    try:
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"--eval could not start ({e.strerror}) for point {label}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip().splitlines()
        why = f": {tail[-1][:200]}" if tail else ""
        raise UserError(f"--eval exited with status {done.returncode} on point {label}{why}; no output was written")
    score = parse_score(done.stdout)
    if score is None:
        raise UserError(f"--eval printed no number on stdout for point {label} (the score is the last number "
                        "it prints); no output was written")
    return score


def sweep(recipe_path: Path, sets: list[str], out: Path | None = None, *, work_dir: Path | None = None,
          keep: str = "all", eval_cmd: str | None = None, yes: bool = False, cache_max: int = 4 << 30,
          overwrite: bool = False, force_replace: bool = False, device: str = "cpu", minimize: bool = False,
          on_point: Callable[[PointResult], None] | None = None,
          on_notes: Callable[[list[str]], None] | None = None) -> SweepResult:
    """Run the grid of ``sets`` over the recipe at ``recipe_path`` into ``out`` (see the module)."""
    from .. import outputs
    from .. import plan as plan_mod
    from .. import recipe as recipe_mod
    from ..ops import registry
    from ..sources import hub_plan
    from ..placement import AtomicDirectory, check_output, refuse_overlap

    if not sets:
        raise UserError("merge sweep needs at least one --set NAME=V1,V2,...")
    if keep not in ("all", "best"):
        raise UserError(f"--keep must be all or best, got {keep!r}")
    if keep == "best" and eval_cmd is None:
        raise UserError("--keep best needs --eval (the best point is the one with the best score)")
    if eval_cmd is not None and "{out}" not in eval_cmd:
        raise UserError("--eval needs '{out}' in the command: it is replaced by each point's output directory")
    base_recipe = recipe_mod.load(recipe_path)
    if base_recipe._raw is None or not isinstance(base_recipe._raw, dict):
        raise UserError(f"{recipe_path}: merge sweep needs a recipe file of one merge")
    raw = base_recipe._raw
    op = registry.get(base_recipe.merge_method)
    axes = grid.parse_axes(list(sets), op, base_recipe.model_labels())
    grid.check_size(axes, yes)
    grid.check_overrides(raw, axes)
    if out is None:
        if not base_recipe.output.path:
            raise UserError(f"{recipe_path}: no output path; set output.path in the recipe or pass --out")
        out = Path(base_recipe.output.path)
        if not out.is_absolute():
            out = Path(recipe_path).resolve().parent / out
    values_list = grid.points(axes)
    recipes = []
    for values in values_list:  # every point validated before anything is read
        r = recipe_mod.from_dict(grid.point_recipe(raw, axes, values),
                                 f"{recipe_path} [{grid.describe(axes, values)}]")
        r._source_path = Path(recipe_path).resolve()
        recipes.append(r)
    check_output(out, overwrite, recipe_mod.input_paths(base_recipe), force_replace)
    cached = reuses(op.name)
    use_parts = parts_help(axes)
    work = Path(work_dir) if work_dir else Path(recipe_path).resolve().parent / ".merge-sweep"
    try:
        refuse_overlap(work, [p for p in recipe_mod.input_paths(base_recipe) if p != base_recipe._source_path])
        refuse_overlap(work, [out])
    except UserError as e:
        raise UserError(f"--work-dir: {e}") from None
    cache = Cache(work, cache_max)
    memo = InputMemo()
    guard: FileGuard | None = None
    result = SweepResult(out)
    atomic = AtomicDirectory(out, overwrite, recipe_mod.input_paths(base_recipe), force_replace)
    with atomic as tmp:
        for i, (values, r) in enumerate(zip(values_list, recipes)):
            name = grid.point_name(i, axes, values)
            point = PointResult(i, name, {a.text: v for a, v in zip(axes, values)}, cached=cached)
            tally = {"hits": 0, "misses": 0, "part_hits": 0}
            start = time.perf_counter()
            plan = hub_plan.build_plan(r, device=device)  # as `merge run`: hub models fetch what is read
            try:
                if i == 0 and on_notes is not None:
                    on_notes(list(plan.notes))
                if guard is None:  # before the first read of any tensor
                    guard = FileGuard([p for p in plan_mod.input_paths(plan) if p != r._source_path])
                else:
                    guard.check()
                target = tmp / name
                if cached:
                    run_point(plan, target, cache, memo, tally, use_parts)
                else:
                    outputs.run(plan, target, lanes=1)
            finally:
                plan_mod.close(plan)
            point.seconds = time.perf_counter() - start
            point.hits, point.misses, point.part_hits = tally["hits"], tally["misses"], tally["part_hits"]
            if eval_cmd is not None:
                point.score = evaluate(eval_cmd, target, f"{i} ({grid.describe(axes, values)})")
                prev = result.points[result.best].score if result.best is not None else None
                if prev is None or (point.score < prev if minimize else point.score > prev):
                    if keep == "best" and result.best is not None:
                        shutil.rmtree(tmp / result.points[result.best].name)
                        result.points[result.best].kept = False
                    result.best = i
                elif keep == "best":
                    shutil.rmtree(target)
                    point.kept = False
            result.points.append(point)
            if on_point is not None:
                on_point(point)
        if guard is not None:
            guard.check()  # the last point read the same bytes as the first
        result.hashed = memo.hashed
        result.corrupt, result.skipped, result.cache_bytes = cache.corrupt, cache.skipped, cache.total_bytes
        (tmp / "sweep.json").write_text(json.dumps(_summary(result, axes, eval_cmd, cache), indent=1) + "\n",
                                        encoding="utf-8")
        atomic.commit()
    return result


def _summary(result: SweepResult, axes, eval_cmd, cache: Cache) -> dict:
    return {
        "format": "mergekit-ortho-sweep/1",
        "axes": {a.text: list(a.values) for a in axes},
        "eval": eval_cmd,
        "best": result.points[result.best].name if result.best is not None else None,
        "work_dir": str(cache.root),
        "inputs_hashed": result.hashed,  # input tensors hashed: each once per sweep
        "points": [{"name": p.name, "values": p.values, "score": p.score, "seconds": round(p.seconds, 3),
                    "cache_hits": p.hits, "cache_misses": p.misses, "part_hits": p.part_hits, "kept": p.kept} for p in result.points],
    }
