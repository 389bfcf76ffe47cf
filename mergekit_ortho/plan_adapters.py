"""The plan's adapter side: which output format a recipe gets, and the module keys a LoRA, PEFT or
bundle output is merged over.

``output_format`` resolves ``output.format`` against the method and the inputs (DESIGN: ``auto`` is
a LoRA output when every input is a LoRA and the method yields low rank, else full; adapters.md
P24 for what reaches a LoRA output only through a truncated SVD). Without a base model, LoRAs are
aligned by their own module names (``align_without_base``). Headers only, like ``plan.build_plan``.
"""
from __future__ import annotations

import re

from .dtypes import MERGEABLE
from .errors import UserError
from .ops import registry
from .planning import ModelInput, Plan, config_of_source


def output_format(recipe, op: registry.Operator, params: dict, base: ModelInput | None,
                   models: list[ModelInput]) -> str:
    """Resolve output.format against the method and the inputs (DESIGN: auto = LoRA out when every
    input is a LoRA and the method yields low rank, else full)."""
    from .adapters.experts import expert_output_format

    loras = [m for m in models if m.is_lora]
    dense = [m for m in models if not m.is_lora]
    fmt = expert_output_format(recipe.output.format, [m.source for m in loras])
    if op.input_kind == "lora" and dense:
        if op.dense_rank_param and params.get(op.dense_rank_param) is not None and not loras:  # PT-SVD
            if base is None:
                raise UserError(f"method '{op.name}' on full checkpoints needs base_model (task vectors)")
        else:
            hint = (f"; set the method parameter {op.dense_rank_param} to extract each task vector by truncated SVD"
                    if op.dense_rank_param else "")
            raise UserError(f"method '{op.name}' merges LoRA adapters, but {dense[0].ref} is a full checkpoint"
                            + hint)
    if op.input_kind == "lora":
        _check_lora_output(recipe, op, params, loras, fmt if fmt != "auto" else op.result)
    if op.result == "bundle":
        if fmt not in ("auto", "bundle"):
            raise UserError(f"{op.name} writes a bundle (output.format bundle), not {fmt}; "
                            "`merge revert BUNDLE --model NAME` rebuilds one task as peft, kohya or full")
        return "bundle"
    if fmt == "bundle":
        writers = [o.name for o in registry.all_operators() if o.result == "bundle"]
        raise UserError(f"output.format bundle is written by {', '.join(writers)} only, not by '{op.name}'")
    if loras and base is None and op.input_kind == "dense" and (op.lora_fn is None or fmt == "full"):
        raise UserError(f"method '{op.name}' applies the LoRA deltas to the base weights; set base_model to "
                        "the model the LoRAs were trained on")
    low_rank = op.input_kind == "lora" or op.lora_fn is not None
    if fmt == "auto":
        if dense or not low_rank or any(m.source.dense_modules() for m in loras):
            return "full"  # full is exact; other adapter types reach a LoRA output only by SVD (P24)
        fmt = "kohya" if all(m.source.format == "kohya" for m in loras) else "peft"
    if fmt in ("peft", "kohya") and op.input_kind != "lora":
        _check_lora_output(recipe, op, params, loras, fmt)
    if fmt in ("peft", "kohya"):
        if dense:
            raise UserError(f"output.format {fmt} needs every input to be a LoRA; {dense[0].ref} is a full "
                            "checkpoint (use format full)")
        if not low_rank and recipe.output.rank is None:
            raise UserError(f"method '{op.name}' gives full-rank deltas; set output.rank to extract a LoRA "
                            "by truncated SVD, or use output.format full")
        return fmt
    if base is None and loras:
        raise UserError("output.format full applies the merged LoRA to the base weights; set base_model")
    return "full"


def _check_lora_output(recipe, op: registry.Operator, params: dict, loras: list[ModelInput], fmt: str) -> None:
    """Parts that are not LoRA factors reach a LoRA output (or a LoRA operator) only through a
    truncated SVD; 1-D deltas and replacement tensors not at all (adapters.md P24)."""
    exact_ok = op.factor_fold == "B" and op.input_kind != "lora" and op.lora_fn is not None
    for m in loras:
        for mod in m.source.dense_modules():
            if exact_ok and m.source.has_exact_factors(mod):
                continue  # an exact low-rank form (Tucker LoCon, LoHa, LoKr; adapters.md P24)
            if m.source.one_dimensional(mod):
                raise UserError(f"{m.ref}: {m.source.type_name(mod)} tensor(s) of '{mod}' are not a low-rank delta, "
                                f"which a {op.name} merge with {fmt} output needs; use a dense method with "
                                "output.format full")
            rank = (params.get(op.dense_rank_param) if op.input_kind == "lora" and op.dense_rank_param
                    else recipe.output.rank)
            if rank is None:
                what = (f"set the method parameter {op.dense_rank_param}" if op.input_kind == "lora"
                        and op.dense_rank_param else "set output.rank")
                raise UserError(f"{m.ref}: {m.source.type_name(mod)} module '{mod}' is not LoRA factors; {what} to "
                                "approximate it by truncated SVD (the error is reported per module), or use "
                                "output.format full")


