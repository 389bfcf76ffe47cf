"""Module-by-module execution: LoRA outputs (PEFT / kohya), RMM bundles, LoRA methods written as
full models, and reverting a bundle.

The same engine as dense merges, grouped differently: a LoRA method sees one adapted module at a
time (every input's canonical scale-folded factors for that base key), never a whole adapter's
dense deltas. Dense methods given LoRA inputs with a LoRA output get each module's dense deltas
(``scale * B @ A``) and their result is re-factored by truncated SVD (``output.rank``); linear and
task_arithmetic have an exact low-rank form (rank concatenation) and skip that step.

No math here beyond calling operators and :mod:`mergekit_ortho.ops.lowrank`; files are written
through the writer's atomic directory (or an atomic single file for ``.safetensors`` kohya paths).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from .dtypes import cast_checked
from .errors import UserError
from .ops import registry

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


# --- one module -------------------------------------------------------------------------------


def _lora_task(plan, key: str, all_models: bool) -> registry.LoraTask:
    import torch

    factors, index, params, names = [], [], [], []
    shape = plan.module_shapes.get(key) or tuple(plan.items[key].shape)
    rows, cols = shape[0], math.prod(shape[1:])
    for i, m in enumerate(plan.models):
        mod = m.source.by_base.get(key)
        if mod is None:
            if not all_models:
                continue
            A, B = torch.zeros(0, cols), torch.zeros(rows, 0)
        else:
            A, B = m.source.factors_for(key, fold=plan.op.factor_fold)
        factors.append((A, B))
        index.append(i)
        params.append(m.params)
        names.append(m.label)
    base = None
    if plan.op.needs_base and plan.base is not None:
        base = plan.base.source.get(key).to(torch.float32)
    return registry.LoraTask(key, factors, plan.params, params, index, names, base)


def _dense_delta(plan, key: str):
    """A dense method's merged delta on one module (LoRA inputs materialised as scale * B @ A)."""
    import torch

    from .engine import apply_dense

    op = plan.op
    base = plan.base.source.get(key).to(torch.float32)
    task = registry.TensorTask(key, base, [], plan.params, [m.params for m in plan.models],
                               [m.label for m in plan.models])

    def load(m):
        mod = m.source.by_base.get(key)
        x = m.source.delta_for(key, base.shape) if mod is not None else torch.zeros_like(base)
        return x.add_(base) if op.reads == "weights" else x

    out = apply_dense(op, task, lambda: (load(m) for m in plan.models))
    if op.reads == "weights":
        out = out - base
    return out.reshape(base.shape[0], -1)


def _pt_svd_task(plan, key: str) -> registry.TensorTask:
    """Full fine-tunes through a LoRA method (rmm with ``rank``): the task vectors of one tensor."""
    import torch

    base = plan.base.source.get(key).to(torch.float32)
    inputs = [m.source.get(key).to(torch.float32).sub_(base) for m in plan.models]
    return registry.TensorTask(key, None, inputs, plan.params, [m.params for m in plan.models],
                               [m.label for m in plan.models])


def module_result(plan, key: str) -> registry.LoraResult:
    op = plan.op
    if op.input_kind == "lora":
        if not plan.lora_models:
            return op.fn(_pt_svd_task(plan, key))
        return op.fn(_lora_task(plan, key, all_models=False))
    if op.lora_fn is not None:
        return op.lora_fn(_lora_task(plan, key, all_models=True))
    return registry.LoraResult(delta=_dense_delta(plan, key))


def _check_finite(key: str, *tensors) -> None:
    import torch

    for t in tensors:
        if t is not None and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise UserError(f"merged module '{key}' contains NaN or Inf; check the inputs and the method parameters")


def full_tensor(plan, name: str):
    """Base + the LoRA method's merged delta for one tensor of a full-model output."""
    import torch

    res = module_result(plan, name)
    base = plan.base.source.get(name).to(torch.float32)
    delta = res.delta if res.delta is not None else res.B @ res.A
    out = base.add_(delta.reshape(base.shape))
    _check_finite(name, out)
    plan.reports[name] = _json_safe(res.report)
    return cast_checked(out, getattr(torch, plan.items[name].out_dtype), name)


