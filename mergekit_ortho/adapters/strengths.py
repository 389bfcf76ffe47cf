"""Per-model strengths: ``te_weight``, ``unet_weight``, the per-encoder ``te1_weight`` /
``te2_weight`` and LoRA Block Weight vectors, resolved per module (per tensor for a full
checkpoint) when the plan is built.

Spec: ../shared/specs/adapters.md P20 (math: ΔW_module ← λ_part · w[block(module)] · ΔW_module,
λ_part = ``te_weight`` for text-encoder modules, ``unet_weight`` for the rest; "offer te1/te2
overrides") and P25 (strength of a transform kind: W0 + λ(W′ − W0), i.e. the materialised delta
times λ, for every type).

Recipe keys (a model's ``parameters`` or the top-level ``parameters``, for any method):

* ``te_weight``, ``unet_weight``: numbers, in every setting form of :mod:`..settings` (a scalar,
  a gradient over the layer position t, ``{filter, value}`` entries on the module key): they are
  resolved per module with :func:`..settings.resolve`, as every per-item parameter;
* ``te1_weight``, ``te2_weight``: the same, for one text encoder (:func:`.blocks.encoder_of`:
  encoder 2 is SDXL's OpenCLIP-G, ``lora_te2_`` / ``text_encoder_2``, and Flux's T5); at each
  parameter level the encoder's own key wins over ``te_weight``, and a nearer level wins over a
  farther one (a model's ``te_weight`` over a top-level ``te2_weight``), as for every setting;
* ``block_weights``: a preset name (``MIDD``, ``FLUXALL``, ...), an A1111 string ``"1,0,0.5,…"`` or a
  list of numbers, of a length the input's family takes (SD1 17/26, SDXL 12/20, Flux 61);
* ``lbw_unlisted``: the weight of the family's blocks that a short vector does not list (0).

The result is one number per (model, module); :class:`ScaledLora` multiplies that module's
factors (B, or both by √|λ| with the sign in B for the sqrt fold) or its materialised delta, so
every path that reads a LoRA (dense, low-rank, exact low-rank forms, SVD approximations) sees it.

A full checkpoint (a fine-tune) takes the same keys relative to the recipe's ``base_model``: each
tensor becomes W0 + λ·(W − W0) (``torch.lerp``, float32: λ = 0 gives the base and λ = 1 the
fine-tune bit for bit), read through :class:`ScaledDelta`, so every method and path sees the
scaled fine-tune. VAE and EMA tensors are in neither part and no block: they keep λ = 1. This is
the same 26-entry layout as the "Merge Block Weighted" model merges (BASE, IN00-IN11, M00,
OUT00-OUT11), except that there BASE also covers the tensors in no block; here those stay at 1.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..errors import UserError
from ..ops.registry import Param
from . import blocks

KEYS = ("te_weight", "unet_weight", "te1_weight", "te2_weight", "block_weights", "lbw_unlisted")
_SCALAR = (Param("te_weight", float, 1.0), Param("unet_weight", float, 1.0), Param("lbw_unlisted", float, 0.0),
           Param("te1_weight", float, 1.0), Param("te2_weight", float, 1.0))
_BY_NAME = {p.name: p for p in _SCALAR}


def check_setting(key: str, value, where: str) -> None:
    """The recipe check (no I/O): the form of one strength key; ValueError when malformed."""
    from ..settings import check_form

    if key == "block_weights":
        blocks.parse_setting(value, where)
        return
    check_form(value, where)
    param = _BY_NAME[key]

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


def _te_strength(levels: Sequence[Mapping], encoder: int | None, key: str, t: float, where: str) -> float:
    """A text-encoder module's λ: the first level giving ``te{encoder}_weight`` or ``te_weight`` there
    (the encoder's own key first within a level), else 1."""
    from ..settings import NOTHING, evaluate

    names = ((f"te{encoder}_weight",) if encoder in (1, 2) else ()) + ("te_weight",)
    for level in levels:
        for name in names:
            if name in level:
                try:
                    got = evaluate(_BY_NAME[name], level[name], key, t)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                if got is not NOTHING:
                    return float(got)
    return 1.0


def resolve(label: str, keys: Sequence[str], levels: Sequence[Mapping], positions: Mapping[str, float],
            modules: Mapping[str, str] | None = None, what: str = "LoRA") -> tuple[dict[str, float], list[str]]:
    """{module key: strength} of one input (its keys whose strength differs from 1) and the notes;
    ``levels`` are the model's parameter levels (highest precedence first); ``modules`` its stored
    module name per key (the block is read from either name); ``what`` "LoRA" or "checkpoint"."""
    from ..settings import resolve as resolve_setting

    if not any(k in lv for lv in levels for k in KEYS):
        return {}, []
    where = f"model '{label}'"
    setting = _block_setting(levels)
    weights, family = None, None
    names = {k: (modules or {}).get(k, k) for k in keys}
    fams = blocks.families_of(names.values())
    if setting is not None:
        try:
            unlisted = resolve_setting((_SCALAR[2],), levels, "", 0.0, where)["lbw_unlisted"]
            family, weights = blocks.weights_for(setting, fams, unlisted, f"{where}: block_weights",
                                                 what=what)
        except ValueError as e:
            raise UserError(str(e)) from None
    te_family = family or ("flux" if "flux" in fams else "sdxl")
    out: dict[str, float] = {}
    counted: dict[str, int] = {}
    encoders: dict[int, int] = {}
    try:
        for k in keys:
            t = positions.get(k, 0.0)
            part = blocks.part_of(names[k])
            if part == "unet" and blocks.part_of(k) == "te":
                part = "te"
            if part == "te":
                enc = blocks.encoder_of(names[k], te_family) or blocks.encoder_of(k, te_family)
                encoders[enc] = encoders.get(enc, 0) + 1
                s = _te_strength(levels, enc, k, t, where)
            elif part == "unet":
                s = resolve_setting(_SCALAR[1:2], levels, k, t, where)["unet_weight"]
            else:
                s = 1.0  # VAE / EMA tensors of a full checkpoint
            if weights is not None and part is not None:
                b = blocks.block_of(names[k], family) or blocks.block_of(k, family)
                if b is not None:
                    s *= weights[b]
                    counted[b] = counted.get(b, 0) + 1
            if s != 1.0:
                out[k] = float(s)
    except ValueError as e:
        raise UserError(str(e)) from None
    unit = "modules" if what == "LoRA" else "tensors"
    if weights is not None and not counted:
        raise UserError(f"{where}: block_weights: none of its {len(keys)} {unit} is in a Stable Diffusion or Flux "
                        f"block (e.g. '{names[keys[0]] if keys else '-'}'); block weights apply to SD1/SD2, SDXL "
                        "and Flux models")
    notes = []
    if weights is not None:
        zero = sum(1 for v in out.values() if v == 0.0)
        notes.append(f"{label}: block weights ({blocks.FAMILY_NAMES[family]}) over {sum(counted.values())} of "
                     f"{len(keys)} {unit} in {len(counted)} blocks; {zero} {unit[:-1]}(s) at strength 0")
    for n in (1, 2):
        if any(f"te{n}_weight" in lv for lv in levels) and not encoders.get(n):
            notes.append(f"{label}: te{n}_weight is not used: no {unit[:-1]} of text encoder {n} "
                         f"({'CLIP-L' if n == 1 else 'SDXL OpenCLIP-G / Flux T5'})")
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


class ScaledDelta:
    """A full checkpoint whose delta from the base is scaled per tensor: ``get(key)`` =
    lerp(W0, W, λ) = W0 + λ·(W − W0) in float32 for the keys in ``strengths``, the stored tensor
    otherwise; everything else (``infos``, files, config) is the wrapped source's."""

    def __init__(self, source, base, strengths: Mapping[str, float]):
        self.source, self.base, self.strengths = source, base, dict(strengths)

    def __getattr__(self, name: str):
        if name in ("source", "base", "strengths"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def get(self, key: str):
        import torch

        s = self.strengths.get(key)
        if s is None:
            return self.source.get(key)
        w0 = self.base.get(key).to(torch.float32)
        return torch.lerp(w0, self.source.get(key).to(torch.float32), s)

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return f"ScaledDelta({self.source!r}, {len(self.strengths)} scaled tensors)"


def _scalable(m, base) -> list[str]:
    """The floating tensors of full checkpoint ``m`` that the base has under the same name and shape."""
    binfo = base.source.infos
    out = []
    for k, i in m.source.infos.items():
        b = binfo.get(k)
        if b is not None and tuple(b.shape) == tuple(i.shape) and "float" in str(i.dtype) and "float" in str(b.dtype):
            out.append(k)
    return out


def apply(models, levels: Mapping[str, list[dict]], positions_of, base=None) -> list[str]:
    """Scale every input of ``models`` (LoRA sources already matched) by its resolved strengths;
    ``levels`` maps a label to its parameter levels, ``positions_of(keys)`` gives t, ``base`` is
    the recipe's base model (a full checkpoint's strengths scale its delta from it). Returns the
    plan notes."""
    notes = []
    for m in models:
        lv = levels.get(m.label, [])
        if not any(k in level for level in lv for k in KEYS):
            continue
        if m.is_lora:
            keys = list(m.source.by_base)
            got, n = resolve(m.label, keys, lv, positions_of(keys), dict(m.source.by_base))
            notes += n
            if got:
                m.source = ScaledLora(m.source, got)
            continue
        if base is None:
            raise UserError(f"model '{m.label}' ({m.ref}) is a full checkpoint: te_weight, unet_weight and "
                            "block_weights scale its difference from base_model; add base_model to the recipe")
        if m.source is base.source or m.ref == base.ref:
            continue  # the base listed among the models: its delta is zero
        keys = _scalable(m, base)
        got, n = resolve(m.label, keys, lv, positions_of(keys), what="checkpoint")
        notes += n
        if got:
            m.source = ScaledDelta(m.source, base.source, got)
    return notes
