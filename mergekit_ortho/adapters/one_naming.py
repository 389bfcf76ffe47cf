"""PEFT adapters merged without a base model, saved under different transformers namings.

Two PEFT LoRAs for one model, one saved by peft under transformers 4 (the checkpoint's module
names, ViT ``vit.encoder.layer.N.attention.attention.query``), one under transformers 5 (the
in-memory names, ``vit.layers.N.attention.q_proj``), share no module name; merged adapter to
adapter with no base they would be written side by side as different modules. The rename rules
that relate the namings (``transformers5``) need the model's config, so one is looked for,
offline: ``config.json`` beside an adapter, else at its adapter_config ``base_model_name_or_path``
as a local directory or a file already in the Hugging Face cache (never the network). With it,
every adapter's keys take the installed transformers' in-memory names (``transformers5.
memory_names``, the rule of every PEFT output), so modules of the two namings line up and the
merge is exact. Without one, adapters that share no module name with any other are refused
with one line saying what to pass (they may be the same modules named twice). With transformers
< 5 installed there are no rules to apply and nothing changes. Spec: adapters.md P19; issue 15.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, MutableMapping, Sequence

from ..errors import UserError


def find_config(adapter_path: Path, adapter_config: Mapping) -> tuple[dict, str] | None:
    """(config, where it was found) for an adapter, looked up offline; None when none is found."""
    from ..io.json_files import read_object

    here = adapter_path if adapter_path.is_dir() else adapter_path.parent
    candidates = [here / "config.json"]
    ref = adapter_config.get("base_model_name_or_path")
    if isinstance(ref, str) and ref:
        candidates.append(Path(ref) / "config.json")
        cached = _hub_cached(ref)
        if cached is not None:
            candidates.append(cached)
    for f in candidates:
        try:
            if f.is_file():
                cfg = read_object(f, "model config")
                if cfg.get("model_type"):
                    return cfg, str(f)
        except OSError:
            continue
    return None


def _hub_cached(repo_id: str) -> Path | None:
    """config.json of a hub id when it is already in the local Hugging Face cache (no download)."""
    if repo_id.count("/") > 1 or Path(repo_id).is_absolute():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        got = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub client rejects (not a repo id): nothing cached
        return None
    return Path(got) if isinstance(got, str) else None


def align(adapters: Sequence[tuple[str, Path, Mapping, MutableMapping[str, str]]]) -> list[str]:
    """Rename in place each adapter's {module: key} map to one naming; the plan's notes.

    ``adapters``: (label, path, adapter_config, {stored module: key}) per PEFT adapter, keys as
    the adapter names them (``.weight`` appended). Raises UserError as the module doc says."""
    from .transformers5 import describe, memory_names, version

    if len(adapters) < 2 or version() is None:
        return []
    found = next((c for _, p, cfg, _ in adapters if (c := find_config(Path(p), cfg)) is not None), None)
    if found is None:
        _refuse_disjoint(adapters)
        return []
    config, where = found
    _refuse_fused(adapters, config)
    renamed = 0
    for label, _, _, mapping in adapters:
        names = memory_names(sorted(set(mapping.values())), config)
        if not names:
            continue
        seen: dict[str, str] = {}
        for mod, key in mapping.items():
            new = names.get(key, key)
            if new in seen and seen[new] != mod:
                raise UserError(f"{label}: LoRA modules '{seen[new]}' and '{mod}' both name '{new}' under "
                                f"{describe()} (the adapter mixes both namings)")
            seen[new] = mod
            renamed += new != key
            mapping[mod] = new
    if not renamed:
        return []
    return [f"without a base model: {renamed} LoRA module(s) renamed to {describe()} by the rules for "
            f"{config.get('model_type')} (config: {where}), so adapters of either naming line up"]


def _refuse_disjoint(adapters) -> None:
    keys = [set(m.values()) for *_, m in adapters]
    for i, (label, _, cfg, _) in enumerate(adapters):
        others = set().union(*(k for j, k in enumerate(keys) if j != i))
        if keys[i] and not keys[i] & others:
            ref = cfg.get("base_model_name_or_path")
            where = f"base_model_name_or_path '{ref}' is neither a local directory nor cached" if ref else \
                "adapter_config.json names no base_model_name_or_path"
            raise UserError(
                f"{label} shares no LoRA module name with the other adapters and no model config was found to "
                f"relate transformers 4 and 5 module names (no config.json beside the adapters; {where}): "
                "set base_model, or put the base model's config.json beside one adapter")


def _refuse_fused(adapters, config) -> None:
    """A module the installed transformers splits or fuses on load (Dinov2's ``mlp.weights_in``
    <-> gate/up) has no one name in the other naming: when the adapters mix the checkpoint's
    fused module and the in-memory parts (or the reverse), without a base the rows cannot be
    placed, so it is refused; adapters all of one naming merge by name as before."""
    from .transformers5 import _rules_for
    from .transformers5_fused import _taken

    rules = _rules_for(config)
    if rules is None:
        return
    hits = {False: None, True: None}  # direction -> (label, key, converter, renamed)
    for label, _, _, mapping in adapters:
        for k in sorted(set(mapping.values())):
            for reverse in (False, True):
                hit = _taken(k, rules[reverse], reverse)
                if hit is not None and hits[reverse] is None:
                    hits[reverse] = (label, k, hit[0], hit[2])
    if hits[False] and hits[True]:
        label, k, conv, renamed = hits[False]
        raise UserError(f"{label}: LoRA module '{k[: -len('.weight')]}' is split or fused by transformers' "
                        f"conversion {conv.source_patterns} -> {conv.target_patterns} (as '{renamed}') while "
                        f"{hits[True][0]} names the other side ('{hits[True][1][: -len('.weight')]}'); merging "
                        "them needs the base model: set base_model")
