"""`merge methods` and `merge inspect`: what the tool offers and what a file holds."""
from __future__ import annotations

from typing import Optional

import typer

from .app import app, clean_lines, handle_errors, say, stdout_console


@app.command()
@handle_errors
def methods(name: Optional[str] = typer.Argument(None, help="Show one method's parameters in detail.")):
    """List the merge methods, what they read and their parameters."""
    from rich.table import Table

    from ..ops import registry

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
    c = stdout_console()
    c.print(t)
    if name:
        op = ops[0]
        c.print(f"spec: {op.spec}")
        if op.details:
            from rich.text import Text

            c.print(Text(clean_lines(op.details)))
        for p in op.params + op.model_params:
            extra = f" (one of {', '.join(map(str, p.choices))})" if p.choices else ""
            say(f"({p.type.__name__}, default {'required' if p.required else repr(p.default)}){extra}: {p.help}", f"  {p.name}", console=c)


@app.command()
@handle_errors
def inspect(path: str = typer.Argument(..., help="Checkpoint, LoRA, RMM bundle, or hub id.")):
    """Describe a checkpoint, LoRA adapter or RMM bundle (headers only)."""
    from .. import describe as inspect_mod

    info = inspect_mod.describe(path)
    c = stdout_console()
    for line in inspect_mod.render(info):
        c.print(line)
