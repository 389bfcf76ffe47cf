"""Plan and streaming execution: one engine runs every operator.

``build_plan`` opens the sources (headers only), checks every tensor's presence and shape across
inputs, decides per tensor whether it is merged or copied from the base, lays out the output
shards and estimates bytes and peak memory. No tensor data is read, so ``--dry-run`` and
``merge validate`` are cheap.

``execute`` walks the output tensors in shard order; for each it reads the aligned input tensors
(or folds them one at a time when the operator has a streaming form), calls the operator, checks
the result is finite, casts, hands it to the writer and frees everything. Peak memory is bounded
by (inputs + a few) x the largest tensor, never by the model size.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import recipe as recipe_mod
from .dtypes import FP8, MERGEABLE, canonical, itemsize
from .errors import UserError
from .ops import registry
from .writer import OutTensor, plan_shards

# fixed overhead of the interpreter + torch, for the peak-memory estimate
_RUNTIME_BYTES = 350 * 2**20


@dataclass
class ModelInput:
    label: str
    ref: str
    source: Any  # CheckpointSource (LoRA sources arrive with the LoRA layer)
    params: dict[str, Any]


@dataclass
class PlanItem:
    name: str
    action: str  # "merge" | "copy"
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    read_bytes: int
    reason: str = ""  # why a tensor is copied

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Plan:
    recipe: recipe_mod.Recipe
    op: registry.Operator
    params: dict[str, Any]
    base: ModelInput | None
    models: list[ModelInput]
    items: dict[str, PlanItem]
    shards: list[list[OutTensor]]
    compute_dtype: str
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def merge_count(self) -> int:
        return sum(1 for i in self.items.values() if i.action == "merge")

    @property
    def copy_count(self) -> int:
        return sum(1 for i in self.items.values() if i.action == "copy")

    @property
    def read_bytes(self) -> int:
        return sum(i.read_bytes for i in self.items.values())

    @property
    def write_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s)

    @property
    def peak_bytes(self) -> int:
        """Interpreter + the largest merge step: inputs held at once, work buffers and the cast."""
        c = itemsize(self.compute_dtype)
        held = 2 if self.op.stream is not None else len(self.models)
        worst = 0
        for i in self.items.values():
            if i.action == "merge":
                step = i.numel * c * (held + 1 + (1 if self.base else 0) + 2) + i.numel * itemsize(i.out_dtype)
            else:
                step = i.numel * itemsize(i.out_dtype) * 2
            worst = max(worst, step)
        return _RUNTIME_BYTES + worst

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.op.name,
            "parameters": self.params,
            "base_model": self.base.ref if self.base else None,
            "models": [m.ref for m in self.models],
            "tensors_merged": self.merge_count,
            "tensors_copied": self.copy_count,
            "bytes_read": self.read_bytes,
            "bytes_written": self.write_bytes,
            "shards": len(self.shards),
            "peak_memory_estimate": self.peak_bytes,
            "compute_dtype": self.compute_dtype,
            "device": self.device,
        }


def open_source(ref: str, label: str):
    from .sources.checkpoint import CheckpointSource

    return CheckpointSource(ref, label)


def _same_ref(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def build_plan(recipe: recipe_mod.Recipe, device: str = "cpu") -> Plan:
    op = registry.get(recipe.merge_method)
    params = op.resolve_params(recipe.parameters)
    compute = canonical(recipe.dtype, "dtype")
    out_dtype = canonical(recipe.out_dtype, "out_dtype") if recipe.out_dtype else None

    base = None
    if recipe.base_model:
        ref = recipe_mod.resolve_ref(recipe, recipe.base_model)
        base = ModelInput("base", ref, open_source(ref, "base"), {})
    models: list[ModelInput] = []
    for entry, label in zip(recipe.models, recipe.model_labels()):
        ref = recipe_mod.resolve_ref(recipe, entry.model)
        if base is not None and op.reads == "deltas" and _same_ref(ref, base.ref):
            continue  # mergekit lists the base among the models; its task vector is zero
        models.append(ModelInput(label, ref, open_source(ref, label), op.resolve_model_params(entry.parameters, label)))
    if not models:
        raise UserError("the recipe lists no model other than the base model")

    reference = base or models[0]
    items = plan_items(reference, models, recipe.include, recipe.exclude, out_dtype)
    if not any(i.action == "merge" for i in items.values()):
        raise UserError("no tensor is left to merge (check include/exclude)")
    specs = [OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()]
    shards = plan_shards(specs, recipe.output.shard_size)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA device is available")
    return Plan(recipe, op, params, base, models, items, shards, compute, device)


def plan_items(reference: ModelInput, models: list[ModelInput], include: list[str], exclude: list[str],
               out_dtype: str | None) -> dict[str, PlanItem]:
    """Per tensor of the reference (the base, else the first model): merge or copy, and why.

    Every merged tensor must exist with the same shape in every model; extra tensors in a model
    are an error too (they would be silently dropped otherwise).
    """
    include_re = [re.compile(p) for p in include]
    exclude_re = [re.compile(p) for p in exclude]
    items: dict[str, PlanItem] = {}
    for name, info in reference.source.infos.items():
        if info.dtype in FP8:
            raise UserError(
                f"{info.file}: tensor '{name}' is {info.dtype}; FP8 checkpoints need their scale tensors "
                "and are not merged raw - dequantise to bf16/fp16 first"
            )
        reason = ""
        if info.dtype not in MERGEABLE:
            reason = "not a float tensor"
        elif include_re and not any(p.search(name) for p in include_re):
            reason = "not matched by include"
        elif any(p.search(name) for p in exclude_re):
            reason = "matched by exclude"
        action = "copy" if reason else "merge"
        read = info.nbytes
        if action == "merge":
            for m in models:
                other = m.source.infos.get(name)
                if other is None:
                    raise UserError(
                        f"tensor '{name}' is in {reference.ref} but missing from {m.ref}; "
                        "exclude it or use matching checkpoints"
                    )
                if other.shape != info.shape:
                    raise UserError(
                        f"tensor '{name}' has shape {list(info.shape)} in {reference.ref} but "
                        f"{list(other.shape)} in {m.ref}"
                    )
                if other.dtype in FP8 or other.dtype not in MERGEABLE:
                    raise UserError(f"tensor '{name}' is {other.dtype} in {m.ref}, cannot merge it")
                read += other.nbytes
        od = out_dtype if (out_dtype and info.dtype in MERGEABLE) else info.dtype
        items[name] = PlanItem(name, action, info.shape, info.dtype, od, read, reason)
    for m in models:
        extra = sorted(set(m.source.infos) - set(reference.source.infos))
        if extra:
            raise UserError(
                f"tensor '{extra[0]}' is in {m.ref} but not in {reference.ref}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; use checkpoints of the same architecture"
            )
    return items


# --- execution -----------------------------------------------------------------------------------


class NonFinite(UserError):
    pass


def merge_tensor(plan: Plan, name: str):
    """Merge one tensor: read the aligned inputs, call the operator, return the merged tensor."""
    import torch

    item = plan.items[name]
    dev = plan.device
    cdt = getattr(torch, plan.compute_dtype)
    op = plan.op
    base = plan.base.source.get(name).to(dev, cdt) if plan.base is not None else None
    task = registry.TensorTask(
        name=name, base=base, inputs=[], params=plan.params,
        model_params=[m.params for m in plan.models], model_names=[m.label for m in plan.models],
    )

    def load(m: ModelInput):
        raw = m.source.get(name)
        x = raw.to(dev, cdt)
        if op.reads == "deltas":
            # never modify a tensor that may alias a memory-mapped file
            x = x - base if x.data_ptr() == raw.data_ptr() else x.sub_(base)
        return x

    if op.stream is not None:
        state = op.stream.start(task)
        for i, m in enumerate(plan.models):
            state = op.stream.step(state, load(m), i, task)
        out = op.stream.finish(state, task)
    else:
        task.inputs = [load(m) for m in plan.models]
        out = op.fn(task)
        task.inputs = []
    if op.reads == "deltas":
        out = out.add_(base) if out.dtype == base.dtype else base + out
    if not torch.isfinite(out).all():
        raise NonFinite(
            f"merged tensor '{name}' contains NaN or Inf; check the inputs "
            f"({', '.join(m.ref for m in plan.models)}) and the method parameters"
        )
    return out.to("cpu", getattr(torch, item.out_dtype))


def execute(plan: Plan, out_dir: Path, metadata: dict[str, str],
            on_tensor: Callable[[str, int], None] | None = None,
            produce: Callable[[str], Any] | None = None) -> None:
    """Write the merged model's shards into ``out_dir`` (a fresh, empty directory).

    ``produce(name)`` returns a merged tensor; the default merges the plan's inputs. Continual
    export passes its own (from the persisted state) and reuses everything else.
    """
    import torch

    from .writer import ShardedWriter

    reference = plan.base or plan.models[0]
    writer = ShardedWriter(out_dir, plan.shards, metadata)
    # test hook: slow each tensor down so crash tests can kill the process mid-run
    delay = float(os.environ.get("MERGEKIT_ORTHO_TEST_DELAY", "0") or 0)
    try:
        for spec in writer.order():
            item = plan.items[spec.name]
            if item.action == "copy":
                t = reference.source.get(spec.name)
                if t.dtype != getattr(torch, item.out_dtype):
                    t = t.to(getattr(torch, item.out_dtype))
            else:
                t = produce(spec.name) if produce else merge_tensor(plan, spec.name)
            writer.write(spec.name, t)
            del t
            if delay:
                time.sleep(delay)
            if on_tensor:
                on_tensor(spec.name, item.read_bytes)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def close(plan: Plan) -> None:
    for m in ([plan.base] if plan.base else []) + plan.models:
        m.source.close()


def recipe_yaml(recipe: recipe_mod.Recipe) -> str:
    import yaml

    data = recipe._raw if recipe._raw is not None else recipe.model_dump()
    return yaml.safe_dump(data, sort_keys=False)


def run(plan: Plan, out: Path, overwrite: bool = False,
        on_tensor: Callable[[str, int], None] | None = None,
        produce: Callable[[str], Any] | None = None, card_extra: str = "") -> Path:
    """Execute a plan into ``out`` atomically: config/tokenizer files, shards, index, card."""
    import json

    from . import __version__
    from .writer import AtomicDirectory, copy_model_files, write_model_card

    recipe = plan.recipe
    text = recipe_yaml(recipe)
    metadata = {
        "format": "pt",
        "merge_tool": f"mergekit-ortho {__version__}",
        "merge_method": plan.op.name,
        "merge_recipe": json.dumps(recipe._raw if recipe._raw is not None else recipe.model_dump(), sort_keys=False),
    }
    atomic = AtomicDirectory(out, overwrite)
    with atomic as tmp:
        execute(plan, tmp, metadata, on_tensor, produce)
        donor = _donor_dir(plan)
        dtypes = {i.out_dtype for i in plan.items.values() if i.action == "merge"}
        copy_model_files(donor, tmp, dtypes.pop() if len(dtypes) == 1 else None)
        write_model_card(tmp, plan.op.name, plan.base.ref if plan.base else None,
                         [(m.label, m.ref) for m in plan.models], text, card_extra)
        atomic.commit()
    return atomic.target


def _donor_dir(plan: Plan) -> Path | None:
    """Config and tokenizer files come from tokenizer_source, else the base, else the first model."""
    recipe = plan.recipe
    candidates = []
    if recipe.tokenizer_source and recipe.tokenizer_source != "base":
        candidates.append(Path(recipe_mod.resolve_ref(recipe, recipe.tokenizer_source)))
    for m in ([plan.base] if plan.base else []) + plan.models:
        d = getattr(m.source, "directory", None)
        if d is not None:
            candidates.append(Path(d))
    for c in candidates:
        if c.is_dir():
            return c
    return None
