"""Every bundled recipe validates and runs on the demo checkpoints; magmax/widen end to end."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from test_run import load_dir, recipe_text
from conftest import write_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DENSE = ["demo", "linear", "task_arithmetic", "dare_ties", "magmax", "widen", "tsv", "opcm", "nearswap", "nuslerp",
         "multislerp", "karcher", "model_stock", "arcee_fusion", "passthrough", "ram", "ramplus_tl", "della",
         "breadcrumbs", "sce", "slerp_gradient", "frankenmerge"]


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    from mergekit_ortho.demo import build_demo

    root = tmp_path_factory.mktemp("demo_tree")
    build_demo(root / "demo", hidden=16, layers=2, vocab=32)
    shutil.copytree(RECIPES, root / "recipes")
    return root


@pytest.mark.parametrize("name", DENSE)
def test_bundled_recipe_runs(demo_tree, name, cli):
    recipe = demo_tree / "recipes" / f"{name}.yaml"
    out = demo_tree / "out" / name
    code, _, err = cli("run", recipe, "--out", out)
    assert code == 0, err
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()


LORA = {"lora_task_arithmetic": "adapter_model.safetensors", "rmm": "rmm_manifest.json",
        "lora_lego": "adapter_model.safetensors", "core_space": "adapter_model.safetensors"}


@pytest.mark.parametrize("name", sorted(LORA))
def test_bundled_lora_recipe_runs(demo_tree, name, cli):
    recipe = demo_tree / "recipes" / f"{name}.yaml"
    out = demo_tree / "out" / name
    code, _, err = cli("run", recipe, "--out", out)
    assert code == 0, err
    assert (out / LORA[name]).is_file()


def test_magmax_end_to_end(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[k] for k in "abc"], "magmax",
                                                      tiny_models["base"]))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged = load_dir(tmp_path / "out")
    base = load_dir(tiny_models["base"])
    taus = [{k: v - base[k] for k, v in load_dir(tiny_models[m]).items()} for m in "abc"]
    for k in merged:
        stack = torch.stack([t[k] for t in taus])
        sel = torch.gather(stack, 0, stack.abs().flip(0).argmax(0, keepdim=True).neg().add(2)).squeeze(0)
        assert torch.allclose(merged[k], base[k] + 0.5 * sel, atol=1e-6), k


def test_widen_end_to_end_single_model_is_identity(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"]], "widen", tiny_models["base"]))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged, a = load_dir(tmp_path / "out"), load_dir(tiny_models["a"])
    assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in a)
