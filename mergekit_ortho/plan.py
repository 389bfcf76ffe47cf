"""The plan: what a merge reads and writes, decided from headers alone.

``build_plan`` opens the sources (headers only), checks every tensor's presence and shape across
inputs, decides per output item (a tensor of a full model, or a module of an adapter / bundle)
whether it is merged or copied from the base, lays out the output shards and estimates bytes and
peak memory. No tensor data is read, so ``--dry-run`` and ``merge validate`` are cheap.

A unit of work is the group of items that fills one output shard (``Plan.units``): it is
computable from the plan and the input files alone. ``execute`` runs the items.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from . import recipe as recipe_mod
from .dtypes import FP8, MERGEABLE, canonical
from .prefixes import RenamedSource
from .errors import UserError
from .ops import registry
from .planning import (ItemParams, ModelInput, Plan, PlanItem, Source, _plan_params, _same_ref, _shared_levels,
                       _unique_label, check_model_count, config_of_source, open_source, output_dtype, promoted,
                       resolve_items, tokenizer_donor, vocabulary_for, apply_recipe_dtypes, TIED_HEADS,
                       VOCABULARY_TENSORS, _config_of)
from .writer import OutTensor, plan_shards

__all__ = ["ItemParams", "ModelInput", "Plan", "PlanItem", "Source", "build_plan", "check_model_count",
           "open_source", "output_dtype", "plan_items", "promoted", "resolve_items", "tokenizer_donor"]


def build_plan(recipe: recipe_mod.Recipe, device: str = "cpu") -> Plan:
    op = registry.get(recipe.merge_method)
    params = _plan_params(op, _shared_levels(recipe), "method")
    compute = canonical(recipe.compute_dtype, "compute_dtype")
    out_dtype = output_dtype(recipe)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA device is available")
    if recipe.slices:
        from .plan_slices import slices_plan

        return slices_plan(recipe, op, params, compute, out_dtype, device)

    base = None
    if recipe.base_model:
        ref = recipe_mod.resolve_ref(recipe, recipe.base_model)
        base = ModelInput("base", ref, open_source(ref, "base"), registry.Params())
        if base.is_lora:
            raise UserError(f"base_model {ref} is a LoRA adapter; the base must be the full model the "
                            "LoRAs were trained on (list the LoRA under models)")
    models: list[ModelInput] = []
    levels: dict[str, list[dict]] = {}
    listed_base = False
    for entry, label in zip(recipe.models, recipe.model_labels()):
        ref = recipe_mod.resolve_ref(recipe, entry.model)
        if base is not None and _same_ref(ref, base.ref):
            listed_base = True
            if op.reads_base:
                continue  # mergekit lists the base among the models; its task vector is zero
        levels[label] = [entry.parameters] + _shared_levels(recipe)
        models.append(ModelInput(label, ref, open_source(ref, label), _plan_params(op, levels[label], "model")))
    notes = list(recipe._warnings) + [
        f"ignored: '{k}' applies to continual states (`merge continual init`) only"
        for k in ("retain", "window", "gate") if getattr(recipe, k) is not None]
    if (op.base_input and base is not None and not listed_base and models
            and not any(m.is_lora for m in models)):
        # mergekit's linear / karcher / passthrough: a base_model not listed is one more input
        label = _unique_label(recipe_mod._label_from(base.ref), {m.label for m in models})
        levels[label] = _shared_levels(recipe)
        models.append(ModelInput(label, base.ref, base.source, _plan_params(op, levels[label], "model")))
        notes.append(f"base_model {base.ref} is one of the inputs of '{op.name}' (mergekit's rule), as '{label}'")
    if not models:
        raise UserError("the recipe lists no model other than the base model")
    notes += map_prefixes(recipe, base, models)
    from .tied_heads import rescale

    head_notes, untied = rescale([m for m in ([base] if base else []) + models if not m.is_lora])
    notes += head_notes
    vocab, chat_template = vocabulary_for(recipe, op, base, models)
    tokenizer_dir, tokenizer_note = (None, None) if vocab is not None else tokenizer_donor(recipe)
    notes += [tokenizer_note] if tokenizer_note else []

    loras = [m for m in models if m.is_lora]
    dense = [m for m in models if not m.is_lora]
    if op.needs_base and base is None and dense:
        raise UserError(f"method '{op.name}' needs 'base_model' (task vectors are relative to it)")
    check_model_count(op, len(models), "the recipe")
    out_format = _output_format(recipe, op, params, base, models)
    if loras:
        from .adapters.arch import check_compatible
        from .adapters.experts import check_lora_output as check_expert_output, match_with_experts
        from .adapters.matched import MatchedLora

        check_compatible([m.source for m in loras])
        if base is not None:
            keys = list(base.source.infos)
            shapes = {k: i.shape for k, i in base.source.infos.items()}
            for m in loras:
                src, match = match_with_experts(m.source, keys, shapes, config_of_source(base.source))
                m.source = MatchedLora(src, match, base.source)
                if set(match.rules) - {"name"} or match.naming.recognised:
                    notes.append(f"{m.label}: {match.summary()}")
            check_expert_output(loras, out_format)
        else:
            notes += _align_without_base(loras)

    from .adapters.strengths import apply as apply_strengths

    notes += apply_strengths(models, levels, _positions, base)  # te_weight / unet_weight / block_weights per module
    reference = base or models[0]
    model_levels = [levels[m.label] for m in models]
    if out_format in ("peft", "kohya", "bundle"):
        from .fp8_out import refuse_for_adapters

        refuse_for_adapters(recipe)
        keys, shapes = _module_keys(op, base, models, recipe.include, recipe.exclude)
        if not keys:
            raise UserError("no LoRA module is left to merge (check include/exclude)")
        plan = Plan(recipe, op, params, base, models, {}, [], compute, device, out_format=out_format,
                    module_keys=keys, module_shapes=shapes, tokenizer_dir=tokenizer_dir,
                    item_params=resolve_items(op, [(k, k, [k] * len(models)) for k in keys], _positions(keys),
                                              _shared_levels(recipe), model_levels, models))
        _lora_notes(plan)
        _adapter_names(plan)
        plan.notes += notes
        return plan

    read_base = base is not None and (op.reads_base or bool(loras))
    from .recipe_modules import copy_reason

    module_reason, module_notes = copy_reason(recipe, reference.source.infos)  # modules: (M8)
    notes += module_notes
    items, config_updates = plan_items(reference, dense, recipe.include, recipe.exclude, out_dtype,
                                       base=base if read_base else None, all_models=models,
                                       vocab_rows=vocab.size if vocab is not None else None,
                                       module_reason=module_reason)
    config_updates.update(untied)  # a rescaled T5 head (tied_heads.py) is written untied
    if vocab is not None:
        config_updates["vocab_size"] = vocab.config_vocab_size
        notes += vocab.notes
    notes += _fp8_notes(([base] if base else []) + models, config_updates, recipe.out_dtype)
    notes += _mergekit_drop_notes(reference, items)
    if loras:
        adapted = set().union(*(m.source.by_base for m in loras))
        dropped = sorted(k for k in adapted if items[k].action == "copy")
        for name, it in items.items():
            if it.action != "merge":
                continue
            if not dense and name not in adapted:
                # every input is a LoRA and none touches this tensor: all task vectors are zero
                it.action, it.reason = "copy", "no LoRA adapts it"
            else:
                it.read_bytes += sum(sum(math.prod(s) * 4 for s in m.source.stored_shapes(m.source.by_base[name]))
                                     for m in loras if name in m.source.by_base)
    if not any(i.action == "merge" for i in items.values()):
        raise UserError("no tensor is left to merge (check include/exclude)")
    specs = [OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()]
    shards = plan_shards(specs, recipe.output.shard_size)
    merged = [n for n, i in items.items() if i.action == "merge"]
    wanted = [(n, n, [_input_name(items[n], i, n) for i in range(len(models))]) for n in merged]
    item_params = resolve_items(op, wanted, _positions(merged), _shared_levels(recipe), model_levels, models)
    plan = Plan(recipe, op, params, base, models, items, shards, compute, device, out_format="full",
                tokenizer_dir=tokenizer_dir, item_params=item_params, config_updates=config_updates,
                vocab=vocab, chat_template=chat_template)
    plan.notes += notes + _filter_notes(recipe, items, models)
    apply_recipe_dtypes(plan)
    from .fp8_out import apply as fp8_output

    donor = donor_dir(plan)
    fp8_output(plan, ([base] if base else []) + models, _config_of(donor) if donor is not None else {})
    if loras and dropped:
        plan.notes.append(f"{len(dropped)} LoRA-adapted tensor(s) are kept from the base ({items[dropped[0]].reason}), "
                          f"e.g. '{dropped[0]}'")
    return plan


def _mergekit_drop_notes(reference: ModelInput, items: dict) -> list[str]:
    """Tensors written here that mergekit 0.1.5 drops (spec A8, mk_tensor_set): one note per group."""
    from .mk_tensor_set import notes
    from .planning import _config_of

    d = getattr(reference.source, "directory", None)
    return notes(_config_of(Path(d)), items) if d else []


def _filter_notes(recipe: recipe_mod.Recipe, items: dict, models: list[ModelInput]) -> list[str]:
    from .settings import unmatched_filters

    names = set(items)
    for m in models:
        names.update(getattr(m.source, "infos", {}) or {})
    levels = [(w, mp) for w, mp, _ in recipe_mod.parameter_levels(recipe)]
    from .layout import layer_counts
    from .settings import long_gradients

    return unmatched_filters(levels, names) + long_gradients(levels, max(layer_counts(items).values(), default=0))


def _positions(names: list[str]) -> dict[str, float]:
    """t of each tensor of a ``models:`` recipe: its layer's place in its stack (mergekit M4)."""
    from .layout import layer_counts, t_of

    counts = layer_counts(names)
    return {n: t_of(n, counts) for n in names}


