"""The parts every plan is built from: its data model (inputs, items, the plan), opening a source,
and resolving parameters per item. :mod:`.plan` builds the plan of a ``models:`` recipe,
:mod:`.plan_slices` that of a ``slices:`` recipe, both from these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import recipe as recipe_mod
from .dtypes import canonical, itemsize
from .errors import UserError
from .ops import registry
from .writer import OutTensor


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
    """The operator's parameters for one output item: the method's and each of its models',
    resolved (in the order of the item's sources). Items share one instance while a recipe gives
    the same values everywhere."""

    method: registry.Params
    models: tuple[registry.Params, ...]


# a head that tied checkpoints do not store, and the embeddings they read it from instead
TIED_HEADS = {"lm_head.weight": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                                 "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                                 "embed_tokens.weight", "transformer.word_embeddings.weight", "shared.weight",
                                 "backbone.embeddings.weight"),  # Mamba
              # masked-LM heads (transformers 5 stores none; checkpoints saved by 4 often do)
              "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
              "cls.predictions.decoder.bias": ("cls.predictions.bias",),
              "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
              "lm_head.decoder.bias": ("lm_head.bias",)}
VOCABULARY_TENSORS = {"lm_head.weight", *TIED_HEADS["lm_head.weight"]}


# an input of one output item: a model and the name of its tensor that the item reads
Source = tuple[ModelInput, str]


@dataclass
class PlanItem:
    name: str
    action: str  # "merge" | "copy"
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    read_bytes: int
    reason: str = ""  # why a tensor is copied
    # where the inputs come from when not every model's tensor of the same name: a slices recipe
    # (another layer, only the slice's models) or a tied head read from a model's embeddings
    sources: tuple[Source, ...] | None = None
    base_source: Source | None = None

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
    # PEFT outputs: base key -> the key its module is written under (the installed transformers 5's
    # in-memory name where it renames the base's modules on load); keys not listed keep their name
    adapter_names: dict[str, str] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)  # per-module operator reports, when any
    # paths read outside the models (a continual state, a bundle) that the output must not touch
    extra_inputs: list[Path] = field(default_factory=list)
    # the recipe's tokenizer_source, resolved to a directory (None: base, else first model)
    tokenizer_dir: Path | None = None
    # each merged item's parameters (tensor name, or module key for adapter / bundle outputs);
    # an item not listed takes the plan-level ones. Values that vary by layer or name filter
    # are resolved into this map, so a unit of work carries everything it needs.
    item_params: dict[str, ItemParams] = field(default_factory=dict)
    # config.json fields the output changes (layer count of a frankenmerge, an untied head)
    config_updates: dict[str, Any] = field(default_factory=dict)
    # the aligned output vocabulary (a tokenizer setting, mergekit M10): vocabulary tensors are
    # re-indexed to it before merging, and its tokenizer is written; None: rows by index
    vocab: Any = None
    chat_template: str | None = None  # the chat template text written with the tokenizer (M11)
    # a recipe's ``dtype``: every input is rounded to it when read (mergekit loads inputs in it);
    # the arithmetic stays in compute_dtype
    load_dtype: Any = None
    # mergekit's rule: config.json's dtype changes only when the recipe sets dtype / out_dtype
    keep_config_dtype: bool = False
    # FP8 output (``out_dtype: float8_e4m3fn``): the weights written as codes + block scales (fp8_out)
    fp8_out: Any = None

    def sources_of(self, name: str) -> tuple[Source | None, list[Source]]:
        """The base input (None without one) and the model inputs of item ``name``."""
        item = self.items.get(name)
        if item is not None and item.sources is not None:
            return item.base_source, list(item.sources)
        return ((self.base, name) if self.base is not None else None), [(m, name) for m in self.models]

    def params_for(self, name: str) -> ItemParams:
        """The resolved method and model parameters of output item ``name``."""
        got = self.item_params.get(name)
        return got if got is not None else ItemParams(self.params, tuple(m.params for m in self.models))

    def parameter_samples(self, limit: int) -> list[tuple[str, ItemParams]]:
        """The first item of each distinct set of resolved parameters (at most ``limit``)."""
        seen: set[int] = set()
        out = []
        for name, given in self.item_params.items():
            if id(given) not in seen:
                seen.add(id(given))
                out.append((name, given))
                if len(out) == limit:
                    break
        return out

    @property
    def distinct_parameter_sets(self) -> int:
        return len({id(g) for g in self.item_params.values()})

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
        full model each; an adapter or a bundle is one file, so one group here (``--shard`` splits
        its modules: ``module_units``)."""
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
        from .row_merge import by_rows

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
            elif by_rows(self, i.name) is not None:  # two passes (ops/gta_rows.py): a task vector, then the output
                step = i.numel * (c + out)  # and its cast (the row blocks are a few MiB)
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


def split_lora_ref(ref: str) -> tuple[str, str | None]:
    """mergekit's ``model+lora`` reference (M2): (model, lora), or (ref, None). A path that exists
    as written is never split, so a directory whose name holds a '+' still works."""
    if "+" not in ref or Path(ref).exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"model reference {ref}: write model+lora with exactly one '+'")
    return parts[0], parts[1]


