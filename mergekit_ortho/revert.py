"""`merge revert`: rebuild one task from an RMM bundle alone, as an adapter (PEFT / kohya, scale 1)
or a full model (base + the task's B @ A), through the same loop and sinks as `merge run`.

A PEFT revert names its modules by the rule of `merge run`'s PEFT outputs
(``adapters.transformers5.output_names``): the installed transformers 5's in-memory names where it
renames the family at load time (ViT's ``encoder.layer.N.attention.attention.query`` is
``layers.N.attention.q_proj``), so peft loads the reverted adapter. The rules need the base's
config: the one the bundle recorded (``extras.base_config``), else ``config.json`` of ``--base``,
of the bundle's base model or of its PEFT base path when that is a local directory. Without any,
the bundle's own (checkpoint) names are kept. A module on a fused checkpoint tensor that the
installed transformers splits in memory (Dinov2's ``mlp.weights_in`` -> gate / up) is written as
its parts (``adapters.transformers5_fused.split_outputs``), as `merge run` writes it. Issue 15."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError


def revert(bundle_dir: Path, task: str, out: Path, fmt: str = "peft", base_ref: str | None = None,
           overwrite: bool = False, out_dtype: str | None = None, force_replace: bool = False) -> Path:
    import torch

    from . import bundle as bundle_mod
    from . import sinks
    from .execute import Work, execute
    from .lora_out import to_kohya, to_peft
    from .ops.registry import LoraResult

    if fmt not in ("peft", "kohya", "full"):
        raise UserError(f"unknown revert format '{fmt}'; use peft, kohya or full")
    base_ref = base_ref or None
    guard = dict(overwrite=overwrite, inputs=[Path(bundle_dir)] + ([Path(base_ref)] if base_ref else []),
                 force_replace=force_replace)
    card_text = f"Task `{task}` reverted from the RMM bundle `{bundle_dir}` (p = {{p}})."
    if fmt == "full":
        from .placement import AtomicDirectory

        AtomicDirectory(out, **guard).check()  # before any work
        b = bundle_mod.read_bundle(bundle_dir)
        return _revert_full(b, task, base_ref or b.manifest.get("base_model"), out, out_dtype,
                            card_text.format(p=b.manifest["p"]), guard)
    dtype = getattr(torch, out_dtype) if out_dtype else torch.float32
    if fmt == "peft":
        def pack(modules):
            from .adapters.transformers5_fused import split_outputs

            out_shapes = shapes
            if shapes is not None:  # fused checkpoint tensors transformers splits in memory: their parts
                modules, out_shapes = split_outputs(modules, shapes, _base_config(b, base_ref))
            tensors, cfg = to_peft(modules, extras.get("peft_base_model") or b.manifest.get("base_model"),
                                   shapes=out_shapes, layouts=extras.get("layouts") or None, dtype=dtype,
                                   names=names)
            return tensors, {"format": "pt", "rmm_task": task}, cfg
    else:
        def pack(modules):
            tensors, meta = to_kohya(modules, template=extras.get("kohya_names") or None, shapes=shapes,
                                     dtype=dtype, metadata={"rmm_task": task})
            return tensors, meta, None
    sink = sinks.Adapter(out, fmt, pack, **guard)  # checks the target before any work
    b = bundle_mod.read_bundle(bundle_dir)
    extras = b.manifest.get("extras") or {}
    shapes = {k: tuple(v) for k, v in (extras.get("base_shapes") or {}).items()} or None
    if fmt == "peft":
        sink.card = sinks.Card("rmm (reverted)", b.manifest.get("base_model"), [(task, str(bundle_dir))],
                               "", card_text.format(p=b.manifest["p"]))
    keys = _task_modules(b, task, bundle_dir)
    names = _peft_names(b, keys, base_ref) if fmt == "peft" else {}

    def compute(key: str):
        A, B = b.revert_module(key, task)
        return LoraResult(A=A, B=B), None

    with sink:
        execute([Work(k) for k in keys], compute, sink, check_finite=False)
        return sink.commit()


def _base_config(b, base_ref: str | None) -> dict:
    """The base's config.json: recorded in the bundle, else next to a local base path it names."""
    from .planning import _config_of

    extras = b.manifest.get("extras") or {}
    if isinstance(extras.get("base_config"), dict) and extras["base_config"]:
        return extras["base_config"]
    for ref in (base_ref, b.manifest.get("base_model"), extras.get("peft_base_model")):
        if ref and Path(ref).is_dir():
            cfg = _config_of(Path(ref))
            if cfg:
                return cfg
    return {}


def _peft_names(b, keys: list[str], base_ref: str | None) -> dict[str, str]:
    """{bundle key: PEFT module key}: `merge run`'s rule for PEFT outputs (see the module doc)."""
    from .adapters.transformers5 import output_names

    return output_names(keys, _base_config(b, base_ref))[0]


def _task_modules(b, task: str, bundle_dir) -> list[str]:
    keys = b.task_modules(task)
    if not keys:
        raise UserError(f"task '{task}' adapts no module in bundle {bundle_dir}")
    return keys


def _revert_full(b, task: str, base_ref: str | None, out: Path, out_dtype: str | None, card: str,
                 guard: dict) -> Path:
    import torch

    from . import plan as plan_mod
    from . import recipe as recipe_mod
    from .dtypes import canonical
    from .execute import write_full_model
    from .ops import registry
    from .writer import OutTensor, plan_shards

    keys = set(_task_modules(b, task, b.path))
    if not base_ref:
        raise UserError("reverting to a full model needs the base model: pass --base (the bundle records none)")
    r = recipe_mod.from_dict({"merge_method": "rmm", "base_model": base_ref, "models": [],
                              "parameters": {"basis_size": b.manifest["p"]}}, require_models=False)
    base = plan_mod.ModelInput("base", base_ref, plan_mod.open_source(base_ref, "base"), {})
    try:
        if base.is_lora:
            raise UserError(f"--base {base_ref} is a LoRA adapter; give the full base model")
        od = canonical(out_dtype, "out_dtype") if out_dtype else None
        items, _ = plan_mod.plan_items(base, [], [], [], od)
        for key in keys:
            if key not in items:
                raise UserError(f"bundle module '{key}' is not a tensor of the base model {base_ref}")
        for name, it in items.items():
            if it.action == "merge" and name not in keys:
                it.action, it.reason = "copy", "the task does not adapt it"
        # the plan of a merge without models: the method named only for the card and metadata
        plan = plan_mod.Plan(r, registry.get(r.merge_method), {}, base, [], items,
                             plan_shards([OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()],
                                         r.output.shard_size), "float32", "cpu")

        def compute(name: str):
            if items[name].action == "copy":
                return base.source.get(name), None
            A, B = b.revert_module(name, task)
            t = base.source.get(name).to(torch.float32)
            return t.add_((B.to(torch.float32) @ A.to(torch.float32)).reshape(t.shape)), None

        return write_full_model(plan, out, compute, card_extra=card, overwrite=guard["overwrite"],
                                inputs=list(guard["inputs"]) + plan_mod.input_paths(plan),
                                force_replace=guard["force_replace"])
    finally:
        base.source.close()
