"""Differences between a plan's inputs that make a merge fail or surprise, from headers only.

Reuses :func:`..describe._model_facts` (family, vocabulary rows, tied / stored head) and the
plan itself (whose checks already refused missing tensors, shape and architecture mismatches
with their one-line errors). Each finding: {"level": "fail" | "surprise" | "info", "what", "detail"}.
"""
from __future__ import annotations

from collections import Counter


def _facts(m) -> dict | None:
    from ..describe import _model_facts

    src = getattr(m.source, "source", m.source) if not hasattr(m.source, "infos") else m.source
    if getattr(m.source, "kind", "") == "lora" or not hasattr(src, "infos"):
        return None
    try:
        facts = _model_facts(src) if getattr(src, "directory", None) is not None else {}
    except Exception:  # a source without a config directory: tensor facts only
        facts = {}
    dtypes = Counter(i.dtype for i in src.infos.values() if i.dtype)
    return {**facts, "dtypes": dict(dtypes), "names": set(src.infos)}


def findings(plan) -> list[dict]:
    inputs = ([plan.base] if plan.base is not None else []) + list(plan.models)
    seen = {}
    for m in inputs:
        f = _facts(m)
        if f is not None and m.label not in seen:
            seen[m.label] = f
    out: list[dict] = []

    def add(level, what, detail):
        out.append({"level": level, "what": what, "detail": detail})

    fams = {k: f.get("family") for k, f in seen.items() if f.get("family")}
    if len(set(fams.values())) > 1:
        add("surprise", "architecture", "config families differ: " + ", ".join(f"{k}: {v}" for k, v in fams.items()))
    vocab = {k: f.get("vocabulary_tensors") for k, f in seen.items() if f.get("vocabulary_tensors")}
    rows = {k: max(v.values()) for k, v in vocab.items()}
    if len(set(rows.values())) > 1:
        how = ("aligned by the recipe's tokenizer settings" if plan.vocab is not None
               else "merged row by row; set tokenizer_source to align them")
        add("surprise" if plan.vocab is not None else "fail", "vocabulary",
            "vocabulary rows differ: " + ", ".join(f"{k}: {v}" for k, v in rows.items()) + f" ({how})")
    cfg_vocab = {k: f.get("config_vocab_size") for k, f in seen.items() if f.get("config_vocab_size")}
    if len(set(cfg_vocab.values())) > 1:
        add("surprise", "vocab_size", "config vocab_size differs: " + ", ".join(f"{k}: {v}" for k, v in cfg_vocab.items()))
    stored = {k: f.get("head_stored") for k, f in seen.items() if "head_stored" in f}
    if len(set(stored.values())) > 1:
        add("surprise", "tied head", "some inputs store lm_head and some tie it to the embeddings ("
            + ", ".join(f"{k}: {'stored' if v else 'tied'}" for k, v in stored.items())
            + "); the tied inputs contribute their embeddings as their head and the output is untied")
    main = {k: max(f["dtypes"], key=f["dtypes"].get) for k, f in seen.items() if f["dtypes"]}
    if len(set(main.values())) > 1:
        add("surprise", "dtype", "stored dtypes differ: " + ", ".join(f"{k}: {v}" for k, v in main.items())
            + "; merged tensors are written in the promoted dtype unless the recipe sets dtype / out_dtype")
    if plan.base is not None and plan.base.label in seen:
        ref = seen[plan.base.label]["names"]
        for k, f in seen.items():
            missing = sorted(ref - f["names"])
            if k != plan.base.label and missing:
                add("info", "missing tensors", f"{k} lacks {len(missing)} tensor(s) of the base (e.g. "
                    f"'{missing[0]}'); the plan keeps them from the base")
    copied = [i for i in plan.items.values() if i.action == "copy"]
    if copied:
        reasons = Counter(i.reason for i in copied)
        add("info", "copied", f"{len(copied)} tensor(s) are not merged: "
            + "; ".join(f"{n} {r}" for r, n in reasons.most_common(3)))
    for note in plan.notes:
        add("info", "plan", note)
    return out
