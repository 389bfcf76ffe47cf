"""Shared set-up of the transformers-5 naming tests: a tiny random ViT (transformers 5 renames its
modules at load time) with two PEFT LoRAs, one saved under the in-memory names (as peft on
transformers 5 saves it) and one rewritten to the transformers 4 checkpoint names."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

V4 = (("vit.layers.", "vit.encoder.layer."), (".attention.q_proj", ".attention.attention.query"),
      (".attention.v_proj", ".attention.attention.value"))


def to_v4(key: str) -> str:
    for a, b in V4:
        key = key.replace(a, b)
    return key


def vit_with_two_namings(root: Path, layers: int, rank_b: int) -> dict:
    """``root/base`` (checkpoint names), adapter ``a`` (in-memory names, r 2, alpha 4) and ``b``
    (checkpoint names, from ``b5``: r ``rank_b``, alpha 3); ``load()`` gives the base model."""
    import transformers
    from transformers import AutoModelForImageClassification

    from mergekit_ortho.testing.loras import make_peft_adapter

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                 intermediate_size=24, image_size=8, patch_size=4, num_labels=3)
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(root / "base")

    def load():
        return AutoModelForImageClassification.from_pretrained(root / "base", dtype=torch.float32).eval()

    a = make_peft_adapter(load(), root / "a", seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    b5 = make_peft_adapter(load(), root / "b5", seed=2, r=rank_b, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    (root / "b").mkdir()  # the second adapter as peft under transformers 4 names it
    save_file({to_v4(k): v for k, v in load_file(str(b5 / "adapter_model.safetensors")).items()},
              str(root / "b" / "adapter_model.safetensors"))
    c = json.loads((b5 / "adapter_config.json").read_text())
    c["target_modules"] = ["query", "value"]
    (root / "b" / "adapter_config.json").write_text(json.dumps(c))
    return {"load": load, "a": a, "b5": b5, "b": root / "b"}


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """{base weight name: alpha / r * B @ A} of a PEFT LoRA directory."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    return {k[len("base_model.model."):].replace(".lora_A.weight", ".weight"):
            cfg["lora_alpha"] / cfg["r"] * sd[k.replace(".lora_A.", ".lora_B.")] @ A
            for k, A in sd.items() if ".lora_A." in k}
