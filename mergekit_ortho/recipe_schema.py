"""The recipe's schema: the pydantic models a YAML recipe validates into (``Recipe``, its model
entries, slices, modules and output section), and the size and model-reference forms they accept.

The shape follows mergekit's so that existing mergekit recipes run unchanged
(mergekit_compat.md). Key and parameter checks and loading are in recipe.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from .errors import shown

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as Hugging Face); '512MiB' binary; ints are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"size must be like 5GB or 500MB, got {shown(value)}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"size must be like 5GB or 500MB, got {shown(value)}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {shown(value)}")
    return n


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class _WithParameters(_Strict):
    parameters: dict[str, Any] = {}

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v


def model_reference(value: Any) -> Any:
    """mergekit's mapping form of a reference, ``{model: {path, revision}, lora: {path, revision}}``
    (or ``{path, revision}``), as the string form ``path@revision+lora@revision``."""
    if not isinstance(value, dict):
        return value

    def part(v, what: str) -> str:
        if isinstance(v, str):
            return v
        if not isinstance(v, dict) or not isinstance(v.get("path"), str) or set(v) - {"path", "revision"}:
            raise ValueError(f"model reference: {what} is {{path, revision?}}, got {shown(v)}")
        if any(c in v["path"] for c in "@+") and not Path(v["path"]).exists():
            raise ValueError(f"model reference: path {shown(v['path'])} holds '@' or '+'; not supported")
        return v["path"] + (f"@{v['revision']}" if v.get("revision") else "")

    if "path" in value:
        return part(value, "model")
    if set(value) - {"model", "lora"} or "model" not in value:
        raise ValueError(f"model reference: expected {{model: {{path, revision}}, lora?: {{path, revision}}}}, "
                         f"got {shown(value)}")
    ref = part(value["model"], "model")
    return ref + (f"+{part(value['lora'], 'lora')}" if value.get("lora") else "")


class ModelEntry(_WithParameters):
    model: str
    name: str | None = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: model_reference(v)))


class SliceSource(_WithParameters):
    """One source of a slice: layers [a, b) of a model (mergekit's half-open ``layer_range``)."""

    model: str
    layer_range: tuple[int, int] | None = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: model_reference(v)))


class Slice(_WithParameters):
    sources: list[SliceSource]
    base_model: str | None = None

    _ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: model_reference(v)))
    residual_weight: Any = None  # parsed by mergekit and never used: ignored with a warning


class Module(_WithParameters):
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None


class OutputSpec(_Strict):
    path: str | None = None
    format: Literal["auto", "full", "peft", "kohya", "bundle"] = "auto"
    shard_size: int = 5 * 10**9
    copy_files: bool = True  # config, tokenizer and generation files from the donor model
    rank: int | None = None  # LoRA outputs: re-factor every module to at most this rank (truncated SVD)

    @field_validator("rank")
    @classmethod
    def _rank(cls, v):
        if v is not None and v < 1:
            raise ValueError("output.rank must be >= 1")
        return v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)


class Recipe(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = []
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None  # mergekit: inputs' dtype; here the output dtype unless out_dtype is set
    out_dtype: str | None = None
    compute_dtype: str = "float32"  # ours: arithmetic dtype (float32 or float64)
    include: list[str] = []
    exclude: list[str] = []
    output: OutputSpec = OutputSpec()
    tokenizer_source: str | None = None  # mergekit key: which model donates tokenizer files
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    name: str | None = None  # an intermediate merge's name in a multi-document recipe (multi.py)
    embed_slerp: Any = None  # legacy mergekit key (removed in 2024): ignored with a warning
    # ours: an input prefix -> the reference's prefix (a text-only fine-tune into a VLM); {} = off
    prefix_map: dict[str, str] | None = None
    # ours, continual states only (`merge continual init`; its flags win): versions kept, the
    # sliding window of a linear/task_arithmetic state, the outlier gate {max_norm_ratio, command}
    retain: int | None = None
    window: int | None = None
    gate: dict[str, Any] | None = None

    _ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: model_reference(v)))

    @field_validator("parameters", "output", mode="before")
    @classmethod
    def _none_is_default(cls, v, info):
        if v is None:
            return {} if info.field_name == "parameters" else OutputSpec()
        return v

    @field_validator("models", "include", "exclude", mode="before")
    @classmethod
    def _none_is_empty_list(cls, v):
        return [] if v is None else v

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, v):
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid regex {pattern!r}: {e}") from None
        return v

    # filled by load(): where relative paths are resolved from, and the raw text for metadata
    _source_path: Path | None = None
    _raw: dict | None = None
    # filled by from_dict(): one line per key accepted and not acted on; modules.default.parameters
    _warnings: list[str] = []
    _module_parameters: dict[str, Any] = {}
    _module_levels: list = []  # named modules (recipe_modules): their parameters as written

    def model_labels(self) -> list[str]:
        """Unique, readable names for the models (the recipe's `name`, else from the path); a
        repeated name gets _2, _3, ... (linear in the number of models)."""
        labels: list[str] = []
        taken: set[str] = set()
        next_suffix: dict[str, int] = {}
        for entry in self.models:
            label = base = entry.name or label_from(entry.model)
            k = next_suffix.get(base, 2)
            while label in taken:
                label, k = f"{base}_{k}", k + 1
            next_suffix[base] = k
            taken.add(label)
            labels.append(label)
        return labels


def label_from(ref: str) -> str:
    if "+" in ref and not Path(ref).exists():  # model+lora
        return "+".join(label_from(part) for part in ref.split("+"))
    p = ref.rstrip("/").split("@")[0]
    name = Path(p).name
    for suffix in (".safetensors", ".bin", ".pt"):
        name = name.removesuffix(suffix)
    return name or ref
