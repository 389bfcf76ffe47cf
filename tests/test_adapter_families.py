"""The base-dependent families (dora.py, orthogonal.py, orthogonal_lycoris.py, ia3.py) as inputs of
`merge run`: detected, the base passed, merged with a plain LoRA. References: peft's own
merge_and_unload for PEFT files, the spec's goldens (adapters.md P14, P15, P18) for LyCORIS files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ortho.testing.checkpoints import write_safetensors
from mergekit_ortho.testing.goldens import base, base_bias, g, tensor

peft = pytest.importorskip("peft")

from test_adapter_peft import Tiny  # noqa: E402  (the same tiny Linear/Conv/head model)


def _recipe(path: Path, models, base_file: Path) -> Path:
    import yaml

    doc = {"merge_method": "task_arithmetic", "base_model": str(base_file),
           "models": [{"model": str(p), "name": n, "parameters": {"weight": w}} for n, p, w in models]}
    path.write_text(yaml.safe_dump(doc))
    return path


def _out(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _peft_adapter(tmp_path: Path, name: str, config, base_file: Path):
    torch.manual_seed(0)
    model = Tiny()
    model.load_state_dict(load_file(str(base_file)))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, config)
    torch.manual_seed(5)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            p.data += 0.1 * torch.randn_like(p)
    pm.save_pretrained(tmp_path / name)
    merged = pm.merge_and_unload().state_dict()
    return tmp_path / name, {k: merged[k] - before[k] for k in before}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    torch.manual_seed(0)
    base_file = write_safetensors(root / "base.safetensors", {k: v.detach().clone() for k, v in Tiny().state_dict().items()})
    lora, lora_d = _peft_adapter(root, "lora", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "head"],
                                                                init_lora_weights=False), base_file)
    return {"root": root, "base": base_file, "lora": lora, "lora_d": lora_d}


@pytest.mark.parametrize("name,config", [
    ("dora", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "conv"], use_dora=True,
                                     init_lora_weights=False)),
    ("ia3", lambda: peft.IA3Config(target_modules=["lin", "conv"], feedforward_modules=["conv"],
                                   init_ia3_weights=False)),
    ("oft", lambda: peft.OFTConfig(oft_block_size=2, r=0, target_modules=["lin"], init_weights=False)),
    ("boft", lambda: peft.BOFTConfig(boft_block_size=2, target_modules=["lin"], init_weights=False)),
    ("hra", lambda: peft.HRAConfig(r=2, target_modules=["lin", "conv"], init_weights=False)),
])
def test_peft_family_merges_with_a_lora(setup, tmp_path, cli, name, config):
    adapter, want = _peft_adapter(tmp_path, name, config(), setup["base"])
    r = _recipe(tmp_path / "r.yaml", [(name, adapter, 0.5), ("lora", setup["lora"], 1.0)], setup["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    got = _out(tmp_path / "out")
    b = load_file(str(setup["base"]))
    for k in b:
        torch.testing.assert_close(got[k], b[k] + 0.5 * want[k] + setup["lora_d"][k], rtol=1e-5, atol=1e-6, msg=k)
    code, out, err = cli("inspect", adapter)
    assert code == 0 and "needs the base model" in out


def _golden_base(root: Path) -> Path:
    t = {"lin.weight": base("lin"), "lin.bias": base_bias("lin"), "conv.weight": base("conv"),
         "conv.bias": base_bias("conv")}
    return write_safetensors(root / "gbase.safetensors", {k: v.float() for k, v in t.items()})


@pytest.mark.parametrize("name,tensors,total", [
    ("dora_scale", {"lora_unet_lin.lora_down.weight": tensor("lora_down", (2, 6)),
                    "lora_unet_lin.lora_up.weight": tensor("lora_up", (8, 2)), "lora_unet_lin.alpha": torch.tensor(4.0),
                    "lora_unet_lin.dora_scale": 1 + 0.1 * torch.arange(8, dtype=torch.float64).reshape(8, 1)},
     0.7158357711),
    ("diag_oft", {"lora_unet_lin.oft_blocks": g((4, 2, 2), 0.43, 0.3, 0.2), "lora_unet_lin.alpha": torch.tensor(0.0)},
     -0.6211146638),
    ("ia3", {"lora_unet_lin.weight": g((8,), 0.3, 0.1, 0.5), "lora_unet_lin.on_input": torch.tensor(0)},
     -0.3371944743),
])
def test_lycoris_family_goldens_through_merge_run(tmp_path, cli, name, tensors, total):
    base_file = _golden_base(tmp_path)
    f = write_safetensors(tmp_path / f"{name}.safetensors",
                          {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()})
    r = _recipe(tmp_path / "r.yaml", [(name, f, 1.0)], base_file)
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    got = _out(tmp_path / "out")
    d = got["lin.weight"].double() - base("lin").float().double()
    assert float(d.sum()) == pytest.approx(total, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got["conv.weight"], base("conv").float())


def test_base_dependent_types_need_a_base(setup, tmp_path, cli):
    adapter, _ = _peft_adapter(tmp_path, "hra", peft.HRAConfig(r=2, target_modules=["lin"], init_weights=False),
                               setup["base"])
    import yaml

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "models": [
        {"model": str(adapter), "parameters": {"weight": 1.0}}, {"model": str(setup["lora"]), "parameters": {"weight": 1.0}}]}))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "base_model" in out + err and not (tmp_path / "out").exists()
