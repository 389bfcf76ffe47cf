"""Test helpers for LoRA formats: real PEFT adapters on tiny random models, hand-made kohya files.

Everything is built offline in seconds: transformers builds tiny random Llama / GPT-2 models from a
config (no download), peft wraps them with random (non-zero) LoRA factors, and kohya files are
written with safetensors directly over a fake SD-like base state dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def tiny_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def tiny_gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class TinyConvNet(torch.nn.Module):
    """A module with a 3x3 conv, a 1x1 conv and a linear layer, for PEFT conv LoRAs."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.proj = torch.nn.Conv2d(6, 5, 1)
        self.head = torch.nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.proj(torch.relu(self.conv_in(x))).mean((2, 3)))


def tiny_convnet(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in TinyConvNet().state_dict().items()}, str(path / "model.safetensors"))
    return path


def load_convnet(path: Path) -> TinyConvNet:
    m = TinyConvNet()
    m.load_state_dict(load_file(str(path / "model.safetensors")))
    return m.eval()


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


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


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


def random_base(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_peft_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
