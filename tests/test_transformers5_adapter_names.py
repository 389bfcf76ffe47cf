"""PEFT adapters named by transformers 4 (checkpoint names) or 5 (in-memory names) merge into
checkpoints of either naming, and PEFT outputs load with peft on the installed transformers
(issue 15). Two families transformers 5 renames at load time: ViT (``vit.encoder.layer.N.
attention.attention.query`` -> ``vit.layers.N.attention.q_proj``) and Swin (``attention.self.query``
-> ``attention.q_proj``). Tiny random models from configs, built once per module; the expected
merge is computed by hand from the adapter files (W + alpha/r B A in the in-memory naming)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ortho.adapters import transformers5

pytestmark = pytest.mark.skipif(transformers5.version() is None, reason="needs transformers >= 5")

# in-memory -> checkpoint (transformers 4) names, written out by hand for the test's v4 adapters
V4 = {"vit": (("vit.layers.", "vit.encoder.layer."), (".attention.q_proj", ".attention.attention.query"),
              (".attention.v_proj", ".attention.attention.value")),
      "swin": ((".attention.q_proj", ".attention.self.query"), (".attention.v_proj", ".attention.self.value"))}
TARGETS = {"vit": (["q_proj", "v_proj"], ["query", "value"]), "swin": (["q_proj", "v_proj"], ["query", "value"])}


def _build(name: str):
    import transformers

    torch.manual_seed(0)
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                     image_size=8, patch_size=4, num_labels=3)
        return transformers.ViTForImageClassification(cfg).eval(), 8
    cfg = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                  window_size=2, num_labels=3)
    return transformers.SwinForImageClassification(cfg).eval(), 16


def _to_v4(name: str, key: str) -> str:
    for a, b in V4[name]:
        key = key.replace(a, b)
    return key


@pytest.fixture(scope="module", params=["vit", "swin"])
def family(request, tmp_path_factory):
    from transformers import AutoModelForImageClassification

    from mergekit_ortho.testing.loras import make_peft_adapter

    name = request.param
    root = tmp_path_factory.mktemp(name)
    model, size = _build(name)
    model.save_pretrained(root / "disk")  # the checkpoint naming (transformers reverts its renames on save)
    (root / "memory").mkdir()  # a state dict saved raw from the transformers 5 model: in-memory names
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "memory" / "model.safetensors"))
    (root / "memory" / "config.json").write_text((root / "disk" / "config.json").read_text())
    disk_keys = set(load_file(str(root / "disk" / "model.safetensors")))
    assert disk_keys != set(model.state_dict())  # the family is renamed at load time

    def load():
        return AutoModelForImageClassification.from_pretrained(root / "disk", dtype=torch.float32).eval()

    a = make_peft_adapter(load(), root / "a5", seed=1, r=2, lora_alpha=4, target_modules=TARGETS[name][0])
    b5 = make_peft_adapter(load(), root / "b5", seed=2, r=3, lora_alpha=3, target_modules=TARGETS[name][0])
    (root / "b4").mkdir()  # the same adapter as peft under transformers 4 names it
    save_file({_to_v4(name, k): v for k, v in load_file(str(b5 / "adapter_model.safetensors")).items()},
              str(root / "b4" / "adapter_model.safetensors"))
    cfg = json.loads((b5 / "adapter_config.json").read_text())
    cfg["target_modules"] = TARGETS[name][1]
    (root / "b4" / "adapter_config.json").write_text(json.dumps(cfg))
    assert not set(load_file(str(root / "b4" / "adapter_model.safetensors"))) & set(
        load_file(str(b5 / "adapter_model.safetensors")))
    deltas = [_deltas(a), _deltas(b5)]
    torch.manual_seed(5)
    return {"name": name, "root": root, "load": load, "a": a, "b4": root / "b4", "b5": b5, "deltas": deltas,
            "pixels": torch.randn(2, 3, size, size), "disk_keys": disk_keys, "memory_keys": set(model.state_dict())}


def _deltas(adapter) -> dict[str, torch.Tensor]:
    """{in-memory base key: alpha/r * B @ A} from a PEFT adapter file."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, A in sd.items():
        if ".lora_A." in k:
            B = sd[k.replace(".lora_A.", ".lora_B.")]
            key = k[len("base_model.model."):].replace(".lora_A.weight", ".weight")
            out[key] = cfg["lora_alpha"] / cfg["r"] * B @ A
    return out


def _expected_logits(fam, weights):
    model = fam["load"]()
    sd = model.state_dict()
    with torch.no_grad():
        for d, w in zip(fam["deltas"], weights):
            for k, v in d.items():
                sd[k].add_(w * v)
        return model(pixel_values=fam["pixels"]).logits