def _input_name(item: PlanItem, i: int, name: str) -> str:
    return item.sources[i][1] if item.sources is not None else name


def _output_format(recipe, op: registry.Operator, params: dict, base: ModelInput | None,
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


def _align_without_base(loras: list[ModelInput]) -> list[str]:
    """No base model: LoRAs are aligned by their own module names, so they must share one format.

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


def _module_keys(op: registry.Operator, base: ModelInput | None, models: list[ModelInput],
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


def _lora_notes(plan: Plan) -> None:
    if plan.base is not None and not plan.lora_models:
        skipped = sum(1 for n, i in plan.base.source.infos.items() if n not in plan.module_shapes)
        if skipped:
            plan.notes.append(f"{skipped} tensor(s) that are not 2-D weights are not stored in the bundle; "
                              "a reverted full model takes them from the base")


def _adapter_names(plan: Plan) -> None:
    """PEFT outputs take the installed transformers 5's in-memory module names (so peft loads them)."""
    if plan.out_format == "peft" and plan.base is not None:
        from .adapters.transformers5 import output_names

        plan.adapter_names, note = output_names(plan.module_keys, config_of_source(plan.base.source))
        plan.notes += [note] if note else []


def _tied_source(m: ModelInput, head: str) -> str | None:
    return next((e for e in TIED_HEADS.get(head, ()) if e in m.source.infos), None)


def plan_items(reference: ModelInput, models: list[ModelInput], include: list[str], exclude: list[str],
               out_dtype: str | None, base: ModelInput | None = None, all_models: list[ModelInput] | None = None,
               vocab_rows: int | None = None, module_reason=None) -> tuple[dict[str, PlanItem], dict[str, Any]]:
    """Per tensor of the reference (the base, else the first model): merge or copy, and why; and
    the config fields the output changes.

    Every merged tensor must exist with the same shape in every model; extra tensors in a model
    are an error too (they would be silently dropped otherwise). A head stored by some inputs
    only (tied checkpoints do not store it) is written, and the tied inputs contribute their
    embeddings as their head (mergekit M5); the output config then says untied. A merged tensor
    is written in ``out_dtype``, else in its inputs' promoted dtype (mergekit's result dtype).
    ``models`` are the full checkpoints checked; ``all_models`` every model in plan order (LoRAs
    too), which an item's ``sources`` follow; ``base`` the base when the operator reads it.
    ``vocab_rows``: the aligned vocabulary's row count (a tokenizer setting): vocabulary tensors
    may then differ in rows between inputs and are written with that many.
    ``module_reason``: name -> why it is copied unmerged ("" to merge it), for modular recipes.
    """
    ordered = all_models if all_models is not None else models
    include_re = [re.compile(p) for p in include]
    exclude_re = [re.compile(p) for p in exclude]
    items: dict[str, PlanItem] = {}
    config: dict[str, Any] = {}
    infos = dict(reference.source.infos)
    heads = [h for h in TIED_HEADS if h not in infos and any(h in m.source.infos for m in models)]
    for h in heads:  # the reference is tied, some model stores the head: the head is written
        infos[h] = next(m.source.infos[h] for m in models if h in m.source.infos)
    for name, info in infos.items():
        if info.dtype in FP8:
            raise UserError(
                f"{info.file}: tensor '{name}' is {info.dtype}; FP8 checkpoints need their scale tensors "
                "and are not merged raw - dequantise to bf16/fp16 first"
            )
        reason = ""
        outside = next((m for m in ordered if isinstance(m.source, RenamedSource) and name not in m.source.infos
                        and not (name in TIED_HEADS and _tied_source(m, name))), None)
        if info.dtype not in MERGEABLE:
            reason = "not a float tensor"
        elif outside is not None:  # e.g. a VLM base's vision tower, which a text-only input lacks
            reason = f"not in {outside.label}, whose language model is mapped onto {reference.label}'s"
        elif include_re and not any(p.search(name) for p in include_re):
            reason = "not matched by include"
        elif any(p.search(name) for p in exclude_re):
            reason = "matched by exclude"
        elif module_reason is not None:  # a module a modular recipe does not list
            reason = module_reason(name)
        action = "copy" if reason else "merge"
        read = info.nbytes if name in reference.source.infos else 0
        sources = None
        dtypes = [info.dtype]
        if action == "merge":
            named = []
            for m in ordered:
                if m.is_lora:
                    named.append((m, name))
                    continue
                src = name
                other = m.source.infos.get(name)
                if other is None and name in TIED_HEADS:
                    src = _tied_source(m, name)
                    other = m.source.infos.get(src) if src else None
                if other is None:
                    raise UserError(f"tensor '{name}' is in {reference.ref} but missing from {m.ref}"
                                    + (_mismatch_hint(reference, m, name)
                                       or "; exclude it or use matching checkpoints"))
                aligned = vocab_rows is not None and name in VOCABULARY_TENSORS
                if other.shape != info.shape and not (aligned and other.shape[1:] == info.shape[1:]):
                    raise UserError(_shape_message(name, reference, info, m, other) + _mismatch_hint(reference, m))
                if other.dtype in FP8 or other.dtype not in MERGEABLE:
                    raise UserError(f"tensor '{name}' is {other.dtype} in {m.ref}, cannot merge it")
                read += other.nbytes
                dtypes.append(other.dtype)
                named.append((m, src))
            base_src = None
            if base is not None:
                bname = name if name in base.source.infos else _tied_source(base, name)
                if bname is None:
                    raise UserError(f"tensor '{name}' is missing from the base model {base.ref}")
                base_src = (base, bname)
                if bname != name:
                    read += base.source.infos[bname].nbytes
            if any(src != name for _, src in named) or (base_src is not None and base_src[1] != name):
                sources = tuple(named)
            od = out_dtype or promoted(dtypes)
        else:
            od = info.dtype
        shape = info.shape
        if vocab_rows is not None and name in VOCABULARY_TENSORS and action == "merge":
            shape = (vocab_rows, *info.shape[1:])
        item = PlanItem(name, action, shape, info.dtype, od, read, reason)
        if sources is not None:
            item.sources, item.base_source = sources, base_src
        items[name] = item
    if any(_head_differs_from_embeddings(items, h) for h in TIED_HEADS if h in items):
        config["tie_word_embeddings"] = False
    known = set(infos) | {e for es in TIED_HEADS.values() for e in es}
    for m in models:
        extra = sorted(set(m.source.infos) - known)
        if extra:
            raise UserError(
                f"tensor '{extra[0]}' is in {m.ref} but not in {reference.ref}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + (_mismatch_hint(reference, m) or "; use checkpoints of the same architecture")
            )
    return items, config


def map_prefixes(recipe: recipe_mod.Recipe, base: ModelInput | None, models: list[ModelInput]) -> list[str]:
    """Inputs whose language model sits under another prefix than the reference's (a text-only
    fine-tune of a VLM's language tower, or the reverse) are seen under the reference's names
    (prefixes.py); the recipe's ``prefix_map`` (input prefix -> reference prefix) replaces
    detection. Returns one note per renamed input."""
    from .prefixes import RenamedSource, detect

    reference = base or next((m for m in models if not m.is_lora), None)
    if reference is None:
        return []
    names = list(reference.source.infos)
    given = recipe.prefix_map
    notes = []
    for m in models:
        if m is reference or m.is_lora or m.source is reference.source:
            continue
        own = list(m.source.infos)
        if given is not None:
            pairs = tuple((ref, mine) for mine, ref in given.items())
            if not pairs or sum(n in set(names) for n in own) >= 0.5 * len(own):
                continue
        else:
            pairs = detect(names, own)
            if pairs is None:
                continue
        m.source = RenamedSource(m.source, pairs, names)
        dropped = m.source.dropped
        notes.append(f"{m.label}: {m.source.describe()} ({m.source.renamed} tensors renamed"
                     + (f"; {len(dropped)} not in {reference.label} left out, e.g. '{dropped[0]}'" if dropped else "")
                     + ")" + ("" if given is not None else "; set prefix_map to change this"))
    return notes + _map_expert_layouts(reference, models)


def _map_expert_layouts(reference: ModelInput, models: list[ModelInput]) -> list[str]:
    """MoE inputs storing experts fused (a state dict saved as transformers 5 holds it) against a
    per-expert reference, or the reverse, are seen in the reference's layout (experts.py)."""
    from .experts import ExpertLayoutSource, needs_conversion

    notes = []
    for m in models:
        if m is reference or m.is_lora or not needs_conversion(reference.source.infos, m.source.infos):
            continue
        m.source = ExpertLayoutSource(m.source, reference.source.infos)
        notes.append(f"{m.label}: {m.source.describe()} (the layout of {reference.label})")
    return notes


def _head_differs_from_embeddings(items: dict[str, PlanItem], head: str) -> bool:
    """Whether the written head can differ from the written embeddings, so that the output must
    say untied (a tied config would make transformers use the embeddings and drop the head, or
    refuse to tie them): some input contributes its embeddings as its head (it is tied and does
    not store one), or the head is kept from the base while the embeddings are merged (``exclude:
    lm_head`` on tied checkpoints). A head merged from heads the inputs all store can differ too (a
    method with random masks, DARE, draws them per tensor), so any merged head says untied."""
    it = items[head]
    if it.action == "merge":
        return True
    return any(items[e].action == "merge" for e in TIED_HEADS[head] if e in items)


def _fp8_notes(inputs: list[ModelInput], config_updates: dict, out_dtype: str | None = None) -> list[str]:
    """FP8 inputs are read dequantised (fp8.py): the output is not quantised, so its config drops
    ``quantization_config``, unless ``out_dtype`` asks for FP8 (fp8_out writes fresh scales and a
    new config); say which inputs were dequantised and what was dropped."""
    from .fp8_out import requested
    from .writer import REMOVE

    requantised = requested(out_dtype) is not None

    notes = []
    for m in inputs:
        scheme = getattr(m.source, "scheme", "")
        if scheme:
            config_updates["quantization_config"] = REMOVE
            dropped = getattr(m.source, "dropped", [])
            notes.append(f"{m.label}: {scheme} read dequantised; the output is "
                         + ("re-quantised with fresh scales" if requantised else "not quantised")
                         + (f" ({len(dropped)} activation scale(s) dropped, e.g. '{dropped[0]}')" if dropped else ""))
    return notes


def _mismatch_hint(reference: ModelInput, m: ModelInput, missing: str | None = None) -> str:
    from .prefixes import mismatch_hint

    return mismatch_hint(reference.label, reference.source, m.source, missing)


def _shape_message(name: str, reference: ModelInput, info, m: ModelInput, other) -> str:
    if name in VOCABULARY_TENSORS and info.shape[1:] == other.shape[1:]:
        return (f"tensor '{name}' has {info.shape[0]} vocabulary rows in {reference.ref} but {other.shape[0]} "
                f"in {m.ref} (mergekit: Tensor size mismatch); align the vocabularies with tokenizer_source: "
                "base, union or a model, or a tokenizer: section")
    return f"tensor '{name}' has shape {list(info.shape)} in {reference.ref} but {list(other.shape)} in {m.ref}"


# --- what a plan reads -------------------------------------------------------------------------


def close(plan: Plan) -> None:
    for m in ([plan.base] if plan.base else []) + plan.models:
        m.source.close()


def recipe_yaml(recipe: recipe_mod.Recipe) -> str:
    import yaml

    data = recipe._raw if recipe._raw is not None else recipe.model_dump()
    return yaml.safe_dump(data, sort_keys=False)


def input_paths(plan: Plan) -> list[Path]:
    """Every path the plan reads: the models' files and directories, the recipe, the tokenizer
    donor. An output must stay clear of all of them (``placement.refuse_overlap``)."""
    paths: list[Path] = []
    for m in ([plan.base] if plan.base else []) + plan.models:
        for src in (m.source, getattr(getattr(m.source, "lora", None), "source", None)):  # model+lora: both
            for attr in ("path", "directory"):
                p = getattr(src, attr, None)
                if p is not None:
                    paths.append(Path(p))
        if m.source is None and m.ref:
            paths.append(Path(m.ref))
    if plan.recipe._source_path is not None:
        paths.append(plan.recipe._source_path)
    if plan.tokenizer_dir is not None:
        paths.append(plan.tokenizer_dir)
    return paths + list(plan.extra_inputs)


def donor_dir(plan: Plan) -> Path | None:
    """Config and tokenizer files come from tokenizer_source, else the base, else the first model;
    none with ``output.copy_files: false`` (the merged tensors and our card and report only)."""
    if not plan.recipe.output.copy_files:
        return None
    candidates = [plan.tokenizer_dir] if plan.tokenizer_dir is not None else []
    for m in ([plan.base] if plan.base else []) + plan.models:
        d = getattr(m.source, "directory", None)
        if d is not None:
            candidates.append(Path(d))
    for c in candidates:
        if c.is_dir():
            return c
    return None
