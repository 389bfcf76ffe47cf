"""`merge run`, `merge validate`, `merge finalize`: a recipe (or a multi-document file, or one
--shard unit of it) planned, printed and executed."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .app import STATE, app, clean, fmt_bytes, handle_errors, say, stderr_console, stdout_console


def _print_plan(plan) -> None:
    from rich.table import Table

    c = stdout_console()
    s = plan.summary()
    say(f"{s['method']}  parameters {s['parameters']}", "method", console=c)
    if s["base_model"]:
        say(f"  {s['base_model']}", "base", console=c)
    for m in plan.models:
        kind = f" (LoRA, {m.source.format})" if m.is_lora else ""
        say(f" {m.label}: {m.ref}{kind}  {m.params}", "model", console=c)
    for note in plan.notes:
        say(note, "note:", "yellow", console=c)
    if plan.module_mode:
        c.print(
            f"output: {plan.out_format} | modules: {len(plan.module_keys)} | read {fmt_bytes(s['bytes_read'])} | "
            f"estimated peak memory {fmt_bytes(s['peak_memory_estimate'])}"
        )
        t = Table("module (base key)", "delta shape", "inputs", title="modules", title_justify="left")
        for k in plan.module_keys[:12]:
            n = sum(1 for m in plan.models if not m.is_lora or k in m.source.by_base)
            t.add_row(clean(k), "×".join(map(str, plan.module_shapes[k])), str(n))
        c.print(t)
        if len(plan.module_keys) > 12:
            c.print(f"... and {len(plan.module_keys) - 12} more")
        return
    c.print(
        f"tensors: {s['tensors_merged']} merged, {s['tensors_copied']} copied from the base | "
        f"read {fmt_bytes(s['bytes_read'])} | write {fmt_bytes(s['bytes_written'])} in {s['shards']} shard(s) | "
        f"estimated peak memory {fmt_bytes(s['peak_memory_estimate'])}"
    )
    largest = sorted(plan.items.values(), key=lambda i: -i.numel)[:8]
    t = Table("tensor", "action", "shape", "dtype in→out", title="largest tensors", title_justify="left")
    for i in largest:
        t.add_row(clean(i.name), i.action if i.action == "merge" else f"copy ({i.reason})", "×".join(map(str, i.shape)) or "scalar",
                  f"{i.in_dtype}→{i.out_dtype}")
    c.print(t)
    _print_resolved(plan, c)


def _print_resolved(plan, c, limit: int = 10) -> None:
    """Where parameters vary by tensor (gradients, filters, slices), the first tensor of each
    distinct set of values, so a user sees what a gradient or a filter did."""
    from rich.table import Table

    samples = plan.parameter_samples(limit)
    sliced = any(i.sources is not None for i in plan.items.values())
    if len(samples) < 2 and not sliced:
        return
    t = Table("tensor", "reads", "method", "models", title="resolved parameters (first tensor of each set)",
              title_justify="left")
    for name, given in samples:
        base, sources = plan.sources_of(name)
        reads = ", ".join(f"{m.label}:{clean(n) if n != name else '='}" for m, n in ([base] if base else []) + sources)
        t.add_row(clean(name), reads, _short(given.method),
                  "; ".join(f"{m.label} {_short(p)}" for (m, _), p in zip(sources, given.models)))
    c.print(t)
    if plan.distinct_parameter_sets > len(samples):
        c.print(f"... and {plan.distinct_parameter_sets - len(samples)} more sets")


def _short(p) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "-"


def _progress(units: bool = False):
    """A rich progress bar over bytes read (``units``: over units done); a no-op when quiet or not a
    terminal."""
    from contextlib import nullcontext

    if STATE["quiet"] or not sys.stderr.isatty():
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]merging"), BarColumn(), MofNCompleteColumn() if units else DownloadColumn(),
                        TimeRemainingColumn(),
                        TextColumn("{task.fields[tensor]}", markup=False), console=stderr_console().rich, transient=True)
    return progress


@app.command()
@handle_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (overrides output.path)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (compute device)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; read no tensor data, write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that mergekit-ortho wrote."),
    force_replace: bool = typer.Option(False, "--force-replace",
                                       help="Replace an existing output even if mergekit-ortho did not write it."),
    intermediates: Optional[Path] = typer.Option(
        None, "--intermediates",
        help="Multi-document recipes: where the named (intermediate) merges go (default: <out>.intermediates)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="Compute only unit i of N (i from 0; whole output shards, or an adapter's modules) "
        "into --stage; then `merge finalize`."),
    stage: Optional[Path] = typer.Option(None, "--stage", help="Staging directory of a --shard or --executor ray run."),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="ray: run the units (one per output shard) as Ray tasks, then finalize "
        "(needs mergekit-ortho\\[ray])."),
    address: Optional[str] = typer.Option(None, "--address", help="--executor ray: the Ray cluster (e.g. auto); "
                                          "default: start Ray on this machine."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Merge the models of a recipe into a new model directory.

    A file of several YAML documents (mergekit-multi's form) runs every merge in dependency order:
    a document with `name: X` is written to INTERMEDIATES/X and read wherever a model is `X`."""
    STATE["quiet"] = STATE["quiet"] or quiet
    STATE["verbose"] = STATE["verbose"] or verbose
    from .. import recipe as recipe_mod

    docs = recipe_mod.load_all(recipe)
    if executor is not None or address is not None:
        _run_ray(docs, recipe, out, stage, executor, address, device, dry_run, overwrite, force_replace, shard)
        return
    if shard is not None or stage is not None:
        _run_unit(docs, shard, stage, device, dry_run)
        return
    if len(docs) == 1:
        r = docs[0]
        _run_recipe(r, _output_of(r, out, recipe), device, dry_run, overwrite, force_replace)
        return
    from .. import multi

    final = next((d for d in docs if d.name is None), None)
    target = _output_of(final, out, recipe) if final is not None else None
    merges = multi.schedule(recipe, target, intermediates)
    if not dry_run and target is not None:
        from ..placement import check_output

        check_output(target, overwrite, recipe_mod.input_paths(final), force_replace)
    for m in merges:
        label = m.name or "final merge"
        for note in m.notes:
            say(note, "note:", "yellow", err=True)
        if m.name is not None and m.recipe.output.path:
            say(f"{label}: output.path is not used; an intermediate merge is written to {m.target}",
                 "note:", "yellow", err=True)
        if m.name is not None and not overwrite and multi.is_complete(m.target):
            say(f"{label}: reusing {m.target}, written by an earlier run (--overwrite recomputes it)",
                 "note:", "yellow", err=True)
            continue
        if dry_run and any(not multi.is_complete(x.target) for x in merges if x.name in m.depends):
            stdout_console().print(f"{label}: planned once {', '.join(m.depends)} is written")
            continue
        stdout_console().print(f"{label}:")
        _run_recipe(m.recipe, m.target, device, dry_run, overwrite, force_replace)


