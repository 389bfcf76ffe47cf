"""`merge continual` and mergekit-style per-layer parameters (issue 14): a continual state folds
every tensor with one value per parameter, so gradient lists, filter conditionals and per-model
defaults under the top-level parameters are refused at `init` in one line (exit 2, no state),
while the same recipe runs with `merge run`."""
from __future__ import annotations

import pytest

from conftest import write_recipe

from mergekit_ortho.testing.checkpoints import code_value, spec_llama


@pytest.fixture
def models(tmp_path):
    for k in range(3):
        spec_llama(tmp_path / f"m{k}", code_value(k + 1))
    return tmp_path


@pytest.mark.parametrize("params, match", [
    ("models: [{model: m1}]\nparameters:\n  lambda: [0, 1]\n", "parameters.lambda is a per-layer setting"),
    ("models: [{model: m1}]\nparameters:\n  lambda: [{filter: mlp, value: 0.5}, {value: 1}]\n",
     "parameters.lambda is a per-layer setting"),
    ("models: [{model: m1, parameters: {weight: [0, 1]}}]\n", "the parameter 'weight' of model"),
    ("models: [{model: m1}]\nparameters:\n  weight: 0.5\n", "'weight' under the top-level parameters"),
])
def test_continual_init_refuses_per_layer_settings(models, cli, params, match):
    r = write_recipe(models / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {models / 'm0'}\n"
                     + params.replace("model: m1", f"model: {models / 'm1'}"))
    code, _, err = cli("continual", "init", models / "st", "--recipe", r)
    assert code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (models / "st").exists()
    # the same recipe is a valid `merge run` recipe
    code, _, err = cli("run", r, "--out", models / "out")
    assert code == 0, err


def test_continual_init_takes_scalar_parameters(models, cli):
    r = write_recipe(models / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {models / 'm0'}\n"
                     f"models: [{{model: {models / 'm1'}, parameters: {{weight: 0.5}}}}]\nparameters: {{lambda: 1}}\n")
    code, _, err = cli("continual", "init", models / "st", "--recipe", r)
    assert code == 0, err
    assert (models / "st" / "state.json").exists()


def test_continual_refuses_slerp_whose_fold_takes_one_model(models, cli):
    r = write_recipe(models / "r.yaml", f"merge_method: slerp\nbase_model: {models / 'm0'}\n"
                     f"models: [{{model: {models / 'm1'}}}]\nparameters: {{t: 0.3}}\n")
    code, _, err = cli("continual", "init", models / "st", "--recipe", r)
    assert code == 2 and "'slerp' is not one of them" in err, err
    assert not (models / "st").exists()
