"""Tied heads that a family rescales at run time: a tied T5 computes ``lm_head(h * d_model^-0.5)``.

Spec: ../shared/specs/mergekit_compat.md (tied heads: if any input stores a head, the tied inputs
contribute their embeddings as their head and the output says untied; if none does, the output
stays tied); issue 15. For most families (GPT-2, Qwen2, Llama, Gemma - whose sqrt(hidden)
scale is on the embedding side, at run time) a tied input's head *is* its embeddings, and
:func:`..plan_items.plan_items` reads it from them. T5 is different: when tied (config.json
``tie_word_embeddings`` true or absent; transformers 5 saves it as ``scale_decoder_outputs``, and
then always says tied) it
scales the decoder output by ``d_model^-0.5`` before the head, and an untied T5 does not. So
once the output is untied, input i's head in the untied convention is

    E_i = d_model^-0.5 * H_i   (H_i: its stored ``lm_head.weight``, else ``shared.weight``)

for a tied input, and ``E_i = H_i`` for an untied one. :func:`rescale` applies this whenever a head is
written (some input stores one, or the inputs' conventions differ): each tied T5 input is seen
through a :class:`ScaledHeadSource` whose ``lm_head.weight`` is E_i, the head is merged by name
from those, and the output config says untied (the caller sets it), as for every family that
writes a head. Inputs that are all tied and store no head are left alone: the output stays tied.
"""
from __future__ import annotations

from typing import Any

HEAD = "lm_head.weight"
# model_type -> (embeddings tensor, config key of the width whose -0.5 power scales a tied head)
SCALED = {"t5": ("shared.weight", "d_model"), "mt5": ("shared.weight", "d_model")}


class ScaledHeadSource:
    """An input seen with ``lm_head.weight`` = ``factor`` x its stored head, or its embeddings when
    it stores none (computed in float32, returned in the stored dtype)."""

    def __init__(self, source, embeddings: str, factor: float):
        self.source = source
        self.factor = factor
        self.read_from = HEAD if HEAD in source.infos else embeddings
        self.infos = {**source.infos, HEAD: source.infos[self.read_from]}

    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def get(self, key: str):
        if key != HEAD:
            return self.source.get(key)
        import torch

        t = self.source.get(self.read_from)
        return (t.to(torch.float32) * self.factor).to(t.dtype)

    def close(self) -> None:
        self.source.close()


def _facts(m) -> tuple[Any, bool, bool] | None:
    """(family entry, width, scaled, stores head) of a full-checkpoint input of a rescaling family;
    scaled: the head sees the decoder output times d^-0.5 (a tied T5)."""
    from .planning import config_of_source

    cfg = config_of_source(m.source)
    entry = SCALED.get(cfg.get("model_type"))
    if entry is None or entry[0] not in m.source.infos:
        return None
    if "scale_decoder_outputs" in cfg:  # saved by transformers 5, which always says tied
        scaled = bool(cfg["scale_decoder_outputs"])
    else:
        scaled = cfg.get("tie_word_embeddings", True) is not False
    return (entry, cfg.get(entry[1]), scaled, HEAD in m.source.infos)


# what an untied output's config.json says: transformers 5 saves a tied T5's scale as
# ``scale_decoder_outputs`` (read back as is), transformers 4 reads it from ``tie_word_embeddings``
UNTIED = {"tie_word_embeddings": False, "scale_decoder_outputs": False}


def rescale(inputs: list) -> tuple[list[str], dict]:
    """Wrap the tied inputs of a rescaling family where the inputs disagree (see module doc).
    ``inputs``: the full-checkpoint ModelInputs (base included). Returns (notes, the config
    fields the output must then say: ``UNTIED``, or {})."""
    facts = {id(m): _facts(m) for m in inputs}
    found = [f for f in facts.values() if f is not None]
    if not found or len(found) != len(inputs):
        return [], {}
    if not any(stored for *_, stored in found) and len({scaled for _, _, scaled, _ in found}) == 1:
        return [], {}  # no head anywhere and one convention: the output stays tied
    notes = []
    wrapped: dict[int, ScaledHeadSource] = {}  # the base listed among the models shares its source
    for m in inputs:
        if id(m.source) in wrapped:
            m.source = wrapped[id(m.source)]
            continue
        (embeddings, width_key), width, tied, stored = facts[id(m)]
        if not tied and stored:
            continue  # already the untied convention
        if not isinstance(width, int) or width <= 0:
            from .errors import UserError

            raise UserError(f"{m.ref}: config.json has no {width_key}, which a tied T5 head's d_model^-0.5 "
                            "scale needs to be merged with untied or head-storing inputs")
        factor = width ** -0.5 if tied else 1.0
        wrapped[id(m.source)] = ScaledHeadSource(m.source, embeddings, factor)
        m.source = wrapped[id(m.source)]
        notes.append(f"{m.label}: head read as {m.source.read_from} x {factor:g} ({width_key}^-0.5 of a tied T5, "
                     "which scales its decoder output; the output is untied and stores the head)")
    return notes, dict(UNTIED)
