"""Module names as transformers 5 holds them in memory, against the names checkpoints store.

transformers 5 renames modules at load time for several families (ViT: the checkpoint's
``vit.encoder.layer.N.attention.attention.query`` is ``vit.layers.N.attention.q_proj`` in memory;
Swin: ``attention.self.query`` is ``attention.q_proj``; CLIP vision/text towers drop their
``vision_model.`` / ``text_model.`` prefix), and peft under transformers 5 saves adapters with the
in-memory names, while the checkpoints on disk keep the original ones (transformers reverts the
renames when saving). Spec: ../shared/specs/adapters.md P19 (key maps); issue 15.

The rules are transformers' own, read from the installed version (``conversion_mapping``): the
model is built on the meta device from the checkpoint's config.json (no weights, no memory), its
``get_model_conversion_mapping`` gives the ordered ``WeightRenaming`` list with each rule's scope,
and a key is renamed as transformers renames it on load (every renaming in turn, ``rename_source_key``)
or back as it renames on save (the rules reversed, in reverse order, without ``PrefixChange`` and
the legacy renames, as ``revert_weight_conversion`` does). Only renamings are used: a key that a
``WeightConverter`` takes (a split or fusion of tensors: Dinov2's ``weights_in`` -> gate/up,
Mixtral's per-expert ``w1``/``w3`` -> ``gate_up_proj``) is not the rename of one module and gets
no other name here (Mixtral's router ``block_sparse_moe.gate`` -> ``mlp.gate`` still does).

* :func:`renames` ``(keys, config) -> {key: renamed key}`` in both directions: a key stored under
  the checkpoint naming gets its in-memory name, a key already in the in-memory naming (a state
  dict saved raw from a transformers 5 model) its checkpoint name; keys the rules leave alone are
  not listed. ``{}`` when transformers < 5 (or none) is installed, or the config names no model
  it knows.
* :func:`aliases` : the same as ``naming.Alias`` entries (rule ``"transformers"``), so
  ``keymap.match_to_base`` matches adapters of either naming onto a base of either naming.
* :func:`memory_names` ``(keys, config) -> {key: in-memory key}``: what PEFT outputs are named
  by, so they load with peft on the installed transformers.

transformers is imported only here, and only when a caller needs it (an adapter that did not
match by name, a PEFT output of a family the installed version renames); a cheap look at the
rule table's names first skips building the model for families without rules (Llama, GPT-2...).
"""
from __future__ import annotations

import functools
import json
from typing import Mapping, Sequence

from .naming import Alias

RULE = "transformers"


def _installed() -> str | None:
    from importlib import metadata

    try:
        v = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    return v if v.split(".")[0].isdigit() and int(v.split(".")[0]) >= 5 else None


def version() -> str | None:
    """The installed transformers version when it is 5 or later (the renaming one), else None."""
    return _installed()


def _config_names(config: Mapping, classes_of) -> set[str]:
    """The architectures of a config plus, for it and each sub-config with a ``model_type``, that
    model type and ``classes_of(model_type)`` (its model classes)."""
    out: set[str] = set(config.get("architectures") or [])
    stack = [config]
    while stack:
        c = stack.pop()
        mt = c.get("model_type")
        if mt:
            out |= {mt} | set(classes_of(mt))
        stack += [v for v in c.values() if isinstance(v, dict) and "model_type" in v]
    return out


def _candidates(config: Mapping) -> set[str]:
    """Names the rule table may be keyed by for this config: model types (the config's and its
    sub-configs'), architectures, and each model type's base model class."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    def base_classes(mt: str):
        base = MODEL_MAPPING_NAMES.get(mt)
        return [base] if isinstance(base, str) else list(base or ())

    return _config_names(config, base_classes)


@functools.lru_cache(maxsize=1)
def _table_names() -> tuple[frozenset, dict] | None:
    """Without importing transformers: the names its rule table is keyed by (model types, class
    names) and {model type: its auto classes}, read from the installed sources; None if unread."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    try:
        table = (root / "conversion_mapping.py").read_text(encoding="utf-8")
        auto = (root / "models" / "auto" / "modeling_auto.py").read_text(encoding="utf-8")
    except OSError:
        return None
    keys = frozenset(re.findall(r'"([\w.]+)"\s*:', table))
    classes: dict[str, set[str]] = {}
    for mt, cls in re.findall(r'\(\s*"(\w+)",\s*"(\w+)"\s*\)', auto):
        classes.setdefault(mt, set()).add(cls)
    return (keys, classes) if keys and classes else None


