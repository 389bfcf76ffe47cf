"""Parameter settings as a recipe writes them, and how one resolves for a tensor.

Spec: ../shared/specs/mergekit_compat.md M3 (forms, scopes, precedence) and M4 (gradients, t).

A *setting* is what a recipe writes for one parameter at one place:

1. a scalar (bool, int, float, str);
2. a gradient: a list of scalars spread evenly over t in [0, 1], interpolated linearly
   (``s = t(K-1)``), or a step function when any anchor is a bool or a string;
3. one ``{filter, value}`` mapping: ``value`` (a scalar or a gradient) where ``filter`` is absent,
   null, ``"*"`` or a plain case-sensitive substring of the tensor name;
4. a list of such mappings: the first that matches wins.

A setting that yields nothing for a tensor (a conditional that does not match, an empty list)
falls through to the next place (``NOTHING``). Places, highest precedence first: the model's own
entry (per-model parameters only), the slice, the module, the top level; then the method's
default. No I/O here: the plan calls :func:`resolve` for every output item.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import shown
from .ops.registry import REQUIRED, Param, Params


class _Nothing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOTHING"


NOTHING: Any = _Nothing()
_SCALARS = (bool, int, float, str)


class Scoped:
    """The per-module settings of one parameter in a modular recipe (:mod:`..recipe_modules`):
    ``values`` maps a module to the setting written there, ``scope(name)`` gives the listed
    module a tensor belongs to (None: none). Yields nothing outside those modules."""

    __slots__ = ("values", "scope")

    def __init__(self, values: dict[str, Any], scope):
        self.values, self.scope = values, scope

    def __repr__(self) -> str:
        return f"Scoped({self.values!r})"


def _is_conditional(v: Any) -> bool:
    return isinstance(v, dict)


def check_form(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` is one of the four forms (mixing scalars and
    ``{filter, value}`` mappings in one list is refused, as mergekit does)."""
    if value is None or isinstance(value, _SCALARS):
        return
    if isinstance(value, dict):
        _check_conditional(value, where)
        return
    if isinstance(value, list):
        kinds = {_is_conditional(v) for v in value}
        if len(kinds) > 1:
            raise ValueError(f"{where}: a list mixes plain values and {{filter, value}} entries; use one form")
        for v in value:
            if isinstance(v, dict):
                _check_conditional(v, where)
            elif not isinstance(v, _SCALARS):
                raise ValueError(f"{where}: a gradient lists plain values only, got {shown(v)}")
        return
    raise ValueError(f"{where}: expected a value, a list of values or {{filter, value}} entries, got {shown(value)}")


def _check_conditional(entry: dict, where: str) -> None:
    extra = set(entry) - {"filter", "value"}
    if extra or "value" not in entry:
        raise ValueError(f"{where}: a conditional entry is {{filter: <substring>, value: <value>}}, got {shown(entry)}")
    f, v = entry.get("filter"), entry["value"]
    if f is not None and not isinstance(f, str):
        raise ValueError(f"{where}: filter must be a string (a substring of tensor names), got {shown(f)}")
    if isinstance(v, dict) or (isinstance(v, list) and any(not isinstance(x, _SCALARS) for x in v)):
        raise ValueError(f"{where}: a conditional's value is a value or a gradient, not {shown(v)}")


def filter_matches(f: str | None, name: str) -> bool:
    return f is None or f == "*" or f in name


def _gradient(param: Param, anchors: list, t: float) -> Any:
    values = [param.coerce(a) for a in anchors]
    k = len(values)
    if any(isinstance(v, (bool, str)) for v in values) or k == 1:
        return values[min(k - 1, max(0, math.floor(t * (k - 1))))]
    s = t * (k - 1)
    i0 = max(0, min(k - 1, math.floor(s)))
    i1 = min(i0 + 1, k - 1)
    f = s - i0
    return (1.0 - f) * float(values[i0]) + f * float(values[i1])  # in double, validated after


def evaluate(param: Param, setting: Any, name: str, t: float) -> Any:
    """The value ``setting`` gives ``param`` for tensor ``name`` at layer position ``t``, coerced
    to the parameter's type; ``NOTHING`` when it gives none there."""
    if isinstance(setting, Scoped):
        module = setting.scope(name)
        return evaluate(param, setting.values[module], name, t) if module in setting.values else NOTHING
    if isinstance(setting, dict):
        return evaluate(param, setting["value"], name, t) if filter_matches(setting.get("filter"), name) else NOTHING
    if isinstance(setting, list):
        if not setting:
            return NOTHING
        if isinstance(setting[0], dict):
            for entry in setting:
                got = evaluate(param, entry, name, t)
                if got is not NOTHING:
                    return got
            return NOTHING
        return param.coerce(_gradient(param, setting, t))
    return param.coerce(setting)


def is_constant(setting: Any) -> bool:
    """True when the setting gives one value everywhere (a scalar): nothing to resolve per tensor."""
    return setting is None or isinstance(setting, _SCALARS)


def resolve(schema: Sequence[Param], levels: Sequence[dict[str, Any]], name: str, t: float, where: str) -> Params:
    """Every parameter of ``schema`` for tensor ``name``: the first of ``levels`` (dicts of
    settings, highest precedence first) whose setting yields a value there, else the default.
    A required parameter that no level gives is an error naming ``where`` and the tensor."""
    out: dict[str, Any] = {}
    for p in schema:
        value = NOTHING
        for level in levels:
            if p.name in level:
                value = evaluate(p, level[p.name], name, t)
                if value is not NOTHING:
                    break
        if value is NOTHING:
            if p.default is REQUIRED:
                raise ValueError(f"missing required parameter '{p.name}' for {where} at tensor '{name}'")
            value = p.default
        out[p.name] = value
    return Params(out)


def filters_in(setting: Any) -> list[str]:
    """The filter strings of a setting (``*`` and absent ones left out)."""
    items = setting if isinstance(setting, list) else [setting]
    return [e["filter"] for e in items if isinstance(e, dict) and e.get("filter") not in (None, "*")]


def unmatched_filters(levels: list[tuple[str, dict]], names) -> list[str]:
    """One warning per filter that matches no tensor name (a typo, or another architecture's
    names): mergekit silently falls through to the next level there."""
    names = list(names)
    out = []
    for where, mapping in levels:
        for key, setting in mapping.items():
            for f in filters_in(setting):
                if not any(f in n for n in names):
                    out.append(f"filter '{f}' in {where}.{key} matches no tensor; that entry is never used")
    return out


def _gradients_in(setting: Any) -> list[list]:
    items = setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else [setting]
    out = []
    for e in items:
        v = e.get("value") if isinstance(e, dict) else e
        if isinstance(v, list) and len(v) > 1:
            out.append(v)
    return out


def long_gradients(levels: list[tuple[str, dict]], layers: int) -> list[str]:
    """One note per gradient with more values than the layers it spreads over: some values then
    fall between layers and are only interpolated (mergekit does the same, silently)."""
    out = []
    for where, mapping in levels:
        for key, setting in mapping.items():
            for g in _gradients_in(setting):
                if layers and len(g) > layers:
                    out.append(f"{where}.{key}: a gradient of {len(g)} values over {layers} layers; values "
                               "between layers are interpolated, not used as given")
    return out
