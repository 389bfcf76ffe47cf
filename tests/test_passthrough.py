"""passthrough: mergekit's golden example (../shared/specs/mergekit_compat.md M24), its input
contract (M6) and parameter (M13), and a recipe run."""
from __future__ import annotations

import pytest
import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask

OP = registry.get("passthrough")
M1 = torch.tensor([[0.875, -1.25, 2.625], [1.375, 0.5, -1.25]])


def run(x, **model_params):
    return OP.fn(TensorTask("w", None, [x.clone()], OP.resolve_params({}), [OP.resolve_model_params(model_params)]))


def test_golden_example_from_mergekit():
    assert torch.equal(run(M1, scale=0.5), torch.tensor([[0.4375, -0.625, 1.3125], [0.6875, 0.25, -0.625]]))


@pytest.mark.parametrize("given", [{}, {"scale": None}, {"scale": 1.0}, {"scale": 1}])
def test_no_scale_or_scale_one_is_the_identity(given):
    out = run(M1, **given)
    assert torch.equal(out, M1) and out.dtype == torch.float32


def test_scale_multiplies_every_entry():
    assert torch.equal(run(M1, scale=-2.0), -2.0 * M1)
    assert torch.equal(run(M1, scale=0.0), torch.zeros_like(M1))


def test_contract_and_parameters():
    assert (OP.reads, OP.needs_base, OP.base_input, OP.model_count, OP.params) == ("weights", False, True, 1, ())
    (scale,) = OP.model_params
    assert scale.name == "scale" and scale.type is float and scale.default is None and not scale.required
    with pytest.raises(ValueError, match="scale"):
        OP.resolve_model_params({"scale": "big"}, "m")


def test_recipe_with_one_model_and_a_scale(tiny_models, tmp_path, cli):
    a = tiny_models["a"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text([a], "passthrough", None, model_params=["{scale: 0.5}"]))
    code, _, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, err
    out, aw = load_dir(tmp_path / "o"), load_dir(a)
    assert out.keys() == aw.keys()
    assert all(torch.equal(v, 0.5 * aw[k]) for k, v in out.items())
