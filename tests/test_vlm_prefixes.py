"""A text-only fine-tune of a VLM's language model merges into the VLM (and the reverse): the
language tower's prefix is detected, the vision tower and projector are kept from the base, and
transformers loads the result (issue 15)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from test_run import load_dir


def _configs():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tc = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4)
    return tc, LlavaConfig(vision_config=vc, text_config=tc, image_token_index=63)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("vlm")
    tc, cfg = _configs()
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(root / "vlm")
    (root / "vlm" / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    sd = load_file(str(root / "vlm" / "model.safetensors"))
    lm = LlamaForCausalLM(tc)
    lm.save_pretrained(root / "text")
    gen = torch.Generator().manual_seed(1)
    text = {}
    for k in load_file(str(root / "text" / "model.safetensors")):
        src = "language_model." + k  # the on-disk LLaVA layout: language_model.model.*, language_model.lm_head.*
        text[k] = sd[src] + 0.05 * torch.randn(sd[src].shape, generator=gen)
    save_file(text, str(root / "text" / "model.safetensors"), metadata={"format": "pt"})
    return root, sd, text


def _recipe(tmp_path, base, model):
    return write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}\n"
                                             f"models:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")


def test_text_fine_tune_into_a_vlm_keeps_the_vision_tower_and_loads(cli, tmp_path, vlm):
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    root, sd, text = vlm
    r = _recipe(tmp_path, root / "vlm", root / "text")
    code, out, err = cli("run", r, "--dry-run", "--out", tmp_path / "out")
    assert code == 0 and "'model.*' read as 'language_model.model.*'" in err + out, err + out
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    got = load_dir(tmp_path / "out")
    assert set(got) == set(sd)
    for k, v in sd.items():
        want = text[k.removeprefix("language_model.")] if k.startswith("language_model.") else v
        assert torch.allclose(got[k], want, atol=1e-6), k
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ref = LlamaForCausalLM.from_pretrained(root / "text").eval()
    ids = torch.tensor([[1, 7, 2, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref(ids).logits, atol=1e-5)


def test_vlm_fine_tune_into_a_text_base_and_an_explicit_prefix_map(cli, tmp_path, vlm):
    root, sd, text = vlm
    code, out, err = cli("run", _recipe(tmp_path, root / "text", root / "vlm"), "--out", tmp_path / "out")
    assert code == 0, err
    assert "27 not in base left out" in err and "multi_modal_projector" in err
    got = load_dir(tmp_path / "out")
    assert set(got) == set(text)
    assert torch.allclose(got["lm_head.weight"], sd["language_model.lm_head.weight"], atol=1e-6)
    # prefix_map: {} turns detection off: the mismatch is then the usual one-line error
    r = write_recipe(tmp_path / "r2.yaml", (tmp_path / "r.yaml").read_text() + "prefix_map: {}\n")
    code, out, err = cli("run", r, "--out", tmp_path / "out2")
    assert code == 2 and "missing from" in err and not (tmp_path / "out2").exists()
