"""`merge analyze` end to end: a recipe (or a base and models) planned as `merge run` plans it,
then one streaming pass, the header findings and the recommendations."""
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
    plan = plan_mod.build_plan(recipe)
    try:
        result = analyze_plan(plan, density, top_rank, on_tensor)
        result["method"] = plan.op.name
        result["base_model"] = plan.base.ref if plan.base is not None else None
        result["findings"] = compat.findings(plan)
        result["recommendations"] = advice.recommend(result)
        return result
    finally:
        plan_mod.close(plan)


def load_recipe(path: Path):
    from .. import recipe as recipe_mod
    from ..errors import UserError

    if not Path(path).is_file():
        raise UserError(f"recipe {path} not found")
    return recipe_mod.load(path)
