"""`merge sweep`: run a recipe over a grid of parameter values, reusing what does not depend on them
(issue 18). Rendering only; the loop lives in mergekit_ortho/sweep."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import STATE, app, clean, fmt_bytes, handle_errors, say, stdout_console


@app.command()
@handle_errors
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (one merge)."),
    sets: List[str] = typer.Option([], "--set", help="NAME=V1,V2,... (or START:STOP:STEP): a method parameter "
                                   "(lambda), a per-model one for every model (density), or one model's "
                                   "(models[0].weight, LABEL.weight). Repeat for more axes: the grid is "
                                   "their cartesian product."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: output.path); "
                                       "each point is written to OUT/<point>, plus OUT/sweep.json."),
    eval_cmd: Optional[str] = typer.Option(None, "--eval", help="Shell command scoring a point: '{out}' is "
                                           "replaced by its directory; the score is the last number printed "
                                           "on stdout."),
    keep: str = typer.Option("all", "--keep", help="all: keep every point's merge; best: only the best "
                             "(needs --eval)."),
    minimize: bool = typer.Option(False, "--minimize", help="Lower --eval scores are better."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Cache directory (default: "
                                            ".merge-sweep beside the recipe); safe to delete."),
    cache_max: str = typer.Option("4GiB", "--cache-max", help="Most bytes the cache keeps (LRU), e.g. 4GiB, 500MB."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Run a grid of more than 1,000 points."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (compute device)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that mergekit-ortho wrote."),
    force_replace: bool = typer.Option(False, "--force-replace",
                                       help="Replace an existing output even if mergekit-ortho did not write it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-point lines."),
):
    """Merge a recipe at every point of a parameter grid; each point equals a plain `merge run` with
    those values, bit for bit. What does not depend on the swept values (tsv's SVD merge before
    lambda, core_space's bases and merged core, the TIES-family merge before lambda) is computed
    once and cached in --work-dir."""
    from ..errors import UserError
    from ..recipe import parse_size
    from ..sweep.driver import sweep as run_sweep

    STATE["quiet"] = STATE["quiet"] or quiet
    try:
        limit = parse_size(cache_max)
    except ValueError as e:
        raise UserError(f"--cache-max: {e}") from None
    c = stdout_console()

    def on_point(p) -> None:
        if not STATE["quiet"]:
            score = "" if p.score is None else f"  score {p.score:.6g}"
            say(f"{p.name}  {p.seconds:.2f} s  cache {_cache(p)}{score}", "point", console=c)

    def on_notes(notes) -> None:
        for note in notes:
            say(note, "note:", "yellow", err=True)

    result = run_sweep(recipe, list(sets), out, work_dir=work_dir, keep=keep, eval_cmd=eval_cmd, yes=yes,
                       cache_max=limit, overwrite=overwrite, force_replace=force_replace, device=device,
                       minimize=minimize, on_point=on_point, on_notes=on_notes)
    _table(result, c)
    if result.corrupt:
        say(f"{result.corrupt} unreadable or altered cache entr{'y was' if result.corrupt == 1 else 'ies were'} "
            "deleted and recomputed", "note:", "yellow", err=True)
    if result.skipped:
        say(f"the cache was full (--cache-max {cache_max}); {result.skipped} entries were not stored, so later "
            "points recomputed them: raise --cache-max", "note:", "yellow", err=True)
    kept = [p for p in result.points if p.kept]
    best = f"; best: {result.points[result.best].name}" if result.best is not None else ""
    say(f"{result.out} ({len(kept)} of {len(result.points)} merges kept{best}; cache "
        f"{fmt_bytes(result.cache_bytes)})", "wrote", console=c)


def _cache(p) -> str:
    if not p.cached:
        return "-"
    parts = f" ({p.part_hits} part hits)" if p.part_hits else ""
    return f"{p.hits} hit / {p.misses} miss{parts}"


def _table(result, c) -> None:
    from rich.table import Table

    t = Table("point", "parameters", "score", "seconds", "cache", "kept", title="sweep", title_justify="left")
    for p in result.points:
        params = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.values.items())
        mark = " *" if result.best == p.index else ""
        t.add_row(f"{p.index}{mark}", clean(params), "-" if p.score is None else f"{p.score:.6g}",
                  f"{p.seconds:.2f}", _cache(p), "yes" if p.kept else "no")
    c.print(t)
