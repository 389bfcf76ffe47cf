"""Key maps for merging into single-file checkpoints (spec adapters.md P10, P19).

The naming rules are checked against diffusers' own single-file converters on the key lists of
tiny models built from configs (no download); the merges end to end against base + the delta
computed by hand from the stored factors.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora
from mergekit_ortho.adapters import naming
from mergekit_ortho.testing.checkpoints import write_safetensors

diffusers = pytest.importorskip("diffusers")


def _gen(shape, a, b, s=0.5):
    """P0's generator g(shape; a, b, s)[k] = s sin(a k^2 + b), float64 then float32."""
    n = 1
    for x in shape:
        n *= x
    k = torch.arange(n, dtype=torch.float64)
    return (s * torch.sin(a * k * k + b)).reshape(shape).to(torch.float32)


def _base(shapes: dict, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def _kohya(mods: dict[str, tuple[int, int, int]], alphas: dict | None = None, seed=0) -> dict:
    """{module: (rows, cols, rank)} -> kohya tensors with non-symmetric factors."""
    t = {}
    for i, (m, (rows, cols, r)) in enumerate(mods.items()):
        t[m + ".lora_down.weight"] = _gen((r, cols), 1.3 + 0.1 * i + seed, 0.5)
        t[m + ".lora_up.weight"] = _gen((rows, r), 0.9 + 0.1 * i + seed, 0.2)
        if alphas and m in alphas:
            t[m + ".alpha"] = torch.tensor(float(alphas[m]))
    return t


def _peft_style(mods: dict[str, tuple[int, int, int]], seed=0) -> dict:
    t = {}
    for i, (m, (rows, cols, r)) in enumerate(mods.items()):
        t[m + ".lora_A.weight"] = _gen((r, cols), 1.3 + 0.1 * i + seed, 0.5)
        t[m + ".lora_B.weight"] = _gen((rows, r), 0.9 + 0.1 * i + seed, 0.2)
    return t


def _d(t: dict, m: str, scale=1.0, peft=False) -> torch.Tensor:
    """A module's delta computed by hand from its stored factors: scale * up @ down."""
    a, b = (".lora_A.weight", ".lora_B.weight") if peft else (".lora_down.weight", ".lora_up.weight")
    down, up = t[m + a].double(), t[m + b].double()
    return scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))


def _matched(lora: Path, base: dict) -> MatchedLora:
    src = LoraSource(lora)
    return MatchedLora(src, match_to_base(src, list(base), {k: tuple(v.shape) for k, v in base.items()}))


def _assert_exact_factors(ml: MatchedLora, base: dict):
    for key in ml.by_base:
        A, B = ml.factors_for(key)
        d = ml.delta_for(key, base[key].shape)
        torch.testing.assert_close((B @ A).reshape(d.shape), d, rtol=1e-6, atol=1e-7)
        As, Bs = ml.factors_for(key, fold="sqrt")
        torch.testing.assert_close((Bs @ As).reshape(d.shape), d, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the UNet rule set against diffusers' own LDM converter

_SD1 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 8, 8),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=12,
            attention_head_dim=2, norm_num_groups=4)
_SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
             attention_head_dim=2, norm_num_groups=4, transformer_layers_per_block=(1, 1, 2),
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
             projection_class_embeddings_input_dim=20)


def _param(key: str) -> tuple[str, str]:
    mod, p = key.rsplit(".", 1)
    return mod, p


@pytest.mark.parametrize("config", [_SD1, _SDXL], ids=["sd1", "sdxl"])
def test_unet_rules_agree_with_diffusers_converter_both_ways(config):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(**config)
    sd = unet.state_dict()
    dpaths = [_param(k)[0] for k in sd]
    shape_d = naming.unet_shape_diffusers(dpaths)
    ldm = {}
    for i, k in enumerate(sd):
        mod, p = _param(k)
        alt = naming.diffusers_to_ldm(mod, shape_d)
        assert alt is not None, k
        ldm["model.diffusion_model." + alt + "." + p] = torch.full(tuple(sd[k].shape), float(i))
    assert len(ldm) == len(sd)  # one LDM name per diffusers tensor
    conv = convert_ldm_unet_checkpoint(dict(ldm), dict(unet.config))
    assert set(conv) == set(sd)
    for i, k in enumerate(sd):
        assert float(conv[k].reshape(-1)[0]) == float(i), k  # diffusers put our tensor i at k
    # and back: LDM -> diffusers with the layout read from the LDM keys alone
    lpaths = [_param(k[len("model.diffusion_model."):])[0] for k in ldm]
    shape_l = naming.unet_shape_ldm(lpaths)
    for k in sd:
        mod, _ = _param(k)
        assert naming.ldm_to_diffusers(naming.diffusers_to_ldm(mod, shape_d), shape_l) == mod


