"""Two PEFT LoRAs for one ViT, one saved under transformers 4 module names, one under transformers
5 names, merged adapter to adapter with no base model (issue 15): with a config findable offline
(config.json beside an adapter, or adapter_config's base_model_name_or_path as a local directory)
they are mapped to the installed transformers' in-memory names and merge exactly (peft loads the
output, logits equal W + sum w_i B_i A_i by hand); with none, one line says what to pass."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vit_namings import lora_deltas, vit_with_two_namings

from mergekit_ortho.adapters import transformers5

pytestmark = pytest.mark.skipif(transformers5.version() is None, reason="needs transformers >= 5")

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_nobase")
    got = vit_with_two_namings(root, layers=2, rank_b=3)
    torch.manual_seed(5)
    return {"root": root, "load": got["load"], "a": got["a"], "b": got["b"], "pixels": torch.randn(2, 3, 8, 8),
            "deltas": [lora_deltas(got["a"]), lora_deltas(got["b5"])], "memory_keys": set(got["load"]().state_dict())}


def _copy(src, dst, base_ref: str | None):
    shutil.copytree(src, dst)
    c = json.loads((dst / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = base_ref
    (dst / "adapter_config.json").write_text(json.dumps(c))
    return dst


def _run(cli, tmp_path, a, b):
    (tmp_path / "r.yaml").write_text(f"merge_method: task_arithmetic\nmodels:\n"
                                     f"  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                                     f"  - model: {b}\n    parameters: {{weight: 1.0}}\n")
    return cli("run", tmp_path / "r.yaml", "--out", tmp_path / "out")


@pytest.mark.parametrize("where", ["beside", "base_path"])
def test_mixed_namings_merge_exactly_when_a_config_is_found(cli, tmp_path, vit, where):
    from peft import PeftModel

    if where == "beside":  # base_model_name_or_path useless (a hub id not cached); config.json beside b
        a = _copy(vit["a"], tmp_path / "a", "nobody/not-cached")
        b = _copy(vit["b"], tmp_path / "b", "nobody/not-cached")
        shutil.copy(vit["root"] / "base" / "config.json", b / "config.json")
    else:  # no config beside; base_model_name_or_path is the local base directory
        a = _copy(vit["a"], tmp_path / "a", str(vit["root"] / "base"))
        b = _copy(vit["b"], tmp_path / "b", str(vit["root"] / "base"))
    code, out, err = _run(cli, tmp_path, a, b)
    assert code == 0, out + err
    sd = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight" for k in sd}
    assert mods == set(vit["deltas"][0]), sorted(mods)  # one module per target, in-memory names
    model = vit["load"]()
    want = model.state_dict()
    with torch.no_grad():
        for d, w in zip(vit["deltas"], [0.5, 1.0]):
            for k, v in d.items():
                want[k].add_(w * v)
        expected = model(pixel_values=vit["pixels"]).logits
        got = PeftModel.from_pretrained(vit["load"](), tmp_path / "out").eval()(pixel_values=vit["pixels"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_dry_run_says_the_adapters_were_renamed(cli, tmp_path, vit):
    a = _copy(vit["a"], tmp_path / "a", str(vit["root"] / "base"))
    (tmp_path / "r.yaml").write_text(f"merge_method: task_arithmetic\nmodels:\n  - model: {a}\n"
                                     f"    parameters: {{weight: 0.5}}\n  - model: {vit['b']}\n"
                                     "    parameters: {weight: 1.0}\n")
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "out", "--dry-run")
    assert code == 0, out + err
    text = " ".join((out + err).split())
    assert "renamed to transformers" in text and "by the rules for vit" in text, text


def test_mixed_namings_without_any_config_are_refused_in_one_line(cli, tmp_path, vit):
    a = _copy(vit["a"], tmp_path / "a", "nobody/not-cached")
    b = _copy(vit["b"], tmp_path / "b", None)
    code, out, err = _run(cli, tmp_path, a, b)
    assert code == 2 and len(err.strip().splitlines()) == 1, out + err
    assert "shares no LoRA module name" in err and "set base_model" in err and "config.json" in err, err
    assert not (tmp_path / "out").exists()


def test_adapters_of_one_naming_without_config_still_merge(cli, tmp_path, vit):
    """Shared module names: nothing to relate, no config needed (the old behaviour)."""
    a = _copy(vit["a"], tmp_path / "a", None)
    a2 = _copy(vit["a"], tmp_path / "a2", None)
    code, out, err = _run(cli, tmp_path, a, a2)
    assert code == 0, out + err


def test_the_config_is_found_in_the_hugging_face_cache_without_the_network(cli, tmp_path, vit, monkeypatch):
    """base_model_name_or_path a hub id whose config.json is already cached: read from the cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-vit" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    shutil.copy(vit["root"] / "base" / "config.json", snap / "config.json")
    (cache / "models--someone--tiny-vit" / "refs").mkdir()
    (cache / "models--someone--tiny-vit" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = _copy(vit["a"], tmp_path / "a", "someone/tiny-vit")
    b = _copy(vit["b"], tmp_path / "b", "someone/tiny-vit")
    code, out, err = _run(cli, tmp_path, a, b)
    assert code == 0, out + err
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight"
            for k in load_file(str(tmp_path / "out" / "adapter_model.safetensors"))}
    assert mods == set(vit["deltas"][0])
