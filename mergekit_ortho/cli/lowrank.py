"""`merge resize` and `merge extract`: LoRAs made smaller or made from a fine-tune, module by
module, with a per-module error report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, clean, handle_errors, say, stdout_console


def _print_lowrank_report(report: dict, limit: int = 20) -> None:
    """The per-module table of `merge resize` / `merge extract` (first ``limit`` rows) and totals."""
    from rich.table import Table

    c = stdout_console()
    mods = report["modules"]
    t = Table("module", "kind", "rank in→out", "rel. error", "fro retained", title="modules", title_justify="left")
    for name in list(mods)[:limit]:
        r = mods[name]
        fro = r.get("fro_retained", (max(0.0, 1 - r["rel_error"] ** 2)) ** 0.5)
        t.add_row(clean(name), r.get("kind", ""), f"{r['rank_in']}→{r['rank_out']}", f"{r['rel_error']:.3g}", f"{fro:.6f}")
    c.print(t)
    if len(mods) > limit:
        c.print(f"... and {len(mods) - limit} more (all in the report file)")
    s = report["summary"]
    if s.get("modules"):
        c.print(f"{s['modules']} modules, rank {s['rank_out_min']}..{s['rank_out_max']} (mean {s['rank_out_mean']:.1f}), "
                f"relative error max {s['rel_error_max']:.3g}, mean {s['rel_error_mean']:.3g}")
    for reason, n in (report.get("skipped") or {}).items():
        say(f"{n} tensor(s) left out: {reason}", "note:", "yellow", console=c)
    stdout_console().print(f"wrote {report['output']}")


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
    from ..adapters.resize import ResizeOptions, resize as do_resize

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
    from ..adapters.extract import ExtractOptions, extract as do_extract

    fmt = format or ("kohya" if out.suffix == ".safetensors" else "peft")
    opts = ExtractOptions(rank=rank, conv_rank=conv_rank, format=fmt, clamp_quantile=clamp_quantile,
                          min_diff=min_diff, out_dtype=out_dtype)
    _print_lowrank_report(do_extract(base, finetune, out, opts, overwrite=overwrite, force_replace=force_replace))