def open_source(ref: str, label: str):
    """A LoraSource when ``ref`` is a LoRA adapter (detected from its files), else a CheckpointSource;
    ``model+lora`` is the model with the LoRA applied (in float32, in memory: no cache directory)."""
    from .sources.checkpoint import CheckpointSource
    from .adapters.detect import detect_lora
    from .adapters.lora import LoraSource

    model_ref, lora_ref = split_lora_ref(ref)
    if lora_ref is not None:
        from .adapters.experts import match_with_experts
        from .adapters.matched import AppliedLora, MatchedLora

        model = open_source(model_ref, label)
        lora = open_source(lora_ref, f"{label} (LoRA)")
        if getattr(model, "kind", "") == "lora" or getattr(lora, "kind", "") != "lora":
            raise UserError(f"model reference {ref}: the part after '+' must be a LoRA adapter and the part "
                            "before it a full checkpoint")
        shapes = {k: i.shape for k, i in model.infos.items()}
        matched = MatchedLora(*match_with_experts(lora, list(model.infos), shapes, config_of_source(model)))
        return AppliedLora(matched, model, owns_base=True)
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
    from .fp8 import dequantised

    source = CheckpointSource(ref, label)
    return dequantised(source, _config_of(source.directory) if source.directory is not None else None)


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


def output_dtype(recipe: recipe_mod.Recipe) -> str | None:
    """mergekit's rule: ``out_dtype``, else ``dtype``; None: each tensor's inputs' promoted dtype."""
    if recipe.out_dtype:
        from .fp8_out import requested

        if requested(recipe.out_dtype):
            return "bfloat16"  # FP8 output: the weights the input quantised become FP8 later (fp8_out)
        return canonical(recipe.out_dtype, "out_dtype")
    return canonical(recipe.dtype, "dtype") if recipe.dtype else None


def apply_recipe_dtypes(plan: Plan) -> None:
    """mergekit's dtype rules on a plan built from a recipe: inputs rounded to its ``dtype`` when
    read, and config.json's dtype left alone unless it sets ``dtype`` / ``out_dtype``."""
    recipe = plan.recipe
    if recipe.dtype:
        import torch

        plan.load_dtype = getattr(torch, canonical(recipe.dtype, "dtype"))
    plan.keep_config_dtype = output_dtype(recipe) is None


def _shared_levels(recipe: recipe_mod.Recipe, slice_params: dict | None = None) -> list[dict]:
    """Where a method-level parameter is looked up, highest precedence first (mergekit M3)."""
    return [lv for lv in (slice_params, recipe._module_parameters, recipe.parameters) if lv]


def _plan_params(op: registry.Operator, levels: list[dict], what: str) -> registry.Params:
    """The plan-level view of parameters (summary, a fold's global reduce, the continual state):
    each one's value where the recipe gives it everywhere, else its default (None if required)."""
    from .settings import is_constant, resolve

    constant = [{k: v for k, v in lv.items() if is_constant(v)} for lv in levels]
    schema = op.params if what == "method" else op.model_params
    lax = tuple(registry.Param(p.name, p.type, None if p.required else p.default) for p in schema)
    try:
        return resolve(lax, constant, "", 0.0, what)
    except ValueError as e:
        raise UserError(str(e)) from None


def _unique_label(label: str, taken: set[str]) -> str:
    out, k = label, 2
    while out in taken:
        out, k = f"{label}_{k}", k + 1
    return out


def check_model_count(op: registry.Operator, n: int, where: str) -> None:
    """The method's input contract (mergekit M6): how many models besides the base it merges."""
    if op.model_count is not None and n != op.model_count:
        extra = " (counting the base, an ordinary input of this method)" if op.base_input else " besides the base"
        raise UserError(f"method '{op.name}' merges exactly {op.model_count} model(s){extra}; {where} "
                        f"gives {n}")
    if n < op.min_models:
        raise UserError(f"method '{op.name}' merges at least {op.min_models} models besides the base; {where} "
                        f"gives {n}")


