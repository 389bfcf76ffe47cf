"""Where a plan's result goes: one entry point for every output format of `merge run`.

``engine`` merges tensor by tensor into a full model directory; ``lora_engine`` merges module by
module into an adapter (PEFT, kohya) or an RMM bundle, and also gives a LoRA method's result as
full tensors (base + B @ A). This module picks between them, so the dependency runs one way
(lora_engine uses engine, never the reverse).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def run(plan, out: Path, overwrite: bool = False, on_tensor: Callable[[str, int], None] | None = None,
        force_replace: bool = False) -> Path:
    from . import engine, lora_engine

    if plan.out_format == "bundle":
        return lora_engine.run_bundle(plan, out, overwrite, on_tensor, force_replace=force_replace)
    if plan.out_format in ("peft", "kohya"):
        return lora_engine.run_lora(plan, out, overwrite, on_tensor, force_replace=force_replace)
    produce = (lambda name: lora_engine.full_tensor(plan, name)) if plan.op.input_kind == "lora" else None
    return engine.run(plan, out, overwrite, on_tensor, produce=produce, force_replace=force_replace)