def _single(docs, what: str):
    from ..errors import UserError

    if len(docs) != 1:
        raise UserError(f"{what} takes a recipe of one merge; run the documents of a multi-document recipe "
                        "one by one")
    return docs[0]


def _run_unit(docs, shard: Optional[str], stage: Optional[Path], device: str, dry_run: bool) -> None:
    from .. import plan as plan_mod
    from .. import schedule
    from ..errors import UserError

    if shard is None or stage is None:
        raise UserError("--shard and --stage go together: --shard i/N --stage DIR computes unit i of N into DIR")
    i, n = schedule.parse_shard(shard)
    r = _single(docs, "--shard")
    plan = _plan(r, device) if dry_run else schedule.plan_unit(r, i, n, device)  # hub: its own files only
    try:
        schedule.check_shardable(plan, n)
        est = schedule.unit_estimate(plan, i, n)
        what = schedule.describe_unit(plan, i, n)
        if dry_run:
            _print_plan(plan)
            stdout_console().print(f"unit {i}/{n}: {what}; "
                             f"read {fmt_bytes(est.read_bytes)}, write {fmt_bytes(est.write_bytes)}")
            return
        with _progress() as p:
            cb = None
            if p is not None:
                task = p.add_task("merge", total=est.read_bytes, tensor="")
                cb = lambda name, k: p.update(task, advance=k, tensor=clean(name))  # noqa: E731
            result = schedule.run_unit(plan, i, n, stage, on_tensor=cb)
        stdout_console().print(f"wrote unit {i}/{n} to {result} ({what})")
    finally:
        plan_mod.close(plan)


