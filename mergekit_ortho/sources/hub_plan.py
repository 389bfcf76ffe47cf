"""`merge run` over hub ids: plan on the safetensors headers, download the weight files that plan
reads (``allow_patterns``), plan again over them (``hub_remote`` holds the views and the mode).
A unit of a sharded run (``schedule.plan_unit``) downloads the files of its own items only, so N
machines each fetch about 1/N of the weights; `merge finalize` downloads none of a plain merge's.

A file is read if any item reads a tensor of it: a merged item reads its base and every model's
tensor, a copied item its one source; where the file of a tensor cannot be told (a renamed, tied or
adapted tensor, a module-mode output), every weight file of that model is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from .hub_remote import _TOUCHED, _VIEWS, _offline, headers_only, only_files


def files_read(plan, names=None, base_only: bool = False) -> dict[str, set[str]]:
    """Per hub id planned over a view: the weight files ``plan`` reads (a file is read if any item
    reads a tensor of it; where that cannot be told, every weight file of the model).

    ``names``: only these items are computed (a unit of a sharded run); ``base_only``: a merged
    item reads its base alone (the second map of a fold with a reduce, in `merge finalize`)."""
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
    for name in (plan.items if names is None else names):
        item = plan.items[name]
        if item.action == "copy":
            if base_only and plan.base is not None:  # sequential.export_items copies from the base
                add(plan.base, name)
                continue
            m, n = item.base_source or (item.sources[0] if item.sources else (reference, name))
            add(m, n)
            continue
        base, sources = plan.sources_of(name)
        for m, n in ([base] if base else []) + ([(plan.base, name)] if plan.base is not None else []) + \
                ([] if base_only else sources):
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


def build_plan(recipe, device: str = "cpu", reads=None):
    """``plan.build_plan``, downloading from the Hub only the weight files the plan reads.

    ``reads(plan)``: the files to download, per hub id, given the plan over headers (default
    ``files_read``: every file the whole plan reads); a unit of a sharded run passes the files of
    its own items, `merge finalize` the few it reads itself. The plan over the downloaded files is
    the same plan (``stage.plan_hash`` does not depend on what was downloaded)."""
    from .. import plan as plan_mod

    if _offline():
        return plan_mod.build_plan(recipe, device=device)
    before = len(_TOUCHED)
    with headers_only():
        first = plan_mod.build_plan(recipe, device=device)
    if len(_TOUCHED) == before:
        return first  # no hub id: the plan over local files is the plan
    try:
        wanted = (reads or files_read)(first)
    finally:
        plan_mod.close(first)
    with only_files(wanted):
        return plan_mod.build_plan(recipe, device=device)