def resolve_items(op: registry.Operator, wanted, t: dict[str, float], shared: list[dict],
                  model_levels: list[list[dict]], models: list[ModelInput]) -> dict[str, ItemParams]:
    """Each output item's parameters (mergekit M3/M4): ``wanted`` lists (item, output name, each
    model's input name); ``t`` maps an item to its layer position (0 when absent). Shared
    parameters match the output name, per-model ones the model's input name. Items with equal
    values share one ItemParams."""
    from .settings import is_constant, resolve

    settings = [*shared, *(lv for levels in model_levels for lv in levels)]
    constant = all(is_constant(v) for lv in settings for v in lv.values())  # then resolve once
    cache: dict[tuple, ItemParams] = {}
    out: dict[str, ItemParams] = {}
    where = f"method '{op.name}'"
    try:
        for item, out_name, in_names in wanted:
            if constant and cache:
                out[item] = next(iter(cache.values()))
                continue
            ti = t.get(item, 0.0)
            method = resolve(op.params, shared, out_name, ti, where)
            per_model = tuple(resolve(op.model_params, lv, n, ti, f"model '{m.label}'")
                              for lv, n, m in zip(model_levels, in_names, models))
            key = (tuple(method.items()), tuple(tuple(p.items()) for p in per_model))
            out[item] = cache.setdefault(key, ItemParams(method, per_model))
    except ValueError as e:
        raise UserError(str(e)) from None
    return out


def promoted(dtypes) -> str:
    """The dtype torch's type promotion gives a mix of float dtypes (bf16 + fp16 -> float32)."""
    order = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
    ds = set(dtypes)
    if ds == {"float16", "bfloat16"} or (len(ds) > 1 and max(order.get(d, 0) for d in ds) == 1):
        return "float32"
    return max(ds, key=lambda d: order.get(d, 0))


def vocabulary_for(recipe: recipe_mod.Recipe, op: registry.Operator, base: ModelInput | None,
                   models: list[ModelInput]):
    """The output vocabulary when the recipe asks for one (``tokenizer_source`` / ``tokenizer:``,
    mergekit M10), else None; and the chat template text to write (M11), validated now."""
    from .tokenizer_spec import TokenizerSpec

    spec = TokenizerSpec.from_recipe(recipe.tokenizer_source, recipe.tokenizer)
    dirs = [Path(d) for d in (getattr(m.source, "directory", None) for m in ([base] if base else []) + models) if d]
    template = None
    if recipe.chat_template is not None:
        from .chat_templates import resolve_chat_template

        template = resolve_chat_template(recipe.chat_template, dirs)
    if spec is None or any(m.is_lora for m in models):  # adapters carry no vocabulary rows
        return None, template
    import importlib.util

    if importlib.util.find_spec("tokenizers") is None:
        raise UserError("tokenizer alignment (tokenizer_source / tokenizer:) needs the tokenizers library: "
                        "pip install 'mergekit-ortho[tokenizers]'")
    from .vocab import VocabModel, build_vocabulary

    seen: list[VocabModel] = []
    entries = ([base] if base is not None and op.reads_base else []) + models
    for m in entries:
        d = getattr(m.source, "directory", None)
        cfg = _config_of(Path(d)) if d else {}
        size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
        seen.append(VocabModel(m.label, Path(d) if d else None, size, (m.ref,)))
    base_label = None
    if base is not None:
        base_label = next((m.label for m in entries if _same_ref(m.ref, base.ref)), None)
    source_dir = None
    if spec.source not in ("base", "union") and not any(spec.source in (v.label, *v.refs) for v in seen):
        ref = recipe_mod.resolve_ref(recipe, spec.source)
        if not any(_same_ref(ref, v.refs[0]) for v in seen):
            source_dir = Path(ref) if Path(ref).is_dir() else None
            if source_dir is None:
                from .sources import hub

                if not hub.looks_like_hub_id(ref):
                    key = "tokenizer_source" if recipe.tokenizer_source is not None else "tokenizer.source"
                    raise UserError(f"{key} {spec.source}: path not found; name a model directory, "
                                    "a hub id, 'base' or 'union'")
                source_dir = hub.resolve(ref)
    return build_vocabulary(spec, seen, base=base_label, source_dir=source_dir), template


def config_of_source(source) -> dict:
    """A checkpoint source's config.json ({} without one)."""
    d = getattr(source, "directory", None)
    return _config_of(Path(d)) if d is not None else {}


def _config_of(d: Path) -> dict:
    from .io.json_files import read_object

    f = d / "config.json"
    return read_object(f, "model config") if f.is_file() else {}
