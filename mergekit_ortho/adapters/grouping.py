"""An adapter file's keys grouped into modules, each module classified into its parts.

Spec: ../shared/specs/adapters.md P1 (PEFT extra keys), P10 (suffix table), P26 (detection).
``group_keys`` is a pure function of the header's key names, the format and the PEFT config:

* plain LoRA weight parts -> ``lora`` {stem: {"A"|"eA": key, "B"|"eB": key}} (exact factors);
* every other part -> ``parts`` {module id: Part}; a module's weight part has the stem as its id,
  its bias part ``<stem>|bias`` (a LoRA with DoRA or another epilogue is a part too: not
  additive, so not factors);
* ``alpha`` {stem: key of its ``.alpha`` tensor}; ``base_copies`` {key: shape} for PEFT's
  ``.base_layer.weight`` copies (checked against the base, never applied).

PEFT keys that are not adapter suffixes: ``modules_to_save`` tensors and trained biases
(``bias: all | lora_only``) become ``replacement`` parts (W' = stored).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from . import families
from .families import Part

BIAS = "|bias"
PEFT_PREFIX = "base_model.model."


def peft_pattern_key(patterns: dict, name: str) -> str | None:
    """PEFT's get_pattern_key: first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def module_id(stem: str, target: str) -> str:
    return stem if target == "weight" else stem + BIAS


def stem_of(module: str) -> tuple[str, str]:
    """(stem, target) of a module id."""
    return (module[: -len(BIAS)], "bias") if module.endswith(BIAS) else (module, "weight")


def _peft_name(stem: str) -> str:
    return stem[len(PEFT_PREFIX):] if stem.startswith(PEFT_PREFIX) else stem


def _saved_module(stem: str, modules_to_save) -> bool:
    n = _peft_name(stem)
    return any(n == m or n.endswith("." + m) for m in modules_to_save)


def group_keys(entries: Mapping[str, tuple[Any, tuple[int, ...]]], fmt: str, config: Mapping[str, Any],
               file: Path):
    from .peft_extras import REPLACEMENT

    peft = fmt in ("peft", "diffusers")
    allowed = None
    if fmt == "peft" and config:
        ptype = str(config.get("peft_type", "LORA")).upper()
        allowed = families.peft_types().get(ptype)
        if allowed is None:
            raise UserError(f"not supported yet: {ptype} in {file} (peft_type {ptype})")
    mts = list(config.get("modules_to_save") or []) if peft else []
    trained_bias = peft and str(config.get("bias", "none")) in ("all", "lora_only")
    by_stem: dict[str, dict[str, str]] = {}
    parts: dict[str, Part] = {}
    base_copies: dict[str, tuple[int, ...]] = {}
    for key in entries:
        if peft and key.endswith(".base_layer.weight"):
            base_copies[key] = tuple(entries[key][1])  # save_embedding_layers: a frozen base copy
            continue
        split = families.split_key(key)
        adapter_suffix = split is not None and split[1] not in ("weight", "bias") and (
            split[1] in families.suffix_table() or split[1] in families.UNSUPPORTED_SUFFIXES)
        stem, last = key.rsplit(".", 1) if "." in key else (key, "")
        if peft and mts and _saved_module(stem, mts) and not adapter_suffix:
            if last not in ("weight", "bias"):
                raise UserError(f"not supported yet: modules_to_save tensor '{key}' in {file} (only weight and bias)")
            parts[module_id(stem, last)] = Part(REPLACEMENT, {"value": key}, last)
            continue
        if peft and last == "bias" and not adapter_suffix:
            if not trained_bias:
                raise UserError(f"{file}: tensor '{key}' is a bias but adapter_config.json has bias "
                                f"{config.get('bias', 'none')!r} (want 'all' or 'lora_only')")
            stem = stem.removesuffix(".base_layer")  # PEFT saves a wrapped layer's bias under base_layer
            parts[module_id(stem, "bias")] = Part(REPLACEMENT, {"value": key}, "bias")
            continue
        if split is None:
            raise UserError(f"not supported yet: unrecognised tensor '{key}' in {file} (not a {fmt} adapter tensor)")
        by_stem.setdefault(split[0], {})[split[1]] = key
    lora: dict[str, dict[str, str]] = {}
    alpha: dict[str, str] = {}
    for stem, sufs in by_stem.items():
        found, a = families.classify(stem, sufs, fmt, file, allowed)
        if a is not None:
            alpha[stem] = a
        for p in found:
            fn = p.type.extra.get("shape")
            if fn is not None:  # the type's structural checks (complete factor sets, chaining shapes)
                fn({r: tuple(entries[k][1]) for r, k in p.keys.items()},
                   {"module": stem, "file": str(file), "format": "peft" if peft else "lycoris"})
            mid = module_id(stem, p.target)
            if mid in parts:
                if p.target == "bias" and not p.factors:  # trained bias + lora_bias: PEFT adds both
                    parts[mid].also.append(p)
                    continue
                raise UserError(f"{file}: module '{stem}' has two {p.target} deltas ({parts[mid].name}, {p.name})")
            if p.factors:
                lora[stem] = dict(p.keys)
                continue
            parts[mid] = p
            # the LoRA factors inside a part (an epilogue's host, PEFT DoRA): the source's LoRA
            # scale rules (alpha / r, rsLoRA, patterns) give the part's hp['scale']
            lora_keys = {families.roles_of(families.LORA).get(s) or families.roles_of(families.LORA_EMBEDDING).get(s): k
                         for s, k in sufs.items() if s in families.roles_of(families.LORA)
                         or s in families.roles_of(families.LORA_EMBEDDING)}
            if {"A", "B"} <= set(lora_keys) or {"eA", "eB"} <= set(lora_keys):
                lora[stem] = lora_keys
            if p.target == "weight" and callable(p.type.extra.get("bias")):
                b = Part(families.derived_bias(p.type), dict(p.keys), "bias")
                bid = module_id(stem, "bias")
                if bid in parts:
                    parts[bid].also.append(b)
                else:
                    parts[bid] = b
    return lora, parts, alpha, base_copies
