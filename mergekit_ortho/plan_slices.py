"""The plan of a ``slices:`` recipe (frankenmerges): output layers taken from layer ranges of the
models, renumbered from 0, each merged over its slice's sources.

Spec: ../shared/specs/mergekit_compat.md M7 (slices, sources, layer_range), M3 (a source's own
parameters, then the slice's, the module's, the top level; per-model filters see the source's
input name, method-level ones the output name), M9 (config: ``num_hidden_layers`` and per-layer
arrays follow the output layers). Headers only, like :func:`.plan.build_plan`.

Deliberate differences from mergekit (its Appendix A): post-weights (final norm, head) are merged
over *every* source of the last slice (mergekit pairs them with only as many sources as the first
slice has, A3); a reversed ``layer_range`` is an error (mergekit subtracts it from the layer
count, A4); ``layer_types`` is sliced with the layers (mergekit leaves it, and transformers 5
then refuses the config, A7).
"""
from __future__ import annotations

from typing import Any

from . import recipe as recipe_mod
from .dtypes import FP8, MERGEABLE
from .errors import UserError
from .layout import LayoutError, frankenmerge, layer_counts, output_layers
from .ops import registry
from .planning import (ModelInput, Plan, PlanItem, _plan_params, _same_ref, _shared_levels, check_model_count,
                       apply_recipe_dtypes, open_source, promoted, resolve_items, tokenizer_donor)
from .writer import OutTensor, plan_shards


