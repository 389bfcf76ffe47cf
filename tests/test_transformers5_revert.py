"""`merge revert` to PEFT names modules as `merge run`'s PEFT outputs do (issue 15): on a family
transformers 5 renames at load time (ViT), the reverted adapter carries the in-memory names, peft
loads it with PeftModel, and its outputs equal those of the full-model revert of the same task.
Tiny random ViT from a config; adapters of both namings (transformers 4 checkpoint names, 5
in-memory names) go into one RMM bundle over the checkpoint-named base."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vit_namings import vit_with_two_namings

from mergekit_ortho.adapters import transformers5

pytestmark = pytest.mark.skipif(transformers5.version() is None, reason="needs transformers >= 5")

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_revert")
    got = vit_with_two_namings(root, layers=1, rank_b=2)
    (root / "r.yaml").write_text(f"merge_method: rmm\nbase_model: {root / 'base'}\nparameters: {{basis_size: 1}}\n"
                                 f"models:\n  - model: {got['a']}\n  - model: {got['b']}\n")
    torch.manual_seed(5)
    return {"root": root, "load": got["load"], "pixels": torch.randn(2, 3, 8, 8),
            "memory_keys": set(got["load"]().state_dict())}


@pytest.fixture(scope="module")
def bundle(vit):
    from typer.testing import CliRunner

    from mergekit_ortho.cli import app

    res = CliRunner().invoke(app, ["run", str(vit["root"] / "r.yaml"), "--out", str(vit["root"] / "bundle")])
    assert res.exit_code == 0, res.stdout + res.stderr
    return vit["root"] / "bundle"


def _peft_logits(vit, adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(vit["load"](), adapter).eval()
    with torch.no_grad():
        return model(pixel_values=vit["pixels"]).logits


def _full_logits(vit, full):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(full, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(pixel_values=vit["pixels"]).logits


@pytest.mark.parametrize("task", ["a", "b"])  # the transformers-5-named and the transformers-4-named input
def test_a_reverted_peft_adapter_loads_in_peft_and_equals_the_full_revert(cli, tmp_path, vit, bundle, task):
    code, out, err = cli("revert", bundle, "--model", task, "--out", tmp_path / "peft")
    assert code == 0, out + err
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight"
            for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))}
    assert mods and mods <= vit["memory_keys"], sorted(mods - vit["memory_keys"])  # in-memory names
    assert any(".q_proj." in m for m in mods)
    code, out, err = cli("revert", bundle, "--model", task, "--out", tmp_path / "full", "--format", "full")
    assert code == 0, out + err
    full = _full_logits(vit, tmp_path / "full")
    torch.testing.assert_close(_peft_logits(vit, tmp_path / "peft"), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = vit["load"]()(pixel_values=vit["pixels"]).logits
    assert (full - plain).abs().max() > 1e-3  # the task changes the model: the comparison can fail


def test_a_bundle_without_a_recorded_config_takes_the_base_directory(cli, tmp_path, vit, bundle):
    """Bundles written before the config was recorded: --base (or the bundle's base path) gives it."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    m = json.loads((old / "rmm_manifest.json").read_text())
    m["extras"].pop("base_config")
    (old / "rmm_manifest.json").write_text(json.dumps(m))
    code, out, err = cli("revert", old, "--model", "b", "--out", tmp_path / "peft", "--base", vit["root"] / "base")
    assert code == 0, out + err
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight"
            for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))}
    assert mods and mods <= vit["memory_keys"]
    code, out, err = cli("revert", bundle, "--model", "b", "--out", tmp_path / "full", "--format", "full")
    assert code == 0, out + err
    torch.testing.assert_close(_peft_logits(vit, tmp_path / "peft"), _full_logits(vit, tmp_path / "full"),
                               rtol=1e-5, atol=1e-5)