def _run_ray(docs, recipe: Path, out, stage, executor, address, device: str, dry_run: bool, overwrite: bool,
             force_replace: bool, shard) -> None:
    import shutil

    from .. import plan as plan_mod
    from .. import recipe as recipe_mod
    from .. import schedule
    from ..errors import UserError

    if executor != "ray":
        raise UserError(f"--executor {executor}: the one executor is ray (--address needs --executor ray)")
    if shard is not None:
        raise UserError("--executor ray runs every unit itself; leave out --shard")
    r = _single(docs, "--executor ray")
    target = _output_of(r, out, recipe)
    if dry_run:
        _run_recipe(r, target, device, True, overwrite, force_replace)
        return
    from ..placement import check_output

    check_output(target, overwrite, recipe_mod.input_paths(r), force_replace)
    from .. import ray_executor

    own_stage = stage is None
    stage = Path(stage) if stage is not None else target.parent / f".{target.name}.stage"
    if own_stage:
        shutil.rmtree(stage, ignore_errors=True)  # a crashed earlier run's units, perhaps of another N
    plan = schedule.plan_finalize(r, device)  # hub: headers only; each task downloads its own files
    try:
        with _progress(units=True) as p:
            cb = None
            if p is not None:
                task = p.add_task("merge", total=schedule.unit_total(plan), tensor="units")
                cb = lambda done, n: p.update(task, completed=done, total=n)  # noqa: E731
            result = ray_executor.run(plan, recipe, stage, target, address=address, overwrite=overwrite,
                                      force_replace=force_replace, on_unit=cb)
    finally:
        plan_mod.close(plan)
    if own_stage:
        shutil.rmtree(stage, ignore_errors=True)
    if plan.module_mode:
        stdout_console().print(f"wrote {result} ({plan.out_format}, {plan.merge_count} modules, units on Ray)")
    else:
        stdout_console().print(f"wrote {result} ({len(plan.shards)} unit(s) on Ray, {plan.merge_count} tensors "
                               f"merged, {plan.copy_count} copied)")


