"""Multi-document recipes (mergekit-multi, spec mergekit_compat.md M12): several merges in one file.

A document with ``name: X`` is an intermediate merge written to ``INTERMEDIATES/X``; a model
reference (base, model, slice source, tokenizer donor) whose path is exactly ``X`` (optionally
with ``+lora``) reads that directory and makes the document depend on X. At most one document has
no name: the final merge, written to the run's output. Merges run in dependency order; an
intermediate that is already complete (written by this tool) is reused, as mergekit-multi's
default ``--lazy`` does, unless ``--overwrite`` asks for it to be recomputed.

Knows no merge math: it turns one file into an ordered list of ordinary single-document recipes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


@dataclass
class Merge:
    name: str | None  # None: the final merge
    recipe: object  # recipe.Recipe, its references redirected to the intermediates it reads
    target: Path | None
    depends: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _redirect(ref: str | None, dirs: dict[str, Path], used: list[str], notes: list[str]) -> str | None:
    """``X``, ``X@rev`` or ``X+lora`` with X an intermediate's name -> its directory (+lora)."""
    if not ref:
        return ref
    head, plus, lora = ref.partition("+")
    name, at, rev = head.partition("@")
    if name not in dirs:
        return ref
    used.append(name)
    if at:
        notes.append(f"'{ref}': the revision '{rev}' is ignored; '{name}' is the intermediate merge {dirs[name]}")
    return str(dirs[name]) + (plus + lora if plus else "")


def _redirect_recipe(r, dirs: dict[str, Path]) -> tuple[list[str], list[str]]:
    used: list[str] = []
    notes: list[str] = []

    def red(ref):
        return _redirect(ref, dirs, used, notes)

    r.base_model = red(r.base_model)
    for e in r.models:
        e.model = red(e.model)
    for sl in r.slices or []:
        sl.base_model = red(sl.base_model)
        for src in sl.sources:
            src.model = red(src.model)
    if r.tokenizer_source not in (None, "base", "union"):
        r.tokenizer_source = red(r.tokenizer_source)
    if r.tokenizer and isinstance(r.tokenizer.get("source"), str) and r.tokenizer["source"] not in ("base", "union"):
        r.tokenizer["source"] = red(r.tokenizer["source"])
    return list(dict.fromkeys(used)), notes


def schedule(path: Path, out: Path | None, intermediates: Path | None) -> list[Merge]:
    """Every merge of a multi-document recipe, in the order they must run (dependencies first).

    ``out``: the final (unnamed) merge's output; ``intermediates``: where named merges are written
    (default: beside the final output, ``<out>.intermediates``)."""
    from . import recipe as recipe_mod

    docs = recipe_mod.load_all(path)
    names = [d.name for d in docs]
    seen: set[str] = set()
    for n in names:
        if n is not None and n in seen:
            raise UserError(f"{path}: two documents are named '{n}'; give each intermediate merge its own name")
        seen.add(n)
    unnamed = [i for i, n in enumerate(names) if n is None]
    if len(unnamed) > 1:
        raise UserError(f"{path}: documents {unnamed[0] + 1} and {unnamed[1] + 1} have no 'name'; only the final "
                        "merge may be unnamed - name the intermediate ones")
    if unnamed and out is None:
        raise UserError(f"{path}: the unnamed document is the final merge and needs an output: pass --out "
                        "(or set output.path in it)")
    if intermediates is None:
        if out is None:
            raise UserError(f"{path}: every document is named (all are intermediate merges); pass "
                            "--intermediates DIR to say where they go")
        intermediates = out.parent / f"{out.name}.intermediates"
    intermediates = intermediates.absolute()
    dirs = {n: intermediates / n for n in names if n is not None}
    for n in dirs:
        if not n or "/" in n or "\\" in n or n in (".", ".."):
            raise UserError(f"{path}: merge name {n!r} is not a plain directory name")
    merges = {}
    for d in docs:
        used, notes = _redirect_recipe(d, dirs)
        if d.name in used:
            raise UserError(f"{path}: merge '{d.name}' reads its own output")
        merges[d.name] = Merge(d.name, d, dirs.get(d.name, out), used, notes)
    order: list[Merge] = []
    state: dict[str | None, str] = {}

    def visit(name, chain):
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise UserError(f"{path}: merges depend on each other in a circle: {' -> '.join(chain + [name])}")
        state[name] = "active"
        for dep in merges[name].depends:
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(merges[name])

    for d in docs:
        visit(d.name, [])
    return order


def is_complete(directory: Path) -> bool:
    """An intermediate this tool finished: its owner marker, config and at least one weight file."""
    from .placement import OWNER_MARKER

    return ((directory / OWNER_MARKER).is_file() and (directory / "config.json").is_file()
            and any(directory.glob("*.safetensors")))
