"""The `merge` command line: parse, call the library, render. No merge logic lives here.

Exit codes: 0 success, 2 bad input (one line, no traceback), 1 unexpected internal error,
130 interrupted. ``--verbose`` shows tracebacks. Heavy modules (torch, the executor) are imported
inside the commands so that ``merge --help`` and argument errors stay fast.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="merge",
    help="Merge model checkpoints and LoRA adapters with exact, streaming operators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"verbose": False, "quiet": False}


class _PlainConsole:
    """A rich console for user text: markup off (tensor names, paths and model names are user
    text, and rich would parse '[/x]' in them as a closing tag and crash; styles go through Text,
    see _say) and strings printed as cleaned single lines (see _clean)."""

    def __init__(self, stderr: bool = False):
        from rich.console import Console

        self.rich = Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False)

    def print(self, obj) -> None:
        from rich.text import Text

        self.rich.print(Text(_clean(obj)) if isinstance(obj, str) else obj)


def _err_console():
    return _PlainConsole(stderr=True)


def _console():
    return _PlainConsole()


def _clean(text) -> str:
    """User text made safe for one terminal line: control characters (a newline in a path would
    forge a second line) are shown escaped."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def _clean_lines(text) -> str:
    """Like _clean, keeping the newlines of our own multi-line text (method details)."""
    return "\n".join(_clean(line) for line in str(text).split("\n"))


def _say(text, label: str | None = None, style: str = "bold", err: bool = False, console=None) -> None:
    """Print one line: an optional styled label, then ``text`` as plain, cleaned text."""
    from rich.text import Text

    line = Text()
    if label:
        line.append(label, style=style)
        line.append(" ")
    line.append(_clean(text))
    (console or (_err_console() if err else _console())).print(line)


