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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import recipe as recipe_mod
from .dtypes import FP8, MERGEABLE, canonical, itemsize
from .errors import UserError
from .ops import registry
from .writer import OutTensor, plan_shards

# fixed overhead of the interpreter, torch and the CLI's modules, for the peak-memory estimate
# (measured: 0.24-0.26 GiB resident after the imports)
_RUNTIME_BYTES = 260 * 2**20


@dataclass
class ModelInput:
    label: str
    ref: str
    source: Any  # CheckpointSource or LoraSource
    params: registry.Params  # its resolved per-model parameters

    @property
    def is_lora(self) -> bool:
        return getattr(self.source, "kind", "") == "lora"


@dataclass(frozen=True)
class ItemParams:
    """The operator's parameters for one output item: the method's and each model's, resolved.
    Items share one instance while a recipe gives the same values everywhere."""

    method: registry.Params
    models: tuple[registry.Params, ...]


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
        return math.prod(self.shape)


@dataclass
class Plan:
    recipe: recipe_mod.Recipe
    op: registry.Operator
    params: registry.Params  # the method-level parameters (global scalars: a fold's reduce)
    base: ModelInput | None
    models: list[ModelInput]
    items: dict[str, PlanItem]
    shards: list[list[OutTensor]]
    compute_dtype: str
    device: str
    notes: list[str] = field(default_factory=list)
    # what is written: "full" (a model directory), "peft" / "kohya" (a LoRA), "bundle" (RMM)
    out_format: str = "full"
    # LoRA / bundle outputs: the base keys merged module by module, with their 2-D delta shapes
    module_keys: list[str] = field(default_factory=list)
    module_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)  # per-module operator reports, when any
    # paths read outside the models (a continual state, a bundle) that the output must not touch
    extra_inputs: list[Path] = field(default_factory=list)
    # the recipe's tokenizer_source, resolved to a directory (None: base, else first model)
    tokenizer_dir: Path | None = None
    # each merged item's parameters (tensor name, or module key for adapter / bundle outputs);
    # an item not listed takes the plan-level ones. Values that vary by layer or name filter
    # are resolved into this map, so a unit of work carries everything it needs.
    item_params: dict[str, ItemParams] = field(default_factory=dict)

    def params_for(self, name: str) -> ItemParams:
        """The resolved method and model parameters of output item ``name``."""
        got = self.item_params.get(name)
        return got if got is not None else ItemParams(self.params, tuple(m.params for m in self.models))

    @property
    def lora_models(self) -> list[ModelInput]:
        return [m for m in self.models if m.is_lora]

    @property
    def module_mode(self) -> bool:
        """True when the output is a LoRA or a bundle, produced module by module."""
        return self.out_format != "full"

    @property
    def units(self) -> list[list[str]]:
        """The output items in execution order, grouped by what they fill: one output shard of a
        full model each; an adapter or a bundle is one file, so one unit."""
        if self.module_mode:
            return [list(self.module_keys)]
        return [[t.name for t in shard] for shard in self.shards]

    @property
    def merge_count(self) -> int:
        if self.module_mode:
            return len(self.module_keys)
        return sum(1 for i in self.items.values() if i.action == "merge")

    @property
    def copy_count(self) -> int:
        return 0 if self.module_mode else sum(1 for i in self.items.values() if i.action == "copy")

    @property
    def read_bytes(self) -> int:
        if self.module_mode:
            return sum(self.module_read_bytes(k) for k in self.module_keys)
        return sum(i.read_bytes for i in self.items.values())

    def module_read_bytes(self, key: str) -> int:
        n = 0
        for m in self.models:
            if m.is_lora:
                mod = m.source.by_base.get(key)
                if mod is not None:
                    n += sum(math.prod(s) * 4 for s in m.source.stored_shapes(mod))
            else:
                n += m.source.infos[key].nbytes
        return n

    @property
    def write_bytes(self) -> int:
        if self.module_mode:  # an estimate: the output rank is known only after the merge
            return sum(self.module_read_bytes(k) for k in self.module_keys) // max(1, len(self.models))
        return sum(t.nbytes for s in self.shards for t in s)

    @property
    def peak_bytes(self) -> int:
        """Interpreter + the largest merge step: inputs held at once, work buffers and the cast."""
        c = itemsize(self.compute_dtype)
        if self.module_mode:
            dense = self.op.input_kind == "dense" and self.op.lora_fn is None
            worst = max((math.prod(s) for s in self.module_shapes.values()), default=0)
            factors = max((self.module_read_bytes(k) for k in self.module_keys), default=0)
            return _RUNTIME_BYTES + worst * c * ((len(self.models) + 3) if dense else 2) + 4 * factors
        fold = self.op.fold
        raw = fold is not None and fold.raw_weights and not self.lora_models
        base = self.base is not None and (self.op.reads_base or bool(self.lora_models))
        worst = 0
        for i in self.items.values():
            stored, out = itemsize(i.in_dtype), itemsize(i.out_dtype)
            if i.action != "merge":
                step = i.numel * (stored + out)
            elif raw:  # the state, one input and the base as stored; then the cast of the result
                step = i.numel * (c + max(stored, out) + (stored if base else 0))
            elif fold is not None:  # the state, a prepared input (and its stored read), the base
                step = i.numel * (2 * c + stored + (c if base else 0))
            else:  # every prepared input at once, the base, about one work buffer of the operator
                step = i.numel * (len(self.models) * c + stored + (c if base else 0) + c)
            worst = max(worst, step)
        return _RUNTIME_BYTES + worst

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.op.name,
            "parameters": self.params,
            "base_model": self.base.ref if self.base else None,
            "models": [m.ref for m in self.models],
            "output_format": self.out_format,
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
    """A LoraSource when ``ref`` is a LoRA adapter (detected from its files), else a CheckpointSource."""
    from .sources.checkpoint import CheckpointSource
    from .adapters.detect import detect_lora
    from .adapters.lora import LoraSource

    path = Path(ref)
    if not path.exists():
        from .sources import hub

        if hub.looks_like_hub_id(ref):
            path = hub.resolve(ref)
    if path.exists() and not path.is_dir():
        from .sources.paths import require_regular

        require_regular(path, "checkpoint")
    if path.exists() and detect_lora(path):
        return LoraSource(path, label)
    return CheckpointSource(ref, label)