# --- LoRA outputs ------------------------------------------------------------------------------


def _out_dtype(plan):
    import torch

    from .dtypes import canonical

    if plan.recipe.out_dtype:
        return getattr(torch, canonical(plan.recipe.out_dtype, "out_dtype"))
    seen: Counter = Counter()
    for m in plan.lora_models:
        for dt, _shape in m.source._entries.values():
            seen[_ST_DTYPES.get(dt, dt)] += 1
    best = next((d for d, _ in seen.most_common() if d in ("float16", "bfloat16", "float32")), "float32")
    return getattr(torch, best)


def _json_safe(report: dict) -> dict:
    import torch

    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.tolist() if v.numel() <= 4096 else f"<tensor {list(v.shape)}>"
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, float) and v != v:
            return None
        return v

    return conv(report)


def merged_modules(plan, on_module: Callable[[str, int], None] | None = None):
    """{base key: (A, B)} of the merged adapter plus per-module reports (output.rank applied)."""
    rank = plan.recipe.output.rank
    modules, reports = {}, {}
    from .ops import lowrank

    from .errors import memory_guard

    for key in plan.module_keys:
        shape = plan.module_shapes[key]
        with memory_guard(key, shape[0] * shape[1] * 4 * (len(plan.models) + 2), plan.peak_bytes):
            res = module_result(plan, key)
        rep = _json_safe(dict(res.report))
        A, B = res.A, res.B
        if A is None:
            if res.delta is None:
                raise UserError(f"method '{plan.op.name}' gave no result for module '{key}'")
            if rank is None:
                raise UserError(f"method '{plan.op.name}' gives a full-rank delta for '{key}'; set output.rank "
                                "to extract a LoRA, or use output.format full")
            A, B, err = lowrank.factorize(res.delta, rank)
            rep["extraction_relative_error"] = err
        elif rank is not None and A.shape[0] > rank:
            A, B, err = lowrank.truncate(A, B, rank)
            rep["truncation_relative_error"] = err
        _check_finite(key, A, B)
        rep["rank"] = int(A.shape[0])
        modules[key] = (A.contiguous(), B.contiguous())
        reports[key] = rep
        if on_module:
            on_module(key, plan.module_read_bytes(key))
    return modules, reports


def _metadata(plan) -> dict[str, str]:
    from . import __version__

    r = plan.recipe
    return {
        "format": "pt",
        "merge_tool": f"mergekit-ortho {__version__}",
        "merge_method": plan.op.name,
        "merge_recipe": json.dumps(r._raw if r._raw is not None else r.model_dump(), sort_keys=False),
    }


