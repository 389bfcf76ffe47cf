"""Tiny random transformers models (Llama, GPT-2) and a conv net, saved offline from a config:
the bases real PEFT adapters are built on."""
from __future__ import annotations

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
