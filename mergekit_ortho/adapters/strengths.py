"""Per-model LoRA strengths: ``te_weight``, ``unet_weight`` and LoRA Block Weight vectors, resolved
per module when the plan is built.

Spec: ../shared/specs/adapters.md P20 (math: ΔW_module ← λ_part · w[block(module)] · ΔW_module,
λ_part = ``te_weight`` for text-encoder modules, ``unet_weight`` for the rest) and P25 (strength
of a transform kind: W0 + λ(W′ − W0), i.e. the materialised delta times λ, for every type).

Recipe keys (a model's ``parameters`` or the top-level ``parameters``, for any method):

* ``te_weight``, ``unet_weight``: numbers, in every setting form of :mod:`..settings` (a scalar,
  a gradient over the layer position t, ``{filter, value}`` entries on the module key): they are
  resolved per module with :func:`..settings.resolve`, as every per-item parameter;
* ``block_weights``: a preset name (``MIDD``, ``FLUXALL``, ...), an A1111 string ``"1,0,0.5,…"`` or a
  list of numbers, of a length the LoRA's family takes (SD1 17/26, SDXL 12/20, Flux 61);
* ``lbw_unlisted``: the weight of the family's blocks that a short vector does not list (0).

The result is one number per (model, module); :class:`ScaledLora` multiplies that module's
factors (B, or both by √|λ| with the sign in B for the sqrt fold) or its materialised delta, so
every path that reads a LoRA (dense, low-rank, exact low-rank forms, SVD approximations) sees it.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..errors import UserError
from ..ops.registry import Param
from . import blocks

KEYS = ("te_weight", "unet_weight", "block_weights", "lbw_unlisted")
_SCALAR = (Param("te_weight", float, 1.0), Param("unet_weight", float, 1.0), Param("lbw_unlisted", float, 0.0))


def check_setting(key: str, value, where: str) -> None:
    """The recipe check (no I/O): the form of one strength key; ValueError when malformed."""
    from ..settings import check_form

    if key == "block_weights":
        blocks.parse_setting(value, where)
        return
    check_form(value, where)
    param = next(p for p in _SCALAR if p.name == key)

    def each(v):
        if isinstance(v, dict):
            each(v["value"])
        elif isinstance(v, list):
            for x in v:
                each(x)
        else:
            try:
                param.coerce(v)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None

    each(value)


def _block_setting(levels: Sequence[Mapping]):
    for level in levels:
        if "block_weights" in level and level["block_weights"] is not None:
            return level["block_weights"]
    return None


def resolve(label: str, keys: Sequence[str], levels: Sequence[Mapping], positions: Mapping[str, float],
            modules: Mapping[str, str] | None = None) -> tuple[dict[str, float], list[str]]:
    """{module key: strength} of one LoRA (its keys that differ from 1) and the notes; ``levels``
    are the model's parameter levels (highest precedence first); ``modules`` its stored module
    name per key (the block is read from either name)."""
    from ..settings import resolve as resolve_setting

    if not any(k in lv for lv in levels for k in KEYS):
        return {}, []
    where = f"model '{label}'"
    setting = _block_setting(levels)
    weights, family = None, None
    names = {k: (modules or {}).get(k, k) for k in keys}
    if setting is not None:
        fams = blocks.families_of(names.values())
        try:
            unlisted = resolve_setting((_SCALAR[2],), levels, "", 0.0, where)["lbw_unlisted"]
            family, weights = blocks.weights_for(setting, fams, unlisted, f"{where}: block_weights")
        except ValueError as e:
            raise UserError(str(e)) from None
    out: dict[str, float] = {}
    counted: dict[str, int] = {}
    try:
        for k in keys:
            p = resolve_setting(_SCALAR[:2], levels, k, positions.get(k, 0.0), where)
            te = blocks.is_text_encoder(names[k]) or blocks.is_text_encoder(k)
            s = p["te_weight"] if te else p["unet_weight"]
            if weights is not None:
                b = blocks.block_of(names[k], family) or blocks.block_of(k, family)
                if b is not None:
                    s *= weights[b]
                    counted[b] = counted.get(b, 0) + 1
            if s != 1.0:
                out[k] = float(s)
    except ValueError as e:
        raise UserError(str(e)) from None
    notes = []
    if weights is not None:
        zero = sum(1 for v in out.values() if v == 0.0)
        notes.append(f"{label}: block weights ({blocks.FAMILY_NAMES[family]}) over {sum(counted.values())} of "
                     f"{len(keys)} modules in {len(counted)} blocks; {zero} module(s) at strength 0")
    return out, notes


class ScaledLora:
    """A matched LoRA whose modules are scaled by per-key strengths (``factors_for`` /
    ``delta_for``); everything else is the wrapped source's."""

    __slots__ = ("lora", "strengths")

    def __init__(self, lora, strengths: Mapping[str, float]):
        object.__setattr__(self, "lora", lora)
        object.__setattr__(self, "strengths", dict(strengths))

    def __getattr__(self, name: str):
        if name == "lora":
            raise AttributeError(name)
        return getattr(self.lora, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"ScaledLora is read-only (cannot set {name!r})")

    def strength(self, base_key: str) -> float:
        return self.strengths.get(base_key, 1.0)

    def factors_for(self, base_key: str, fold: str = "B"):
        A, B = self.lora.factors_for(base_key, fold)
        s = self.strengths.get(base_key)
        if s is None:
            return A, B
        if fold == "sqrt":
            r = math.sqrt(abs(s))
            return A * r, B * (math.copysign(r, s))
        return A, B * s

    def exact_factors_for(self, base_key: str):
        got = self.lora.exact_factors_for(base_key)
        s = self.strengths.get(base_key)
        return got if got is None or s is None else (got[0], got[1] * s)

    def delta_for(self, base_key: str, shape=None, base=None):
        d = self.lora.delta_for(base_key, shape, base=base)
        s = self.strengths.get(base_key)
        return d if s is None else d * s

    def __enter__(self) -> "ScaledLora":
        return self

    def __exit__(self, *exc) -> None:
        self.lora.__exit__(*exc)

    def __repr__(self) -> str:
        return f"ScaledLora({self.lora!r}, {len(self.strengths)} scaled modules)"


def apply(models, levels: Mapping[str, list[dict]], positions_of) -> list[str]:
    """Scale every LoRA input of ``models`` (their sources already matched) by its resolved
    strengths; ``levels`` maps a label to its parameter levels, ``positions_of(keys)`` gives t.
    A full checkpoint given a strength key is refused. Returns the plan notes."""
    notes = []
    for m in models:
        lv = levels.get(m.label, [])
        if not any(k in level for level in lv[:1] for k in KEYS):
            if not m.is_lora or not any(k in level for level in lv for k in KEYS):
                continue
        if not m.is_lora:
            raise UserError(f"model '{m.label}' ({m.ref}) is a full checkpoint; te_weight, unet_weight and "
                            "block_weights apply to LoRA inputs (use 'weight' with a filter instead)")
        keys = list(m.source.by_base)
        got, n = resolve(m.label, keys, lv, positions_of(keys), dict(m.source.by_base))
        notes += n
        if got:
            m.source = ScaledLora(m.source, got)
    return notes
