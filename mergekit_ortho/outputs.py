"""Where a plan's result goes: `merge run` picks the sink for the plan's output format (full model,
PEFT / kohya adapter, RMM bundle) and the compute for its items, and runs the one loop
(:func:`.execute.execute`). A fold with a reduce across tensors (OPCM) runs its single pass (:mod:`.sequential`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .execute import Work, bundle_result, execute, full_item, in_order, lowrank_result, write_full_model


def run(plan, out: Path, overwrite: bool = False, on_tensor: Callable[[str, int], None] | None = None,
        force_replace: bool = False, lanes: int | None = None) -> Path:
    """Execute ``plan`` into ``out`` atomically, in the plan's output format (``lanes``: see
    :func:`.execute.fill_full`)."""
    from .plan import input_paths

    guard = dict(overwrite=overwrite, inputs=input_paths(plan), force_replace=force_replace)
    if not plan.op.merges_one_tensor_alone:
        from .sequential import run_sequential

        return run_sequential(plan, out, on_tensor=on_tensor, **guard)
    if plan.out_format == "full":
        return write_full_model(plan, out, full_item(plan), on_tensor=on_tensor, lanes=lanes, **guard)
    sink = _bundle_sink(plan, out, guard) if plan.out_format == "bundle" else _adapter_sink(plan, out, guard)
    with sink:
        fill_modules(plan, sink, plan.module_keys, on_tensor)
        return sink.commit()


def fill_modules(plan, sink, keys: list[str], on_tensor: Callable[[str, int], None] | None = None) -> None:
    """The loop over the modules ``keys`` of an adapter or bundle plan into ``sink`` (a serial
    run: all of them; a unit of a sharded run, :mod:`.module_units`: its own)."""
    if plan.out_format == "bundle":
        compute = lambda key: bundle_result(plan, key)  # noqa: E731
    else:
        compute = lambda key: lowrank_result(plan, key)  # noqa: E731
    work = {k: Work(k, plan.module_read_bytes(k), _module_need(plan, k)) for k in keys}
    execute(in_order(sink, work), compute, sink, peak_bytes=plan.peak_bytes,
            inputs_hint=", ".join(m.ref for m in plan.models), on_item=on_tensor)


def _module_need(plan, key: str) -> int:
    shape = plan.module_shapes[key]
    return shape[0] * shape[1] * 4 * (len(plan.models) + 2)


def _peft_base_name(plan) -> str | None:
    if plan.base is not None:
        return plan.base.ref
    names = {m.source.config.get("base_model_name_or_path") for m in plan.lora_models if m.source.config}
    names.discard(None)
    return names.pop() if len(names) == 1 else None


def config_of_source(source) -> dict:
    from .planning import config_of_source as of

    return of(source)


def _base_config(plan) -> dict:
    return config_of_source(plan.base.source) if plan.base is not None else {}


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _adapter_dtype(plan):
    """out_dtype, else the dtype most of the input LoRAs' tensors are stored in."""
    from collections import Counter

    import torch

    from .plan import output_dtype

    if output_dtype(plan.recipe):
        return getattr(torch, output_dtype(plan.recipe))
    seen: Counter = Counter()
    for m in plan.lora_models:
        for dt, _shape in m.source._entries.values():
            seen[_ST_DTYPES.get(dt, dt)] += 1
    best = next((d for d, _ in seen.most_common() if d in ("float16", "bfloat16", "float32")), "float32")
    return getattr(torch, best)


def _adapter_sink(plan, out: Path, guard: dict):
    from . import sinks
    from .lora_out import layouts_of, to_kohya, to_peft

    dtype = _adapter_dtype(plan)
    shapes = {k: plan.base.source.infos[k].shape for k in plan.module_keys} if plan.base is not None else None
    sources = [m.source for m in plan.lora_models]
    meta = sinks.merge_metadata(plan.recipe, plan.op.name)
    fmt = plan.out_format

    def pack(modules: dict):
        shaped = {k: shapes[k] for k in modules} if shapes is not None else None
        if fmt == "peft":
            from .adapters.experts_out import merge_config, split_expert_modules

            tasks = {m.source.config.get("task_type") for m in plan.lora_models if m.source.config}
            plain, experts, expert_cfg = split_expert_modules(modules, sources, dtype)
            shaped = {k: shaped[k] for k in plain} if shaped is not None else None
            if plan.base is not None and shaped is not None:
                from .adapters.transformers5_fused import split_outputs

                plain, shaped = split_outputs(plain, shaped, config_of_source(plan.base.source))
            tensors, cfg = to_peft(plain, _peft_base_name(plan), shapes=shaped, layouts=layouts_of(sources),
                                   dtype=dtype, task_type=tasks.pop() if len(tasks) == 1 else None,
                                   names=plan.adapter_names)
            tensors.update(experts)
            return tensors, meta, merge_config(cfg, expert_cfg, bool(plain))
        tensors, kmeta = to_kohya(modules, template=sources, shapes=shaped, dtype=dtype, sources=sources,
                                  metadata={k: v for k, v in meta.items() if k != "format"},
                                  merged_from=[m.label for m in plan.models])
        return tensors, kmeta, None

    def describe(modules: dict) -> str:
        ranks = sorted({int(a.shape[0]) for a, _ in modules.values()})
        return f"LoRA output ({fmt}), {len(modules)} modules, rank(s) {ranks}."

    card = sinks.Card(plan.op.name, plan.base.ref if plan.base else None, [(m.label, m.ref) for m in plan.models],
                      sinks.recipe_yaml(plan.recipe))
    head = {"method": plan.op.name, "parameters": sinks.json_safe(dict(plan.params)),
            "models": [m.label for m in plan.models]}
    return sinks.Adapter(out, fmt, pack, card=card, card_extra=describe, report_head=head, **guard)


def _bundle_sink(plan, out: Path, guard: dict):
    from . import bundle, sinks
    from .lora_out import layouts_of

    sources = [m.source for m in plan.lora_models]
    p = plan.params["basis_size"]

    def manifest(reports: dict) -> dict:
        extras = {
            "layouts": layouts_of(sources) if sources else {},
            "kohya_names": {k: s.by_base[k] for s in sources if s.format == "kohya" for k in s.by_base},
            "input_formats": {m.label: (m.source.format if m.is_lora else "full") for m in plan.models},
            "base_shapes": ({k: list(plan.base.source.infos[k].shape) for k in reports} if plan.base else {}),
            "peft_base_model": _peft_base_name(plan),
            "base_config": _base_config(plan),  # `merge revert` names PEFT modules by its family's rules
        }
        return bundle.build_manifest([m.label for m in plan.models], reports, p=p, center=plan.params["center"],
                                     base_model=plan.base.ref if plan.base else None, extras=extras)

    def describe(written: dict) -> str:
        ratio = written.get("storage_ratio")
        n = len(written.get("modules", {}))
        return (f"RMM bundle: {n} modules, p = {p}, storage ratio {ratio:.3f} of keeping every adapter."
                if ratio is not None else "RMM bundle.")

    card = sinks.Card(plan.op.name, plan.base.ref if plan.base else None, [(m.label, m.ref) for m in plan.models],
                      sinks.recipe_yaml(plan.recipe))
    return sinks.Bundle(out, manifest, card, describe, **guard)
