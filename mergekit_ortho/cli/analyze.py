"""`merge analyze`: how the task vectors of a recipe's models interfere, before merging them
(issue 18). Rendering only; the statistics live in mergekit_ortho/analysis."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import app, handle_errors, say, stdout_console


@app.command()
@handle_errors
def analyze(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe whose base and models are analysed."),
    models: Optional[List[str]] = typer.Argument(None, help="With --base: the models (checkpoints or LoRAs)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; the arguments are then the models."),
    density: Optional[float] = typer.Option(None, "--density",
                                            help="TIES density of the sign-conflict statistics (default: the "
                                            "recipe's, else 0.2)."),
    top_rank: int = typer.Option(16, "--top-rank", help="Singular directions of the energy share (0: skip the SVDs)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full statistics as JSON."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report with heatmaps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report that merge analyze wrote."),
    force_replace: bool = typer.Option(False, "--force-replace", help="Replace any existing file at --json / --html."),
):
    """Task-vector norms, cosines, TIES sign conflict, top-k overlap and spectra per tensor, layer
    and module kind, in one streaming pass; plus what would make the merge fail or surprise."""
    from ..analysis import report
    from ..analysis.run import analyze as run_analysis, load_recipe, recipe_from_models
    from ..errors import UserError
    from ..placement import AtomicFile

    if base is not None:
        refs = ([str(recipe)] if recipe is not None else []) + list(models or [])
        if not refs:
            raise UserError("merge analyze --base B M1 [M2 ...]: give at least one model")
        for r in [base, *refs]:
            _exists(r)
        r = recipe_from_models(base, refs)
    else:
        if recipe is None or models:
            raise UserError("merge analyze takes one RECIPE, or --base B M1 [M2 ...]")
        r = load_recipe(recipe)
    targets = []
    for out in (json_out, html_out):
        if out is not None:
            # placement's rules: --overwrite replaces a report of ours (written_by_us: its generator
            # mark), anything else needs --force-replace
            targets.append(AtomicFile(out, overwrite, force_replace=force_replace))
    if html_out is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--html draws its figures with matplotlib: pip install 'mergekit-ortho[analyze]'")
    result = run_analysis(r, density, top_rank)
    report.terminal(result, stdout_console().rich)
    texts = ([report.to_json(result)] if json_out is not None else []) + (
        [report.to_html(result)] if html_out is not None else [])
    for atomic, text in zip(targets, texts):
        with atomic as tmp:
            tmp.write_text(text, encoding="utf-8")
        say(str(atomic.target), "wrote")


def _exists(ref: str) -> None:
    from ..errors import UserError
    from ..planning import split_lora_ref
    from ..sources import hub

    for part in [p for p in split_lora_ref(ref) if p]:
        if not Path(part).exists() and not hub.looks_like_hub_id(part):
            raise UserError(f"{part}: no such file or directory (a checkpoint, a LoRA or a hub id)")