def _same_ref(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def tokenizer_donor(recipe: recipe_mod.Recipe) -> tuple[Path | None, str | None]:
    """The directory named by ``tokenizer_source`` (a path or hub id), and a note when the value is
    one we do not act on; a path that does not exist is an error, not silently the base's files."""
    ts = recipe.tokenizer_source
    if not ts or ts == "base":
        return None, None
    if not recipe.output.copy_files:
        return None, f"tokenizer_source {ts} is not used: output.copy_files is false, so no tokenizer file is copied"
    if ts == "union":
        return None, ("tokenizer_source: union (mergekit's merged vocabulary) is not supported yet; the "
                      "tokenizer files are copied from the base model")
    ref = recipe_mod.resolve_ref(recipe, ts)
    path = Path(ref)
    if not path.exists():
        from .sources import hub

        if not hub.looks_like_hub_id(ref):
            raise UserError(f"tokenizer_source {ts}: path not found; name a model directory, a hub id, or 'base'")
        path = hub.resolve(ref)
    if not path.is_dir():
        raise UserError(f"tokenizer_source {ts}: not a model directory (its tokenizer files are copied from one)")
    return path, None


def build_plan(recipe: recipe_mod.Recipe, device: str = "cpu") -> Plan:
    op = registry.get(recipe.merge_method)
    params = op.resolve_params(recipe.parameters)
    compute = canonical(recipe.dtype, "dtype")
    out_dtype = canonical(recipe.out_dtype, "out_dtype") if recipe.out_dtype else None

    base = None
    if recipe.base_model:
        ref = recipe_mod.resolve_ref(recipe, recipe.base_model)
        base = ModelInput("base", ref, open_source(ref, "base"), {})
        if base.is_lora:
            raise UserError(f"base_model {ref} is a LoRA adapter; the base must be the full model the "
                            "LoRAs were trained on (list the LoRA under models)")
    models: list[ModelInput] = []
    for entry, label in zip(recipe.models, recipe.model_labels()):
        ref = recipe_mod.resolve_ref(recipe, entry.model)
        if base is not None and op.reads_base and _same_ref(ref, base.ref):
            continue  # mergekit lists the base among the models; its task vector is zero
        models.append(ModelInput(label, ref, open_source(ref, label), op.resolve_model_params(entry.parameters, label)))
    if not models:
        raise UserError("the recipe lists no model other than the base model")
    tokenizer_dir, tokenizer_note = tokenizer_donor(recipe)

    loras = [m for m in models if m.is_lora]
    dense = [m for m in models if not m.is_lora]
    if op.needs_base and base is None and dense:
        raise UserError(f"method '{op.name}' needs 'base_model' (task vectors are relative to it)")
    if op.model_count is not None and len(models) != op.model_count:
        raise UserError(f"method '{op.name}' merges the base and exactly {op.model_count} other model(s); "
                        f"the recipe lists {len(models)} besides the base")
    out_format = _output_format(recipe, op, params, base, models)
    if loras:
        from .adapters.arch import check_compatible
        from .adapters.keymap import match_to_base
        from .adapters.matched import MatchedLora

        check_compatible([m.source for m in loras])
        if base is not None:
            keys = list(base.source.infos)
            shapes = {k: i.shape for k, i in base.source.infos.items()}
            for m in loras:
                m.source = MatchedLora(m.source, match_to_base(m.source, keys, shapes))
        else:
            _align_without_base(loras)

    reference = base or models[0]
    if out_format in ("peft", "kohya", "bundle"):
        keys, shapes = _module_keys(op, base, models, recipe.include, recipe.exclude)
        if not keys:
            raise UserError("no LoRA module is left to merge (check include/exclude)")
        plan = Plan(recipe, op, params, base, models, {}, [], compute, device, out_format=out_format,
                    module_keys=keys, module_shapes=shapes, tokenizer_dir=tokenizer_dir,
                    item_params=_item_params(keys, params, models))
        _lora_notes(plan)
        plan.notes += [tokenizer_note] if tokenizer_note else []
        return plan

    items = plan_items(reference, dense, recipe.include, recipe.exclude, out_dtype)
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
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA device is available")
    plan = Plan(recipe, op, params, base, models, items, shards, compute, device, out_format="full",
                tokenizer_dir=tokenizer_dir,
                item_params=_item_params([n for n, i in items.items() if i.action == "merge"], params, models))
    plan.notes += [tokenizer_note] if tokenizer_note else []
    if loras and dropped:
        plan.notes.append(f"{len(dropped)} LoRA-adapted tensor(s) are kept from the base ({items[dropped[0]].reason}), "
                          f"e.g. '{dropped[0]}'")
    return plan


def _item_params(names: list[str], params: registry.Params, models: list[ModelInput]) -> dict[str, ItemParams]:
    """Every item's parameters: the recipe's method and per-model values, the same for each item."""
    shared = ItemParams(params, tuple(m.params for m in models))
    return {n: shared for n in names}


def _output_format(recipe, op: registry.Operator, params: dict, base: ModelInput | None,
                   models: list[ModelInput]) -> str:
    """Resolve output.format against the method and the inputs (DESIGN: auto = LoRA out when every
    input is a LoRA and the method yields low rank, else full)."""
    fmt = recipe.output.format
    loras = [m for m in models if m.is_lora]
    dense = [m for m in models if not m.is_lora]
    if op.input_kind == "lora" and dense:
        if op.dense_rank_param and params.get(op.dense_rank_param) is not None and not loras:  # PT-SVD
            if base is None:
                raise UserError(f"method '{op.name}' on full checkpoints needs base_model (task vectors)")
        else:
            hint = (f"; set the method parameter {op.dense_rank_param} to extract each task vector by truncated SVD"
                    if op.dense_rank_param else "")
            raise UserError(f"method '{op.name}' merges LoRA adapters, but {dense[0].ref} is a full checkpoint"
                            + hint)
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
        if dense or not low_rank:
            return "full"
        fmt = "kohya" if all(m.source.format == "kohya" for m in loras) else "peft"
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


def _align_without_base(loras: list[ModelInput]) -> None:
    """No base model: LoRAs are aligned by their own module names, so they must share one format.

    The key of a module is its name as the base key it adapts would read (PEFT prefix and
    ``.base_layer`` stripped, ``.weight`` added), which is also what a PEFT output needs."""
    from .adapters.detect import PEFT_PREFIX
    from .adapters.matched import MatchedLora

    fmts = {m.source.format for m in loras}
    if len(fmts) > 1:
        raise UserError(f"LoRAs in different formats ({', '.join(sorted(fmts))}) can only be aligned through "
                        "their base model; set base_model")
    for m in loras:
        src = m.source
        base_map = {}
        for mod in src.modules:
            key = mod[len(PEFT_PREFIX):] if mod.startswith(PEFT_PREFIX) else mod
            base_map[mod] = key.replace(".base_layer", "") + ".weight"
        m.source = MatchedLora(src, base_map)
    first = loras[0]
    for m in loras[1:]:
        for key, mod in m.source.by_base.items():
            if key in first.source.by_base:
                a = first.source.factor_shapes(first.source.by_base[key])
                b = m.source.factor_shapes(mod)
                if (a[0][1], a[1][0]) != (b[0][1], b[1][0]):
                    raise UserError(f"LoRA module '{mod}' is {b[1][0]}x{b[0][1]} in {m.ref} but "
                                    f"{a[1][0]}x{a[0][1]} in {first.ref}; are they for the same base model?")


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
    donor. An output must stay clear of all of them (``writer.refuse_overlap``)."""
    paths: list[Path] = []
    for m in ([plan.base] if plan.base else []) + plan.models:
        for attr in ("path", "directory"):
            p = getattr(m.source, attr, None)
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
