"""LoRA Block Weight and te/unet strengths (spec adapters.md P20): the block function on the spec's
golden keys, the presets, the family check, and `merge run` scaling each module by its block."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ortho.adapters import blocks
from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora
from mergekit_ortho.adapters.strengths import ScaledLora
from mergekit_ortho.testing.checkpoints import random_base, write_safetensors
from mergekit_ortho.testing.loras import kohya_tensors

# spec P20 golden example (sd-scripts get_lbw_block_index), SD1 kohya names
SD1_GOLDEN = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
    "lora_unet_down_blocks_0_resnets_1_conv1": "IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_3_resnets_1_conv2": "IN11",
    "lora_unet_mid_block_attentions_0_proj_out": "M00",
    "lora_unet_up_blocks_0_resnets_0_conv1": "OUT00",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_attentions_0_proj_in": "OUT03",
    "lora_unet_up_blocks_3_attentions_2_proj_out": "OUT11",
}
SDXL_GOLDEN = {
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": "BASE",
    "lora_te2_text_model_encoder_layers_3_mlp_fc1": "BASE",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "IN04",
    "lora_unet_input_blocks_8_0_in_layers_2": "IN08",
    "lora_unet_middle_block_1_proj_in": "M00",
    "lora_unet_output_blocks_0_1_proj_out": "OUT00",
    "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
}


@pytest.mark.parametrize("family,golden", [("sd1", SD1_GOLDEN), ("sdxl", SDXL_GOLDEN)])
def test_block_of_matches_the_spec_golden_keys(family, golden):
    for key, want in golden.items():
        assert blocks.block_of(key, family) == want, key
    assert blocks.families_of(golden) == {family}


def test_block_of_reads_base_keys_in_ldm_and_diffusers_naming_alike():
    # the same module in three namings: LDM single file, diffusers base key, kohya module
    for k in ("model.diffusion_model.input_blocks.7.1.proj_in.weight", "unet.down_blocks.2.attentions.0.proj_in.weight",
              "lora_unet_down_blocks_2_attentions_0_proj_in"):
        assert blocks.block_of(k, "sd1") == "IN07", k
    assert blocks.block_of("model.diffusion_model.output_blocks.2.1.conv.weight", "sd1") == "OUT02"
    assert blocks.block_of("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "sd1") == "BASE"
    assert blocks.block_of("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl") == "BASE"
    # modules in no block keep weight 1 (the extension never picks them)
    for k in ("lora_unet_time_embedding_linear_1", "model.diffusion_model.time_embed.0.weight",
              "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.out.2.weight"):
        assert blocks.block_of(k, "sdxl") is None, k
    assert blocks.block_of("lora_unet_conv_in", "sd1") == "IN00"


def test_flux_blocks():
    cases = {
        "lora_unet_double_blocks_3_img_attn_qkv": "D03",
        "lora_unet_single_blocks_37_linear1": "S37",
        "transformer.transformer_blocks.18.attn.to_q": "D18",
        "transformer.single_transformer_blocks.5.proj_mlp": "S05",
        "transformer.single_transformer_blocks.5.proj_out": "S05",
        "lora_unet_img_in": "IN",
        "transformer.x_embedder": "IN",
        "lora_unet_final_layer_linear": "OUT",
        "transformer.proj_out": "OUT",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": "CLIP",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q": "T5",
    }
    for k, want in cases.items():
        assert blocks.block_of(k, "flux") == want, k
    assert blocks.families_of(cases) == {"flux"}
    assert len(blocks.BLOCKS_FLUX) == 61


def test_lists_and_presets():
    assert [len(x) for x in (blocks.BLOCKS12, blocks.BLOCKS17, blocks.BLOCKS20, blocks.BLOCKS26)] == [12, 17, 20, 26]
    # MIDD: BASE, IN05, IN07, IN08, M00, OUT03-OUT06
    fam, w = blocks.weights_for("MIDD", {"sd1"}, 0.0, "x")
    assert fam == "sd1"
    assert sorted(b for b, v in w.items() if v == 1.0) == sorted(["BASE", "IN05", "IN07", "IN08", "M00", "OUT03",
                                                                   "OUT04", "OUT05", "OUT06"])
    assert len(w) == 26 and w["IN03"] == 0.0  # unlisted in the 17-list: the extension's 0
    _, w1 = blocks.weights_for("midd", {"sd1"}, 1.0, "x")  # case-insensitive; sd-scripts' unlisted = 1
    assert w1["IN03"] == 1.0 and w1["IN04"] == 0.0
    _, w = blocks.weights_for("ALL0.5", {"sdxl"}, 0.0, "x")  # uniform presets fit every family
    assert set(w.values()) == {0.5} and len(w) == 20
    _, w = blocks.weights_for("FLUXALL", {"flux"}, 0.0, "x")
    assert set(w.values()) == {1.0}
    fam, w = blocks.weights_for("1,0,0,0,0,1,0,0,0,0,0,0", {"sd1", "sdxl"}, 0.0, "x")  # 12 entries: SDXL
    assert fam == "sdxl" and w["M00"] == 1.0 and w["IN04"] == 0.0 and w["IN00"] == 0.0
    fam, w = blocks.weights_for([0.25] * 26, {"sd1", "sdxl"}, 0.0, "x")
    assert fam == "sd1" and set(w.values()) == {0.25}


@pytest.mark.parametrize("value,fams,msg", [
    ([1] * 17, {"sdxl"}, "has 17 entries, but the LoRA is SDXL, which takes 12/20"),
    ("MIDD", {"flux"}, "preset MIDD has 17 entries, but the LoRA is Flux"),
    ([1] * 13, {"sd1", "sdxl"}, "has 13 entries"),
    ("1,R,0", {"sd1"}, "R, U and X are not supported"),
    ("NOPE", {"sd1"}, "unknown block-weight preset"),
    ({"a": 1}, {"sd1"}, "preset name, a comma-separated string or a list"),
])
def test_bad_vectors_are_one_line_errors(value, fams, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("/", "/")) as e:
        blocks.weights_for(value, fams, 0.0, "where")
    assert "\n" not in str(e.value)


# ---- end to end ------------------------------------------------------------------------------

SD1_BASE = {  # diffusers-named tiny SD1 UNet + text encoder, one module per block kind
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": (6, 6),
    "unet.down_blocks.0.attentions.0.proj_in.weight": (8, 8),          # IN01
    "unet.down_blocks.0.resnets.1.conv1.weight": (4, 4, 3, 3),          # IN02
    "unet.down_blocks.0.downsamplers.0.conv.weight": (4, 4, 3, 3),      # IN03 (not in the 17-list)
    "unet.down_blocks.1.attentions.1.proj_in.weight": (8, 8),          # IN05
    "unet.mid_block.attentions.0.proj_out.weight": (8, 8),             # M00
    "unet.up_blocks.1.attentions.0.proj_in.weight": (8, 8),            # OUT03
    "unet.up_blocks.3.attentions.2.proj_out.weight": (8, 8),           # OUT11
    "unet.time_embedding.linear_1.weight": (8, 4),                     # no block
}
SD1_BLOCK = {"text_encoder": "BASE", "down_blocks.0.attentions": "IN01", "down_blocks.0.resnets": "IN02",
             "downsamplers": "IN03", "down_blocks.1": "IN05", "mid_block": "M00", "up_blocks.1": "OUT03",
             "up_blocks.3": "OUT11", "time_embedding": None}


def _module(key: str) -> str:
    k = key.removesuffix(".weight")
    if k.startswith("text_encoder."):
        return "lora_te_" + k[len("text_encoder."):].replace(".", "_")
    return "lora_unet_" + k[len("unet."):].replace(".", "_")


def _block(key: str) -> str | None:
    return next(b for part, b in SD1_BLOCK.items() if part in key)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("lbw")
    base = write_safetensors(root / "sd1.safetensors", random_base(SD1_BASE))
    mods = {_module(k): k for k in SD1_BASE}
    lora = write_safetensors(root / "lora.safetensors", kohya_tensors(mods, SD1_BASE, rank=2, seed=5,
                                                                      alphas={m: 1.0 for m in mods}),
                             metadata={"ss_base_model_version": "sd_v1"})
    other = write_safetensors(root / "other.safetensors", kohya_tensors(mods, SD1_BASE, rank=3, seed=6))
    b = load_file(str(base))
    deltas = {}
    for name, path in (("lora", lora), ("other", other)):
        src = LoraSource(path)
        src = MatchedLora(src, match_to_base(src, list(b), {k: v.shape for k, v in b.items()}))
        assert set(src.by_base) == set(SD1_BASE)
        deltas[name] = {k: src.delta_for(k, b[k].shape) for k in src.by_base}
    return {"root": root, "base": base, "lora": lora, "other": other, "deltas": deltas}


def _recipe(path: Path, models, base=None, method="task_arithmetic", params=None, output=None) -> Path:
    doc = {"merge_method": method,
           "models": [{"model": str(p), "parameters": mp} for p, mp in models]}
    if base:
        doc["base_model"] = str(base)
    if params:
        doc["parameters"] = params
    if output:
        doc["output"] = output
    path.write_text(yaml.safe_dump(doc))
    return path


def test_block_weights_scale_each_module_by_its_block_full_output(sd1, tmp_path, cli):
    vec = [0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]  # 17-list: BASE IN01 IN02 IN04 IN05 ...
    want = {"BASE": 0.5, "IN01": 1, "IN02": 2, "IN03": 0.0, "IN05": 4, "M00": 7, "OUT03": 8, "OUT11": 16, None: 1}
    r = _recipe(tmp_path / "r.yaml", [(sd1["lora"], {"weight": 1.0, "block_weights": vec, "te_weight": 2.0,
                                                     "unet_weight": 0.5})], base=sd1["base"],
                output={"format": "full"})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 0, out + err
    got = load_file(str(next((tmp_path / "m").glob("*.safetensors"))))
    b = load_file(str(sd1["base"]))
    for k, d in sd1["deltas"]["lora"].items():
        blk = _block(k)
        part = 2.0 if blk == "BASE" else 0.5
        torch.testing.assert_close(got[k], b[k] + part * want[blk] * d, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["unet.down_blocks.0.downsamplers.0.conv.weight"] - b[
        "unet.down_blocks.0.downsamplers.0.conv.weight"], sd1["deltas"]["lora"]["unet.down_blocks.0.downsamplers.0.conv.weight"])
    assert "block weights (SD1/SD2)" in out + err


def test_preset_and_te_unet_split_into_a_lora_output(sd1, tmp_path, cli):
    # no base: a kohya output; the second model is untouched by the first one's strengths
    r = _recipe(tmp_path / "r.yaml", [(sd1["lora"], {"weight": 1.0, "block_weights": "OUTALL", "lbw_unlisted": 1}),
                                      (sd1["other"], {"weight": 1.0, "te_weight": 0.0, "unet_weight": 3.0})])
    code, out, err = cli("run", r, "--out", tmp_path / "o.safetensors")
    assert code == 0, out + err
    b = load_file(str(sd1["base"]))
    src = LoraSource(tmp_path / "o.safetensors")
    src = MatchedLora(src, match_to_base(src, list(b), {k: v.shape for k, v in b.items()}))
    outall = {"BASE": 1, "IN01": 0, "IN02": 0, "IN03": 1, "IN05": 0, "M00": 0, "OUT03": 1, "OUT11": 1, None: 1}
    for k in SD1_BASE:
        blk = _block(k)
        want = outall[blk] * sd1["deltas"]["lora"][k] + (0.0 if blk == "BASE" else 3.0) * sd1["deltas"]["other"][k]
        torch.testing.assert_close(src.delta_for(k, b[k].shape), want, rtol=1e-5, atol=1e-5)


def test_te_weight_takes_a_filter_setting_like_any_per_item_parameter(sd1, tmp_path, cli):
    tw = [{"filter": "q_proj", "value": 0.25}, {"value": 1.0}]
    r = _recipe(tmp_path / "r.yaml", [(sd1["lora"], {"weight": 1.0})], base=sd1["base"],
                params={"unet_weight": [{"filter": "mid_block", "value": 0.0}], "te_weight": tw},
                output={"format": "full"})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 0, out + err
    got = load_file(str(next((tmp_path / "m").glob("*.safetensors"))))
    b = load_file(str(sd1["base"]))
    d = sd1["deltas"]["lora"]
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"
    mid = "unet.mid_block.attentions.0.proj_out.weight"
    torch.testing.assert_close(got[q], b[q] + 0.25 * d[q], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[mid], b[mid], rtol=0, atol=0)
    k = "unet.up_blocks.1.attentions.0.proj_in.weight"
    torch.testing.assert_close(got[k], b[k] + d[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params,msg", [
    ({"block_weights": [1] * 12}, "has 12 entries, but the LoRA is SD1/SD2, which takes 17/26"),
    ({"block_weights": "FLUXALL"}, "preset FLUXALL has 61 entries"),
    ({"te_weight": "much"}, "must be a number"),
])
def test_bad_strengths_exit_2_with_one_line_and_no_output(sd1, tmp_path, cli, params, msg):
    r = _recipe(tmp_path / "r.yaml", [(sd1["lora"], {"weight": 1.0, **params})], base=sd1["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    text = (out + err).strip()
    assert code == 2, text
    assert msg in text
    assert "Traceback" not in text and len([ln for ln in text.splitlines() if msg in ln]) == 1
    assert not (tmp_path / "m").exists()


def test_strengths_on_a_full_checkpoint_without_base_model_are_refused(sd1, tmp_path, cli):
    # a full checkpoint's strengths scale its difference from base_model (test_block_weights_full.py)
    r = _recipe(tmp_path / "r.yaml", [(sd1["base"], {"weight": 1.0, "block_weights": "ALL"}),
                                      (sd1["base"], {"weight": 1.0})], method="linear")
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 2 and "is a full checkpoint: te_weight, unet_weight and block_weights scale its difference from " \
                         "base_model; add base_model" in out + err, out + err
    assert not (tmp_path / "m").exists()


def test_scaled_lora_sqrt_fold_keeps_the_product_and_the_sign():
    class Fake:
        def factors_for(self, key, fold="B"):
            return torch.ones(2, 3), torch.full((4, 2), 2.0)

        def delta_for(self, key, shape=None, base=None):
            return torch.ones(4, 3)

        def exact_factors_for(self, key):
            return (torch.ones(2, 3), torch.ones(4, 2)) if key == "k" else None

    s = ScaledLora(Fake(), {"k": -4.0})
    A, B = s.factors_for("k", "sqrt")
    torch.testing.assert_close(B @ A, -4.0 * torch.full((4, 3), 4.0))
    A, B = s.factors_for("k")
    torch.testing.assert_close(B @ A, -4.0 * torch.full((4, 3), 4.0))
    torch.testing.assert_close(s.delta_for("other"), torch.ones(4, 3))
    torch.testing.assert_close(s.delta_for("k"), -4.0 * torch.ones(4, 3))
    A, B = s.exact_factors_for("k")  # the exact low-rank forms (LoHa, LoKr, Tucker) are scaled too
    torch.testing.assert_close(B @ A, -4.0 * torch.full((4, 3), 2.0))
    assert s.exact_factors_for("none") is None


def test_strengths_in_a_slices_recipe_are_refused(sd1, tmp_path, cli):
    doc = {"merge_method": "linear", "parameters": {"te_weight": 0.5},
           "slices": [{"sources": [{"model": str(sd1["base"])}]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "m")
    assert code == 2 and "apply to a models: recipe" in out + err
    assert not (tmp_path / "m").exists()
