"""mergekit's modular recipes: ``modules:`` naming the parts of a multimodal checkpoint.

Spec: ../shared/specs/mergekit_compat.md M8. mergekit's architecture files give a multimodal model
several modules (Gemma3-VL, Mistral3, Llama4, Qwen2/2.5/3-VL: ``text_decoder``, ``vision_tower`` or
``vision_model``, ``multi_modal_projector``), each with a weight prefix; a recipe may then give
each module its own ``models:`` and ``parameters:``. Here a module is the set of tensors whose
name starts with one of its prefixes (:data:`PREFIXES`, both the transformers >= 4.52 layout
``model.language_model.`` / ``model.vision_tower.`` and the LLaVA-style ``language_model.`` /
``vision_tower.``, as :mod:`.prefixes` knows them); the longest matching prefix decides, so
``model.visual.merger.`` is the projector inside a Qwen-VL vision tower.

What is honoured:

* every module's ``parameters`` apply to its tensors only, one precedence level below a model's
  own entry (the module level of M3), through :class:`.settings.Scoped`;
* per-model ``parameters`` may differ between modules (a vision tower kept from the base with
  ``weight: 0``), as long as every module lists the same models (mergekit merges each module
  from its own list; different lists per module are refused with one line);
* a module mergekit's architecture has but the recipe does not list: mergekit 0.1.5 does not
  write its tensors (M8). Here they are copied from the base (else the first model) unchanged, so
  the output still loads as the multimodal model its config describes; one note line per module
  says so (a deliberate difference: mergekit's written tensors stay identical).

Refused with one line each: ``slices:`` inside a module other than ``default`` (each module would
need its own layer key), a module name no architecture here knows, mixing ``default`` with
named modules, and (at plan time) a listed module no tensor of the reference model lies under.
"""
from __future__ import annotations

from typing import Any

#: module name -> weight prefixes (longest match over every module decides a tensor's module)
PREFIXES: dict[str, tuple[str, ...]] = {
    "text_decoder": ("model.language_model.", "language_model.", "lm_head.", "model."),
    "vision_tower": ("model.vision_tower.", "vision_tower.", "model.visual.", "visual."),
    "vision_model": ("model.vision_model.", "vision_model."),
    "multi_modal_projector": ("model.multi_modal_projector.", "multi_modal_projector.",
                              "model.visual.merger.", "visual.merger."),
}
_ORDERED = sorted(((p, m) for m, ps in PREFIXES.items() for p in ps), key=lambda pm: -len(pm[0]))


def module_of(name: str) -> str | None:
    """The module tensor ``name`` belongs to (its longest matching prefix), None for none."""
    for prefix, module in _ORDERED:
        if name.startswith(prefix):
            return module
    return None


def _model_key(entry) -> str:
    return str(entry.model)


def unfold(recipe) -> None:
    """Turn ``modules: {name: {models, parameters}, ...}`` into the top-level form: the models of
    the modules (the same in each), per-module settings wrapped as :class:`.settings.Scoped`.
    Raises ValueError (the caller makes it a one-line UserError)."""
    from .settings import Scoped

    names = list(recipe.modules)
    unknown = [n for n in names if n not in PREFIXES]
    if unknown:
        if unknown[0] == "default":
            raise ValueError("modules: 'default' (a single-module architecture) cannot be listed beside named "
                             f"modules ({', '.join(n for n in names if n != 'default')})")
        raise ValueError(f"modules: unknown module '{unknown[0]}'; the modules known here are "
                         f"{', '.join(PREFIXES)} (multimodal checkpoints) and default (every other)")
    for name, mod in recipe.modules.items():
        if mod.slices is not None:
            raise ValueError(f"modules.{name}: slices inside a named module are not supported (each module "
                             "has its own layer count); give the module models:, or use slices: at the top "
                             "level for a text-only model")
    first = names[0]
    keys = [_model_key(e) for e in recipe.modules[first].models]
    for name in names[1:]:
        other = [_model_key(e) for e in recipe.modules[name].models]
        if other != keys:
            raise ValueError(f"modules.{name}: lists models {other} but modules.{first} lists {keys}; every "
                             "module must list the same models in the same order here (give a model weight 0 "
                             "in a module to keep that module from the others)")
    scope = _Scope(tuple(names))
    models = []
    for i, entry in enumerate(recipe.modules[first].models):
        per: dict[str, dict[str, Any]] = {}
        for name in names:
            for key, value in (recipe.modules[name].models[i].parameters or {}).items():
                per.setdefault(key, {})[name] = value
        models.append(entry.model_copy(update={"parameters": {k: Scoped(v, scope) for k, v in per.items()}}))
    shared: dict[str, dict[str, Any]] = {}
    for name in names:
        for key, value in (recipe.modules[name].parameters or {}).items():
            shared.setdefault(key, {})[name] = value
    recipe.models, recipe.slices = models, None
    recipe._module_parameters = {k: Scoped(v, scope) for k, v in shared.items()}
    recipe._module_levels = _levels(recipe, names)


class _Scope:
    """tensor name -> its module when the recipe lists that module (picklable, comparable)."""

    def __init__(self, listed: tuple[str, ...]):
        self.listed = listed

    def __call__(self, name: str) -> str | None:
        m = module_of(name)
        return m if m in self.listed else None

    def __eq__(self, other):
        return isinstance(other, _Scope) and other.listed == self.listed

    def __hash__(self):
        return hash(self.listed)


def _levels(recipe, names: list[str]) -> list[tuple[str, dict, bool]]:
    """Every ``parameters`` mapping of the modules as the recipe wrote it (checked and reported
    per place: modules.NAME.parameters, modules.NAME.models[i].parameters)."""
    out = []
    for name in names:
        mod = recipe.modules[name]
        out.append((f"modules.{name}.parameters", dict(mod.parameters or {}), False))
        for i, e in enumerate(mod.models):
            out.append((f"modules.{name}.models[{i}].parameters", dict(e.parameters or {}), True))
    return out


def copy_reason(recipe, names) -> tuple[Any, list[str]]:
    """For a modular recipe: (name -> reason to copy it unmerged, or ""), and the notes; checks
    that every listed module has tensors in the reference model. (None, []) otherwise."""
    if not recipe.modules or list(recipe.modules) == ["default"]:
        return None, []
    listed = list(recipe.modules)
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(module_of(n), []).append(n)
    from .errors import UserError

    for m in listed:
        if not by_module.get(m):
            raise UserError(f"modules.{m}: no tensor of the reference model lies under {', '.join(PREFIXES[m])}; "
                            "list only the modules this checkpoint has (text-only models: modules: {default: ...})")
    notes = [f"modules: {len(ts)} tensor(s) of module '{m}' (e.g. '{ts[0]}') are not listed under modules: and "
             "are copied from the reference model unchanged (mergekit 0.1.5 does not write them)"
             for m, ts in by_module.items() if m is not None and m not in listed]

    def reason(name: str) -> str:
        m = module_of(name)
        return f"module '{m}' not listed under modules:" if m is not None and m not in listed else ""

    return reason, notes