def align_without_base(loras: list[ModelInput]) -> list[str]:
    """No base model: LoRAs are aligned by their own module names, so they must share one format;
    PEFT adapters of different transformers namings are first mapped to one (``adapters.one_naming``).
    Returns the plan's notes.

    The key of a module is its name as the base key it adapts would read (PEFT prefix and
    ``.base_layer`` stripped, ``.weight`` added), which is also what a PEFT output needs."""
    from .adapters.detect import PEFT_PREFIX
    from .adapters.matched import MatchedLora

    from .adapters.experts import refuse_without_base

    for m in loras:
        refuse_without_base(m.source)
        dense = m.source.dense_modules()
        if dense:
            raise UserError(f"{m.ref} has {m.source.type_name(dense[0])} modules (e.g. '{dense[0]}'), which are "
                            "materialised against their base tensors; set base_model")
    fmts = {m.source.format for m in loras}
    if len(fmts) > 1:
        raise UserError(f"LoRAs in different formats ({', '.join(sorted(fmts))}) can only be aligned through "
                        "their base model; set base_model")
    maps = []
    for m in loras:
        base_map = {}
        for mod in m.source.modules:
            key = mod[len(PEFT_PREFIX):] if mod.startswith(PEFT_PREFIX) else mod
            base_map[mod] = key.replace(".base_layer", "") + ".weight"
        maps.append(base_map)
    from .adapters.one_naming import align

    notes = align([(m.ref, m.source.path, m.source.config, bm) for m, bm in zip(loras, maps)]) \
        if fmts == {"peft"} else []  # transformers 4 / 5 module names mapped to one naming
    for m, base_map in zip(loras, maps):
        m.source = MatchedLora(m.source, base_map)
    first = loras[0]
    for m in loras[1:]:
        for key, mod in m.source.by_base.items():
            if key in first.source.by_base:
                a = first.source.factor_shapes(first.source.by_base[key])
                b = m.source.factor_shapes(mod)
                if (a[0][1], a[1][0]) != (b[0][1], b[1][0]):
                    raise UserError(f"LoRA module '{mod}' is {b[1][0]}x{b[0][1]} in {m.ref} but "
                                    f"{a[1][0]}x{a[0][1]} in {first.ref}; are they for the same base model?")
    return notes


def module_keys(op: registry.Operator, base: ModelInput | None, models: list[ModelInput],
                 include: list[str], exclude: list[str]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The base keys merged module by module (LoRA / bundle outputs) and each one's 2-D delta shape."""
    include_re = [re.compile(p) for p in include]
    exclude_re = [re.compile(p) for p in exclude]
    shapes: dict[str, tuple[int, ...]] = {}
    loras = [m for m in models if m.is_lora]
    if loras:
        for m in loras:
            for key, mod in m.source.by_base.items():
                (r, cols), (rows, _) = m.source.factor_shapes(mod)
                shapes.setdefault(key, (rows, cols))
    else:  # full fine-tunes through a LoRA method (rmm with rank): every 2-D float weight
        for name, info in base.source.infos.items():
            if len(info.shape) == 2 and info.dtype in MERGEABLE:
                for m in models:
                    other = m.source.infos.get(name)
                    if other is None or other.shape != info.shape:
                        raise UserError(f"tensor '{name}' is missing from {m.ref} or has another shape there")
                shapes[name] = tuple(info.shape)
    keys = [k for k in sorted(shapes)
            if (not include_re or any(p.search(k) for p in include_re)) and not any(p.search(k) for p in exclude_re)]
    return keys, {k: shapes[k] for k in keys}


def lora_notes(plan: Plan) -> None:
    if plan.base is not None and not plan.lora_models:
        skipped = sum(1 for n, i in plan.base.source.infos.items() if n not in plan.module_shapes)
        if skipped:
            plan.notes.append(f"{skipped} tensor(s) that are not 2-D weights are not stored in the bundle; "
                              "a reverted full model takes them from the base")


def adapter_names(plan: Plan) -> None:
    """PEFT outputs take the installed transformers 5's in-memory module names (so peft loads them)."""
    if plan.out_format == "peft" and plan.base is not None:
        from .adapters.transformers5 import output_names

        plan.adapter_names, note = output_names(plan.module_keys, config_of_source(plan.base.source))
        plan.notes += [note] if note else []