def slices_plan(recipe: recipe_mod.Recipe, op: registry.Operator, params: registry.Params, compute: str,
                out_dtype: str | None, device: str):

    if not op.merges_one_tensor_alone or op.input_kind != "dense" or op.result != "tensor":
        raise UserError(f"method '{op.name}' cannot merge a slices recipe (it merges whole models or adapters); "
                        "use models:")
    opened: dict[str, ModelInput] = {}
    taken: set[str] = set()

    def model(raw: str) -> ModelInput:
        ref = recipe_mod.resolve_ref(recipe, raw)
        for known in opened.values():
            if _same_ref(known.ref, ref):
                return known
        label, k = recipe_mod.label_from(raw), 2
        while label in taken:
            label, k = f"{recipe_mod.label_from(raw)}_{k}", k + 1
        taken.add(label)
        m = ModelInput(label, ref, open_source(ref, label), registry.Params())
        if m.is_lora:
            raise UserError(f"{ref} is a LoRA adapter; slices take full checkpoints (apply the LoRA first)")
        opened[ref] = m
        return m

    top_base = model(recipe.base_model) if recipe.base_model else None
    slices: list[dict[str, Any]] = []
    for k, sl in enumerate(recipe.slices):
        members = [model(src.model) for src in sl.sources]
        if len({id(m) for m in members}) != len(members):
            raise UserError(f"slices[{k}] lists the same model twice")
        base = model(sl.base_model) if sl.base_model else top_base
        base_at = None
        if op.reads_base and base is not None:
            base_at = next((i for i, m in enumerate(members) if m is base), None)
        if base_at is None and (op.reads == "deltas" or op.needs_base):
            if base is None:
                raise UserError(f"slices[{k}]: method '{op.name}' needs base_model (at the top or in the slice)")
            raise UserError(f"slices[{k}]: the base model {base.ref} is not among its sources; in slices the "
                            "base is merged only as one of them (mergekit's rule) - add it")
        ranges = []
        for j, (src, m) in enumerate(zip(sl.sources, members)):
            if src.layer_range is not None:
                ranges.append(tuple(src.layer_range))
            else:
                counts = layer_counts(m.source.infos)
                ranges.append((0, max(counts.values(), default=0)))
        n_models = len(members) - (1 if base_at is not None else 0)
        check_model_count(op, n_models, f"slices[{k}]")
        slices.append({"members": members, "base_at": base_at, "ranges": ranges, "spec": sl})

    try:
        laid = frankenmerge([s["ranges"] for s in slices], lambda m: list(m.source.infos),
                            lambda k: slices[k]["members"])
    except LayoutError as e:
        raise UserError(str(e)) from None

    items: dict[str, PlanItem] = {}
    wanted: dict[int, list] = {}
    for lo in laid:
        sl = slices[lo.slice]
        members, base_at = sl["members"], sl["base_at"]
        infos = []
        for m, in_name in zip(members, lo.inputs):
            info = m.source.infos.get(in_name)
            if info is None:
                raise UserError(f"tensor '{in_name}' (for output '{lo.name}', slices[{lo.slice}]) is missing "
                                f"from {m.ref}")
            infos.append(info)
        first = infos[0]
        for m, info in zip(members[1:], infos[1:]):
            if info.shape != first.shape:
                raise UserError(f"tensor '{lo.name}' (slices[{lo.slice}]) has shape {list(first.shape)} in "
                                f"{members[0].ref} but {list(info.shape)} in {m.ref}")
        if any(i.dtype in FP8 for i in infos):
            raise UserError(f"tensor '{lo.inputs[0]}' is FP8; dequantise the checkpoint to bf16/fp16 first")
        mergeable = all(i.dtype in MERGEABLE for i in infos)
        pairs = list(zip(members, lo.inputs))
        base_src = pairs[base_at] if base_at is not None else None
        others = tuple(p for i, p in enumerate(pairs) if i != base_at)
        item = PlanItem(lo.name, "merge" if mergeable else "copy", first.shape, first.dtype,
                        (out_dtype or promoted([i.dtype for i in infos])) if mergeable else first.dtype,
                        sum(i.nbytes for i in infos), "" if mergeable else "not a float tensor")
        item.sources, item.base_source = others, base_src
        items[lo.name] = item
        if mergeable:
            wanted.setdefault(lo.slice, []).append((lo, others))

    item_params = {}
    for k, entries in wanted.items():
        sl = slices[k]
        spec = sl["spec"]
        shared = _shared_levels(recipe, spec.parameters)
        own = [src.parameters for i, src in enumerate(spec.sources) if i != sl["base_at"]]
        levels = [[p] + shared for p in own]
        models = [m for i, m in enumerate(sl["members"]) if i != sl["base_at"]]
        item_params.update(resolve_items(op, [(lo.name, lo.name, [n for _, n in others]) for lo, others in entries],
                                         {lo.name: lo.t for lo, _ in entries}, shared, levels, models))
    base = top_base
    order = []
    for s in slices:
        for i, m in enumerate(s["members"]):
            if i != s["base_at"] and m not in order:
                order.append(m)
    for m in order:
        m.params = _plan_params(op, [recipe._module_parameters, recipe.parameters], "model")
    tokenizer_dir, tokenizer_note = tokenizer_donor(recipe)
    specs = [OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()]
    plan = Plan(recipe, op, params, base, order, items, plan_shards(specs, recipe.output.shard_size), compute,
                device, out_format="full", tokenizer_dir=tokenizer_dir, item_params=item_params,
                config_updates=_config_updates(slices))
    from .settings import unmatched_filters

    names = set(items) | {n for m in opened.values() for n in m.source.infos}
    levels = [(w, mp) for w, mp, _ in recipe_mod.parameter_levels(recipe)]
    apply_recipe_dtypes(plan)
    from .fp8_out import apply as fp8_output

    fp8_output(plan, order, {})
    from .settings import long_gradients

    span = max((b - a for s in slices for a, b in s["ranges"][:1]), default=0)
    plan.notes += (list(recipe._warnings) + ([tokenizer_note] if tokenizer_note else [])
                   + unmatched_filters(levels, names) + long_gradients(levels, span))
    for k, s in enumerate(slices):
        empty = [j for j, (a, b) in enumerate(s["ranges"]) if a == b]
        if empty:
            plan.notes.append(f"slices[{k}] is empty (layer_range [{s['ranges'][0][0]}, {s['ranges'][0][1]}) "
                              "adds no layer)")
    return plan


def _config_updates(slices: list[dict]) -> dict[str, Any]:
    layers = output_layers([s["ranges"] for s in slices])

    def sliced(values):
        # a per-layer list (layer_types) follows the output layers; anything else is left alone
        if isinstance(values, list) and layers and max(layers) < len(values):
            return [values[i] for i in layers]
        return values

    return {"num_hidden_layers": len(layers), "layer_types": sliced}
