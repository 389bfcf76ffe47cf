"""The parts of an adapter that are not plain LoRA factors: their facts and their dense delta.

Spec: ../shared/specs/adapters.md P24 (three canonical kinds: factors, dense delta, transform of
W0). A part (``families.Part``) is one module's delta on one base tensor; ``materialise`` reads its
tensors and calls its type's ``materialise(base, tensors, hp)`` (``adapters.types``), then each
epilogue (DoRA) with ``hp['delta']`` = the delta so far. A part whose type needs the base and gets
none is a ``UserError`` (``<file>: <type> needs the base model``).
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import UserError
from .grouping import PEFT_PREFIX, peft_pattern_key, stem_of

# ``src`` below is an ``adapters.lora.LoraSource`` (not imported: lora imports this module)


def type_name(src: "LoraSource", module: str) -> str:
    if module in src._parts:
        return src._parts[module].name
    src._check(module)
    return "LoRA (embedding)" if "eA" in src._keys[module] else "LoRA"


def part_shapes(src: "LoraSource", module: str) -> dict[str, tuple[int, ...]]:
    p = src._parts[module]
    out = {r: tuple(src._entries[k][1]) for r, k in p.all_keys.items()}
    for e, keys in p.epilogues:
        out.update({f"{e.name}:{r}": tuple(src._entries[k][1]) for r, k in keys.items()})
    return out


def _role_shapes(src: "LoraSource", module: str) -> dict[str, tuple[int, ...]]:
    return {r: tuple(src._entries[k][1]) for r, k in src._parts[module].keys.items()}


def part_rank(src: "LoraSource", module: str) -> int | None:
    p = src._parts[module]
    stem, _ = stem_of(module)
    if p.type.extra.get("factors"):
        a = p.keys.get("A") or p.keys.get("eA")
        return src._entries[a][1][0]
    if p.target == "weight" and src.format in ("peft", "diffusers"):
        r = _pattern(src, "rank_pattern", stem)
        return int(r) if r is not None else (src.config.get("r") if src.config else None)
    for role in ("w1b", "w1_b", "w2_b", "down"):
        if role in p.keys:
            return src._entries[p.keys[role]][1][0]
    return None


def _pattern(src: "LoraSource", field: str, stem: str):
    pats = (src.config or {}).get(field) or {}
    k = peft_pattern_key(pats, src._peft_name(stem))
    return pats[k] if k is not None else None


def part_alpha(src: "LoraSource", module: str) -> float | None:
    stem, _ = stem_of(module)
    if stem in src._alpha_keys:
        return float(src._read(src._alpha_keys[stem]).float().reshape(-1)[0])
    if src.format in ("peft", "diffusers") and src.config:
        a = _pattern(src, "alpha_pattern", stem)
        if a is not None:
            return float(a)
        for f in ("alpha", "lora_alpha"):
            if src.config.get(f) is not None:
                return float(src.config[f])
    return None


def hyperparameters(src: "LoraSource", module: str, shape=None) -> dict[str, Any]:
    """The ``hp`` a type's materialise gets (``adapters.types``), plus ``shape``, ``file``, ``key``."""
    p = src._parts[module]
    stem, _ = stem_of(module)
    scale = src.scale(stem) if stem in src._keys else None
    name = stem[len(PEFT_PREFIX):] if stem.startswith(PEFT_PREFIX) else stem
    return {"format": "peft" if src.format in ("peft", "diffusers") else "lycoris", "config": dict(src.config),
            "module": name, "alpha": part_alpha(src, module), "rank": part_rank(src, module), "scale": scale,
            "metadata": dict(src.metadata), "shape": tuple(shape) if shape is not None else None,
            "file": str(src.file), "key": next(iter(p.keys.values()), None)}


def delta_shape(src: "LoraSource", module: str, shape=None) -> tuple[int, int]:
    """(rows, cols) of the part's delta from its stored shapes (``shape``: the base tensor's, checked)."""
    p = src._parts[module]
    fn = p.type.extra.get("shape")
    if fn is None:
        if shape is None:
            raise UserError(f"{src.file}: the shape of {p.name} module '{module}' comes from the base model; "
                            "set base_model")
        full = tuple(shape)
    else:
        full = tuple(fn(_role_shapes(src, module), hyperparameters(src, module, shape)))
    return (full[0], math.prod(full[1:])) if len(full) >= 2 else (math.prod(full), 1)


def materialise(src: "LoraSource", module: str, shape=None, base=None):
    import torch

    p = src._parts[module]
    if p.needs_base and base is None:
        raise UserError(f"{src.file}: {p.name} needs the base model (it depends on W0); pass base_model")
    hp = hyperparameters(src, module, shape if shape is not None else (base.shape if base is not None else None))
    b32 = base.to(torch.float32) if base is not None else None
    def read(keys):  # the stored tensors by role, float32 (the contract of adapters.types)
        out = {}
        for r, k in keys.items():
            t = src._read(k)
            out[r] = t.to(torch.float32) if t.is_floating_point() else t
        return out

    d = p.type.materialise(b32 if p.type.needs_base else None, read(p.keys), hp)
    for e, keys in p.epilogues:
        d = e.materialise(b32 if e.needs_base else None, read(keys), dict(hp, delta=d))
    d = d.to(torch.float32)
    for q in p.also:  # e.g. a trained bias (replacement) and lora_bias on one bias: PEFT adds both
        d = d.reshape(-1) + q.type.materialise(b32 if q.type.needs_base else None, read(q.keys), hp).reshape(-1)
    if shape is not None:
        if d.numel() != math.prod(shape):
            raise UserError(f"{src.file}: {p.name} module '{module}' gives a delta of shape {list(d.shape)} but the "
                            f"base tensor has shape {list(shape)}")
        d = d.reshape(tuple(shape))
    return d


def has_exact_factors(src: "LoraSource", module: str) -> bool:
    """The part has an exact low-rank form (``extra['factors_fn']``; no epilogue, nothing added)."""
    p = src._parts.get(module)
    if p is None or p.epilogues or p.also or p.type.extra.get("factors_fn") is None:
        return False
    cond = p.type.extra.get("factors_if")
    return cond is None or bool(cond(set(p.keys)))


def exact_factors(src: "LoraSource", module: str, shape=None):
    """(A [k, cols], B [rows, k]) float32 with B @ A = the part's delta flattened, scale in B."""
    import torch

    p = src._parts[module]
    tensors = {r: src._read(k).to(torch.float32) for r, k in p.keys.items()}
    A, B = p.type.extra["factors_fn"](tensors, hyperparameters(src, module, shape))
    return A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous()
