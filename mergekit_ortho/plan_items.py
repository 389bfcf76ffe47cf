"""Per tensor of a full-model output: merged or copied, from which input tensors, and why.

``plan_items`` checks every merged tensor's presence, shape and dtype across the inputs (extra
tensors in a model are an error: they would be dropped silently otherwise), resolves tied heads
(mergekit M5: a tied input contributes its embeddings as its head where another input stores one;
tied_heads.py) and the aligned vocabulary's row count, and says which config fields the output
changes. Headers only.
"""
from __future__ import annotations

import re
from typing import Any

from .dtypes import FP8, MERGEABLE
from .errors import UserError
from .planning import TIED_HEADS, VOCABULARY_TENSORS, ModelInput, PlanItem, promoted
from .prefixes import RenamedSource


def _tied_source(m: ModelInput, head: str) -> str | None:
    return next((e for e in TIED_HEADS.get(head, ()) if e in m.source.infos), None)


def plan_items(reference: ModelInput, models: list[ModelInput], include: list[str], exclude: list[str],
               out_dtype: str | None, base: ModelInput | None = None, all_models: list[ModelInput] | None = None,
               vocab_rows: int | None = None, module_reason=None) -> tuple[dict[str, PlanItem], dict[str, Any]]:
    """Per tensor of the reference (the base, else the first model): merge or copy, and why; and
    the config fields the output changes.

    Every merged tensor must exist with the same shape in every model; extra tensors in a model
    are an error too (they would be silently dropped otherwise). A head stored by some inputs
    only (tied checkpoints do not store it) is written, and the tied inputs contribute their
    embeddings as their head (mergekit M5); the output config then says untied. A merged tensor
    is written in ``out_dtype``, else in its inputs' promoted dtype (mergekit's result dtype).
    ``models`` are the full checkpoints checked; ``all_models`` every model in plan order (LoRAs
    too), which an item's ``sources`` follow; ``base`` the base when the operator reads it.
    ``vocab_rows``: the aligned vocabulary's row count (a tokenizer setting): vocabulary tensors
    may then differ in rows between inputs and are written with that many.
    ``module_reason``: name -> why it is copied unmerged ("" to merge it), for modular recipes.
    """
    ordered = all_models if all_models is not None else models
    include_re = [re.compile(p) for p in include]
    exclude_re = [re.compile(p) for p in exclude]
    items: dict[str, PlanItem] = {}
    config: dict[str, Any] = {}
    infos = dict(reference.source.infos)
    heads = [h for h in TIED_HEADS if h not in infos and any(h in m.source.infos for m in models)]
    for h in heads:  # the reference is tied, some model stores the head: the head is written
        infos[h] = next(m.source.infos[h] for m in models if h in m.source.infos)
    for name, info in infos.items():
        if info.dtype in FP8:
            raise UserError(
                f"{info.file}: tensor '{name}' is {info.dtype}; FP8 checkpoints need their scale tensors "
                "and are not merged raw - dequantise to bf16/fp16 first"
            )
        reason = ""
        outside = next((m for m in ordered if isinstance(m.source, RenamedSource) and name not in m.source.infos
                        and not (name in TIED_HEADS and _tied_source(m, name))), None)
        if info.dtype not in MERGEABLE:
            reason = "not a float tensor"
        elif outside is not None:  # e.g. a VLM base's vision tower, which a text-only input lacks
            reason = f"not in {outside.label}, whose language model is mapped onto {reference.label}'s"
        elif include_re and not any(p.search(name) for p in include_re):
            reason = "not matched by include"
        elif any(p.search(name) for p in exclude_re):
            reason = "matched by exclude"
        elif module_reason is not None:  # a module a modular recipe does not list
            reason = module_reason(name)
        action = "copy" if reason else "merge"
        read = info.nbytes if name in reference.source.infos else 0
        sources = None
        dtypes = [info.dtype]
        if action == "merge":
            named = []
            for m in ordered:
                if m.is_lora:
                    named.append((m, name))
                    continue
                src = name
                other = m.source.infos.get(name)
                if other is None and name in TIED_HEADS:
                    src = _tied_source(m, name)
                    other = m.source.infos.get(src) if src else None
                if other is None:
                    raise UserError(f"tensor '{name}' is in {reference.ref} but missing from {m.ref}"
                                    + (_mismatch_hint(reference, m, name)
                                       or "; exclude it or use matching checkpoints"))
                aligned = vocab_rows is not None and name in VOCABULARY_TENSORS
                if other.shape != info.shape and not (aligned and other.shape[1:] == info.shape[1:]):
                    raise UserError(_shape_message(name, reference, info, m, other) + _mismatch_hint(reference, m))
                if other.dtype in FP8 or other.dtype not in MERGEABLE:
                    raise UserError(f"tensor '{name}' is {other.dtype} in {m.ref}, cannot merge it")
                read += other.nbytes
                dtypes.append(other.dtype)
                named.append((m, src))
            base_src = None
            if base is not None:
                bname = name if name in base.source.infos else _tied_source(base, name)
                if bname is None:
                    raise UserError(f"tensor '{name}' is missing from the base model {base.ref}")
                base_src = (base, bname)
                if bname != name:
                    read += base.source.infos[bname].nbytes
            if any(src != name for _, src in named) or (base_src is not None and base_src[1] != name):
                sources = tuple(named)
            od = out_dtype or promoted(dtypes)
        else:
            od = info.dtype
        shape = info.shape
        if vocab_rows is not None and name in VOCABULARY_TENSORS and action == "merge":
            shape = (vocab_rows, *info.shape[1:])
        item = PlanItem(name, action, shape, info.dtype, od, read, reason)
        if sources is not None:
            item.sources, item.base_source = sources, base_src
        items[name] = item
    if any(_head_differs_from_embeddings(items, h) for h in TIED_HEADS if h in items):
        config["tie_word_embeddings"] = False
    known = set(infos) | {e for es in TIED_HEADS.values() for e in es}
    for m in models:
        extra = sorted(set(m.source.infos) - known)
        if extra:
            raise UserError(
                f"tensor '{extra[0]}' is in {m.ref} but not in {reference.ref}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + (_mismatch_hint(reference, m) or "; use checkpoints of the same architecture")
            )
    return items, config


