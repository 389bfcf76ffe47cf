"""Block weights and te/unet strengths on full checkpoints (spec adapters.md P20 applied to a
fine-tune's difference from its base): tiny diffusers UNets in diffusers and LDM/SGM single-file
naming, each tensor's delta scaled by its block's weight, unlisted blocks at ``lbw_unlisted``, the
tensors in no block (time embedding, conv_out, the VAE) untouched; the output loads in diffusers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ortho.adapters import naming
from mergekit_ortho.adapters.strengths import ScaledDelta
from mergekit_ortho.testing.checkpoints import write_safetensors

diffusers = pytest.importorskip("diffusers")

SD1 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=12,
           attention_head_dim=2, norm_num_groups=4)
SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
            attention_head_dim=2, norm_num_groups=4, transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=20)

# hand-picked tensors of the tiny SD1 UNet and their block (spec P20: IN = input_blocks in LDM numbering)
SD1_GOLDEN = {
    "conv_in.weight": "IN00",
    "down_blocks.0.attentions.0.proj_in.weight": "IN01",
    "down_blocks.0.resnets.1.conv1.weight": "IN02",
    "down_blocks.0.downsamplers.0.conv.weight": "IN03",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight": "IN08",
    "down_blocks.3.resnets.1.conv2.bias": "IN11",
    "mid_block.attentions.0.proj_in.weight": "M00",
    "mid_block.resnets.1.conv1.weight": "M00",
    "up_blocks.0.resnets.2.conv1.weight": "OUT02",
    "up_blocks.0.upsamplers.0.conv.weight": "OUT02",
    "up_blocks.1.attentions.0.proj_in.weight": "OUT03",
    "up_blocks.3.attentions.2.proj_out.weight": "OUT11",
    "time_embedding.linear_1.weight": None,
    "conv_norm_out.weight": None,
    "conv_out.weight": None,
}
BLOCKS26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
BLOCKS17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))]
BLOCKS12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))]


def spec_block(key: str) -> str | None:
    """The P20 rule on diffusers names with 2 resnets per level (what SD1 and SDXL have)."""
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.", key):
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.", key):
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    if key.startswith("mid_block."):
        return "M00"
    return "IN00" if key.startswith("conv_in.") else None


def _pair(config: dict, seed: int) -> tuple[dict, dict]:
    """(base, fine-tune) state dicts of a tiny UNet: the fine-tune moves every tensor."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config)
    base = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, tuned


def _recipe(path: Path, base: Path, tuned: Path, params: dict, method: str = "task_arithmetic",
            top: dict | None = None) -> Path:
    doc = {"merge_method": method, "base_model": str(base), "models": [{"model": str(tuned), "parameters": params}],
           "output": {"format": "full"}}
    if top:
        doc["parameters"] = top
    path.write_text(yaml.safe_dump(doc))
    return path


def _merged(out: Path) -> dict[str, torch.Tensor]:
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_lbw")
    base, tuned = _pair(SD1, 0)
    assert all(spec_block(k) == b for k, b in SD1_GOLDEN.items())
    return {"base": write_safetensors(root / "base.safetensors", base),
            "tuned": write_safetensors(root / "tuned.safetensors", tuned), "b": base, "t": tuned}


def test_the_26_vector_scales_each_blocks_delta_diffusers_naming(sd1, tmp_path, cli):
    vec = [round(0.1 * (i + 1), 2) for i in range(26)]  # every block its own weight
    w = dict(zip(BLOCKS26, vec))
    r = _recipe(tmp_path / "r.yaml", sd1["base"], sd1["tuned"], {"weight": 1.0, "block_weights": vec,
                                                                   "unet_weight": 2.0})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 0, out + err
    got, b, t = _merged(tmp_path / "m"), sd1["b"], sd1["t"]
    assert set(got) == set(b)
    seen = set()
    for k in b:
        blk = spec_block(k)
        s = 2.0 * (1.0 if blk is None else w[blk])  # no block (time embedding, conv_out): block weight 1
        seen.add(blk)
        torch.testing.assert_close(got[k] - b[k], s * (t[k] - b[k]), rtol=1e-5, atol=2e-7, msg=k)
    assert seen == set(BLOCKS26[1:]) | {None}  # the tiny SD1 UNet has every one of the 25 UNet blocks
    assert "block weights (SD1/SD2) over" in out + err and "tensors in 25 blocks" in out + err


