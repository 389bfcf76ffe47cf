"""Recipe loading and checks: YAML (safe_load) -> validated ``Recipe`` (schema in recipe_schema.py).

The shape follows mergekit's so that existing mergekit recipes for the shared methods run
unchanged. Validation happens here, before any source is opened: unknown keys (with the nearest
known one suggested), wrong types, unknown methods and per-method parameters all fail with one
line that names the recipe file.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import UserError, shown
from .recipe_schema import (ModelEntry, Module, OutputSpec, Recipe, Slice, SliceSource,  # the API
                            label_from, parse_size)

__all__ = ["ModelEntry", "Module", "OutputSpec", "Recipe", "Slice", "SliceSource", "from_dict", "input_paths",
           "label_from", "load", "load_all", "parameter_levels", "parse_size", "resolve_ref"]

_TOP_KEYS = list(Recipe.model_fields)
_SECTION_KEYS = {"models": list(ModelEntry.model_fields), "output": list(OutputSpec.model_fields),
                 "slices": list(Slice.model_fields), "sources": list(SliceSource.model_fields),
                 "modules": list(Module.model_fields)}
# keys mergekit accepts that change nothing here (or there): each one is named in a warning
_IGNORED = {
    "embed_slerp": "a mergekit setting removed in 2024 (mergekit 0.1.5 ignores it too); vocabulary "
                   "tensors go through the merge method",
    "residual_weight": "parsed by mergekit and never used",
    "name": "it names an intermediate merge of a multi-document recipe; this file holds one merge",
}


def _unknown_key_message(where: str, key: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    msg = f"unknown recipe key {shown(key, 60)}{where}"
    return msg + (f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})")


def _check_section(mapping: Any, where: str, section: str) -> None:
    if not isinstance(mapping, dict):
        return
    known = _SECTION_KEYS[section]
    for key in mapping:
        if key not in known:
            raise ValueError(_unknown_key_message(f" in {where}", str(key), known))


def _check_keys(data: dict) -> list[str]:
    """Unknown keys are errors with the nearest known key suggested (mergekit ignores them, so a
    typo such as ``dype`` would silently fall back to a default); keys mergekit accepts and that
    change nothing give one warning line each, returned."""
    warnings = []
    for key in data:
        if key not in _TOP_KEYS:
            if key in _IGNORED:  # a mergekit key of another level (residual_weight), ignored there too
                warnings.append(f"ignored: '{key}' ({_IGNORED[key]})")
                continue
            if str(key) in _all_parameter_names():  # mergekit ignores a method parameter written here
                warnings.append(f"ignored: top-level '{key}' is a method parameter; mergekit ignores it there "
                                "too - write it under parameters to use it")
                continue
            raise ValueError(_unknown_key_message("", str(key), _TOP_KEYS))
        if key in _IGNORED and data[key] is not None:
            warnings.append(f"ignored: '{key}' ({_IGNORED[key]})")
    forms = [k for k in ("models", "slices", "modules") if data.get(k)]
    if len(forms) > 1:
        raise ValueError(f"give exactly one of 'models', 'slices' or 'modules', not {' and '.join(forms)}")
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise ValueError("give either tokenizer_source or tokenizer, not both")

    def models(entries, where):
        for i, entry in enumerate(entries or []):
            _check_section(entry, f"{where}[{i}]", "models")

    def slices(entries, where):
        for i, sl in enumerate(entries or []):
            _check_section(sl, f"{where}[{i}]", "slices")
            if isinstance(sl, dict):
                if sl.get("residual_weight") is not None:
                    warnings.append(f"ignored: '{where}[{i}].residual_weight' ({_IGNORED['residual_weight']})")
                for j, src in enumerate(sl.get("sources") or []):
                    _check_section(src, f"{where}[{i}].sources[{j}]", "sources")

    models(data.get("models"), "models")
    slices(data.get("slices"), "slices")
    mods = data.get("modules")
    if isinstance(mods, dict):
        for name, mod in mods.items():
            _check_section(mod, f"modules.{name}", "modules")
            if isinstance(mod, dict):
                if (mod.get("models") is None) == (mod.get("slices") is None):
                    raise ValueError(f"modules.{name}: give either models or slices")
                models(mod.get("models"), f"modules.{name}.models")
                slices(mod.get("slices"), f"modules.{name}.slices")
    _check_section(data.get("output"), "output", "output")
    return warnings


def _pydantic_message(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])[:120]
    msg = first["msg"].removeprefix("Value error, ")[:200]
    got = f" (got {shown(first['input'])})" if "input" in first and not isinstance(first["input"], dict) else ""
    return f"recipe key '{loc}': {msg}{got}"


def _unfold_modules(recipe: Recipe) -> None:
    """``modules: {default: ...}`` (mergekit's form for single-module architectures) is the
    top-level form with the module's ``parameters`` one precedence level below a slice's."""
    if recipe.modules is None:
        return
    names = list(recipe.modules)
    if names != ["default"]:
        from .recipe_modules import unfold

        unfold(recipe)  # named modules of a multimodal checkpoint (M8)
        return
    mod = recipe.modules["default"]
    recipe.models, recipe.slices = list(mod.models or []), mod.slices
    recipe._module_parameters = dict(mod.parameters)


def from_dict(data: Any, origin: str = "<recipe>", require_models: bool = True) -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{origin}: a recipe must be a YAML mapping with at least 'merge_method'")
    try:
        warnings = _check_keys(data)
        recipe = Recipe.model_validate({k: v for k, v in data.items() if k in _TOP_KEYS})
        _unfold_modules(recipe)
    except ValidationError as e:
        raise UserError(f"{origin}: {_pydantic_message(e)}") from None
    except ValueError as e:
        raise UserError(f"{origin}: {e}") from None
    recipe._raw = data
    recipe._warnings = warnings
    _check_method(recipe, origin, require_models)
    return recipe


def _all_parameter_names() -> dict[str, set[str]]:
    """Every parameter name of every method -> the methods declaring it."""
    from .ops import registry

    names: dict[str, set[str]] = {}
    for op in registry.all_operators():
        for p in op.params + op.model_params:
            names.setdefault(p.name, set()).add(op.name)
    return names


def parameter_levels(recipe: Recipe) -> list[tuple[str, dict, bool]]:
    """Every ``parameters`` mapping of the recipe: (where, mapping, is a model's own entry)."""
    if recipe._module_levels:  # named modules: each module's settings as written (recipe_modules)
        return [("parameters", recipe.parameters, False), *recipe._module_levels]
    out = [("parameters", recipe.parameters, False), ("modules.default.parameters", recipe._module_parameters, False)]
    for i, e in enumerate(recipe.models):
        out.append((f"models[{i}].parameters", e.parameters, True))
    for i, sl in enumerate(recipe.slices or []):
        out.append((f"slices[{i}].parameters", sl.parameters, False))
        for j, src in enumerate(sl.sources):
            out.append((f"slices[{i}].sources[{j}].parameters", src.parameters, True))
    return out


def _check_parameters(recipe: Recipe, op) -> list[str]:
    """Each setting's form and every value in it, against the method's schema. mergekit looks up
    only the parameters a method declares; here a name another method declares (a recipe copied
    from one method to another) is named in a warning, a method-level parameter under a model
    (mergekit ignores it there) too, and any other name is an error with a suggestion."""
    from .settings import check_form

    shared = {p.name: p for p in op.params}
    per_model = {p.name: p for p in op.model_params}
    others = None
    warnings = []
    from .adapters.strengths import KEYS as STRENGTH_KEYS, check_setting

    for where, mapping, own in parameter_levels(recipe):
        for key, value in mapping.items():
            key = str(key)
            if key in STRENGTH_KEYS and key not in per_model and key not in shared:
                if where.startswith("slices") or recipe.slices:
                    raise ValueError(f"{where}.{key}: LoRA strengths (te_weight, unet_weight, block_weights) "
                                     "apply to a models: recipe; list the LoRAs under models")
                check_setting(key, value, f"{where}.{key}")
                continue
            param = per_model.get(key) or shared.get(key)
            if param is None:
                others = others if others is not None else _all_parameter_names()
                if key in others:
                    warnings.append(f"ignored: '{where}.{key}' is not a parameter of '{op.name}' "
                                    f"(it is one of {', '.join(sorted(others[key])[:3])})")
                    continue
                hint = difflib.get_close_matches(key, list(shared) + list(per_model), n=1)
                known = ", ".join(list(shared) + list(per_model)) or "none"
                raise ValueError(f"unknown parameter {shown(key, 60)} in {where} for method '{op.name}'"
                                 + (f" (did you mean '{hint[0]}'?)" if hint else f" (known: {known})"))
            if own and key not in per_model:
                warnings.append(f"ignored: '{where}.{key}' is a method-level parameter; it is read from "
                                "the top-level or slice parameters only (mergekit ignores it under a model too)")
                continue
            check_form(value, f"{where}.{key}")
            _check_values(param, value, f"{where}.{key}")
    return warnings


def _check_values(param, value, where: str) -> None:
    """Coerce every plain value inside a setting now, so a wrong type fails before any I/O."""
    if isinstance(value, dict):
        _check_values(param, value["value"], where)
    elif isinstance(value, list):
        for v in value:
            _check_values(param, v, where)
    else:
        try:
            param.coerce(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _check_method(recipe: Recipe, origin: str, require_models: bool = True) -> None:
    """Resolve the method and its parameters now, so errors surface before any I/O."""
    from .dtypes import canonical
    from .ops import registry

    try:
        op = registry.get(recipe.merge_method)
        recipe._warnings += _check_parameters(recipe, op)
        from .fp8_out import requested

        for key in ("dtype", "out_dtype"):
            if getattr(recipe, key) is not None and not (key == "out_dtype" and requested(recipe.out_dtype)):
                canonical(getattr(recipe, key), key)
        if canonical(recipe.compute_dtype, "compute_dtype") not in ("float32", "float64"):
            raise ValueError("compute_dtype must be float32 or float64 (outputs take out_dtype / dtype)")
        for i, sl in enumerate(recipe.slices or []):
            if not sl.sources:
                raise ValueError(f"slices[{i}] lists no source")
            for j, src in enumerate(sl.sources):
                if src.layer_range is not None and src.layer_range[1] < src.layer_range[0]:
                    raise ValueError(f"slices[{i}].sources[{j}].layer_range {list(src.layer_range)} is reversed; "
                                     "it is [start, end) with end >= start")
    except ValueError as e:
        raise UserError(f"{origin}: {e}") from None
    if require_models and not recipe.models and not recipe.slices:
        raise UserError(f"{origin}: 'models' lists no model to merge")
    # methods with an exact LoRA form merge LoRA-only recipes without a base (checked in the plan)
    if op.needs_base and not recipe.base_model and op.lora_fn is None and not recipe.slices:
        raise UserError(f"{origin}: method '{op.name}' needs 'base_model' (task vectors are relative to it)")


# A recipe is small: this many values, aliases counted as often as they are used, is far beyond
# any real one and stops a "billion laughs" file (nested aliases) before it is expanded anywhere.
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_BYTES = 16 * 2**20

# YAML 1.1 (PyYAML) reads 1e-3 as a string: its float pattern wants a dot. mergekit recipes
# write weights that way, and YAML 1.2 reads them as numbers, so we do too.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))
    return RecipeLoader


def _check_size(data: Any, origin: str) -> None:
    """Walk the loaded recipe as if aliases were expanded, up to MAX_RECIPE_VALUES values."""
    budget = MAX_RECIPE_VALUES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise UserError(f"{origin}: the recipe expands to more than {MAX_RECIPE_VALUES:,} values (nested "
                            "YAML aliases?); write it out plainly")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _read_documents(p: Path) -> list:
    import yaml

    from .sources.paths import require_regular

    if not p.is_file():
        raise UserError(f"recipe not found: {p}")
    require_regular(p, "recipe")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise UserError(f"{p}: {p.stat().st_size:,} bytes is not a recipe (at most {MAX_RECIPE_BYTES:,})")
    try:
        text = p.read_text(encoding="utf-8")
        docs = list(yaml.load_all(text, Loader=_loader()))  # a SafeLoader: no Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{p}: not valid YAML{where}: {str(getattr(e, 'problem', e))[:200]}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file") from None
    except RecursionError:
        raise UserError(f"{p}: the YAML is nested too deeply to be a recipe") from None
    docs = [d for d in docs if d is not None] or [None]  # a trailing '---' makes an empty document
    for d in docs:
        _check_size(d, str(p))
    return docs


def load(path: str | Path, require_models: bool = True) -> Recipe:
    p = Path(path)
    docs = _read_documents(p)
    if len(docs) > 1:
        raise UserError(f"{p} holds {len(docs)} merges (a multi-document recipe, mergekit-multi's form); "
                        "`merge run` and `merge validate` take it - here give a file with one merge")
    recipe = from_dict(docs[0], str(p), require_models)
    recipe._source_path = p.resolve()
    return recipe


def load_all(path: str | Path) -> list[Recipe]:
    """Every merge of a recipe file (one per YAML document), in file order."""
    p = Path(path)
    docs = _read_documents(p)
    out = []
    for i, d in enumerate(docs):
        r = from_dict(d, str(p) if len(docs) == 1 else f"{p} (document {i + 1})")
        if len(docs) > 1:  # here a name is meaningful: it names an intermediate merge
            r._warnings = [w for w in r._warnings if not w.startswith("ignored: 'name'")]
        r._source_path = p.resolve()
        out.append(r)
    return out


def resolve_ref(recipe: Recipe, ref: str) -> str:
    """Paths in a recipe are relative to the recipe file; hub ids pass through unchanged; each part
    of a ``model+lora`` reference is resolved on its own."""
    if recipe._source_path is None:
        return ref
    if "+" in ref and not (recipe._source_path.parent / ref).exists() and not Path(ref).exists():
        return "+".join(resolve_ref(recipe, part) for part in ref.split("+"))
    candidate = Path(ref).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    local = recipe._source_path.parent / candidate
    if local.exists() or ref.startswith((".", "/", "~")):
        return str(local)
    cwd = Path.cwd() / candidate
    return str(cwd) if cwd.exists() else ref


def input_paths(recipe: Recipe) -> list[Path]:
    """The local paths a recipe reads (itself, the base, the models, the tokenizer donor); hub ids
    are left out. Used to keep outputs clear of their inputs before anything is opened."""
    refs = [recipe.base_model] + [e.model for e in recipe.models]
    for sl in recipe.slices or []:
        refs += [sl.base_model] + [src.model for src in sl.sources]
    if recipe.tokenizer_source and recipe.tokenizer_source not in ("base", "union"):
        refs.append(recipe.tokenizer_source)
    resolved = [resolve_ref(recipe, r) for r in refs if r]
    parts = [p for r in resolved for p in ([r] if Path(r).exists() or "+" not in r else r.split("+"))]
    paths = [Path(p) for p in parts]
    return ([recipe._source_path] if recipe._source_path is not None else []) + paths
