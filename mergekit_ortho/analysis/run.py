"""`merge analyze` end to end: a recipe (or a base and models) planned as `merge run` plans it,
then one streaming pass, the header findings and the recommendations.

A plan refusal is a finding, not the end: when ``build_plan`` refuses the recipe (a tensor missing
from one model, a shape or vocabulary-size mismatch), the headers are compared
(:func:`header_problems`), every tensor that differs is reported as a ``fail`` finding, and the
analysis plans the recipe again with those tensors excluded (the plan copies them) and analyses
the rest. A refusal that no excluded tensor explains (a method that needs a base, an adapter the
method cannot read) stays the one-line error."""
from __future__ import annotations

from pathlib import Path


def recipe_from_models(base: str, models: list[str]):
    """The recipe `merge analyze --base B M1 M2 ...` stands for: task arithmetic over the models
    (full output, so LoRAs are seen as dense deltas over every base tensor)."""
    from .. import recipe as recipe_mod

    return recipe_mod.from_dict({"merge_method": "task_arithmetic", "base_model": base,
                                 "models": [{"model": m} for m in models], "output": {"format": "full"}},
                                "merge analyze")


def analyze(recipe, density: float | None = None, top_rank: int = 16, on_tensor=None) -> dict:
    from .. import plan as plan_mod
    from ..errors import UserError
    from . import advice, compat
    from .streaming import analyze_plan

    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density must be in (0, 1], got {density}")
    if top_rank < 0:
        raise UserError(f"--top-rank must be >= 0, got {top_rank}")
    refused: list[dict] = []
    try:
        plan = plan_mod.build_plan(recipe)
    except UserError as e:
        problems = header_problems(recipe)
        if not problems:
            raise
        try:
            plan = plan_mod.build_plan(excluding(recipe, problems))
        except UserError:
            raise e from None
        refused = [{"level": "fail", "what": "plan", "detail": f"merge run would refuse this recipe: {e}; "
                    f"the analysis leaves out the {len(problems)} tensor(s) below and analyses the rest"}]
        refused += [{"level": "fail", "what": what, "detail": f"'{name}' {why}"}
                    for name, (what, why) in sorted(problems.items())]
    try:
        result = analyze_plan(plan, density, top_rank, on_tensor)
        result["method"] = plan.op.name
        result["base_model"] = plan.base.ref if plan.base is not None else None
        result["findings"] = refused + compat.findings(plan)
        result["recommendations"] = advice.recommend(result)
        return result
    finally:
        plan_mod.close(plan)


def header_problems(recipe) -> dict[str, tuple[str, str]]:
    """{tensor: (kind, why)} for the tensors whose presence or shape differs between the base (else
    the first model) and a full checkpoint of the recipe, from the headers only. A head that a
    tied checkpoint does not store is not a difference (the plan reads its embeddings)."""
    from .. import recipe as recipe_mod
    from ..planning import TIED_HEADS, VOCABULARY_TENSORS, open_source

    refs = ([("base", recipe.base_model)] if recipe.base_model else []) + list(
        zip(recipe.model_labels(), [e.model for e in recipe.models]))
    opened = []
    try:
        for label, ref in refs:
            try:
                src = open_source(recipe_mod.resolve_ref(recipe, ref), label)
            except Exception:  # noqa: BLE001 - an input that does not open is the plan's error
                return {}
            opened.append(src)
        full = [(label, src) for (label, _), src in zip(refs, opened)
                if getattr(src, "kind", "") != "lora" and hasattr(src, "infos")]
        if len(full) < 2:
            return {}
        ref_label, ref_src = full[0]
        ref_shapes = {k: tuple(i.shape) for k, i in ref_src.infos.items()}
        out: dict[str, tuple[str, str]] = {}
        for label, src in full[1:]:
            shapes = {k: tuple(i.shape) for k, i in src.infos.items()}
            for name in sorted(set(ref_shapes) | set(shapes)):
                if name in TIED_HEADS and (name not in shapes or name not in ref_shapes):
                    continue
                if name not in shapes:
                    out.setdefault(name, ("missing tensor", f"is in {ref_label} but missing from {label}"))
                elif name not in ref_shapes:
                    out.setdefault(name, ("extra tensor", f"is in {label} but not in {ref_label}"))
                elif shapes[name] != ref_shapes[name]:
                    kind = ("vocabulary" if name in VOCABULARY_TENSORS and shapes[name][1:] == ref_shapes[name][1:]
                            else "shape")
                    out.setdefault(name, (kind, f"is {list(ref_shapes[name])} in {ref_label} but "
                                          f"{list(shapes[name])} in {label}"))
        return out
    finally:
        for src in opened:
            src.close()


def excluding(recipe, names) -> object:
    """The recipe with ``names`` (exact tensor names) added to its ``exclude`` patterns."""
    import re

    extra = [f"^{re.escape(n)}$" for n in sorted(names)]
    return recipe.model_copy(update={"exclude": list(recipe.exclude) + extra})


def load_recipe(path: Path):
    from .. import recipe as recipe_mod
    from ..errors import UserError

    if not Path(path).is_file():
        raise UserError(f"recipe {path} not found")
    return recipe_mod.load(path)