def test_a_17_vector_leaves_unlisted_blocks_at_lbw_unlisted(sd1, tmp_path, cli):
    vec = [1, 0, 0.5, 2, 0, 1.5, 0.25, 3, 0, 1, 0.5, 2, 0.75, 1.25, 0, 4, 0.1]
    w = dict(zip(BLOCKS17, vec))
    for unlisted in (0.0, 0.3):
        r = _recipe(tmp_path / f"r{unlisted}.yaml", sd1["base"], sd1["tuned"],
                    {"weight": 1.0, "block_weights": vec, "lbw_unlisted": unlisted})
        out_dir = tmp_path / f"m{unlisted}"
        code, out, err = cli("run", r, "--out", out_dir)
        assert code == 0, out + err
        got, b, t = _merged(out_dir), sd1["b"], sd1["t"]
        for k in b:
            blk = spec_block(k)
            s = 1.0 if blk is None else w.get(blk, unlisted)  # IN00/03/06/09/10/11, OUT00-02: unlisted
            if s == 0.0:
                torch.testing.assert_close(got[k], b[k], rtol=0, atol=1e-7, msg=k)
            else:
                torch.testing.assert_close(got[k] - b[k], s * (t[k] - b[k]), rtol=1e-5, atol=2e-7, msg=k)
    # the output loads into diffusers' own UNet and runs as the hand-scaled fine-tune does
    want = {k: b[k] + (1.0 if spec_block(k) is None else w.get(spec_block(k), 0.3)) * (t[k] - b[k]) for k in b}
    outs = []
    for sd in (got, want):
        unet = diffusers.UNet2DConditionModel(**SD1)
        unet.load_state_dict(sd, strict=True)
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            outs.append(unet(torch.randn(1, 4, 8, 8, generator=g), 5, torch.randn(1, 3, 12, generator=g)).sample)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def _ldm(sd: dict, config: dict) -> dict:
    """A diffusers UNet state dict in SGM single-file names (checked below against diffusers' converter)."""
    shape = naming.unet_shape_diffusers([k.rsplit(".", 1)[0] for k in sd])
    out = {}
    for k, v in sd.items():
        mod, p = k.rsplit(".", 1)
        out[f"model.diffusion_model.{naming.diffusers_to_ldm(mod, shape)}.{p}"] = v
    return out


EXTRA = {  # an SDXL single file's other parts: CLIP-L, OpenCLIP-G (fused in_proj), the VAE
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (16, 8),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
    "first_stage_model.encoder.mid.block_1.conv1.weight": (4, 4, 3, 3),
    "first_stage_model.decoder.up.0.block.0.conv1.weight": (4, 4, 3, 3),
}