def handle_errors(fn):
    """Map exceptions to exit codes and one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import UserError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _say("interrupted; no output was written", "error:", "red", err=True)
            raise typer.Exit(130)
        except (UserError, OSError) as e:
            if _state["verbose"]:
                import traceback

                traceback.print_exc()
            msg = str(e) if isinstance(e, UserError) else _os_message(e)
            _say(msg, "error:", "red", err=True)
            raise typer.Exit(2)
        except Exception as e:  # internal error
            if _state["verbose"]:
                import traceback

                traceback.print_exc()
            _say(f"{type(e).__name__}: {e} (run with --verbose for the traceback)", "internal error:", "red", err=True)
            raise typer.Exit(1)

    return wrapper


def _os_message(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1,
        help="CPU threads for the tensor math (default: one per core). On cores shared with other "
        "jobs, --threads 1 avoids stalls of torch's thread pool."),
):
    _state["verbose"] = verbose
    _state["quiet"] = quiet
    if threads:
        import os

        os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch starts (it is not imported yet)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _print_plan(plan) -> None:
    from rich.table import Table

    c = _console()
    s = plan.summary()
    _say(f"{s['method']}  parameters {s['parameters']}", "method", console=c)
    if s["base_model"]:
        _say(f"  {s['base_model']}", "base", console=c)
    for m in plan.models:
        kind = f" (LoRA, {m.source.format})" if m.is_lora else ""
        _say(f" {m.label}: {m.ref}{kind}  {m.params}", "model", console=c)
    for note in plan.notes:
        _say(note, "note:", "yellow", console=c)
    if plan.module_mode:
        c.print(
            f"output: {plan.out_format} | modules: {len(plan.module_keys)} | read {_fmt_bytes(s['bytes_read'])} | "
            f"estimated peak memory {_fmt_bytes(s['peak_memory_estimate'])}"
        )
        t = Table("module (base key)", "delta shape", "inputs", title="modules", title_justify="left")
        for k in plan.module_keys[:12]:
            n = sum(1 for m in plan.models if not m.is_lora or k in m.source.by_base)
            t.add_row(_clean(k), "×".join(map(str, plan.module_shapes[k])), str(n))
        c.print(t)
        if len(plan.module_keys) > 12:
            c.print(f"... and {len(plan.module_keys) - 12} more")
        return
    c.print(
        f"tensors: {s['tensors_merged']} merged, {s['tensors_copied']} copied from the base | "
        f"read {_fmt_bytes(s['bytes_read'])} | write {_fmt_bytes(s['bytes_written'])} in {s['shards']} shard(s) | "
        f"estimated peak memory {_fmt_bytes(s['peak_memory_estimate'])}"
    )
    largest = sorted(plan.items.values(), key=lambda i: -i.numel)[:8]
    t = Table("tensor", "action", "shape", "dtype in→out", title="largest tensors", title_justify="left")
    for i in largest:
        t.add_row(_clean(i.name), i.action if i.action == "merge" else f"copy ({i.reason})", "×".join(map(str, i.shape)) or "scalar",
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
        reads = ", ".join(f"{m.label}:{_clean(n) if n != name else '='}" for m, n in ([base] if base else []) + sources)
        t.add_row(_clean(name), reads, _short(given.method),
                  "; ".join(f"{m.label} {_short(p)}" for (m, _), p in zip(sources, given.models)))
    c.print(t)
    if plan.distinct_parameter_sets > len(samples):
        c.print(f"... and {plan.distinct_parameter_sets - len(samples)} more sets")


def _short(p) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "-"


def _progress():
    """A rich progress bar over bytes read; a no-op when quiet or not a terminal."""
    from contextlib import nullcontext

    if _state["quiet"] or not sys.stderr.isatty():
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]merging"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[tensor]}", markup=False), console=_err_console().rich, transient=True)
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
        None, "--shard", help="Compute only unit i of N (i from 0; whole output shards) into --stage; "
        "then `merge finalize`."),
    stage: Optional[Path] = typer.Option(None, "--stage", help="Staging directory of a --shard run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Merge the models of a recipe into a new model directory.

    A file of several YAML documents (mergekit-multi's form) runs every merge in dependency order:
    a document with `name: X` is written to INTERMEDIATES/X and read wherever a model is `X`."""
    _state["quiet"] = _state["quiet"] or quiet
    _state["verbose"] = _state["verbose"] or verbose
    from . import recipe as recipe_mod

    docs = recipe_mod.load_all(recipe)
    if shard is not None or stage is not None:
        _run_unit(docs, shard, stage, device, dry_run)
        return
    if len(docs) == 1:
        r = docs[0]
        _run_recipe(r, _output_of(r, out, recipe), device, dry_run, overwrite, force_replace)
        return
    from . import multi

    final = next((d for d in docs if d.name is None), None)
    target = _output_of(final, out, recipe) if final is not None else None
    merges = multi.schedule(recipe, target, intermediates)
    if not dry_run and target is not None:
        from .writer import check_output

        check_output(target, overwrite, recipe_mod.input_paths(final), force_replace)
    for m in merges:
        label = m.name or "final merge"
        for note in m.notes:
            _say(note, "note:", "yellow", err=True)
        if m.name is not None and m.recipe.output.path:
            _say(f"{label}: output.path is not used; an intermediate merge is written to {m.target}",
                 "note:", "yellow", err=True)
        if m.name is not None and not overwrite and multi.is_complete(m.target):
            _say(f"{label}: reusing {m.target}, written by an earlier run (--overwrite recomputes it)",
                 "note:", "yellow", err=True)
            continue
        if dry_run and any(not multi.is_complete(x.target) for x in merges if x.name in m.depends):
            _console().print(f"{label}: planned once {', '.join(m.depends)} is written")
            continue
        _console().print(f"{label}:")
        _run_recipe(m.recipe, m.target, device, dry_run, overwrite, force_replace)


def _single(docs, what: str):
    from .errors import UserError

    if len(docs) != 1:
        raise UserError(f"{what} takes a recipe of one merge; run the documents of a multi-document recipe "
                        "one by one")
    return docs[0]


