"""The grid of `merge sweep` (issue 18): ``--set NAME=V1,V2,...`` axes, their cartesian product, and
each point's recipe.

An axis is a method parameter (``lambda=0.1,0.3``; a per-model parameter given at the top level,
``density=0.2,0.5``, applies to every model) or one model's parameter (``models[1].weight=0.5,1``
or ``LABEL.weight=...`` with a model label of the recipe). Values are a comma list, or a range
``START:STOP:STEP`` (numbers, STOP included when reached). Every value is checked against the
method's parameter schema before anything is read. A point's recipe is the recipe's own mapping
with the axes' values written in (top-level ``parameters``, or ``models[i].parameters``).
"""
from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

MAX_POINTS = 1000  # above this, --yes is required
_MODEL_INDEX = re.compile(r"^models\[(\d+)\]\.(.+)$")


@dataclass(frozen=True)
class Axis:
    text: str  # the name as given: lambda, models[0].weight, a.weight
    name: str  # the parameter
    model: int | None  # the index in the recipe's models, None for the top level
    values: tuple


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"--set {text}: expected NAME=VALUE[,VALUE...] (e.g. --set lambda=0.1,0.3,0.5)")
    name, _, values = text.partition("=")
    name, values = name.strip(), values.strip()
    if not name or not values:
        raise UserError(f"--set {text}: expected NAME=VALUE[,VALUE...] (e.g. --set lambda=0.1,0.3,0.5)")
    return name, values


def _values(text: str, raw: str) -> list[str]:
    if ":" in raw and "," not in raw:
        parts = raw.split(":")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise UserError(f"--set {text}: a range is START:STOP:STEP with three numbers") from None
        if len(parts) != 3 or step <= 0 or stop < start:
            raise UserError(f"--set {text}: a range is START:STOP:STEP with STEP > 0 and STOP >= START")
        count = int((stop - start) / step + 1e-9) + 1
        if count > 100_000:
            raise UserError(f"--set {text}: the range has {count} values; use a larger step")
        return [repr(round(start + k * step, 12)) for k in range(count)]
    out = [v.strip() for v in raw.split(",")]
    if any(not v for v in out):
        raise UserError(f"--set {text}: empty value in the list (values are separated by commas)")
    return out


def parse_axes(sets: list[str], op, labels: list[str]) -> list[Axis]:
    """The axes of ``--set`` arguments for operator ``op`` and a recipe whose models have ``labels``."""
    method = {p.name: p for p in op.params}
    per_model = {p.name: p for p in op.model_params}
    axes: list[Axis] = []
    for text in sets:
        name, raw = _split(text)
        model = None
        m = _MODEL_INDEX.match(name)
        if m:
            model, pname = int(m.group(1)), m.group(2)
            if model >= len(labels):
                raise UserError(f"--set {text}: the recipe lists {len(labels)} model(s) (models[0] to "
                                f"models[{len(labels) - 1}])")
        elif "." in name:
            label, _, pname = name.partition(".")
            if label not in labels:
                raise UserError(f"--set {text}: no model labelled '{label}' in the recipe (labels: "
                                f"{', '.join(labels)}; or use models[i].{pname})")
            model = labels.index(label)
        else:
            pname = name
        schema = per_model if model is not None else {**per_model, **method}
        param = schema.get(pname)
        if param is None:
            if model is not None and pname in method:
                raise UserError(f"--set {text}: '{pname}' is a method-level parameter of '{op.name}'; "
                                f"sweep it as --set {pname}=...")
            known = list(schema)
            hint = difflib.get_close_matches(pname, known, n=1)
            raise UserError(f"--set {text}: method '{op.name}' has no {'per-model ' if model is not None else ''}"
                            f"parameter '{pname}'" + (f" (did you mean '{hint[0]}'?)" if hint else
                                                      f" (known: {', '.join(known) or 'none'})"))
        values = []
        for v in _values(text, raw):
            try:
                values.append(param.coerce(v))
            except ValueError as e:
                raise UserError(f"--set {text}: {e}") from None
        if any((a.name, a.model) == (pname, model) for a in axes):
            raise UserError(f"--set {text}: '{name}' is swept twice; give its values in one --set")
        axes.append(Axis(name, pname, model, tuple(values)))
    return axes


def check_size(axes: list[Axis], yes: bool) -> int:
    n = 1
    for a in axes:
        n *= len(a.values)
    if n > MAX_POINTS and not yes:
        raise UserError(f"the grid has {n} points (over {MAX_POINTS}); pass --yes to run them all")
    return n


def points(axes: list[Axis]) -> list[tuple[Any, ...]]:
    """The cartesian product of the axes' values, the first axis varying slowest."""
    return list(itertools.product(*(a.values for a in axes)))


def check_overrides(raw: dict, axes: list[Axis]) -> None:
    """A top-level axis must not be shadowed: a value set for the same name at a level that wins
    over the top level (a model's own, a module's, a slice's) would make the sweep a no-op there."""
    levels: list[tuple[str, Any]] = []
    for i, e in enumerate(raw.get("models") or []):
        if isinstance(e, dict):
            levels.append((f"models[{i}].parameters", e.get("parameters")))
    mod = (raw.get("modules") or {}).get("default") if isinstance(raw.get("modules"), dict) else None
    if isinstance(mod, dict):
        levels.append(("modules.default.parameters", mod.get("parameters")))
        for i, e in enumerate(mod.get("models") or []):
            if isinstance(e, dict):
                levels.append((f"modules.default.models[{i}].parameters", e.get("parameters")))
    for i, sl in enumerate(raw.get("slices") or []):
        if isinstance(sl, dict):
            levels.append((f"slices[{i}].parameters", sl.get("parameters")))
            for j, src in enumerate(sl.get("sources") or []):
                if isinstance(src, dict):
                    levels.append((f"slices[{i}].sources[{j}].parameters", src.get("parameters")))
    for a in axes:
        if a.model is not None:
            if raw.get("modules") is not None or not raw.get("models"):
                raise UserError(f"--set {a.text}: a per-model axis needs a recipe with a top-level 'models:' list")
            continue
        for where, params in levels:
            if isinstance(params, dict) and a.name in params:
                raise UserError(f"--set {a.text}: {where} sets '{a.name}' too, and that value wins over the "
                                f"top-level one; remove it there, or sweep that model's value "
                                f"(--set models[i].{a.name}=...)")


def point_recipe(raw: dict, axes: list[Axis], values: tuple) -> dict:
    """The recipe mapping of one grid point (a deep copy of ``raw`` with the values written in)."""
    data = copy.deepcopy(raw)
    for a, v in zip(axes, values):
        if a.model is None:
            if not isinstance(data.get("parameters"), dict):
                data["parameters"] = {}
            data["parameters"][a.name] = v
        else:
            entry = data["models"][a.model]
            if not isinstance(entry, dict):
                entry = data["models"][a.model] = {"model": entry}
            if not isinstance(entry.get("parameters"), dict):
                entry["parameters"] = {}
            entry["parameters"][a.name] = v
    return data


def describe(axes: list[Axis], values: tuple) -> str:
    return " ".join(f"{a.text}={_fmt(v)}" for a, v in zip(axes, values))


def point_name(i: int, axes: list[Axis], values: tuple) -> str:
    """A directory name for point ``i``: its index and values, file-name safe."""
    body = "_".join(f"{a.text}={_fmt(v)}" for a, v in zip(axes, values))
    body = re.sub(r"[^A-Za-z0-9._=+-]", "", body.replace("[", "").replace("]", ""))[:120]
    return f"{i:03d}-{body}" if body else f"{i:03d}"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