def _recipe(tmp_path, fam, base: str, second: str, output: str | None = None):
    text = (f"merge_method: task_arithmetic\nbase_model: {fam['root'] / base}\nmodels:\n"
            f"  - model: {fam['a']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {fam[second]}\n    parameters: {{weight: 1.0}}\n")
    if output:
        text += f"output: {{format: {output}}}\n"
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


@pytest.mark.parametrize("base", ["disk", "memory"])
@pytest.mark.parametrize("second", ["b4", "b5"])
def test_adapters_of_either_naming_merge_into_a_full_model_of_either_naming(cli, tmp_path, family, base, second):
    from transformers import AutoModelForImageClassification

    code, out, err = cli("run", _recipe(tmp_path, family, base, second, "full"), "--out", tmp_path / "out")
    assert code == 0, out + err
    written = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert written == family[f"{base}_keys"]  # the base's own naming is kept
    got = AutoModelForImageClassification.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = got(pixel_values=family["pixels"]).logits
    torch.testing.assert_close(logits, _expected_logits(family, [0.5, 1.0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["disk", "memory"])
@pytest.mark.parametrize("second", ["b4", "b5"])
def test_peft_outputs_load_with_peft_on_the_installed_transformers(cli, tmp_path, family, base, second):
    from peft import PeftModel

    code, out, err = cli("run", _recipe(tmp_path, family, base, second), "--out", tmp_path / "out")
    assert code == 0, out + err
    sd = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight" for k in sd}
    assert mods <= family["memory_keys"], sorted(mods - family["memory_keys"])  # in-memory names
    model = PeftModel.from_pretrained(family["load"](), tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(pixel_values=family["pixels"]).logits
    torch.testing.assert_close(logits, _expected_logits(family, [0.5, 1.0]), rtol=1e-5, atol=1e-5)


def test_the_plan_says_which_rule_matched_and_how_the_output_is_named(cli, tmp_path, family):
    code, out, err = cli("run", _recipe(tmp_path, family, "disk", "b5"), "--out", tmp_path / "out", "--dry-run")
    assert code == 0, out + err
    text = " ".join((out + err).split())
    assert "through the installed transformers' renames" in text, text
    assert "PEFT output named as transformers" in text, text


def test_renames_round_trip_and_leave_unrenamed_families_alone(family):
    cfg = json.loads((family["root"] / "disk" / "config.json").read_text())
    disk = sorted(family["disk_keys"])
    forward = transformers5.memory_names(disk, cfg)
    assert {forward.get(k, k) for k in disk} == family["memory_keys"]
    back = transformers5.renames(sorted(family["memory_keys"]), cfg)
    assert {back.get(k, k) for k in family["memory_keys"]} == family["disk_keys"]
    assert transformers5.renames(disk, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == {}


def test_an_adapter_of_another_model_still_says_what_was_tried(cli, tmp_path, family):
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(str(family["a"] / "adapter_model.safetensors"))
    save_file({k.replace("q_proj", "nope_proj"): v for k, v in sd.items()}, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((family["a"] / "adapter_config.json").read_text())
    (tmp_path / "r.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {family['root'] / 'disk'}\n"
                                     f"models:\n  - model: {bad}\n    parameters: {{weight: 1.0}}\n")
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "nope_proj" in err and "renames for" in err, err
    assert not (tmp_path / "out").exists()


def test_an_extracted_peft_adapter_loads_with_peft_on_the_installed_transformers(cli, tmp_path, family):
    """`merge extract` (full - base as a LoRA) on a renamed family writes in-memory names too."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    sd = load_file(str(family["root"] / "disk" / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if k.endswith(("query.weight", "value.weight")) else v
          for k, v in sd.items()}
    (tmp_path / "ft").mkdir()
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text((family["root"] / "disk" / "config.json").read_text())
    code, out, err = cli("extract", family["root"] / "disk", tmp_path / "ft", "--out", tmp_path / "lora",
                         "--rank", "16", "--format", "peft")
    assert code == 0, out + err
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight"
            for k in load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))}
    assert mods and mods <= family["memory_keys"], sorted(mods - family["memory_keys"])
    model = PeftModel.from_pretrained(family["load"](), tmp_path / "lora").eval()
    want = AutoModelForImageClassification.from_pretrained(tmp_path / "ft", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=family["pixels"]).logits,
                                   want(pixel_values=family["pixels"]).logits, rtol=1e-4, atol=1e-5)


def test_keys_a_converter_fuses_are_not_renamed_but_their_neighbours_are():
    """Mixtral: the router is renamed (block_sparse_moe.gate -> mlp.gate); per-expert w1/w3/w2,
    which transformers fuses into one 3-D tensor, are no module's rename and keep their names."""
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 16,
           "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "vocab_size": 32, "num_local_experts": 2, "num_experts_per_tok": 1}
    keys = ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "model.layers.0.block_sparse_moe.experts.1.w2.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert transformers5.memory_names(keys, cfg) == {keys[0]: "model.layers.0.mlp.gate.weight"}
