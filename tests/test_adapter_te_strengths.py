"""Per-encoder strengths ``te1_weight`` / ``te2_weight`` (spec adapters.md P20, "offer te1/te2
overrides"): SDXL's CLIP-L (``lora_te1_``) and OpenCLIP-G (``lora_te2_``), Flux's CLIP-L and T5
(``lora_te3_``); hand-computed goldens into a zero base, precedence against ``te_weight``, the
setting forms, and a kohya output that diffusers loads into two tiny CLIP text encoders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ortho.adapters import blocks
from mergekit_ortho.testing.checkpoints import write_safetensors

# one module per part, hand-made factors: up·down = [[1, 2], [3, 6]], alpha = rank = 1 (scale 1)
DOWN, UP = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]])
PRODUCT = [[1.0, 2.0], [3.0, 6.0]]
SDXL = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight",
    "lora_unet_input_blocks_4_1_proj_in": "model.diffusion_model.input_blocks.4.1.proj_in.weight",
}
FLUX = {
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
    "lora_unet_double_blocks_0_img_attn_proj": "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
}


def _files(root: Path, mods: dict[str, str]) -> tuple[Path, Path]:
    base = write_safetensors(root / "base.safetensors", {k: torch.zeros(2, 2) for k in mods.values()})
    t = {}
    for m in mods:
        t[f"{m}.lora_down.weight"], t[f"{m}.lora_up.weight"], t[f"{m}.alpha"] = DOWN.clone(), UP.clone(), torch.tensor(1.0)
    return base, write_safetensors(root / "lora.safetensors", t)


def _run(cli, tmp_path, base, lora, params, top=None):
    doc = {"merge_method": "task_arithmetic", "base_model": str(base), "output": {"format": "full"},
           "models": [{"model": str(lora), "parameters": {"weight": 1.0, **params}}]}
    if top:
        doc["parameters"] = top
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "m", "--overwrite")
    assert code == 0, out + err
    got = {}
    for f in (tmp_path / "m").glob("*.safetensors"):
        got.update(load_file(str(f)))
    return got, out + err


def _times(x: float) -> torch.Tensor:
    return torch.tensor([[x * v for v in row] for row in PRODUCT])


def test_encoder_of_on_every_naming():
    for k in ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight",
              "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
              "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        assert blocks.encoder_of(k, "sdxl") == 1, k
    for k in ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight",
              "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"):
        assert blocks.encoder_of(k, "sdxl") == 2, k
    assert blocks.encoder_of("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "flux") == 2
    assert blocks.encoder_of("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.weight", "flux") == 2
    assert blocks.encoder_of("lora_te1_text_model_encoder_layers_0_mlp_fc1", "flux") == 1
    assert blocks.encoder_of("lora_unet_input_blocks_4_1_proj_in", "sdxl") is None


def test_sdxl_te1_te2_golden_numbers(tmp_path, cli):
    base, lora = _files(tmp_path, SDXL)
    # within one level the encoder's own key beats te_weight (3.0 reaches neither encoder)
    got, text = _run(cli, tmp_path, base, lora, {"te_weight": 3.0, "te1_weight": 0.5, "te2_weight": -1.0,
                                                 "unet_weight": 0.25})
    te1, te2, unet = SDXL.values()
    torch.testing.assert_close(got[te1], torch.tensor([[0.5, 1.0], [1.5, 3.0]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(got[te2], torch.tensor([[-1.0, -2.0], [-3.0, -6.0]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(got[unet], torch.tensor([[0.25, 0.5], [0.75, 1.5]]), rtol=0, atol=1e-7)


def test_te2_only_and_precedence_across_levels(tmp_path, cli):
    base, lora = _files(tmp_path, SDXL)
    te1, te2, unet = SDXL.values()
    # te2 only: te1 falls back to te_weight (default 1)
    got, _ = _run(cli, tmp_path, base, lora, {"te2_weight": 0.0})
    torch.testing.assert_close(got[te1], _times(1.0))
    torch.testing.assert_close(got[te2], torch.zeros(2, 2), rtol=0, atol=0)
    torch.testing.assert_close(got[unet], _times(1.0))
    # a nearer level wins: the model's te_weight over the top-level te2_weight; a top-level
    # te1_weight still reaches te1 (the model's level says nothing for it but te_weight)
    got, _ = _run(cli, tmp_path, base, lora, {"te_weight": 2.0}, top={"te2_weight": 0.0})
    torch.testing.assert_close(got[te2], _times(2.0))
    torch.testing.assert_close(got[te1], _times(2.0))


def test_te2_weight_takes_filters_and_block_weights_multiply(tmp_path, cli):
    base, lora = _files(tmp_path, SDXL)
    te1, te2, unet = SDXL.values()
    got, text = _run(cli, tmp_path, base, lora, {
        "te2_weight": [{"filter": "fc1", "value": 0.5}, {"value": 1.0}], "te1_weight": 4.0,
        "block_weights": [0.5, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]})  # SDXL 12-list: BASE 0.5, IN04 2
    torch.testing.assert_close(got[te2], _times(0.5 * 0.5))
    torch.testing.assert_close(got[te1], _times(4.0 * 0.5))
    torch.testing.assert_close(got[unet], _times(2.0))


def test_flux_te2_is_t5(tmp_path, cli):
    base, lora = _files(tmp_path, FLUX)
    clip, t5, dit = FLUX.values()
    got, _ = _run(cli, tmp_path, base, lora, {"te1_weight": 0.5, "te2_weight": 0.0, "unet_weight": 3.0})
    torch.testing.assert_close(got[clip], _times(0.5))
    torch.testing.assert_close(got[t5], torch.zeros(2, 2), rtol=0, atol=0)
    torch.testing.assert_close(got[dit], _times(3.0))


def test_te2_weight_on_a_lora_without_a_second_encoder_is_noted(tmp_path, cli):
    mods = {"lora_te_text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"}
    base, lora = _files(tmp_path, mods)
    got, text = _run(cli, tmp_path, base, lora, {"te2_weight": 0.0, "te1_weight": 2.0})
    torch.testing.assert_close(got[next(iter(mods.values()))], _times(2.0))
    assert "te2_weight is not used: no module of text encoder 2" in text


def test_bad_te1_weight_is_one_line(tmp_path, cli):
    base, lora = _files(tmp_path, SDXL)
    doc = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(lora), "parameters": {"weight": 1.0, "te1_weight": "strong"}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "m")
    text = (out + err).strip()
    assert code == 2 and "te1_weight" in text and "must be a number" in text, text
    assert len(text.splitlines()) == 1 and not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------- diffusers

def _clip(hidden: int, seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, projection_dim=hidden, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def test_kohya_output_with_te1_te2_strengths_loads_in_diffusers(tmp_path, cli):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Loader

    te1, te2 = _clip(8, 0, False), _clip(12, 1, True)
    g = torch.Generator().manual_seed(4)
    t, want = {}, {}
    for prefix, model in (("lora_te1_", te1), ("lora_te2_", te2)):
        for k, v in model.state_dict().items():
            path = k if k.startswith("text_model.") else "text_model." + k  # transformers 5 drops it here
            if v.dim() == 2 and path.startswith("text_model.encoder.") and k.endswith("proj.weight"):
                m = prefix + path.removesuffix(".weight").replace(".", "_")
                down, up = torch.randn(2, v.shape[1], generator=g), 0.1 * torch.randn(v.shape[0], 2, generator=g)
                t[f"{m}.lora_down.weight"], t[f"{m}.lora_up.weight"], t[f"{m}.alpha"] = down, up, torch.tensor(1.0)
                want[(prefix, k)] = 0.5 * (up @ down)  # alpha / rank
    src = write_safetensors(tmp_path / "in.safetensors", t)
    doc = {"merge_method": "linear", "models": [{"model": str(src), "parameters": {
        "weight": 1.0, "te1_weight": 0.25, "te2_weight": [{"filter": "q_proj", "value": 0.0}, {"value": 2.0}]}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "o.safetensors"
    code, so, se = cli("run", tmp_path / "r.yaml", "--out", out)
    assert code == 0, so + se
    state, alphas = Loader.lora_state_dict(str(out))
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for prefix, model, comp in (("lora_te1_", te1, "text_encoder"), ("lora_te2_", te2, "text_encoder_2")):
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        for (p, k), d in want.items():
            if p == prefix:
                s = 0.25 if p == "lora_te1_" else (0.0 if "q_proj" in k else 2.0)
                ref[k] = ref[k] + s * d
        hand = _clip(model.config.hidden_size, 0 if comp == "text_encoder" else 1, comp == "text_encoder_2")
        hand.load_state_dict(ref)
        Loader.load_lora_into_text_encoder(state, alphas, model, prefix=comp, adapter_name="x")
        with torch.no_grad():
            a = model(ids).last_hidden_state if comp == "text_encoder" else model(ids).text_embeds
            b = hand(ids).last_hidden_state if comp == "text_encoder" else hand(ids).text_embeds
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            plain = _clip(model.config.hidden_size, 0 if comp == "text_encoder" else 1, comp == "text_encoder_2")(ids)
        assert float((a - plain[0]).abs().max()) > 1e-3  # the LoRA acts
        assert len([k for k in want if k[0] == prefix]) == 4  # q, k, v, out_proj