@app.command()
@handle_errors
def finalize(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (the one the units ran)."),
    stage: Path = typer.Option(..., "--stage", help="Staging directory the --shard units wrote."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (overrides output.path)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that mergekit-ortho wrote."),
    force_replace: bool = typer.Option(False, "--force-replace",
                                       help="Replace an existing output even if mergekit-ortho did not write it."),
):
    """Verify every unit of a --shard run against the plan and commit the output atomically."""
    from .. import plan as plan_mod
    from .. import recipe as recipe_mod
    from .. import schedule

    r = _single(recipe_mod.load_all(recipe), "merge finalize")
    target = _output_of(r, out, recipe)
    plan = schedule.plan_finalize(r)
    try:
        result = schedule.finalize(plan, stage, target, overwrite=overwrite, force_replace=force_replace)
    finally:
        plan_mod.close(plan)
    if plan.module_mode:
        stdout_console().print(f"wrote {result} ({plan.out_format}, {plan.merge_count} modules)")
    else:
        stdout_console().print(f"wrote {result} ({len(plan.shards)} shard(s), {plan.merge_count} tensors merged, "
                               f"{plan.copy_count} copied)")


def _output_of(r, out: Optional[Path], recipe: Path) -> Path:
    from ..errors import UserError

    target = out or (Path(r.output.path) if r.output.path else None)
    if target is None:
        raise UserError(f"{recipe}: no output path; set output.path in the recipe or pass --out")
    if r.output.path and out is None and r._source_path is not None and not Path(r.output.path).is_absolute():
        target = r._source_path.parent / r.output.path
    return target


def _run_recipe(r, target: Path, device: str, dry_run: bool, overwrite: bool, force_replace: bool) -> None:
    from .. import outputs
    from .. import plan as plan_mod
    from .. import recipe as recipe_mod

    if not dry_run:
        from ..placement import check_output

        check_output(target, overwrite, recipe_mod.input_paths(r), force_replace)
    plan = _plan(r, device, dry_run)
    try:
        if dry_run:
            _print_plan(plan)
            return
        for note in plan.notes:  # what the run does not act on, or does differently, is said
            say(note, "note:", "yellow", err=True)
        bar = _progress()
        with bar as p:
            if p is not None:
                task = p.add_task("merge", total=plan.read_bytes, tensor="")
                cb = lambda name, n: p.update(task, advance=n, tensor=clean(name))  # noqa: E731
            else:
                cb = None
            result = outputs.run(plan, target, overwrite=overwrite, on_tensor=cb, force_replace=force_replace)
        if plan.module_mode:
            stdout_console().print(f"wrote {result} ({plan.out_format}, {plan.merge_count} modules)")
        else:
            stdout_console().print(
                f"wrote {result} ({plan.merge_count} tensors merged, {plan.copy_count} copied, "
                f"{fmt_bytes(plan.write_bytes)})"
            )
    finally:
        plan_mod.close(plan)


@app.command()
@handle_errors
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Multi-document recipes: the final output."),
    intermediates: Optional[Path] = typer.Option(None, "--intermediates",
                                                 help="Multi-document recipes: where the named merges go."),
):
    """Check a recipe: schema, method parameters, sources, tensor names and shapes (no tensor data read).

    Every document of a multi-document recipe is checked; one that reads an intermediate merge not
    written yet is checked up to its schema and parameters."""
    from .. import recipe as recipe_mod

    docs = recipe_mod.load_all(recipe)
    if len(docs) == 1:
        _validate_one(docs[0], str(recipe))
        return
    from .. import multi

    final = next((d for d in docs if d.name is None), None)
    if out is None and final is not None and final.output.path:
        out = _output_of(final, None, recipe)
    # validation writes nothing: without an output, intermediates are looked for beside ./out
    merges = multi.schedule(recipe, out or Path.cwd() / "out", intermediates)
    for m in merges:
        label = f"{recipe} [{m.name or 'final merge'}]"
        pending = [x.name for x in merges if x.name in m.depends and not multi.is_complete(x.target)]
        if pending:
            say(f"{label}: {m.recipe.merge_method}; schema and parameters checked, tensors checked once "
                 f"{', '.join(pending)} is written", "ok", "green")
        else:
            _validate_one(m.recipe, label)


def _plan(r, device: str = "cpu", headers_only: bool = True):
    """The plan of ``r``; hub models: from their safetensors headers alone (``headers_only``), or
    downloading only the weight files the plan reads."""
    from .. import plan as plan_mod
    from ..sources import hub_plan, hub_remote

    if not headers_only:
        return hub_plan.build_plan(r, device=device)
    with hub_remote.headers_only():
        return plan_mod.build_plan(r, device=device)


def _validate_one(r, label: str) -> None:
    from .. import plan as plan_mod

    plan = _plan(r)
    try:
        s = plan.summary()
        say(
            f"{label}: {s['method']} over {len(plan.models)} model(s); "
            f"{s['tensors_merged']} tensors to merge, {s['tensors_copied']} to copy; "
            f"estimated peak memory {fmt_bytes(s['peak_memory_estimate'])}", "ok", "green"
        )
    finally:
        plan_mod.close(plan)
