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
from pathlib import Path

from . import plan_adapters
from . import recipe as recipe_mod
from .dtypes import canonical
from .errors import UserError
from .ops import registry
from .plan_items import plan_items
from .planning import (ModelInput, Plan, PlanItem, _config_of, _plan_params, _same_ref, _shared_levels, _unique_label,
                       apply_recipe_dtypes, check_model_count, config_of_source, open_source, output_dtype,
                       resolve_items, tokenizer_donor, vocabulary_for)
from .writer import OutTensor, plan_shards

# the plan's API; the types and helpers it is built from live in planning.py, the per-tensor
# decisions in plan_items.py and the adapter-output side in plan_adapters.py
__all__ = ["ModelInput", "Plan", "PlanItem", "build_plan", "close", "donor_dir", "input_paths", "map_prefixes",
           "open_source", "output_dtype", "plan_items", "recipe_yaml"]


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
        label = _unique_label(recipe_mod.label_from(base.ref), {m.label for m in models})
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
    out_format = plan_adapters.output_format(recipe, op, params, base, models)
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
            notes += plan_adapters.align_without_base(loras)

    from .adapters.strengths import apply as apply_strengths

    notes += apply_strengths(models, levels, _positions, base)  # te_weight / unet_weight / block_weights per module
    reference = base or models[0]
    model_levels = [levels[m.label] for m in models]
    if out_format in ("peft", "kohya", "bundle"):
        from .fp8_out import refuse_for_adapters

        refuse_for_adapters(recipe)
        keys, shapes = plan_adapters.module_keys(op, base, models, recipe.include, recipe.exclude)
        if not keys:
            raise UserError("no LoRA module is left to merge (check include/exclude)")
        plan = Plan(recipe, op, params, base, models, {}, [], compute, device, out_format=out_format,
                    module_keys=keys, module_shapes=shapes, tokenizer_dir=tokenizer_dir,
                    item_params=resolve_items(op, [(k, k, [k] * len(models)) for k in keys], _positions(keys),
                                              _shared_levels(recipe), model_levels, models))
        plan_adapters.lora_notes(plan)
        plan_adapters.adapter_names(plan)
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