def _head_differs_from_embeddings(items: dict[str, PlanItem], head: str) -> bool:
    """Whether the written head can differ from the written embeddings, so that the output must
    say untied (a tied config would make transformers use the embeddings and drop the head, or
    refuse to tie them): some input contributes its embeddings as its head (it is tied and does
    not store one), or the head is kept from the base while the embeddings are merged (``exclude:
    lm_head`` on tied checkpoints). A head merged from heads the inputs all store can differ too (a
    method with random masks, DARE, draws them per tensor), so any merged head says untied."""
    it = items[head]
    if it.action == "merge":
        return True
    return any(items[e].action == "merge" for e in TIED_HEADS[head] if e in items)


def _mismatch_hint(reference: ModelInput, m: ModelInput, missing: str | None = None) -> str:
    from .prefixes import mismatch_hint

    return mismatch_hint(reference.label, reference.source, m.source, missing)


def _shape_message(name: str, reference: ModelInput, info, m: ModelInput, other) -> str:
    if name in VOCABULARY_TENSORS and info.shape[1:] == other.shape[1:]:
        return (f"tensor '{name}' has {info.shape[0]} vocabulary rows in {reference.ref} but {other.shape[0]} "
                f"in {m.ref} (mergekit: Tensor size mismatch); align the vocabularies with tokenizer_source: "
                "base, union or a model, or a tokenizer: section")
    return f"tensor '{name}' has shape {list(info.shape)} in {reference.ref} but {list(other.shape)} in {m.ref}"