def _run_unit(docs, shard: Optional[str], stage: Optional[Path], device: str, dry_run: bool) -> None:
    from . import plan as plan_mod
    from . import schedule
    from .errors import UserError

    if shard is None or stage is None:
        raise UserError("--shard and --stage go together: --shard i/N --stage DIR computes unit i of N into DIR")
    i, n = schedule.parse_shard(shard)
    plan = plan_mod.build_plan(_single(docs, "--shard"), device=device)
    try:
        schedule.check_shardable(plan, n)
        est = schedule.unit_estimate(plan, i, n)
        shards = schedule.unit_shards(plan, i, n)
        if dry_run:
            _print_plan(plan)
            _console().print(f"unit {i}/{n}: output shard(s) {shards[0] + 1}..{shards[-1] + 1} of {len(plan.shards)}; "
                             f"read {_fmt_bytes(est.read_bytes)}, write {_fmt_bytes(est.write_bytes)}")
            return
        with _progress() as p:
            cb = None
            if p is not None:
                task = p.add_task("merge", total=est.read_bytes, tensor="")
                cb = lambda name, k: p.update(task, advance=k, tensor=_clean(name))  # noqa: E731
            result = schedule.run_unit(plan, i, n, stage, on_tensor=cb)
        _console().print(f"wrote unit {i}/{n} to {result} (output shard(s) {shards[0] + 1}..{shards[-1] + 1} of "
                         f"{len(plan.shards)})")
    finally:
        plan_mod.close(plan)


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
    from . import plan as plan_mod
    from . import recipe as recipe_mod
    from . import schedule

    r = _single(recipe_mod.load_all(recipe), "merge finalize")
    target = _output_of(r, out, recipe)
    plan = plan_mod.build_plan(r)
    try:
        result = schedule.finalize(plan, stage, target, overwrite=overwrite, force_replace=force_replace)
    finally:
        plan_mod.close(plan)
    _console().print(f"wrote {result} ({len(plan.shards)} shard(s), {plan.merge_count} tensors merged, "
                     f"{plan.copy_count} copied)")


def _output_of(r, out: Optional[Path], recipe: Path) -> Path:
    from .errors import UserError

    target = out or (Path(r.output.path) if r.output.path else None)
    if target is None:
        raise UserError(f"{recipe}: no output path; set output.path in the recipe or pass --out")
    if r.output.path and out is None and r._source_path is not None and not Path(r.output.path).is_absolute():
        target = r._source_path.parent / r.output.path
    return target


