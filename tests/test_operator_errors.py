"""Errors a recipe or its inputs can cause inside an operator are UserErrors (CLI: one line, exit 2)."""
from __future__ import annotations

import pytest
import torch

from conftest import write_recipe
from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import errors as E
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import Params, TensorTask
from test_bad_input import _copy_model, base_recipe, expect_error


def _task(method, inputs, base=None, **params):
    op = registry.get(method)
    mps = [op.resolve_model_params({}, f"m{i}") for i in range(len(inputs))]
    return op, TensorTask("w", base, inputs, op.resolve_params(params), mps, dtype=torch.float32)


def test_non_finite_task_vector_exits_2_with_one_line(cli, tmp_path, tiny_models):
    k = "model.norm.weight"
    bad = _copy_model(tiny_models["a"], tmp_path / "nan", lambda t: t[k].__setitem__(0, float("nan")))
    r = write_recipe(tmp_path / "r.yaml", base_recipe(
        tiny_models, merge_method="opcm", models=f"\n  - model: {bad}\n  - model: {tiny_models['b']}"))
    err = expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "not finite")
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    from mergekit_ortho.ops import opcm
    with pytest.raises(E.NonFiniteInput):
        opcm._lambda(float("nan"), 1.0)


def test_no_inputs_and_shape_mismatch_in_magmax_and_widen():
    for method in ("magmax", "widen"):
        op, task = _task(method, [], base=torch.zeros(3))
        with pytest.raises(E.NoInputs, match="no input models"):
            op.fn(task)
    op, task = _task("magmax", [torch.ones(3), torch.ones(4)])
    with pytest.raises(E.ShapeMismatch, match="shape"):
        op.fn(task)
    op, task = _task("widen", [torch.ones(3), torch.ones(4)], base=torch.zeros(3))
    with pytest.raises(E.ShapeMismatch, match="shape"):
        op.fn(task)


def test_widen_missing_base_and_temperature():
    op, task = _task("widen", [torch.ones(3)])
    with pytest.raises(E.MissingBase, match="base model"):
        op.fn(task)
    op, task = _task("widen", [torch.ones(3)], base=torch.zeros(3))
    task.params = Params({**task.params, "temperature": 0.0})  # below the schema's bound: what a caller bypassing it gets
    with pytest.raises(E.BadParameters, match="temperature"):
        op.fn(task)


def test_kmeans_argument_errors_a_recipe_can_cause_are_user_errors():
    from mergekit_ortho.ops.kernels.kmeans import kmeans
    X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    for kw in ({"k": 0}, {"k": 2, "n_init": 0}, {"k": 2, "max_iter": 0}, {"k": 2, "tol": -1.0},
               {"k": 2, "empty_clusters": "keep"}):
        with pytest.raises(E.BadParameters):
            kmeans(X, **kw)


def test_lora_lego_and_rmm_parameter_errors_are_user_errors():
    from mergekit_ortho.ops import lora_lego, rmm
    A, B = torch.ones(2, 5), torch.ones(4, 2)
    with pytest.raises(UserError, match="rank k"):
        lora_lego.lego_merge([(A, B)], 0)
    with pytest.raises(UserError, match="n_init"):
        lora_lego.lego_merge([(A, B)], 1, n_init=0)
    with pytest.raises(UserError, match="different LoRA ranks"):
        rmm.check_ranks([(A, B), (torch.ones(3, 5), torch.ones(4, 3))])
    with pytest.raises(E.BadParameters):
        rmm.storage_ratio(0, 2, 1)


def test_lora_out_factor_shape_errors_are_user_errors():
    from mergekit_ortho import lora_out
    with pytest.raises(UserError, match="must be A"):
        lora_out._rank(torch.ones(2, 5), torch.ones(4, 3), "m.weight")
    with pytest.raises(UserError, match="do not fit"):
        lora_out._conv_shapes("c.weight", torch.ones(2, 5), torch.ones(4, 2), {"c.weight": (4, 3, 3, 3)})