def _may_rename(config: Mapping) -> bool:
    """A cheap first look: False only when no name of this config's models keys the rule table."""
    names = _table_names()
    if names is None:
        return True  # sources not readable as expected: ask transformers itself
    keys, classes = names
    found = _config_names(config, lambda mt: classes.get(mt, ()))
    return bool(found & (keys - {"legacy"}))


@functools.lru_cache(maxsize=8)
def _rules(config_json: str):
    """(forward, reverse) renaming lists for a config, or None when transformers has none."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    config = json.loads(config_json)
    if not any(get_checkpoint_conversion_mapping(n) for n in _candidates(config)):
        return None  # only the legacy rules (LayerNorm.gamma...) could apply: none concerns a module name
    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **fields)
    arch = next((a for a in config.get("architectures") or [] if hasattr(transformers, a)), None)
    with torch.device("meta"):
        model = (getattr(transformers, arch)._from_config(cfg) if arch else transformers.AutoModel.from_config(cfg))
    everything = get_model_conversion_mapping(model)
    forward = [t for t in everything if isinstance(t, WeightRenaming)]
    converters = [t for t in everything if not isinstance(t, WeightRenaming)]
    kept = [t for t in get_model_conversion_mapping(model, add_legacy=False)
            if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)]
    reverse = [t.reverse_transform() for t in kept[::-1]]
    reverse_converters = [t.reverse_transform() for t in get_model_conversion_mapping(model, add_legacy=False)[::-1]
                          if not isinstance(t, WeightRenaming)]
    return (forward, converters), (reverse, reverse_converters)


def _apply(key: str, rules) -> str | None:
    """The key renamed by ``rules`` (renamings, converters); None where a converter (a split or
    fusion of tensors, e.g. Mixtral's per-expert w1/w3 -> fused gate_up_proj) takes it: that is
    not the rename of one module."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = rules
    renamed, pattern = rename_source_key(key, renamings, converters)
    return None if pattern is not None else renamed


def _rules_for(config: Mapping | None):
    if not config or not config.get("model_type") or _installed() is None or not _may_rename(config):
        return None
    try:
        return _rules(json.dumps(dict(config), sort_keys=True, default=str))
    except Exception:  # a config the installed transformers cannot build (custom code, newer model)
        return None


def renames(keys: Sequence[str], config: Mapping | None) -> dict[str, str]:
    """{key: its name in the other naming} for the keys transformers' rules rename (see module doc)."""
    rules = _rules_for(config)
    if rules is None:
        return {}
    forward, reverse = rules
    have = set(keys)
    out: dict[str, str] = {}
    for k in keys:
        fwd = _apply(k, forward)
        if fwd is not None and fwd != k and fwd not in have:
            out[k] = fwd  # a checkpoint name: its in-memory name
            continue
        back = _apply(k, reverse)
        if back is not None and back != k and back not in have and _apply(back, forward) == k:
            out[k] = back  # an in-memory name (a raw state dict): its checkpoint name
    return out


def memory_names(keys: Sequence[str], config: Mapping | None) -> dict[str, str]:
    """{checkpoint key: in-memory key} for the keys the installed transformers renames on load
    (keys already in the in-memory naming are left out: they are their own in-memory name)."""
    rules = _rules_for(config)
    if rules is None:
        return {}
    have = set(keys)
    return {k: fwd for k in keys if (fwd := _apply(k, rules[0])) is not None and fwd != k and fwd not in have}


def output_names(keys: Sequence[str], config: Mapping | None) -> tuple[dict[str, str], str | None]:
    """A PEFT output's {base key: module key} (:func:`memory_names`) and the plan's note on it."""
    names = memory_names(keys, config)
    if not names:
        return {}, None
    k, v = next(iter(names.items()))
    return names, (f"PEFT output named as {describe()} ({len(names)} modules, e.g. '{v}' for checkpoint "
                   f"'{k}'), so peft loads it on the installed transformers")


def aliases(keys: Sequence[str], config: Mapping | None) -> list[Alias]:
    """The base's weight tensors under their other transformers naming, as ``Alias`` entries."""
    return [Alias(other[: -len(".weight")], k, RULE) for k, other in renames(keys, config).items()
            if k.endswith(".weight") and other.endswith(".weight")]


def describe() -> str:
    v = _installed()
    return f"transformers {v} in-memory names" if v else "transformers' in-memory names"
