"""Adapters built on the fly: PEFT adapters written directly or through peft itself (random
non-zero factors), and kohya-style files over fake SD-like bases."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_peft_adapter(out: Path, shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int,
                       alpha: float, seed: int, base_name: str | None = None) -> None:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) with random non-zero
    factors for every 2-D weight whose name ends with one of ``targets``; written directly."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        mod = name[: -len(".weight")]
        if len(shape) != 2 or not mod.endswith(targets):
            continue
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
        tensors[f"base_model.model.{mod}.lora_B.weight"] = 0.02 * torch.randn(shape[0], rank, generator=gen)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": rank,
           "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": False, "fan_in_fan_out": False,
           "bias": "none", "lora_dropout": 0.0}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def make_peft_adapter(model, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    """Wrap ``model`` with a LoRA (random, non-zero factors: init_lora_weights=False) and save it."""
    from peft import LoraConfig, get_peft_model

    safe = lora_kwargs.pop("safe", True)
    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    pm.save_pretrained(out, safe_serialization=safe)
    return out


def peft_merged_deltas(model, adapter: Path) -> dict[str, torch.Tensor]:
    """{base key: merged - base} from PEFT's own merge_and_unload (the reference)."""
    from peft import PeftModel

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    after = merged.state_dict()
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


# ----------------------------------------------------------------------------------------------
# kohya-style files over fake SD-like bases

SD15_BASE = {  # diffusers-layout UNet (bare keys) + "text_encoder." CLIP-L; small widths, real names
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (16, 768),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (16, 16),
    "down_blocks.0.attentions.0.proj_in.weight": (16, 8, 1, 1),
    "down_blocks.0.resnets.0.conv1.weight": (8, 4, 3, 3),
    "down_blocks.0.resnets.0.conv1.bias": (8,),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": (24, 768),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": (40, 24),
}
SD15_KOHYA = {  # module -> base key
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight",
}

SDXL_BASE = {  # SGM single-file UNet + CLIP-L under conditioner, CLIP-G in diffusers naming
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (20, 2048),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (20, 12),
    "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": (12, 6, 3, 3),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (24, 24),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight": (32, 32),
    "model.diffusion_model.out.0.weight": (12,),
}
SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_input_blocks_4_1_proj_in": "model.diffusion_model.input_blocks.4.1.proj_in.weight",
    "lora_unet_input_blocks_4_0_in_layers_2": "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj":
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight",
}




def kohya_tensors(module_to_key: dict[str, str], base_shapes: dict[str, tuple], rank: int = 4,
                  alphas: dict[str, float] | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.float32, linear_4d: bool = False) -> dict[str, torch.Tensor]:
    """kohya tensors for the given modules: down [r, in(, kh, kw)], up [out, r(, 1, 1)], optional alpha.

    ``alphas``: module -> alpha (modules not listed get no .alpha tensor). ``linear_4d`` stores linear
    LoRAs as [r, in, 1, 1] / [out, r, 1, 1] like some trainers do."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for mod, key in module_to_key.items():
        shp = base_shapes[key]
        if len(shp) == 4:
            down = torch.randn(rank, *shp[1:], generator=g)
            up = torch.randn(shp[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, shp[1], generator=g)
            up = torch.randn(shp[0], rank, generator=g)
            if linear_4d:
                down, up = down[:, :, None, None], up[:, :, None, None]
        out[f"{mod}.lora_down.weight"] = (down * 0.1).to(dtype)
        out[f"{mod}.lora_up.weight"] = (up * 0.1).to(dtype)
        if alphas and mod in alphas:
            out[f"{mod}.alpha"] = torch.tensor(alphas[mod], dtype=dtype)
    return out


def write_peft_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
