"""The plan carries each output item's resolved parameters, and the executor reads them per item."""
from __future__ import annotations

import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho import outputs
from mergekit_ortho import plan as plan_mod
from mergekit_ortho import recipe as recipe_mod
from mergekit_ortho.ops.registry import Params
from mergekit_ortho.planning import ItemParams


def _plan(tmp_path, tiny_models, method="task_arithmetic", params="{lambda: 1.0}", extra=""):
    models = [tiny_models["a"], tiny_models["b"]]
    r = write_recipe(tmp_path / "r.yaml", recipe_text(models, method, tiny_models["base"], params, extra=extra))
    return plan_mod.build_plan(recipe_mod.load(r))


def test_every_merged_item_has_the_recipes_resolved_parameters(tmp_path, tiny_models):
    plan = _plan(tmp_path, tiny_models)
    try:
        merged = [n for n, i in plan.items.items() if i.action == "merge"]
        assert set(plan.item_params) == set(merged)
        for n in merged:
            got = plan.params_for(n)
            # task_arithmetic's per-model parameters: weight and density (declared as in mergekit, M13)
            assert got.method == plan.params and [dict(p) for p in got.models] == [{"weight": 1.0, "density": 1.0}] * 2
        assert plan.units and sum(len(u) for u in plan.units) == len(plan.items)
    finally:
        plan_mod.close(plan)


def test_the_executor_reads_each_items_own_parameters(tmp_path, tiny_models):
    """One item given other parameters changes that tensor only: the values a unit of work uses
    come from the plan's item, not from the recipe at large (per-layer values resolve there)."""
    plan = _plan(tmp_path, tiny_models)
    try:
        name = next(n for n, i in plan.items.items() if i.action == "merge" and len(i.shape) == 2)
        other = ItemParams(Params({**plan.params, "lambda": 0.25}), plan.params_for(name).models)
        plan.item_params = {**plan.item_params, name: other}
        outputs.run(plan, tmp_path / "out")
    finally:
        plan_mod.close(plan)
    out, base = load_dir(tmp_path / "out"), load_dir(tiny_models["base"])
    a, b = load_dir(tiny_models["a"]), load_dir(tiny_models["b"])
    for k in out:
        if plan.items[k].action != "merge":
            continue
        lam = 0.25 if k == name else 1.0
        want = (base[k].float() + lam * ((a[k].float() - base[k].float()) + (b[k].float() - base[k].float())))
        torch.testing.assert_close(out[k].float(), want.to(out[k].dtype).float(), rtol=0, atol=1e-6)