def _save(tensors, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _card(plan, out: Path, extra: str) -> None:
    from .engine import recipe_yaml
    from .writer import write_model_card

    write_model_card(out, plan.op.name, plan.base.ref if plan.base else None,
                     [(m.label, m.ref) for m in plan.models], recipe_yaml(plan.recipe), extra)


def _peft_base_name(plan) -> str | None:
    if plan.base is not None:
        return plan.base.ref
    names = {m.source.config.get("base_model_name_or_path") for m in plan.lora_models if m.source.config}
    names.discard(None)
    return names.pop() if len(names) == 1 else None


def run_lora(plan, out: Path, overwrite: bool = False, on_module=None, force_replace: bool = False) -> Path:
    """Write the merged adapter as PEFT (a directory) or kohya (a directory, or one file when
    ``out`` ends in .safetensors), atomically."""
    from .engine import input_paths
    from .lora_out import layouts_of, to_kohya, to_peft
    from .writer import AtomicDirectory, AtomicFile

    guard = dict(inputs=input_paths(plan), force_replace=force_replace)
    modules, reports = merged_modules(plan, on_module)
    dtype = _out_dtype(plan)
    shapes = {k: plan.base.source.infos[k].shape for k in modules} if plan.base is not None else None
    sources = [m.source for m in plan.lora_models]
    report = {"method": plan.op.name, "parameters": _json_safe(plan.params),
              "models": [m.label for m in plan.models], "modules": reports}
    ranks = sorted({int(a.shape[0]) for a, _ in modules.values()})
    extra = f"LoRA output ({plan.out_format}), {len(modules)} modules, rank(s) {ranks}."
    meta = _metadata(plan)
    if plan.out_format == "peft":
        tasks = {m.source.config.get("task_type") for m in plan.lora_models if m.source.config}
        tensors, cfg = to_peft(modules, _peft_base_name(plan), shapes=shapes, layouts=layouts_of(sources),
                               dtype=dtype, task_type=tasks.pop() if len(tasks) == 1 else None)
        atomic = AtomicDirectory(out, overwrite, **guard)
        with atomic as tmp:
            _save(tensors, tmp / "adapter_model.safetensors", meta)
            _write_json(tmp / "adapter_config.json", cfg)
            _write_json(tmp / "merge_report.json", report)
            _card(plan, tmp, extra)
            atomic.commit()
        return atomic.target
    tensors, kmeta = to_kohya(modules, template=sources, shapes=shapes, dtype=dtype, sources=sources,
                              metadata={k: v for k, v in meta.items() if k != "format"},
                              merged_from=[m.label for m in plan.models])
    if Path(out).suffix == ".safetensors":
        with AtomicFile(Path(out), overwrite, **guard) as tmp:
            _save(tensors, tmp, kmeta)
        return Path(out).absolute()
    atomic = AtomicDirectory(out, overwrite, **guard)
    with atomic as tmp:
        _save(tensors, tmp / f"{Path(out).name}.safetensors", kmeta)
        _write_json(tmp / "merge_report.json", report)
        _card(plan, tmp, extra)
        atomic.commit()
    return atomic.target


# --- RMM bundles -------------------------------------------------------------------------------


def run_bundle(plan, out: Path, overwrite: bool = False, on_module=None, force_replace: bool = False) -> Path:
    from . import bundle
    from .engine import input_paths
    from .lora_out import layouts_of
    from .writer import AtomicDirectory

    atomic = AtomicDirectory(out, overwrite, inputs=input_paths(plan), force_replace=force_replace)
    atomic.check()  # before any work
    tensors, reports = {}, {}
    for key in plan.module_keys:
        res = module_result(plan, key)
        rep = dict(res.report)
        tensors[key] = rep.pop("rmm_tensors")
        reports[key] = _json_safe(rep)
        if on_module:
            on_module(key, plan.module_read_bytes(key))
    sources = [m.source for m in plan.lora_models]
    extras = {
        "layouts": layouts_of(sources) if sources else {},
        "kohya_names": {k: s.by_base[k] for s in sources if s.format == "kohya" for k in s.by_base},
        "input_formats": {m.label: (m.source.format if m.is_lora else "full") for m in plan.models},
        "base_shapes": ({k: list(plan.base.source.infos[k].shape) for k in tensors} if plan.base else {}),
        "peft_base_model": _peft_base_name(plan),
    }
    manifest = bundle.build_manifest([m.label for m in plan.models], reports, p=plan.params["basis_size"],
                                     center=plan.params["center"], base_model=plan.base.ref if plan.base else None,
                                     extras=extras)
    with atomic as tmp:
        try:
            written = bundle.write_bundle(tmp, tensors, manifest)
        except OSError as e:
            raise UserError(f"cannot write the bundle into {out}: {e.strerror or e}") from None
        ratio = written.get("storage_ratio")
        _card(plan, tmp, f"RMM bundle: {len(tensors)} modules, p = {plan.params['basis_size']}, storage ratio "
                         f"{ratio:.3f} of keeping every adapter." if ratio is not None else "RMM bundle.")
        atomic.commit()
    return atomic.target


def revert(bundle_dir: Path, task: str, out: Path, fmt: str = "peft", base_ref: str | None = None,
           overwrite: bool = False, out_dtype: str | None = None, force_replace: bool = False) -> Path:
    """Rebuild one task from a bundle alone: a PEFT / kohya adapter (scale 1) or a full model."""
    import torch

    from . import bundle as bundle_mod
    from .lora_out import to_kohya, to_peft
    from .writer import AtomicDirectory, AtomicFile, write_model_card

    base_ref = base_ref or None
    guard = dict(inputs=[Path(bundle_dir)] + ([Path(base_ref)] if base_ref else []), force_replace=force_replace)
    if Path(out).suffix == ".safetensors" and fmt == "kohya":
        AtomicFile(Path(out), overwrite, **guard)  # checks the target before any work
    else:
        AtomicDirectory(out, overwrite, **guard).check()
    b = bundle_mod.read_bundle(bundle_dir)
    modules = b.revert(task)
    if not modules:
        raise UserError(f"task '{task}' adapts no module in bundle {bundle_dir}")
    extras = b.manifest.get("extras") or {}
    shapes = {k: tuple(v) for k, v in (extras.get("base_shapes") or {}).items()} or None
    dtype = getattr(torch, out_dtype) if out_dtype else torch.float32
    card = f"Task `{task}` reverted from the RMM bundle `{bundle_dir}` (p = {b.manifest['p']})."
    if fmt == "full":
        return _revert_full(b, modules, task, base_ref or b.manifest.get("base_model"), out, overwrite,
                            out_dtype, card, guard)
    if fmt == "peft":
        tensors, cfg = to_peft(modules, extras.get("peft_base_model") or b.manifest.get("base_model"),
                               shapes=shapes, layouts=extras.get("layouts") or None, dtype=dtype)
        atomic = AtomicDirectory(out, overwrite, **guard)
        with atomic as tmp:
            _save(tensors, tmp / "adapter_model.safetensors", {"format": "pt", "rmm_task": task})
            _write_json(tmp / "adapter_config.json", cfg)
            write_model_card(tmp, "rmm (reverted)", b.manifest.get("base_model"), [(task, str(bundle_dir))], "", card)
            atomic.commit()
        return atomic.target
    if fmt == "kohya":
        tensors, meta = to_kohya(modules, template=extras.get("kohya_names") or None, shapes=shapes, dtype=dtype,
                                 metadata={"rmm_task": task})
        if Path(out).suffix == ".safetensors":
            with AtomicFile(Path(out), overwrite, **guard) as tmp:
                _save(tensors, tmp, meta)
            return Path(out).absolute()
        atomic = AtomicDirectory(out, overwrite, **guard)
        with atomic as tmp:
            _save(tensors, tmp / f"{Path(out).name}.safetensors", meta)
            atomic.commit()
        return atomic.target
    raise UserError(f"unknown revert format '{fmt}'; use peft, kohya or full")


def _revert_full(b, modules: dict, task: str, base_ref: str | None, out: Path, overwrite: bool,
                 out_dtype: str | None, card: str, guard: dict) -> Path:
    import torch

    from . import engine
    from . import recipe as recipe_mod
    from .dtypes import canonical
    from .writer import OutTensor, plan_shards

    if not base_ref:
        raise UserError("reverting to a full model needs the base model: pass --base (the bundle records none)")
    r = recipe_mod.from_dict({"merge_method": "rmm", "base_model": base_ref, "models": [],
                              "parameters": {"basis_size": b.manifest["p"]}}, require_models=False)
    base = engine.ModelInput("base", base_ref, engine.open_source(base_ref, "base"), {})
    try:
        if base.is_lora:
            raise UserError(f"--base {base_ref} is a LoRA adapter; give the full base model")
        od = canonical(out_dtype, "out_dtype") if out_dtype else None
        items = engine.plan_items(base, [], [], [], od)
        for key in modules:
            if key not in items:
                raise UserError(f"bundle module '{key}' is not a tensor of the base model {base_ref}")
        for name, it in items.items():
            if it.action == "merge" and name not in modules:
                it.action, it.reason = "copy", "the task does not adapt it"
        plan = engine.Plan(r, registry.get("rmm"), {}, base, [], items,
                           plan_shards([OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()],
                                       r.output.shard_size), "float32", "cpu")

        def produce(name: str):
            A, B = modules[name]
            t = base.source.get(name).to(torch.float32)
            t.add_((B.to(torch.float32) @ A.to(torch.float32)).reshape(t.shape))
            _check_finite(name, t)
            return cast_checked(t, getattr(torch, items[name].out_dtype), name)

        plan.extra_inputs = list(guard["inputs"])
        return engine.run(plan, out, overwrite, produce=produce, card_extra=card,
                          force_replace=guard["force_replace"])
    finally:
        base.source.close()
