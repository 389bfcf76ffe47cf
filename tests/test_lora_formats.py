"""LoRA formats: detection, canonical factors (scale folded once), base-key matching, PEFT/kohya output.

References are independent of the code under test: PEFT's own ``merge_and_unload`` on real
adapters (tiny random Llama / GPT-2 / conv net), PEFT loading our output adapters, and for kohya
files the sequential-conv / sequential-linear application of down then up.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

# Real PEFT adapters are the reference: these imports must work (no silent skip).
import peft  # noqa: F401
import transformers  # noqa: F401

from mergekit_ortho.errors import UserError
from mergekit_ortho.lora_out import kohya_hashes, layouts_of, to_kohya, to_peft
from mergekit_ortho.adapters.arch import check_compatible, guess_architecture
from mergekit_ortho.adapters.describe import describe_lora
from mergekit_ortho.adapters.detect import detect_lora, read_header
from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora

from mergekit_ortho.testing.checkpoints import random_base, safetensors_shapes, write_safetensors
from mergekit_ortho.testing.hf_models import load_causal_lm, load_convnet, tiny_convnet, tiny_gpt2, tiny_llama
from mergekit_ortho.testing.loras import (
    SD15_BASE, SD15_KOHYA, SDXL_BASE, SDXL_KOHYA, kohya_tensors, make_peft_adapter, peft_merged_deltas,
    write_peft_dir,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
]


# ----------------------------------------------------------------------------------------------
# fixtures: real PEFT adapters, built once per module


@pytest.fixture(scope="module")
def peft_cases(tmp_path_factory):
    """name -> dict(base=dir, base_file=..., adapter=dir, load=callable, deltas=PEFT reference)."""
    root = tmp_path_factory.mktemp("peft")
    llama = tiny_llama(root / "llama")
    gpt2 = tiny_gpt2(root / "gpt2")
    conv = tiny_convnet(root / "conv")
    specs = {
        "plain": (llama, lambda: load_causal_lm(llama),
                  dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        "rslora_patterns": (llama, lambda: load_causal_lm(llama),
                            dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                 rank_pattern={"model.layers.0.self_attn.q_proj": 2},
                                 alpha_pattern={"v_proj": 3})),
        "embedding": (llama, lambda: load_causal_lm(llama),
                      dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "k_proj"])),
        "bin": (llama, lambda: load_causal_lm(llama),
                dict(r=4, lora_alpha=4, target_modules=["o_proj", "up_proj"], safe=False)),
        "gpt2_fan_in_fan_out": (gpt2, lambda: load_causal_lm(gpt2),
                                dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
        "conv": (conv, lambda: load_convnet(conv),
                 dict(r=2, lora_alpha=3, target_modules=["conv_in", "proj", "head"])),
    }
    out = {}
    for i, (name, (base, load, kw)) in enumerate(specs.items()):
        adapter = make_peft_adapter(load(), root / f"ad_{name}", seed=10 + i, **kw)
        deltas = peft_merged_deltas(load(), adapter)
        base_file = base / "model.safetensors"
        out[name] = dict(base=base, base_file=base_file, adapter=adapter, load=load, deltas=deltas,
                         shapes=safetensors_shapes(base_file))
    return out


def _model_input(case):
    g = torch.Generator().manual_seed(5)
    if "conv" in str(case["base"]):
        return torch.randn(2, 3, 5, 5, generator=g)
    return torch.randint(0, 64, (2, 7), generator=g)


def _forward(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


PEFT_NAMES = ["plain", "rslora_patterns", "embedding", "bin", "gpt2_fan_in_fan_out", "conv"]


# ----------------------------------------------------------------------------------------------
# PEFT


def test_detect_peft_and_full_checkpoints(peft_cases):
    c = peft_cases["plain"]
    assert detect_lora(c["adapter"]) == "peft"
    assert detect_lora(c["adapter"] / "adapter_model.safetensors") == "peft"
    assert detect_lora(peft_cases["bin"]["adapter"]) == "peft"
    assert (peft_cases["bin"]["adapter"] / "adapter_model.bin").is_file()
    assert detect_lora(c["base"]) is None
    assert detect_lora(c["base_file"]) is None


@pytest.mark.parametrize("name", PEFT_NAMES)
def test_peft_delta_equals_merge_and_unload(peft_cases, name):
    c = peft_cases[name]
    src = LoraSource(c["adapter"])
    assert src.format == "peft"
    mapping = match_to_base(src, list(c["shapes"]), c["shapes"])
    src = MatchedLora(src, mapping)
    ref = c["deltas"]
    assert ref and all(d.abs().max() > 0 for d in ref.values())
    assert set(mapping.values()) == set(ref), "matched base keys differ from what PEFT changed"
    for key, want in ref.items():
        got = src.delta_for(key, c["shapes"][key])
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        A, B = src.factors_for(key)
        (r, cols), (rows, _) = src.factor_shapes(src.by_base[key])
        assert A.shape == (r, cols) and B.shape == (rows, r)
        assert rows == want.shape[0] and cols == math.prod(want.shape[1:])


def test_peft_scale_rules(peft_cases):
    src = LoraSource(peft_cases["rslora_patterns"]["adapter"])
    pre = "base_model.model.model.layers."
    q0, q1, v1 = pre + "0.self_attn.q_proj", pre + "1.self_attn.q_proj", pre + "1.self_attn.v_proj"
    assert src.rank(q0) == 2 and src.rank(q1) == 8
    assert src.scale(q0) == pytest.approx(16 / math.sqrt(2))
    assert src.scale(q1) == pytest.approx(16 / math.sqrt(8))
    assert src.alpha(v1) == 3 and src.scale(v1) == pytest.approx(3 / math.sqrt(8))
    plain = LoraSource(peft_cases["plain"]["adapter"])
    assert {plain.scale(m) for m in plain.modules} == {2.0}
    # the scale is folded into B exactly once: B @ A == scale * lora_B @ lora_A
    from safetensors.torch import load_file

    raw = load_file(str(peft_cases["plain"]["adapter"] / "adapter_model.safetensors"))
    m = plain.modules[0]
    A, B = plain.factors(m)
    torch.testing.assert_close(A, raw[m + ".lora_A.weight"])
    torch.testing.assert_close(B, 2.0 * raw[m + ".lora_B.weight"])
    As, Bs = plain.factors(m, fold="sqrt")
    torch.testing.assert_close(Bs @ As, B @ A)
    torch.testing.assert_close(As, math.sqrt(2.0) * raw[m + ".lora_A.weight"])


@pytest.mark.parametrize("name", ["plain", "rslora_patterns", "embedding", "gpt2_fan_in_fan_out", "conv"])
def test_to_peft_roundtrip_loads_in_peft(peft_cases, tmp_path, name):
    from peft import PeftModel

    c = peft_cases[name]
    src = LoraSource(c["adapter"])
    src = MatchedLora(src, match_to_base(src, list(c["shapes"]), c["shapes"]))
    factors = {k: src.factors_for(k) for k in src.by_base}
    tensors, cfg = to_peft(factors, str(c["base"]), shapes=c["shapes"], layouts=layouts_of(src))
    assert cfg["lora_alpha"] == cfg["r"] and cfg["use_rslora"] is False
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    if name == "rslora_patterns":
        assert cfg["r"] == 8 and cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert cfg["fan_in_fan_out"] is (name == "gpt2_fan_in_fan_out")
    out = write_peft_dir(tmp_path / "out", tensors, cfg)

    x = _model_input(c)
    got = _forward(PeftModel.from_pretrained(c["load"](), out).eval(), x)
    expected_model = c["load"]()
    sd = expected_model.state_dict()
    with torch.no_grad():
        for k, d in c["deltas"].items():
            sd[k].add_(d)
    want = _forward(expected_model, x)
    assert not torch.allclose(want, _forward(c["load"](), x), atol=1e-3), "adapter has no effect"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # and read back: scale 1 everywhere, same deltas
    back = LoraSource(out)
    back = MatchedLora(back, match_to_base(back, list(c["shapes"]), c["shapes"]))
    assert {back.scale(m) for m in back.modules} == {1.0}
    for k, d in c["deltas"].items():
        torch.testing.assert_close(back.delta_for(k, c["shapes"][k]), d, atol=1e-5, rtol=1e-5)


def test_matching_returns_a_map_and_leaves_the_source_unchanged(peft_cases):
    c = peft_cases["plain"]
    src = LoraSource(c["adapter"])
    before = dict(vars(src))
    full = match_to_base(src, list(c["shapes"]), c["shapes"])
    bare_shapes = {k[len("model."):]: v for k, v in c["shapes"].items() if k.startswith("model.")}
    bare = match_to_base(src, list(bare_shapes), bare_shapes)
    assert vars(src) == before and not hasattr(src, "by_base")
    a, b = MatchedLora(src, full), MatchedLora(src, bare)  # one source, two bases, two views
    for key, mod in a.by_base.items():
        assert b.base_map[mod] == key[len("model."):]
        torch.testing.assert_close(a.delta_for(key), b.delta_for(key[len("model."):]))
    assert a.modules == src.modules and a.format == "peft" and a.kind == "lora"  # the rest is delegated
    with pytest.raises(AttributeError):
        a.base_map = {}
    with pytest.raises(TypeError):
        a.by_base["x"] = "y"
    with pytest.raises(KeyError, match="no LoRA module matched to 'nope'"):
        a.delta_for("nope")


def test_conv1d_layout_is_decided_by_the_match_not_stored_on_the_source(peft_cases, tmp_path):
    """PEFT sets fan_in_fan_out per GPT-2 Conv1D layer even when the config says False: the base's
    shape decides the layout, and that decision lives in the match."""
    import shutil

    c = peft_cases["gpt2_fan_in_fan_out"]
    d = tmp_path / "no_flag"
    shutil.copytree(c["adapter"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    src = LoraSource(d)
    assert {src.layout(m) for m in src.modules} == {"linear"}
    match = match_to_base(src, list(c["shapes"]), c["shapes"])
    # only a non-square Conv1D tells the layout by its shape (a square one fits either way)
    non_square = {m for m, k in match.items() if len(set(c["shapes"][k])) == 2}
    assert non_square and set(match.layouts) == non_square and set(match.layouts.values()) == {"transposed"}
    assert {src.layout(m) for m in src.modules} == {"linear"}  # unchanged
    view = MatchedLora(src, match)
    for mod in non_square:
        key = match[mod]
        assert view.layout(mod) == "transposed"
        torch.testing.assert_close(view.delta_for(key, c["shapes"][key]), c["deltas"][key], atol=1e-5, rtol=1e-5)


def test_peft_matching_prefix_variants(peft_cases, tmp_path):
    c = peft_cases["plain"]
    src = LoraSource(c["adapter"])
    ref = match_to_base(src, list(c["shapes"]), c["shapes"])
    # base without the leading component (LlamaModel instead of LlamaForCausalLM)
    bare = {k[len("model."):]: v for k, v in c["shapes"].items() if k.startswith("model.")}
    got = match_to_base(LoraSource(c["adapter"]), list(bare), bare)
    assert got == {m: k[len("model."):] for m, k in ref.items()}
    # base saved from a PEFT-wrapped model: ".base_layer.weight"
    wrapped = {k.replace(".q_proj.weight", ".q_proj.base_layer.weight"): v for k, v in c["shapes"].items()}
    got = match_to_base(LoraSource(c["adapter"]), list(wrapped), wrapped)
    assert got == {m: k.replace(".q_proj.weight", ".q_proj.base_layer.weight") for m, k in ref.items()}
    # LoRA trained on a wrapper that adds a leading component ("bert."-style)
    raw = read_header(c["adapter"] / "adapter_model.safetensors")[0]
    from safetensors.torch import load_file

    t = load_file(str(c["adapter"] / "adapter_model.safetensors"))
    t2 = {k.replace("base_model.model.", "base_model.model.wrapper."): v for k, v in t.items()}
    assert len(t2) == len(raw)
    d = tmp_path / "wrapped"
    d.mkdir()
    write_safetensors(d / "adapter_model.safetensors", t2)
    shutil.copy(c["adapter"] / "adapter_config.json", d / "adapter_config.json")
    got = match_to_base(LoraSource(d), list(c["shapes"]), c["shapes"])
    assert got == {m.replace("base_model.model.", "base_model.model.wrapper."): k for m, k in ref.items()}


def test_peft_unmatched_module_is_an_error(peft_cases):
    c = peft_cases["plain"]
    missing = "model.layers.1.mlp.down_proj.weight"
    shapes = {k: v for k, v in c["shapes"].items() if k != missing}
    with pytest.raises(UserError) as e:
        match_to_base(LoraSource(c["adapter"]), list(shapes), shapes)
    msg = str(e.value)
    assert "base_model.model.model.layers.1.mlp.down_proj" in msg and "adapter_model.safetensors" in msg
    assert "\n" not in msg


def test_peft_shape_mismatch_is_an_error(peft_cases):
    c = peft_cases["plain"]
    shapes = dict(c["shapes"])
    shapes["model.layers.0.self_attn.v_proj.weight"] = (24, 32)
    with pytest.raises(UserError, match=r"shape mismatch.*self_attn\.v_proj.*model\.layers\.0\.self_attn\.v_proj\.weight"):
        match_to_base(LoraSource(c["adapter"]), list(shapes), shapes)


def test_describe_peft(peft_cases):
    c = peft_cases["rslora_patterns"]
    info = describe_lora(c["adapter"])
    assert info["format"] == "peft" and info["architecture"] == "LLM"
    assert info["modules"] == 14 and info["ranks"] == {2: 1, 8: 13}
    assert "rsLoRA" in info["scale_rule"] and "pattern" in info["scale_rule"]
    assert info["targets"]["q_proj"] == 2 and info["targets"]["down_proj"] == 2
    total = sum(math.prod(s) for s in safetensors_shapes(c["adapter"] / "adapter_model.safetensors").values())
    assert info["parameters"] == total


def test_peft_without_config_assumes_scale_one(peft_cases, tmp_path):
    c = peft_cases["plain"]
    f = shutil.copy(c["adapter"] / "adapter_model.safetensors", tmp_path / "lone.safetensors")
    with pytest.warns(UserWarning, match="lora_alpha = r"):
        src = LoraSource(f)
    assert src.format == "peft" and {src.scale(m) for m in src.modules} == {1.0}


# ----------------------------------------------------------------------------------------------
# unsupported types


def _kohya_like(tmp_path, extra: dict[str, torch.Tensor], name="x.safetensors"):
    t = kohya_tensors({"lora_unet_a_b": "a.b.weight"}, {"a.b.weight": (4, 4)}, rank=2)
    t.update(extra)
    return write_safetensors(tmp_path / name, t)


@pytest.mark.parametrize("extra,algo", [
    ({"lora_unet_c.vera_lambda_b": torch.zeros(4), "lora_unet_c.vera_lambda_d": torch.zeros(2)}, "VeRA"),
    ({"lora_unet_c.a1.weight": torch.zeros(4, 2), "lora_unet_c.a2.weight": torch.zeros(2, 4)}, "GLoRA"),
])
def test_unsupported_kohya_types(tmp_path, extra, algo):
    f = _kohya_like(tmp_path, extra)
    for call in (detect_lora, LoraSource):
        with pytest.raises(ValueError) as e:
            call(f)
        msg = str(e.value)
        assert msg.startswith("not supported yet: ") and algo in msg and str(f) in msg and "\n" not in msg


@pytest.mark.parametrize("extra,what", [
    ({"lora_unet_c.hada_w1_a": torch.zeros(4, 2), "lora_unet_c.hada_w1_b": torch.zeros(2, 4)}, "LoHa"),
    ({"lora_unet_c.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    ({"lora_unet_c.lora_mid.weight": torch.zeros(2, 2, 3, 3)}, "lora_mid"),
])
def test_incomplete_lycoris_modules_are_one_line_errors(tmp_path, extra, what):
    f = _kohya_like(tmp_path, extra)
    for call in (detect_lora, LoraSource):
        with pytest.raises(ValueError) as e:
            call(f)
        msg = str(e.value)
        assert str(f) in msg and "lora_unet_c" in msg and "\n" not in msg and what.lower() in msg.lower()


def test_unsupported_peft_types(peft_cases, tmp_path):
    c = peft_cases["plain"]
    # target_parameters (LoRA on expert parameters) is read: tests/test_expert_lora.py
    for field, value, algo in [("peft_type", "VERA", "VERA"), ("peft_type", "ADALORA", "ADALORA")]:
        d = tmp_path / (field + str(value)[:8])
        shutil.copytree(c["adapter"], d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg[field] = value
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=rf"^not supported yet: {algo}.* in .*adapter_config\.json"):
            detect_lora(d)
    # a VeRA tensor without a config
    t = {"base_model.model.x.vera_lambda_b": torch.zeros(4), "base_model.model.x.vera_lambda_d": torch.zeros(2)}
    f = write_safetensors(tmp_path / "vera.safetensors", t)
    with pytest.raises(ValueError, match=r"^not supported yet: VeRA in .*vera\.safetensors"):
        detect_lora(f)


# ----------------------------------------------------------------------------------------------
# kohya


def _sd15_file(tmp_path, name="sd15.safetensors", seed=0, with_meta=True):
    alphas = {m: 2.0 for m in list(SD15_KOHYA)[::2]}  # every other module: alpha 2 (scale 0.5); rest none
    t = kohya_tensors(SD15_KOHYA, SD15_BASE, rank=4, alphas=alphas, seed=seed, dtype=torch.float16)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_network_dim": "4",
            "ss_tag_frequency": "{}"} if with_meta else None
    return write_safetensors(tmp_path / name, t, meta), alphas


def _reference_apply(down, up, scale, x):
    """Apply a kohya module the way a network does: down then up (convs keep the kernel/padding)."""
    if down.dim() == 4 and up.dim() == 4:
        pad = down.shape[-1] // 2
        return scale * F.conv2d(F.conv2d(x, down, padding=pad), up)
    return scale * (x @ down.reshape(down.shape[0], -1).t()) @ up.reshape(up.shape[0], -1).t()


def test_kohya_sd15_detect_scale_match_and_deltas(tmp_path):
    f, alphas = _sd15_file(tmp_path)
    assert detect_lora(f) == "kohya"
    src = LoraSource(f)
    assert src.format == "kohya" and sorted(src.modules) == sorted(SD15_KOHYA)
    for m in src.modules:
        assert src.rank(m) == 4
        assert src.scale(m) == (0.5 if m in alphas else 1.0)
    assert src.layout("lora_unet_down_blocks_0_resnets_0_conv1") == "conv"
    src = MatchedLora(src, match_to_base(src, list(SD15_BASE), SD15_BASE))
    assert src.base_map == SD15_KOHYA
    assert guess_architecture(src) == "SD1.5"
    from safetensors.torch import load_file

    raw = {k: v.float() for k, v in load_file(str(f)).items()}
    g = torch.Generator().manual_seed(1)
    for m, key in SD15_KOHYA.items():
        shp = SD15_BASE[key]
        delta = src.delta_for(key, shp)
        assert delta.shape == shp and delta.dtype == torch.float32
        down, up = raw[m + ".lora_down.weight"], raw[m + ".lora_up.weight"]
        if len(shp) == 4:
            x = torch.randn(2, shp[1], 6, 6, generator=g)
            got = F.conv2d(x, delta, padding=shp[-1] // 2)
        else:
            x = torch.randn(3, shp[1], generator=g)
            got = x @ delta.t()
        torch.testing.assert_close(got, _reference_apply(down, up, src.scale(m), x), atol=1e-5, rtol=1e-4)


def test_kohya_sdxl_names_and_linear_4d(tmp_path):
    t = kohya_tensors(SDXL_KOHYA, SDXL_BASE, rank=3, alphas={m: 6.0 for m in SDXL_KOHYA}, linear_4d=True)
    f = write_safetensors(tmp_path / "sdxl.safetensors", t)
    src = LoraSource(f)
    assert t["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"].dim() == 4
    src = MatchedLora(src, match_to_base(src, list(SDXL_BASE), SDXL_BASE))
    assert src.base_map == SDXL_KOHYA
    assert guess_architecture(src) == "SDXL"
    key = SDXL_KOHYA["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    want = 2.0 * t[m + ".lora_up.weight"][:, :, 0, 0] @ t[m + ".lora_down.weight"][:, :, 0, 0]
    torch.testing.assert_close(src.delta_for(key, SDXL_BASE[key]), want)


def test_kohya_roundtrip_same_layout(tmp_path):
    f, _ = _sd15_file(tmp_path)
    src = LoraSource(f)
    src = MatchedLora(src, match_to_base(src, list(SD15_BASE), SD15_BASE))
    factors = {k: src.factors_for(k) for k in src.by_base}
    tensors, meta = to_kohya(factors, src, shapes=SD15_BASE, dtype=torch.float16, merged_from=["sd15.safetensors"])
    assert set(tensors) == set(read_header(f)[0]) | {m + ".alpha" for m in SD15_KOHYA}
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            assert t.dim() == 0 and float(t) == 4.0
        else:
            assert tuple(t.shape) == read_header(f)[0][k][1], k  # conv 1x1 / 3x3 shapes restored
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and "ss_tag_frequency" not in meta
    assert meta["modelspec.merged_from"] == "sd15.safetensors"
    out = write_safetensors(tmp_path / "out.safetensors", tensors, meta)
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert kohya_hashes(tensors, meta)["sshs_model_hash"] == meta["sshs_model_hash"]

    back = LoraSource(out)
    assert detect_lora(out) == "kohya" and guess_architecture(back) == "SD1.5"
    back = MatchedLora(back, match_to_base(back, list(SD15_BASE), SD15_BASE))
    assert back.base_map == SD15_KOHYA
    for key in SD15_KOHYA.values():
        assert back.scale(back.by_base[key]) == 1.0
        torch.testing.assert_close(back.delta_for(key, SD15_BASE[key]), src.delta_for(key, SD15_BASE[key]),
                                   atol=2e-3, rtol=2e-3)  # fp16 storage


def test_kohya_default_names_without_template(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (8, 6, 1, 1),
              "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (5, 7)}
    mods = {k: (torch.randn(2, math.prod(s[1:]), generator=g), torch.randn(s[0], 2, generator=g))
            for k, s in shapes.items()}
    tensors, _ = to_kohya(mods, shapes=shapes, hashes=False)
    assert tensors["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].shape == (2, 6, 1, 1)
    assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape == (5, 2)
    src = LoraSource(write_safetensors(tmp_path / "d.safetensors", tensors))
    m = match_to_base(src, list(shapes), shapes)
    src = MatchedLora(src, m)
    assert set(m.values()) == set(shapes)
    for k, (A, B) in mods.items():
        torch.testing.assert_close(src.delta_for(k, shapes[k]), (B @ A).reshape(shapes[k]))


def test_kohya_unmatched_module_is_an_error(tmp_path):
    t = kohya_tensors(SD15_KOHYA, SD15_BASE, rank=2)
    t.update(kohya_tensors({"lora_unet_mid_block_attentions_0_proj_out": "x"}, {"x": (16, 16)}, rank=2))
    f = write_safetensors(tmp_path / "extra.safetensors", t)
    with pytest.raises(ValueError) as e:
        match_to_base(LoraSource(f), list(SD15_BASE), SD15_BASE)
    msg = str(e.value)
    assert "lora_unet_mid_block_attentions_0_proj_out" in msg and "extra.safetensors" in msg
    assert "1 LoRA module(s)" in msg


def test_sd15_lora_on_sdxl_base_is_a_shape_error(tmp_path):
    # SD1.5-shaped LoRA (cross-attention input 768) written with the SDXL base's names
    sd15_shapes = dict(SDXL_BASE)
    k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    sd15_shapes[k] = (20, 768)
    t = kohya_tensors({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": k}, sd15_shapes)
    f = write_safetensors(tmp_path / "sd15_sgm.safetensors", t)
    src = LoraSource(f)
    assert guess_architecture(src) == "SD1.5"
    with pytest.raises(ValueError, match=r"shape mismatch: LoRA module 'lora_unet_input_blocks_4_1_transformer_"
                                         r"blocks_0_attn2_to_k' in .*sd15_sgm\.safetensors gives a delta of "
                                         r"20x768 .*attn2\.to_k\.weight' has shape \[20, 2048\]"):
        match_to_base(src, list(SDXL_BASE), SDXL_BASE)


def test_mixed_families_rejected(tmp_path):
    f1, _ = _sd15_file(tmp_path, "a.safetensors", with_meta=False)
    f2, _ = _sd15_file(tmp_path, "b.safetensors", seed=1)
    f3 = write_safetensors(tmp_path / "xl.safetensors", kohya_tensors(SDXL_KOHYA, SDXL_BASE, rank=2))
    a, b, xl = LoraSource(f1), LoraSource(f2), LoraSource(f3)
    assert check_compatible([a, b]) == "SD1.5"
    with pytest.raises(ValueError, match=r"different model families.*a\.safetensors is SD1\.5.*xl\.safetensors is SDXL"):
        check_compatible([a, xl])


def test_flux_kohya_names(tmp_path):
    base = {"double_blocks.0.img_attn.qkv.weight": (18, 6), "single_blocks.0.linear1.weight": (30, 6),
            "double_blocks.0.img_attn.norm.query_norm.scale": (6,)}
    mods = {"lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
            "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1.weight"}
    f = write_safetensors(tmp_path / "flux.safetensors", kohya_tensors(mods, base, rank=2, alphas={m: 1.0 for m in mods}),
                          {"ss_base_model_version": "flux1"})
    src = LoraSource(f)
    assert guess_architecture(src) == "Flux"
    assert match_to_base(src, list(base), base) == mods
    comfy = {"model.diffusion_model." + k: v for k, v in base.items()}  # ComfyUI single-file layout
    assert match_to_base(LoraSource(f), list(comfy), comfy) == {m: "model.diffusion_model." + k for m, k in mods.items()}
    assert describe_lora(f)["scales"] == {0.5: 2}


def test_detect_reads_only_the_header(tmp_path):
    f, _ = _sd15_file(tmp_path)
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + n] + b"\0" * 64)  # header intact, tensor data gone
    assert detect_lora(cut) == "kohya"
    full = write_safetensors(tmp_path / "full.safetensors", random_base(SD15_BASE))
    assert detect_lora(full) is None
    with pytest.raises(ValueError, match="is not a LoRA"):
        LoraSource(full)


def test_describe_kohya(tmp_path):
    f, alphas = _sd15_file(tmp_path)
    info = describe_lora(f)
    assert info["format"] == "kohya" and info["architecture"] == "SD1.5" and info["modules"] == 6
    assert info["ranks"] == {4: 6} and info["alphas"] == {2.0: 3, 4.0: 3} and info["scales"] == {0.5: 3, 1.0: 3}
    assert info["targets"]["to_k"] == 1 and info["targets"]["conv1"] == 1 and info["targets"]["fc1"] == 1
    assert info["layouts"] == {"linear": 4, "conv": 2}
    assert info["metadata"]["ss_base_model_version"] == "sd_v1"
    assert info["parameters"] == sum(math.prod(s) for k, (_, s) in read_header(f)[0].items() if not k.endswith(".alpha"))


# ----------------------------------------------------------------------------------------------
# diffusers (PEFT names with a component prefix)


def test_diffusers_format(tmp_path):
    g = torch.Generator().manual_seed(3)
    mods = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "unet.down_blocks.0.resnets.0.conv1": "down_blocks.0.resnets.0.conv1.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"}
    t = {}
    for m, k in mods.items():
        s = SD15_BASE[k]
        t[m + ".lora_A.weight"] = torch.randn(4, *s[1:], generator=g)
        t[m + ".lora_B.weight"] = torch.randn(s[0], 4, *([1, 1] if len(s) == 4 else []), generator=g)
    t["unet.down_blocks.0.resnets.0.conv1.alpha"] = torch.tensor(8.0)
    meta = {"lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 2})}
    f = write_safetensors(tmp_path / "pytorch_lora_weights.safetensors", t, meta)
    assert detect_lora(f) == "diffusers" and detect_lora(tmp_path) == "diffusers"
    src = LoraSource(f)
    src = MatchedLora(src, match_to_base(src, list(SD15_BASE), SD15_BASE))
    assert src.base_map == mods
    scales = {m: src.scale(m) for m in mods}
    assert scales == {list(mods)[0]: 1.0, list(mods)[1]: 2.0, list(mods)[2]: 0.5}
    assert guess_architecture(src) == "SD1.5"
    m = "unet.down_blocks.0.resnets.0.conv1"
    x = torch.randn(1, 4, 5, 5, generator=g)
    want = 2.0 * F.conv2d(F.conv2d(x, t[m + ".lora_A.weight"], padding=1), t[m + ".lora_B.weight"])
    got = F.conv2d(x, src.delta_for(mods[m], SD15_BASE[mods[m]]), padding=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_malformed_lora_files(tmp_path):
    t = kohya_tensors({"lora_unet_a": "a.weight"}, {"a.weight": (4, 4)}, rank=2)
    del t["lora_unet_a.lora_up.weight"]
    with pytest.raises(ValueError, match=r"module 'lora_unet_a' has no B \(up\) tensor"):
        LoraSource(write_safetensors(tmp_path / "m.safetensors", t))
    t = kohya_tensors({"lora_unet_a": "a.weight"}, {"a.weight": (4, 4)}, rank=2)
    t["lora_unet_a.something_else"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unrecognised tensor 'lora_unet_a\.something_else'"):
        LoraSource(write_safetensors(tmp_path / "u.safetensors", t))


@pytest.mark.parametrize("mods,meta,want", [
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)}, None, "SDXL"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}, None, "SD1.5"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)}, None, "SD2"),
    ({"lora_unet_some_block_proj": (8, 8)}, {"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ({"lora_unet_some_block_proj": (8, 8)}, {"modelspec.architecture": "stable-diffusion-v1/lora"}, "SD1.5"),
    ({"lora_unet_some_block_proj": (8, 8)}, None, "unknown"),
    ({"lora_unet_joint_blocks_0_x_attn_qkv": (8, 8)}, None, "SD3"),
])
def test_guess_architecture_evidence(tmp_path, mods, meta, want):
    shapes = {m + ".weight": s for m, s in mods.items()}
    t = kohya_tensors({m: m + ".weight" for m in mods}, shapes, rank=2)
    src = LoraSource(write_safetensors(tmp_path / "a.safetensors", t, meta))
    assert guess_architecture(src) == want
