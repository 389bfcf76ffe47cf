"""`merge revert`: one task rebuilt from an RMM bundle."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import STATE, app, handle_errors, stdout_console


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
    STATE["verbose"] = STATE["verbose"] or verbose
    from ..errors import UserError
    from ..revert import revert as revert_task

    if format not in ("peft", "kohya", "full"):
        raise UserError(f"--format must be peft, kohya or full, not '{format}'")
    result = revert_task(bundle, model, out, format, base, overwrite, out_dtype, force_replace=force_replace)
    stdout_console().print(f"wrote {result} (task {model}, {format})")
