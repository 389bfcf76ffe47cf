"""`merge run` over hub ids: plan on the safetensors headers, download the weight files that plan
reads (``allow_patterns``), plan again over them (``hub_remote`` holds the views and the mode).

A file is read if any item reads a tensor of it: a merged item reads its base and every model's
tensor, a copied item its one source; where the file of a tensor cannot be told (a renamed, tied or
adapted tensor, a module-mode output), every weight file of that model is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from .hub_remote import _TOUCHED, _VIEWS, _offline, headers_only, only_files


def files_read(plan) -> dict[str, set[str]]:
    """Per hub id planned over a view: the weight files ``plan`` reads (a file is read if any item
    reads a tensor of it; where that cannot be told, every weight file of the model)."""
    out: dict[str, set[str]] = {}

    def add(m, name: str) -> None:
        info = getattr(m.source, "infos", {}).get(name)
        v = _VIEWS.get(Path(info.file).absolute().parent) if info is not None and hasattr(info, "file") else None
        if v is not None:
            out.setdefault(v.ref, set()).add(Path(info.file).name)
            return
        for d, v in _VIEWS.items():  # a renamed, tied or adapted tensor: the whole model
            if any(Path(d) in (Path(p).absolute(), Path(p).absolute().parent) for p in _paths_of(m.source)):
                out.setdefault(v.ref, set()).update(v.weights)

    reference = plan.base or plan.models[0]
    for d, v in _VIEWS.items():
        out.setdefault(v.ref, set())
    if plan.module_mode:
        for v in _VIEWS.values():
            out[v.ref].update(v.weights)
        return out
    for name, item in plan.items.items():
        if item.action == "copy":
            m, n = item.base_source or (item.sources[0] if item.sources else (reference, name))
            add(m, n)
            continue
        base, sources = plan.sources_of(name)
        for m, n in ([base] if base else []) + ([(plan.base, name)] if plan.base is not None else []) + sources:
            add(m, n)
    return out


def _paths_of(source) -> list:
    found = []
    for src in (source, getattr(source, "source", None), getattr(source, "base", None),
                getattr(getattr(source, "lora", None), "source", None)):
        for attr in ("path", "directory"):
            p = getattr(src, attr, None) if src is not None else None
            if p is not None:
                found.append(p)
    return found


def build_plan(recipe, device: str = "cpu"):
    """``plan.build_plan``, downloading from the Hub only the weight files the plan reads."""
    from .. import plan as plan_mod

    if _offline():
        return plan_mod.build_plan(recipe, device=device)
    before = len(_TOUCHED)
    with headers_only():
        first = plan_mod.build_plan(recipe, device=device)
    if len(_TOUCHED) == before:
        return first  # no hub id: the plan over local files is the plan
    try:
        wanted = files_read(first)
    finally:
        plan_mod.close(first)
    with only_files(wanted):
        return plan_mod.build_plan(recipe, device=device)