def test_sdxl_single_file_12_vector_te1_te2_and_the_vae(tmp_path, cli):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    b_d, t_d = _pair(SDXL, 7)
    g = torch.Generator().manual_seed(9)
    b, t = _ldm(b_d, SDXL), _ldm(t_d, SDXL)
    for k, s in EXTRA.items():
        b[k] = torch.randn(s, generator=g)
        t[k] = b[k] + 0.05 * torch.randn(s, generator=g)
    bp, tp = write_safetensors(tmp_path / "b.safetensors", b), write_safetensors(tmp_path / "t.safetensors", t)
    vec = [0.5, 1, 0, 2, 0.25, 3, 0.75, 1.5, 0, 4, 0.1, 0.2]  # BASE IN04 IN05 IN07 IN08 M00 OUT00-OUT05
    w = dict(zip(BLOCKS12, vec))
    # the model's te1_weight beats its te_weight; its te_weight beats the top-level te2_weight
    r = _recipe(tmp_path / "r.yaml", bp, tp, {"weight": 1.0, "block_weights": vec, "lbw_unlisted": 0.6,
                                              "te_weight": 3.0, "te1_weight": 0.5}, top={"te2_weight": 0.0})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 0, out + err
    got = _merged(tmp_path / "m")
    te1, te2, *vae = EXTRA
    torch.testing.assert_close(got[te1] - b[te1], 0.5 * 0.5 * (t[te1] - b[te1]), rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(got[te2] - b[te2], 3.0 * 0.5 * (t[te2] - b[te2]), rtol=1e-5, atol=2e-7)
    for k in vae:  # the VAE is in no block and no part
        torch.testing.assert_close(got[k] - b[k], t[k] - b[k], rtol=1e-5, atol=2e-7)
    # the UNet through diffusers' own LDM converter: the names are diffusers', the blocks the spec's
    unet_keys = {k: v for k, v in got.items() if k.startswith("model.diffusion_model.")}
    conv = convert_ldm_unet_checkpoint(unet_keys, SDXL)
    assert set(conv) == set(b_d)
    for k in b_d:
        blk = spec_block(k)
        s = 1.0 if blk is None else w.get(blk, 0.6)  # IN00-IN03, IN06, OUT06-OUT08: unlisted
        torch.testing.assert_close(conv[k] - b_d[k], s * (t_d[k] - b_d[k]), rtol=1e-5, atol=3e-7, msg=k)
    unet = diffusers.UNet2DConditionModel(**SDXL)
    unet.load_state_dict(conv, strict=True)
    assert "block weights (SDXL)" in out + err


def test_scaled_delta_is_the_base_at_0_and_the_finetune_at_1_bit_for_bit():
    class Src:
        def __init__(self, d):
            self.d, self.infos = d, {}

        def get(self, k):
            return self.d[k].clone()

    g = torch.Generator().manual_seed(0)
    b = {k: torch.randn(5, 7, generator=g) for k in "abc"}
    t = {k: v + torch.randn(5, 7, generator=g) for k, v in b.items()}
    s = ScaledDelta(Src(t), Src(b), {"a": 0.0, "b": 1.0})
    assert torch.equal(s.get("a"), b["a"]) and torch.equal(s.get("b"), t["b"]) and torch.equal(s.get("c"), t["c"])
    s = ScaledDelta(Src({"a": t["a"].half()}), Src({"a": b["a"].bfloat16()}), {"a": 0.5})
    assert s.get("a").dtype == torch.float32  # computed in float32, whatever the stored dtypes
    torch.testing.assert_close(s.get("a"), b["a"].bfloat16().float() + 0.5 * (t["a"].half().float()
                                                                              - b["a"].bfloat16().float()))


@pytest.mark.parametrize("params,msg", [
    ({"block_weights": [1] * 12}, "has 12 entries, but the checkpoint is SD1/SD2, which takes 17/26"),
    ({"block_weights": "FLUXALL"}, "preset FLUXALL has 61 entries"),
    ({"te2_weight": "lots"}, "must be a number"),
])
def test_bad_full_checkpoint_strengths_exit_2_one_line_no_output(sd1, tmp_path, cli, params, msg):
    r = _recipe(tmp_path / "r.yaml", sd1["base"], sd1["tuned"], {"weight": 1.0, **params})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    text = (out + err).strip()
    assert code == 2 and msg in text, text
    assert "Traceback" not in text and len(text.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_block_weights_on_a_model_in_no_sd_block_are_refused(tmp_path, cli):
    g = torch.Generator().manual_seed(0)
    b = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4, generator=g)}
    t = {k: v + 1 for k, v in b.items()}
    r = _recipe(tmp_path / "r.yaml", write_safetensors(tmp_path / "b.safetensors", b),
                write_safetensors(tmp_path / "t.safetensors", t), {"weight": 1.0, "block_weights": "ALL"})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 2 and "none of its 1 tensors is in a Stable Diffusion or Flux block" in out + err, out + err
    assert not (tmp_path / "m").exists()


def test_flux_bfl_checkpoint_61_vector(tmp_path, cli):
    flux = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
    keys = {"double_blocks.0.img_attn.qkv.weight": "D00", "double_blocks.18.txt_mlp.0.weight": "D18",
            "single_blocks.1.linear1.weight": "S01", "single_blocks.37.linear2.bias": "S37",
            "img_in.weight": "IN", "time_in.in_layer.weight": "IN", "final_layer.linear.weight": "OUT"}
    g = torch.Generator().manual_seed(2)
    b = {k: torch.randn(6, 4, generator=g) for k in keys}
    t = {k: v + torch.randn(6, 4, generator=g) for k, v in b.items()}
    vec = [round(0.05 * (i + 1), 2) for i in range(61)]
    w = dict(zip(flux, vec))
    r = _recipe(tmp_path / "r.yaml", write_safetensors(tmp_path / "b.safetensors", b),
                write_safetensors(tmp_path / "t.safetensors", t), {"weight": 1.0, "block_weights": vec})
    code, out, err = cli("run", r, "--out", tmp_path / "m")
    assert code == 0, out + err
    got = _merged(tmp_path / "m")
    for k, blk in keys.items():
        torch.testing.assert_close(got[k] - b[k], w[blk] * (t[k] - b[k]), rtol=1e-5, atol=1e-6, msg=k)
    assert "block weights (Flux)" in out + err