def test_p19_unet_goldens():
    assert (naming.ldm_to_diffusers("input_blocks.4.1.transformer_blocks.0.attn2.to_k")
            == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    assert naming.diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", naming.UNetShape(up_attention=frozenset({1, 2, 3}))) \
        == "output_blocks.2.1.conv"
    assert naming.diffusers_to_ldm("up_blocks.1.upsamplers.0.conv", naming.UNetShape(up_attention=frozenset({0, 1}))) \
        == "output_blocks.5.2.conv"
    assert naming.diffusers_to_ldm("down_blocks.2.downsamplers.0.conv") == "input_blocks.9.0.op"
    assert naming.diffusers_to_ldm("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1"
    assert naming.diffusers_to_ldm("add_embedding.linear_2") == "label_emb.0.2"


# ---------------------------------------------------------------------------------------------
# Flux BFL <-> diffusers against diffusers' own converter

D, MLP, HD = 8, 32, 4


def _bfl_shapes(prefix: str = "", D: int = D, MLP: int = MLP, HD: int = HD) -> dict[str, tuple[int, ...]]:
    """A Flux-dev transformer header in BFL names (one double and one single block)."""
    s: dict[str, tuple[int, ...]] = {}

    def lin(name, rows, cols):
        s[f"{prefix}{name}.weight"] = (rows, cols)
        s[f"{prefix}{name}.bias"] = (rows,)

    for side in ("img", "txt"):
        lin(f"double_blocks.0.{side}_mod.lin", 6 * D, D)
        lin(f"double_blocks.0.{side}_attn.qkv", 3 * D, D)
        lin(f"double_blocks.0.{side}_attn.proj", D, D)
        lin(f"double_blocks.0.{side}_mlp.0", MLP, D)
        lin(f"double_blocks.0.{side}_mlp.2", D, MLP)
        for n in ("query", "key"):
            s[f"{prefix}double_blocks.0.{side}_attn.norm.{n}_norm.scale"] = (HD,)
    lin("single_blocks.0.linear1", 3 * D + MLP, D)
    lin("single_blocks.0.linear2", D, D + MLP)
    lin("single_blocks.0.modulation.lin", 3 * D, D)
    for n in ("query", "key"):
        s[f"{prefix}single_blocks.0.norm.{n}_norm.scale"] = (HD,)
    lin("img_in", D, 4)
    lin("txt_in", D, 5)
    for part in ("time_in", "guidance_in"):
        lin(f"{part}.in_layer", D, 256)
        lin(f"{part}.out_layer", D, D)
    lin("vector_in.in_layer", D, 7)
    lin("vector_in.out_layer", D, D)
    lin("final_layer.linear", 4, D)
    lin("final_layer.adaLN_modulation.1", 2 * D, D)
    return s


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=HD, num_attention_heads=D // HD, joint_attention_dim=5,
                                  pooled_projection_dim=7, guidance_embeds=True, axes_dims_rope=(2, 2, 0))


def test_flux_rules_agree_with_diffusers_converter_both_ways():
    """diffusers' converter hard-codes Flux's widths (3072 / 12288) but splits by rows only: the
    header has the real shapes, the tensors one column holding a unique id per row."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = _bfl_shapes(D=3072, MLP=12288, HD=128)
    bfl, at = {}, 0
    for k, s in shapes.items():
        bfl[k] = (torch.arange(s[0], dtype=torch.float64) + at).reshape(s[0], *([1] if len(s) == 2 else []))
        at += s[0]
    conv = convert_flux_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert set(conv) == set(_tiny_flux().state_dict())  # the fake header has the real key structure
    # BFL base -> diffusers module names (fuse, rename, swap): every alias picks the rows diffusers does
    seen = set()
    for a in naming.base_aliases(list(bfl), shapes):
        mod = a.module[len("transformer."):]
        got = bfl[a.key][slice(*a.base_rows)] if a.base_rows else bfl[a.key]
        want = conv[mod + ".weight"][slice(*a.lora_rows)] if a.lora_rows else conv[mod + ".weight"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        seen.add(mod + ".weight")
    assert seen == {k for k in conv if k.endswith(".weight") and conv[k].dim() == 2}
    # diffusers base -> BFL modules (split, rename, swap); q/k/v/mlp widths come from the columns
    dshapes = {k: (v.shape[0], 3072) if v.dim() == 2 else tuple(v.shape) for k, v in conv.items()}
    seen = set()
    for a in naming.base_aliases(list(conv), dshapes):
        bkey = a.module[len("diffusion_model."):] + ".weight"
        src = bfl[bkey]
        assert a.lora_total in (None, src.shape[0])
        got = src[slice(*a.lora_rows)] if a.lora_rows else src
        want = conv[a.key][slice(*a.base_rows)] if a.base_rows else conv[a.key]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        seen.add(a.key)
    assert seen == {k for k in conv if k.endswith(".weight") and conv[k].dim() == 2}


# ---------------------------------------------------------------------------------------------
# end to end: `merge run` of LoRAs into tiny single-file checkpoints of each naming


def _recipe(path: Path, base: Path, models: list[tuple[Path, float]], method="task_arithmetic", out="full") -> Path:
    import yaml

    doc = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in models],
           "output": {"format": out}, "dtype": "float32"}
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(cli, tmp_path, base_path, loras, method="task_arithmetic"):
    r = _recipe(tmp_path / "r.yaml", base_path, loras, method)
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    got = {}
    for f in files:
        got.update(load_file(str(f)))
    return got


def _check(got: dict, base: dict, want_delta: dict):
    assert set(got) == set(base)
    for k, b in base.items():
        want = b.double() + want_delta[k].reshape(b.shape) if k in want_delta else b.double()
        torch.testing.assert_close(got[k].double(), want, rtol=1e-6, atol=1e-6, msg=k)


TE2 = "conditioner.embedders.1.model."
SDXL_SINGLE = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (8, 8),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (6, 6),
    TE2 + "transformer.resblocks.0.attn.in_proj_weight": (3 * D, D),
    TE2 + "transformer.resblocks.0.attn.in_proj_bias": (3 * D,),
    TE2 + "transformer.resblocks.0.attn.out_proj.weight": (D, D),
    TE2 + "transformer.resblocks.0.mlp.c_fc.weight": (MLP, D),
    TE2 + "transformer.resblocks.0.ln_1.weight": (D,),
    TE2 + "text_projection": (D, D),
}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base = _base(SDXL_SINGLE)
    bp = write_safetensors(root / "sdxl_base.safetensors", base)
    te2 = "lora_te2_text_model_encoder_layers_0_"
    mods = {te2 + "self_attn_q_proj": (D, D, 2), te2 + "self_attn_k_proj": (D, D, 3),
            te2 + "self_attn_v_proj": (D, D, 1), te2 + "self_attn_out_proj": (D, D, 2),
            te2 + "mlp_fc1": (MLP, D, 2), "lora_te2_text_projection": (D, D, 2),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (6, 6, 2),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (8, 12, 2)}
    alphas = {te2 + "self_attn_q_proj": 1.0, te2 + "self_attn_k_proj": 6.0, "lora_te2_text_projection": 1.0}
    kt = _kohya(mods, alphas)
    kp = write_safetensors(root / "kohya_xl.safetensors", kt, {"ss_base_model_version": "sdxl_base_v1-0"})
    # a diffusers-format LoRA on q and v only (k block stays zero), and the UNet in diffusers names
    dm = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (D, D, 2),
          "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj": (D, D, 3),
          "unet.down_blocks.1.attentions.0.proj_in": (8, 8, 2)}
    dt = _peft_style(dm, seed=1)
    dp = write_safetensors(root / "pytorch_lora_weights.safetensors", dt)
    return dict(base=base, bp=bp, kt=kt, kp=kp, dt=dt, dp=dp, alphas=alphas)


def _sdxl_want(s, w_k=1.0, w_d=1.0):
    kt, dt, te2 = s["kt"], s["dt"], "lora_te2_text_model_encoder_layers_0_"
    sc = {m: s["alphas"].get(m, None) for m in kt}

    def kd(m):
        r = kt[m + ".lora_down.weight"].shape[0]
        a = s["alphas"].get(m)
        return _d(kt, m, (a / r) if a is not None else 1.0)

    ip = TE2 + "transformer.resblocks.0.attn.in_proj_weight"
    want = {
        ip: w_k * torch.cat([kd(te2 + "self_attn_q_proj"), kd(te2 + "self_attn_k_proj"), kd(te2 + "self_attn_v_proj")])
        + w_d * torch.cat([_d(dt, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", peft=True),
                           torch.zeros(D, D, dtype=torch.float64),
                           _d(dt, "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", peft=True)]),
        TE2 + "transformer.resblocks.0.attn.out_proj.weight": w_k * kd(te2 + "self_attn_out_proj"),
        TE2 + "transformer.resblocks.0.mlp.c_fc.weight": w_k * kd(te2 + "mlp_fc1"),
        TE2 + "text_projection": w_k * kd("lora_te2_text_projection").t(),  # P = W^T (P19)
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
            w_k * kd("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
            w_k * kd("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight":
            w_d * _d(dt, "unet.down_blocks.1.attentions.0.proj_in", peft=True),
    }
    del sc
    return want


def test_sdxl_te2_fused_in_proj_goldens_and_exact_factors(sdxl):
    ml = _matched(sdxl["kp"], sdxl["base"])
    ip = TE2 + "transformer.resblocks.0.attn.in_proj_weight"
    name = ml.by_base[ip]
    asm = ml.assemblies[name]
    assert [(p.module.rsplit("_", 2)[-2], p.base_rows) for p in asm.pieces] == [
        ("q", (0, D)), ("k", (D, 2 * D)), ("v", (2 * D, 3 * D))]  # P19: rows q, k, v
    assert ml.rank(name) == 2 + 3 + 1 and ml.scale(name) == 1.0
    A, B = ml.factors_for(ip)
    assert A.shape == (6, D) and B.shape == (3 * D, 6)
    assert torch.count_nonzero(B[:D, 2:]) == 0 and torch.count_nonzero(B[D:2 * D, :2]) == 0  # block-diagonal
    _assert_exact_factors(ml, sdxl["base"])
    want = _sdxl_want(sdxl, 1.0, 0.0)
    for k in ml.by_base:
        torch.testing.assert_close(ml.delta_for(k, sdxl["base"][k].shape).double(), want[k], rtol=1e-6, atol=1e-7)
    assert dict(ml.match.rules) == {"fuse": 3, "name": 2, "rename": 2, "transpose": 1}
    dl = _matched(sdxl["dp"], sdxl["base"])
    assert dict(dl.match.rules) == {"fuse": 2, "rename": 1}
    _assert_exact_factors(dl, sdxl["base"])


def test_merge_run_into_sdxl_single_file(sdxl, tmp_path, cli):
    got = _run(cli, tmp_path, sdxl["bp"], [(sdxl["kp"], 0.5), (sdxl["dp"], 2.0)])
    _check(got, sdxl["base"], _sdxl_want(sdxl, 0.5, 2.0))


def test_low_rank_method_into_sdxl_single_file_uses_exact_factors(sdxl, tmp_path, cli):
    # core_space reads factors_for (A stacked, B block-diagonal); one LoRA gives base + its delta
    got = _run(cli, tmp_path, sdxl["bp"], [(sdxl["kp"], 1.0)], method="core_space")
    _check(got, sdxl["base"], _sdxl_want(sdxl, 1.0, 0.0))


def test_dry_run_names_the_naming_and_the_rules(sdxl, tmp_path, cli):
    r = _recipe(tmp_path / "r.yaml", sdxl["bp"], [(sdxl["kp"], 1.0), (sdxl["dp"], 1.0)])
    code, out, err = cli("run", r, "--out", tmp_path / "o", "--dry-run")
    assert code == 0, out + err
    text = " ".join((out + err).split())
    assert "OpenCLIP text encoder (fused attn.in_proj_weight)" in text and "UNet in LDM/SGM names" in text
    assert "3 fused by rows into 1 tensor(s)" in text and "1 transposed" in text
    assert "1 through a naming rule" in text and "2 fused by rows into 1 tensor(s)" in text
    assert not (tmp_path / "o").exists()


# Flux ---------------------------------------------------------------------------------------


def _flux_diffusers_lora():
    P = "transformer."
    mods = {P + "transformer_blocks.0.attn.to_q": (D, D, 2), P + "transformer_blocks.0.attn.to_k": (D, D, 3),
            P + "transformer_blocks.0.attn.to_v": (D, D, 1), P + "transformer_blocks.0.attn.add_k_proj": (D, D, 2),
            P + "transformer_blocks.0.attn.to_out.0": (D, D, 2), P + "transformer_blocks.0.ff_context.net.2": (D, MLP, 2),
            P + "single_transformer_blocks.0.attn.to_q": (D, D, 2), P + "single_transformer_blocks.0.attn.to_v": (D, D, 2),
            P + "single_transformer_blocks.0.proj_mlp": (MLP, D, 4), P + "single_transformer_blocks.0.proj_out": (D, D + MLP, 2),
            P + "norm_out.linear": (2 * D, D, 2), P + "x_embedder": (D, 4, 1)}
    return mods, _peft_style(mods, seed=2)


def test_diffusers_flux_lora_into_bfl_checkpoint(tmp_path, cli):
    shapes = {k: v for k, v in _bfl_shapes("model.diffusion_model.").items()}
    base = _base(shapes, seed=3)
    bp = write_safetensors(tmp_path / "flux1-dev.safetensors", base)
    mods, t = _flux_diffusers_lora()
    lp = write_safetensors(tmp_path / "pytorch_lora_weights.safetensors", t)
    d = {m: _d(t, "transformer." + m, peft=True) for m in (x[len("transformer."):] for x in mods)}
    z = lambda r, c=D: torch.zeros(r, c, dtype=torch.float64)  # noqa: E731
    M = "model.diffusion_model."
    adaln = d["norm_out.linear"]
    want = {
        M + "double_blocks.0.img_attn.qkv.weight": torch.cat([d["transformer_blocks.0.attn.to_q"],
                                                              d["transformer_blocks.0.attn.to_k"],
                                                              d["transformer_blocks.0.attn.to_v"]]),
        M + "double_blocks.0.txt_attn.qkv.weight": torch.cat([z(D), d["transformer_blocks.0.attn.add_k_proj"], z(D)]),
        M + "double_blocks.0.img_attn.proj.weight": d["transformer_blocks.0.attn.to_out.0"],
        M + "double_blocks.0.txt_mlp.2.weight": d["transformer_blocks.0.ff_context.net.2"],
        M + "single_blocks.0.linear1.weight": torch.cat([d["single_transformer_blocks.0.attn.to_q"], z(D),
                                                         d["single_transformer_blocks.0.attn.to_v"],
                                                         d["single_transformer_blocks.0.proj_mlp"]]),
        M + "single_blocks.0.linear2.weight": d["single_transformer_blocks.0.proj_out"],
        M + "final_layer.adaLN_modulation.1.weight": torch.cat([adaln[D:], adaln[:D]]),  # (scale, shift) -> (shift, scale)
        M + "img_in.weight": d["x_embedder"],
    }
    ml = _matched(lp, base)
    lin1 = ml.assemblies[ml.by_base[M + "single_blocks.0.linear1.weight"]]
    assert [p.base_rows for p in lin1.pieces] == [(0, D), (2 * D, 3 * D), (3 * D, 3 * D + MLP)]
    _assert_exact_factors(ml, base)
    assert ml.rank(ml.by_base[M + "final_layer.adaLN_modulation.1.weight"]) == 2  # a row permutation: rank kept
    got = _run(cli, tmp_path, bp, [(lp, 1.0)])
    _check(got, base, want)


def test_bfl_kohya_lora_into_diffusers_flux_checkpoint(tmp_path, cli):
    real = _tiny_flux().state_dict()
    base = {k: torch.randn(*v.shape, generator=torch.Generator().manual_seed(4)) for k, v in real.items()}
    bp = write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", base)
    mods = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D, 3), "lora_unet_double_blocks_0_txt_attn_proj": (D, D, 2),
            "lora_unet_double_blocks_0_img_mlp_0": (MLP, D, 2), "lora_unet_single_blocks_0_linear1": (3 * D + MLP, D, 4),
            "lora_unet_single_blocks_0_modulation_lin": (3 * D, D, 2),
            "lora_unet_final_layer_adaLN_modulation_1": (2 * D, D, 2)}
    t = _kohya(mods, {"lora_unet_single_blocks_0_linear1": 2.0}, seed=1)
    lp = write_safetensors(tmp_path / "flux_lora.safetensors", t, {"ss_base_model_version": "flux1"})
    qkv = _d(t, "lora_unet_double_blocks_0_img_attn_qkv")
    l1 = _d(t, "lora_unet_single_blocks_0_linear1", 0.5)
    ad = _d(t, "lora_unet_final_layer_adaLN_modulation_1")
    want = {
        "transformer_blocks.0.attn.to_q.weight": qkv[:D], "transformer_blocks.0.attn.to_k.weight": qkv[D:2 * D],
        "transformer_blocks.0.attn.to_v.weight": qkv[2 * D:],
        "transformer_blocks.0.attn.to_add_out.weight": _d(t, "lora_unet_double_blocks_0_txt_attn_proj"),
        "transformer_blocks.0.ff.net.0.proj.weight": _d(t, "lora_unet_double_blocks_0_img_mlp_0"),
        "single_transformer_blocks.0.attn.to_q.weight": l1[:D], "single_transformer_blocks.0.attn.to_k.weight": l1[D:2 * D],
        "single_transformer_blocks.0.attn.to_v.weight": l1[2 * D:3 * D],
        "single_transformer_blocks.0.proj_mlp.weight": l1[3 * D:],
        "single_transformer_blocks.0.norm.linear.weight": _d(t, "lora_unet_single_blocks_0_modulation_lin"),
        "norm_out.linear.weight": torch.cat([ad[D:], ad[:D]]),
    }
    ml = _matched(lp, base)
    A, B = ml.factors_for("transformer_blocks.0.attn.to_k.weight")
    assert A.shape == (3, D) and B.shape == (D, 3)  # A shared, B rows sliced: rank kept
    _assert_exact_factors(ml, base)
    assert dict(ml.match.rules) == {"rename": 3, "split": 2, "swap": 1}
    got = _run(cli, tmp_path, bp, [(lp, 1.0)])
    _check(got, base, want)


# SD1: diffusers-named LoRAs into an LDM checkpoint and SGM-named LoRAs into a diffusers UNet ---------

SD1_LDM = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (8, 8, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (8, 8, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (8, 8, 3, 3),
    "model.diffusion_model.output_blocks.4.1.proj_in.weight": (8, 8, 1, 1),
    "model.diffusion_model.output_blocks.4.0.skip_connection.weight": (8, 16, 1, 1),
    "model.diffusion_model.middle_block.1.proj_out.weight": (8, 8, 1, 1),
    "model.diffusion_model.time_embed.0.weight": (16, 8),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (6, 6),
}
SD1_DIFFUSERS_NAMES = {  # LoRA module -> LDM key (P19's rule)
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_down_blocks_0_resnets_0_conv1": "input_blocks.1.0.in_layers.2",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv",
    "lora_unet_up_blocks_1_attentions_1_proj_in": "output_blocks.4.1.proj_in",
    "lora_unet_up_blocks_1_resnets_1_conv_shortcut": "output_blocks.4.0.skip_connection",
    "lora_unet_mid_block_attentions_0_proj_out": "middle_block.1.proj_out",
    "lora_unet_time_embedding_linear_1": "time_embed.0",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": None,
}


def _kohya_conv(mods: dict[str, tuple], seed=0) -> dict:
    t = {}
    for i, (m, shp) in enumerate(mods.items()):
        r = 2
        t[m + ".lora_down.weight"] = _gen((r, *shp[1:]), 1.3 + 0.1 * i + seed, 0.5)
        t[m + ".lora_up.weight"] = _gen((shp[0], r) + ((1, 1) if len(shp) == 4 else ()), 0.9 + 0.1 * i + seed, 0.2)
    return t


def test_diffusers_named_sd1_lora_into_ldm_checkpoint(tmp_path, cli):
    base = _base(SD1_LDM, seed=5)
    bp = write_safetensors(tmp_path / "v1-5.safetensors", base)
    keys = {m: ("model.diffusion_model." + k + ".weight" if k else
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
            for m, k in SD1_DIFFUSERS_NAMES.items()}
    t = _kohya_conv({m: SD1_LDM[k] for m, k in keys.items()})
    lp = write_safetensors(tmp_path / "sd1_lora.safetensors", t)
    ml = _matched(lp, base)
    assert dict(ml.base_map) == keys  # P19 golden: ..._down_blocks_1_attentions_0_... -> input_blocks.4.1
    assert dict(ml.match.rules) == {"name": 1, "rename": 9}
    want = {k: _d(t, m) for m, k in keys.items()}
    got = _run(cli, tmp_path, bp, [(lp, 1.0)])
    _check(got, base, want)


def test_sgm_named_lora_into_diffusers_unet(tmp_path, cli):
    from diffusers import UNet2DConditionModel

    sd = UNet2DConditionModel(**_SDXL).state_dict()
    base = {"unet." + k: torch.randn(*v.shape, generator=torch.Generator().manual_seed(6)) for k, v in sd.items()}
    bp = write_safetensors(tmp_path / "unet.safetensors", base)
    mods = {"lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q": "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q",
            "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
            "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
            "lora_unet_label_emb_0_0": "add_embedding.linear_1",
            "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in"}
    keys = {m: "unet." + k + ".weight" for m, k in mods.items()}
    t = _kohya_conv({m: tuple(base[k].shape) for m, k in keys.items()}, seed=1)
    lp = write_safetensors(tmp_path / "xl_lora.safetensors", t)
    ml = _matched(lp, base)
    assert dict(ml.base_map) == keys
    got = _run(cli, tmp_path, bp, [(lp, 1.0)])
    _check(got, base, {k: _d(t, m) for m, k in keys.items()})


# refusals and reports ---------------------------------------------------------------------------


def test_unmappable_module_is_one_line_naming_the_base_naming(sdxl, tmp_path, cli):
    t = dict(sdxl["kt"])
    t.update(_kohya({"lora_unet_down_blocks_7_attentions_0_proj_in": (8, 8, 2)}))
    lp = write_safetensors(tmp_path / "bad.safetensors", t)
    r = _recipe(tmp_path / "r.yaml", sdxl["bp"], [(lp, 1.0)])
    code, out, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 2
    msg = (out + err).strip()
    assert "lora_unet_down_blocks_7_attentions_0_proj_in" in msg and "base naming: UNet in LDM/SGM names" in msg
    assert "Traceback" not in msg and not (tmp_path / "o").exists()


def test_fused_lora_with_wrong_rows_is_refused(tmp_path):
    real = _tiny_flux().state_dict()
    base = {k: torch.zeros(*v.shape) for k, v in real.items()}
    t = _kohya({"lora_unet_double_blocks_0_img_attn_qkv": (2 * D, D, 2)})
    lp = write_safetensors(tmp_path / "short.safetensors", t)
    with pytest.raises(ValueError, match=r"shape mismatch: LoRA module 'lora_unet_double_blocks_0_img_attn_qkv' .* "
                                         r"gives a delta of 16x8 but its split rule .* needs 24x8"):
        _matched(lp, base)


def test_inspect_names_the_naming(sdxl, tmp_path, cli):
    code, out, err = cli("inspect", sdxl["bp"])
    assert code == 0, out + err
    assert "OpenCLIP text encoder (fused attn.in_proj_weight)" in " ".join(out.split())
    code, out, err = cli("inspect", sdxl["kp"])
    assert code == 0, out + err
    assert "UNet LDM/SGM names" in out and "text encoder HF CLIP names" in out


def test_kohya_output_of_fused_inputs_writes_the_inputs_modules_back(sdxl, tmp_path, cli):
    """task_arithmetic of kohya LoRAs on a single-file base writes kohya q/k/v (not a module named
    after in_proj_weight); applied to the same base it gives the merged delta exactly."""
    kt, sfx = sdxl["kt"], ".lora_down.weight"
    mods = {k[: -len(sfx)]: (kt[k[: -len(sfx)] + ".lora_up.weight"].shape[0], v.shape[1], 3)
            for k, v in kt.items() if k.endswith(sfx)}  # the same modules, rank 3
    t2 = _kohya(mods, seed=1)
    p2 = write_safetensors(tmp_path / "two.safetensors", t2, {"ss_base_model_version": "sdxl_base_v1-0"})
    r = _recipe(tmp_path / "r.yaml", sdxl["bp"], [(sdxl["kp"], 0.5), (p2, 1.0)], out="kohya")
    code, out, err = cli("run", r, "--out", tmp_path / "merged.safetensors")
    assert code == 0, out + err
    keys = set(load_file(str(tmp_path / "merged.safetensors")))
    assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in keys
    assert "lora_te2_text_projection.lora_down.weight" in keys
    assert not any("in_proj" in k or "+" in k for k in keys)
    base = sdxl["base"]
    got, one, two = (_matched(p, base) for p in (tmp_path / "merged.safetensors", sdxl["kp"], p2))
    assert set(got.by_base) == set(one.by_base)
    for k in one.by_base:
        want = 0.5 * one.delta_for(k, base[k].shape) + two.delta_for(k, base[k].shape)
        torch.testing.assert_close(got.delta_for(k, base[k].shape), want, rtol=1e-5, atol=1e-6)


def test_kohya_output_of_a_split_bfl_lora_on_a_diffusers_base(tmp_path, cli):
    real = _tiny_flux().state_dict()
    base = {k: torch.randn(*v.shape, generator=torch.Generator().manual_seed(7)) for k, v in real.items()}
    bp = write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", base)
    mods = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D, 3),
            "lora_unet_final_layer_adaLN_modulation_1": (2 * D, D, 2)}
    lp = write_safetensors(tmp_path / "a.safetensors", _kohya(mods), {"ss_base_model_version": "flux1"})
    r = _recipe(tmp_path / "r.yaml", bp, [(lp, 2.0)], out="kohya")
    code, out, err = cli("run", r, "--out", tmp_path / "m.safetensors")
    assert code == 0, out + err
    keys = {k.split(".")[0] for k in load_file(str(tmp_path / "m.safetensors"))}
    assert keys == {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_0_attn_to_k",
                    "lora_unet_transformer_blocks_0_attn_to_v", "lora_unet_final_layer_adaLN_modulation_1"}
    got, one = _matched(tmp_path / "m.safetensors", base), _matched(lp, base)
    assert set(got.by_base) == set(one.by_base)
    for k in one.by_base:
        torch.testing.assert_close(got.delta_for(k, base[k].shape), 2.0 * one.delta_for(k, base[k].shape),
                                   rtol=1e-5, atol=1e-6)


def test_p10_goldens_sd2_openclip_and_double_match(tmp_path):
    base = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (MLP, D)}
    mods = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (8, 12, 2),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1": (MLP, D, 2)}
    ml = _matched(write_safetensors(tmp_path / "a.safetensors", _kohya(mods)), _base(base))
    assert dict(ml.base_map) == dict(zip(mods, base))  # P10 golden
    # SD2: OpenCLIP text tower under cond_stage_model.model, fused in_proj fed by lora_te_ q/v
    sd2 = {"cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight": (3 * D, D),
           "cond_stage_model.model.transformer.resblocks.3.mlp.c_proj.weight": (D, MLP)}
    mods = {"lora_te_text_model_encoder_layers_3_self_attn_q_proj": (D, D, 2),
            "lora_te_text_model_encoder_layers_3_self_attn_v_proj": (D, D, 2),
            "lora_te_text_model_encoder_layers_3_mlp_fc2": (D, MLP, 2)}
    t = _kohya(mods)
    b = _base(sd2)
    ml = _matched(write_safetensors(tmp_path / "sd2.safetensors", t), b)
    ip = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"
    want = torch.cat([_d(t, "lora_te_text_model_encoder_layers_3_self_attn_q_proj"), torch.zeros(D, D).double(),
                      _d(t, "lora_te_text_model_encoder_layers_3_self_attn_v_proj")])
    torch.testing.assert_close(ml.delta_for(ip, b[ip].shape).double(), want, rtol=1e-6, atol=1e-7)
    _assert_exact_factors(ml, b)
    # P19 pitfall: a name that both spellings generate, for two different base tensors, is an error
    mixed = {"model.diffusion_model.input_blocks.4.1.proj_in.weight": (8, 8),
             "unet.down_blocks.1.attentions.0.proj_in.weight": (8, 8)}
    f = write_safetensors(tmp_path / "m.safetensors", _kohya({"lora_unet_down_blocks_1_attentions_0_proj_in": (8, 8, 2)}))
    with pytest.raises(ValueError, match=r"'lora_unet_down_blocks_1_attentions_0_proj_in' .* matches several base "
                                         r"tensors: model\.diffusion_model\.input_blocks\.4\.1\.proj_in\.weight, "
                                         r"unet\.down_blocks"):
        _matched(f, _base(mixed))
