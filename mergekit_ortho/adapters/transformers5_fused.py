"""transformers 5 conversions that split or fuse tensors, as adapter key maps (issue 15).

Besides plain renames (``transformers5``), transformers 5's conversion mapping has rules that
split one stored tensor into several modules or fuse several into one. Installed 5.x examples:
Dinov2 / Dinov2-with-registers SwiGLU (``mlp.weights_in`` -> ``mlp.gate_proj`` + ``mlp.up_proj``,
``Chunk(dim=0)``), RF-DETR / Tipsv2 / gte / jina-v3 / UnlimitedOCR fused ``qkv`` / ``in_proj`` ->
q/k/v (``Chunk``), bailing / glm5-next / kimi-linear ``q/k/v_conv1d`` -> ``conv1d``
(``Concatenate``), and the MoE expert stacks (``MergeModulelist``, handled by ``experts``).

A row split is exact for LoRA: a fused weight ``W = [W_1; ...; W_n]`` (rows) with LoRAs on the
parts has the delta ``[B_1 A_1; ...; B_n A_n] = blockdiag(B_i) [A_1; ...; A_n]``, a LoRA of rank
``sum r_i`` (``keymap.Assembly``, as for Phi-3's fused qkv); a LoRA on the fused module gives
each part the rows of its B: ``(B[rows_i]) A``. So the ``Chunk(dim=0)`` and ``Concatenate(dim=0)``
rules become ``naming.Alias`` entries with ``base_rows`` (the base holds the fused tensor, the
adapter the parts) or ``lora_rows`` (the base holds the parts, the adapter the fused module), in
both directions (the rules as transformers applies them on load, and reversed as on save).
Every other operation (Interleave, Transpose, PermuteForRope, custom ones) is not a row split:
a module it would take is refused with one line naming the module and the rule
(:func:`unsupported`).

* :func:`aliases` ``(keys, shapes, config) -> [Alias]`` (used by ``keymap`` beside ``transformers5.aliases``): the base's tensors under the other
  naming's split / fused module names (rule ``"transformers split"`` / ``"transformers fuse"``).
* :func:`output_splits` ``(keys, shapes, config) -> {key: [(in-memory key, row0, row1)]}``: a PEFT
  output module on a fused checkpoint tensor that the installed transformers splits in memory is
  written as its parts (rows of B, the same A), so peft loads it.
* :func:`unsupported` ``(modules, keys, config) -> str | None``: the one-line reason for an
  unmatched module that a conversion other than a row split produces.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from .naming import Alias

SPLIT, FUSE = "transformers split", "transformers fuse"


def _plain(pattern: str) -> str | None:
    """A pattern as the literal text it matches, or None when it is a real regular expression."""
    text = pattern.replace("\\.", ".").lstrip("^")
    return None if re.search(r"[\\\[\](){}*+?|$]", text) else text


def _row_op(conv) -> str | None:
    """'chunk' / 'concat' for a converter that is exactly one row split / fusion, else None."""
    ops = list(getattr(conv, "operations", ()) or ())
    if len(ops) != 1 or getattr(ops[0], "dim", None) != 0 or getattr(ops[0], "num_shards_attribute", None):
        return None
    name = type(ops[0]).__name__
    if name == "Chunk" and len(conv.source_patterns) == 1 and len(conv.target_patterns) > 1:
        return "chunk"
    if name == "Concatenate" and len(conv.source_patterns) > 1 and len(conv.target_patterns) == 1:
        return "concat"
    return None


def _taken(key: str, rules, reverse: bool):
    """(converter, its matched source pattern, the key as the converter renames it) or None."""
    from transformers.core_model_loading import apply_renamings

    renamings, converters = rules
    k = key if reverse else apply_renamings(key, renamings)
    for conv in converters:
        renamed, pattern = conv.rename_source_key(k)
        if pattern is not None:
            return conv, pattern, (apply_renamings(renamed, renamings) if reverse else renamed)
    return None


def _swap(text: str, old: str, new: str) -> str | None:
    """``text`` with its one occurrence of ``old`` replaced by ``new`` (None unless exactly one)."""
    return text.replace(old, new) if text.count(old) == 1 else None


def _each(keys: Sequence[str], config: Mapping | None):
    """(key, converter, pattern, renamed key) for each .weight key a converter takes, both directions."""
    from .transformers5 import _rules_for

    rules = _rules_for(config)
    if rules is None:
        return
    for k in keys:
        if not k.endswith(".weight"):
            continue
        for direction, reverse in ((rules[0], False), (rules[1], True)):
            hit = _taken(k, direction, reverse)
            if hit is not None:
                yield (k, *hit)
                break


def _parts(k: str, conv, pattern: str, renamed: str, shapes: Mapping[str, Sequence[int]]):
    """For a row converter taking base key ``k``: ('chunk', [part module keys]) when ``k`` is the
    fused tensor, ('concat', fused module key, [sibling base keys in order]) when it is a part."""
    op = _row_op(conv)
    targets = [_plain(t) for t in conv.target_patterns]
    sources = [_plain(s) for s in conv.source_patterns]
    if op is None or None in targets or None in sources:
        return None
    if op == "chunk":
        parts = [_swap(renamed, targets[0], t) for t in targets]
        return None if None in parts else ("chunk", parts)
    me = sources[conv.source_patterns.index(pattern)]
    siblings = [_swap(k, me, s) for s in sources]
    if None in siblings or any(s not in shapes for s in siblings):
        return None
    return "concat", renamed, siblings


def aliases(keys: Sequence[str], shapes: Mapping[str, Sequence[int]], config: Mapping | None) -> list[Alias]:
    """The base's tensors under the other naming's split or fused module names (module doc)."""
    out: list[Alias] = []
    for k, conv, pattern, renamed in _each(keys, config):
        got = _parts(k, conv, pattern, renamed, shapes)
        if got is None:
            continue
        if got[0] == "chunk":
            rows = int(shapes[k][0])
            n = len(got[1])
            if rows % n:
                continue
            h = rows // n
            out += [Alias(p[: -len(".weight")], k, FUSE, base_rows=(i * h, (i + 1) * h))
                    for i, p in enumerate(got[1]) if p.endswith(".weight")]
        else:
            fused, siblings = got[1], got[2]
            if not fused.endswith(".weight"):
                continue
            offsets = [0]
            for s in siblings:
                offsets.append(offsets[-1] + int(shapes[s][0]))
            i = siblings.index(k)
            out.append(Alias(fused[: -len(".weight")], k, SPLIT, lora_rows=(offsets[i], offsets[i + 1]),
                             lora_total=offsets[-1]))
    return out


def output_splits(keys: Sequence[str], shapes: Mapping[str, Sequence[int]],
                  config: Mapping | None) -> dict[str, list[tuple[str, int, int]]]:
    """{fused checkpoint key: [(in-memory part key, row0, row1)]} for the keys the installed
    transformers splits on load (forward ``Chunk(dim=0)`` rules), for PEFT outputs."""
    from .transformers5 import _rules_for

    rules = _rules_for(config)
    if rules is None:
        return {}
    out: dict[str, list[tuple[str, int, int]]] = {}
    for k in keys:
        hit = _taken(k, rules[0], False) if k.endswith(".weight") else None
        got = _parts(k, *hit, shapes) if hit is not None else None
        if got is None or got[0] != "chunk" or int(shapes[k][0]) % len(got[1]):
            continue
        h = int(shapes[k][0]) // len(got[1])
        out[k] = [(p, i * h, (i + 1) * h) for i, p in enumerate(got[1])]
    return out


def unsupported(modules: Sequence[str], keys: Sequence[str], config: Mapping | None) -> str | None:
    """Why an unmatched adapter module (a stem, no ``.weight``) cannot be mapped: the conversion
    rule, other than a row split, that makes it from a base tensor; None when none does."""
    want = set(modules)
    names = {k: k for k in keys}
    for k, conv, pattern, renamed in _each(list(names), config):
        if _row_op(conv) is not None:
            continue
        targets = [t for t in (_plain(t) for t in conv.target_patterns) if t]
        made = {renamed} | {x for t in targets if (x := _swap(renamed, _plain(conv.target_patterns[0]) or "", t))}
        for m in sorted(want):
            if any(x == m or x == m + ".weight" or x.startswith(m + ".") for x in made):
                ops = ", ".join(type(o).__name__ for o in conv.operations)
                return (f"LoRA module '{m}' is made by transformers' conversion {conv.source_patterns} -> "
                        f"{conv.target_patterns} ({ops}) from base tensor '{k}', which is not a row split "
                        "of the tensor and has no exact LoRA form; merge into a base saved in the adapter's "
                        "naming")
    return None


def split_outputs(modules: Mapping, shapes: Mapping[str, Sequence[int]], config: Mapping | None):
    """PEFT output ``modules`` {key: (A, B)} with each fused checkpoint key that the installed
    transformers splits on load written as its in-memory parts (B's rows, the same A, the columns
    of B that are zero on a part dropped with A's rows: exact); and their shapes."""
    splits = output_splits(list(modules), shapes, config)
    if not splits:
        return modules, shapes
    out, shaped = dict(modules), dict(shapes)
    for key, parts in splits.items():
        A, B = out.pop(key)
        shape = tuple(shaped.pop(key))
        for part, r0, r1 in parts:
            b = B[r0:r1]
            keep = b.abs().sum(0) != 0
            out[part] = (A[keep], b[:, keep]) if bool(keep.any()) else (A[:1], b[:, :1])
            shaped[part] = (r1 - r0, *shape[1:])
    return out, shaped
