"""Tied heads stored inconsistently (issue 15): a tied base that stores lm_head with fine-tunes that
do not, with and without `exclude: lm_head`. Whatever is written, config.json must agree with it,
so transformers computes the merge the files hold."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe

from mergekit_ortho.testing.hf_models import load_causal_lm

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tied_llama(path, sd=None, store_head=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    f = path / "model.safetensors"
    tensors = load_file(str(f)) if sd is None else dict(sd)
    tensors.pop(HEAD, None)
    if store_head:
        tensors[HEAD] = tensors[EMBED].clone()
    save_file(tensors, str(f), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = _tied_llama(root / "base", store_head=True)
    sd = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    _tied_llama(root / "ft", ft)
    return root, sd, ft


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[3, 1, 4, 1, 5, 9]])).logits


def _expected(root, tensors):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(root / "ft")
    cfg.tie_word_embeddings = False
    m = LlamaForCausalLM(cfg).eval()
    missing = m.load_state_dict(tensors, strict=False).missing_keys
    assert not missing, missing
    return m


@pytest.mark.parametrize("exclude", [False, True])
def test_tied_base_storing_its_head_with_tied_fine_tunes_that_do_not(cli, tmp_path, tied, exclude):
    root, base, ft = tied
    text = (f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
            f"  - model: {root / 'ft'}\n    parameters: {{weight: 1.0}}\n")
    if exclude:
        text += "exclude: ['lm_head']\n"
    code, out, err = cli("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # a head is written that need not equal the embeddings
    want = {k: v.clone() for k, v in ft.items()}
    want[HEAD] = base[HEAD] if exclude else ft[EMBED]  # the fine-tune's head is its embeddings
    got = load_causal_lm(tmp_path / "out")
    assert torch.allclose(_logits(got), _logits(_expected(root, want)), atol=1e-5)