def _run_recipe(r, target: Path, device: str, dry_run: bool, overwrite: bool, force_replace: bool) -> None:
    from . import outputs
    from . import plan as plan_mod
    from . import recipe as recipe_mod

    if not dry_run:
        from .writer import check_output

        check_output(target, overwrite, recipe_mod.input_paths(r), force_replace)
    plan = plan_mod.build_plan(r, device=device)
    try:
        if dry_run:
            _print_plan(plan)
            return
        for note in plan.notes:  # what the run does not act on, or does differently, is said
            _say(note, "note:", "yellow", err=True)
        bar = _progress()
        with bar as p:
            if p is not None:
                task = p.add_task("merge", total=plan.read_bytes, tensor="")
                cb = lambda name, n: p.update(task, advance=n, tensor=_clean(name))  # noqa: E731
            else:
                cb = None
            result = outputs.run(plan, target, overwrite=overwrite, on_tensor=cb, force_replace=force_replace)
        if plan.module_mode:
            _console().print(f"wrote {result} ({plan.out_format}, {plan.merge_count} modules)")
        else:
            _console().print(
                f"wrote {result} ({plan.merge_count} tensors merged, {plan.copy_count} copied, "
                f"{_fmt_bytes(plan.write_bytes)})"
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
    from . import recipe as recipe_mod

    docs = recipe_mod.load_all(recipe)
    if len(docs) == 1:
        _validate_one(docs[0], str(recipe))
        return
    from . import multi

    final = next((d for d in docs if d.name is None), None)
    if out is None and final is not None and final.output.path:
        out = _output_of(final, None, recipe)
    # validation writes nothing: without an output, intermediates are looked for beside ./out
    merges = multi.schedule(recipe, out or Path.cwd() / "out", intermediates)
    for m in merges:
        label = f"{recipe} [{m.name or 'final merge'}]"
        pending = [x.name for x in merges if x.name in m.depends and not multi.is_complete(x.target)]
        if pending:
            _say(f"{label}: {m.recipe.merge_method}; schema and parameters checked, tensors checked once "
                 f"{', '.join(pending)} is written", "ok", "green")
        else:
            _validate_one(m.recipe, label)


def _validate_one(r, label: str) -> None:
    from . import plan as plan_mod

    plan = plan_mod.build_plan(r)
    try:
        s = plan.summary()
        _say(
            f"{label}: {s['method']} over {len(plan.models)} model(s); "
            f"{s['tensors_merged']} tensors to merge, {s['tensors_copied']} to copy; "
            f"estimated peak memory {_fmt_bytes(s['peak_memory_estimate'])}", "ok", "green"
        )
    finally:
        plan_mod.close(plan)


@app.command()
@handle_errors
def methods(name: Optional[str] = typer.Argument(None, help="Show one method's parameters in detail.")):
    """List the merge methods, what they read and their parameters."""
    from rich.table import Table

    from .ops import registry

    ops = [registry.get(name)] if name else registry.all_operators()

    def fmt(p):
        d = "required" if p.required else repr(p.default)
        return f"{p.name}={d}"

    t = Table("method", "inputs", "parameters", "per-model", "summary", show_lines=bool(name))
    for op in ops:
        kind = op.input_kind + ("" if op.merges_one_tensor_alone else ", sequential")
        alias = f" ({', '.join(op.aliases)})" if op.aliases else ""
        t.add_row(op.name + alias, kind, ", ".join(fmt(p) for p in op.params) or "-",
                  ", ".join(fmt(p) for p in op.model_params) or "-", op.summary)
    c = _console()
    c.print(t)
    if name:
        op = ops[0]
        c.print(f"spec: {op.spec}")
        if op.details:
            from rich.text import Text

            c.print(Text(_clean_lines(op.details)))
        for p in op.params + op.model_params:
            extra = f" (one of {', '.join(map(str, p.choices))})" if p.choices else ""
            _say(f"({p.type.__name__}, default {'required' if p.required else repr(p.default)}){extra}: {p.help}", f"  {p.name}", console=c)


@app.command()
@handle_errors
def inspect(path: str = typer.Argument(..., help="Checkpoint, LoRA, RMM bundle, or hub id.")):
    """Describe a checkpoint, LoRA adapter or RMM bundle (headers only)."""
    from . import describe as inspect_mod

    info = inspect_mod.describe(path)
    c = _console()
    for line in inspect_mod.render(info):
        c.print(line)


@app.command()
@handle_errors
def revert(
    bundle: Path = typer.Argument(..., help="RMM bundle directory (written by `merge run` with rmm)."),
    model: str = typer.Option(..., "--model", "-m", help="Task name to rebuild (see `merge inspect BUNDLE`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (or .safetensors file for kohya)."),
    format: str = typer.Option("peft", "--format", help="peft | kohya | full"),
    base: Optional[str] = typer.Option(None, "--base", help="Base model for --format full (default: the bundle's)."),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", help="Output dtype (default float32 for adapters, "
                                            "the base's for full)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that mergekit-ortho wrote."),
    force_replace: bool = typer.Option(False, "--force-replace",
                                       help="Replace an existing output even if mergekit-ortho did not write it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
):
    """Rebuild one task's adapter (or full model) from an RMM bundle alone."""
    _state["verbose"] = _state["verbose"] or verbose
    from .errors import UserError
    from .revert import revert as revert_task

    if format not in ("peft", "kohya", "full"):
        raise UserError(f"--format must be peft, kohya or full, not '{format}'")
    result = revert_task(bundle, model, out, format, base, overwrite, out_dtype, force_replace=force_replace)
    _console().print(f"wrote {result} (task {model}, {format})")


def _print_lowrank_report(report: dict, limit: int = 20) -> None:
    """The per-module table of `merge resize` / `merge extract` (first ``limit`` rows) and totals."""
    from rich.table import Table

    c = _console()
    mods = report["modules"]
    t = Table("module", "kind", "rank in→out", "rel. error", "fro retained", title="modules", title_justify="left")
    for name in list(mods)[:limit]:
        r = mods[name]
        fro = r.get("fro_retained", (max(0.0, 1 - r["rel_error"] ** 2)) ** 0.5)
        t.add_row(_clean(name), r.get("kind", ""), f"{r['rank_in']}→{r['rank_out']}", f"{r['rel_error']:.3g}", f"{fro:.6f}")
    c.print(t)
    if len(mods) > limit:
        c.print(f"... and {len(mods) - limit} more (all in the report file)")
    s = report["summary"]
    if s.get("modules"):
        c.print(f"{s['modules']} modules, rank {s['rank_out_min']}..{s['rank_out_max']} (mean {s['rank_out_mean']:.1f}), "
                f"relative error max {s['rel_error_max']:.3g}, mean {s['rel_error_mean']:.3g}")
    for reason, n in (report.get("skipped") or {}).items():
        _say(f"{n} tensor(s) left out: {reason}", "note:", "yellow", console=c)
    _console().print(f"wrote {report['output']}")


@app.command()
@handle_errors
def resize(
    adapter: Path = typer.Argument(..., help="kohya .safetensors or PEFT adapter directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output (same format as the input; kohya: a .safetensors file)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="New rank (with --rule: the cap; none by default, "
                                       "where sd-scripts caps at 4)."),
    rule: Optional[str] = typer.Option(None, "--rule", help="Dynamic rank: sv_ratio | sv_fro | sv_cumulative (kohya)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="The rule's parameter."),
    conv_rank: Optional[int] = typer.Option(None, "--conv-rank", help="Rank (cap) for conv modules (default --rank)."),
    kohya_alpha: bool = typer.Option(False, "--kohya-alpha", help="kohya output: alpha = scale * new rank per "
                                     "module as resize_lora.py writes (default: one alpha, exact in diffusers too)."),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", help="float32 | float16 | bfloat16 (default: the input's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that mergekit-ortho wrote."),
    force_replace: bool = typer.Option(False, "--force-replace",
                                       help="Replace an existing output even if mergekit-ortho did not write it."),
):
    """Resize a LoRA to a fixed or dynamic rank (kohya resize_lora.py semantics), module by module."""
    from .adapters.resize import ResizeOptions, resize as do_resize

    opts = ResizeOptions(rank=rank, rule=rule, threshold=threshold, conv_rank=conv_rank,
                         alpha_mode="kohya" if kohya_alpha else "uniform", out_dtype=out_dtype)
    _print_lowrank_report(do_resize(adapter, out, opts, overwrite=overwrite, force_replace=force_replace))


@app.command()
@handle_errors
def extract(
    base: Path = typer.Argument(..., help="Base checkpoint."),
    finetune: Path = typer.Argument(..., help="Fine-tuned checkpoint of the same architecture."),
    out: Path = typer.Option(..., "--out", "-o", help="Output (PEFT directory, or kohya .safetensors file / directory)."),
    rank: int = typer.Option(..., "--rank", help="Rank of linear and conv 1x1 modules."),
    conv_rank: Optional[int] = typer.Option(None, "--conv-rank", help="Also extract conv kxk modules, at this rank."),
    format: Optional[str] = typer.Option(None, "--format", help="peft | kohya (default: kohya for a .safetensors "
                                         "--out, else peft)."),
    clamp_quantile: Optional[float] = typer.Option(None, "--clamp-quantile", help="sd-scripts' clamp of the "
                                                   "factors (0.99 for parity; default: none)."),
    min_diff: float = typer.Option(0.0, "--min-diff", help="Leave out matrices whose max |delta| is at most this."),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", help="float32 | float16 | bfloat16 (default: the fine-tune's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that mergekit-ortho wrote."),
    force_replace: bool = typer.Option(False, "--force-replace",
                                       help="Replace an existing output even if mergekit-ortho did not write it."),
):
    """Extract a LoRA from a fine-tune minus its base (kohya extract_lora_from_models.py), tensor by tensor."""
    from .adapters.extract import ExtractOptions, extract as do_extract

    fmt = format or ("kohya" if out.suffix == ".safetensors" else "peft")
    opts = ExtractOptions(rank=rank, conv_rank=conv_rank, format=fmt, clamp_quantile=clamp_quantile,
                          min_diff=min_diff, out_dtype=out_dtype)
    _print_lowrank_report(do_extract(base, finetune, out, opts, overwrite=overwrite, force_replace=force_replace))


continual_app = typer.Typer(help="Sequential merging into a persistent, crash-safe state.", no_args_is_help=True)
app.add_typer(continual_app, name="continual")


@continual_app.command("init")
@handle_errors
def continual_init(
    state: Path = typer.Argument(..., help="State directory to create."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe: a method that folds one model at a time (`merge methods`: opcm, magmax, linear, task_arithmetic, model_stock, ram, ...), base, parameters, optional initial models."),
    force: bool = typer.Option(False, "--force", help="Merge a model even if the same tensors were merged before."),
    retain: Optional[int] = typer.Option(None, "--retain", help="Versions to keep (tagged ones are kept too; "
                                         "default: the recipe's retain, else 3)."),
    gate_ratio: Optional[float] = typer.Option(None, "--gate-max-norm-ratio",
                                               help="Refuse a model whose task-vector norm in some tensor group is "
                                               "more than this factor from the running median (e.g. 5)."),
    gate_command: Optional[str] = typer.Option(None, "--gate-command",
                                               help="Shell command run on each candidate's export ({path}); the "
                                               "model is merged only if it exits 0."),
    removable: bool = typer.Option(False, "--removable", help="linear / task_arithmetic: keep the running sum in "
                                   "float64 so that `continual remove` subtracts a model exactly."),
    window: Optional[int] = typer.Option(None, "--window", help="linear / task_arithmetic: keep only the last N "
                                         "models (implies --removable)."),
):
    """Create a continual-merging state; merge the recipe's models (if any) in order (all or nothing)."""
    from . import continual

    gate = {k: v for k, v in (("max_norm_ratio", gate_ratio), ("command", gate_command)) if v is not None}
    st = continual.init(state, recipe, on_model=lambda e: _console().print(f"merged {e['name']} as model {e['t']}"),
                        force=force, retain=retain, gate=gate, removable=removable, window=window)
    _console().print(f"created {state} ({st.method}, {st.t} model(s) merged)")


@continual_app.command("add")
@handle_errors
def continual_add(
    state: Path = typer.Argument(..., help="State directory."),
    model: str = typer.Argument(..., help="Checkpoint directory, file or hub id."),
    name: Optional[str] = typer.Option(None, "--name", help="Label recorded in the history."),
    weight: Optional[float] = typer.Option(None, "--weight", help="Per-model weight (linear, task_arithmetic)."),
    force: bool = typer.Option(False, "--force", help="Merge even if the same tensors were merged before."),
):
    """Fold one model into the state (one streaming pass; atomic switch to the new version)."""
    from . import continual

    params = {"weight": weight} if weight is not None else {}
    entry = continual.add(state, model, name=name, force=force, params=params)
    _console().print(f"merged {entry['name']} as model {entry['t']} (sha256 {entry['sha256'][:12]})")


@continual_app.command("status")
@handle_errors
def continual_status(state: Path = typer.Argument(..., help="State directory."),
                     as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Method, models merged (name, source, sha256, time), scalars, disk use."""
    import json

    from . import continual

    s = continual.status(state)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    c = _console()
    _say(f"{s['method']} {s['parameters']}, base {s['base_model']}", f"{_clean(s['state'])}:", console=c)
    c.print(f"models merged: {s['models_merged']}   scalars: {s['scalars']}   disk: {_fmt_bytes(s['disk_bytes'])}")
    for h in s["history"]:
        c.print(f"  {h['t']:>3}  {h['name']}  {h['source']}  sha256 {h['sha256'][:12]}  {h['time']}")


@continual_app.command("export")
@handle_errors
def continual_export(state: Path = typer.Argument(..., help="State directory."),
                     out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
                     overwrite: bool = typer.Option(False, "--overwrite",
                                                    help="Replace an existing output that mergekit-ortho wrote."),
                     force_replace: bool = typer.Option(False, "--force-replace",
                                                        help="Replace an existing output even if mergekit-ortho did "
                                                        "not write it.")):
    """Write the current merged model as a normal model directory."""
    from . import continual

    result = continual.export(state, out, overwrite, force_replace=force_replace)
    _console().print(f"wrote {result}")


@continual_app.command("remove")
@handle_errors
def continual_remove(state: Path = typer.Argument(..., help="State directory."),
                     name: str = typer.Argument(..., help="The model's name in the history, or #t.")):
    """Subtract one model from a removable linear / task_arithmetic state (exact; a new version)."""
    from . import continual

    r = continual.remove(state, name)
    _console().print(f"removed {r['removed']}; {r['t']} model(s) remain (version {r['version']})")


@continual_app.command("versions")
@handle_errors
def continual_versions(state: Path = typer.Argument(..., help="State directory."),
                       as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """The versions kept (oldest first): models merged, time, tags, disk use; * marks the current one."""
    import json

    from . import continual

    vs = continual.list_versions(state)
    if as_json:
        typer.echo(json.dumps(vs, indent=2))
        return
    c = _console()
    for v in vs:
        tags = f"  tags: {', '.join(v['tags'])}" if v["tags"] else ""
        c.print(f"{'*' if v['current'] else ' '} {v['version']}  {v['t']:>3} model(s)  {_fmt_bytes(v['disk_bytes'])}"
                f"  {v['time']}{tags}")


@continual_app.command("promote")
@handle_errors
def continual_promote(state: Path = typer.Argument(..., help="State directory."),
                      version: str = typer.Argument(..., help="A kept version: v000003, 3 or a tag.")):
    """Make a kept version the current one (roll back or forward); later adds continue from it."""
    from . import continual

    r = continual.promote(state, version)
    _console().print(f"current version is now {r['version']} ({r['t']} model(s))")


@continual_app.command("tag")
@handle_errors
def continual_tag(state: Path = typer.Argument(..., help="State directory."),
                  version: str = typer.Argument(..., help="A kept version: v000003, 3 or a tag."),
                  name: str = typer.Argument(..., help="The tag; a tagged version is never swept.")):
    """Tag a kept version so that retention keeps it."""
    from . import continual

    r = continual.tag(state, version, name)
    _console().print(f"tagged {r['version']} as {r['tag']}")


@continual_app.command("watch")
@handle_errors
def continual_watch(state: Path = typer.Argument(..., help="State directory."),
                    inbox: Path = typer.Option(..., "--inbox", help="Directory where new checkpoints appear."),
                    interval: float = typer.Option(2.0, "--interval", help="Seconds between polls."),
                    incomplete_timeout: float = typer.Option(
                        3600.0, "--incomplete-timeout",
                        help="Seconds to wait for an incomplete checkpoint (missing shards) to change before "
                        "giving up on it (logged; retried if its files change later)."),
                    server: Optional[str] = typer.Option(None, "--server",
                                                         help="Post each checkpoint to this `merge serve` URL's "
                                                         "queue instead of merging it here."),
                    token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                              help="Bearer token for --server.")):
    """Merge each complete checkpoint that appears in the inbox, in arrival order, until SIGTERM/Ctrl-C."""
    import signal

    from . import continual

    stop = {"flag": False}

    def _stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    c = _console()
    c.print(f"watching {inbox} for checkpoints (every {interval:g}s); Ctrl-C or SIGTERM to stop")
    submit = None
    if server:
        token = _read_token(token_file) if token_file else None
        submit = continual.poster(server, token)
    n = continual.watch(state, inbox, interval, log=lambda m: c.print(m), should_stop=lambda: stop["flag"],
                        incomplete_timeout=incomplete_timeout, submit=submit)
    c.print(f"stopped; {n} model(s) merged")


@app.command("serve")
@handle_errors
def serve(state: Path = typer.Argument(..., help="State directory (`merge continual init`)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; other than loopback needs "
                                   "--token-file."),
          port: int = typer.Option(8321, "--port", help="Port (0: any free one, logged)."),
          token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                    help="File holding the bearer token every request must send."),
          retain: Optional[int] = typer.Option(None, "--retain", help="Versions to keep (tagged ones too)."),
          log_format: str = typer.Option("json", "--log-format", help="json (one object a line) or text.")):
    """Serve continual merging over HTTP: a job queue, versions, metrics (needs the [serve] extra)."""
    from .continual import server

    server.serve(state, host, port, token_file, retain, log_format, read_token=_read_token)


def _read_token(path: Path) -> str:
    from .errors import UserError

    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UserError(f"--token-file {path}: cannot read it ({e.strerror or e})") from None
    if len(token) < 16:
        raise UserError(f"--token-file {path}: the token must be at least 16 characters")
    return token


def main() -> None:
    import os

    # Ask torch's CPU allocator to back large tensors with transparent huge pages (2 MiB): every
    # merged tensor is a fresh buffer, and first-touch page faults on 4 KiB pages cost more than
    # the arithmetic (measured: linear over 3 x 271M bf16 models 4.9 s -> 4.0 s, same peak RSS).
    # Read by torch when it starts; a user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Idle OpenMP workers sleep instead of spinning: when another job shares the cores, spinning
    # workers starve the one doing the work (2 cores, one busy with another job: a 1024x1024 SVD
    # took 1.2 s with libgomp's default spin-then-sleep and 3.7-5.7 s with ACTIVE at load 3, but
    # 0.46 s passive). On idle cores SVDs are as fast; chunked elementwise methods (ties, dare) pay
    # ~10-15 % for the wake-ups. OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _latch_interrupts()
    app()


def _latch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also recorded, so that a commit point
    refuses even when the exception was raised inside a finaliser and dropped by Python."""
    import signal

    from .writer import INTERRUPTED

    def on_interrupt(signum, frame):
        INTERRUPTED["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)


if __name__ == "__main__":
    main()
