"""FP8 checkpoints with block scales (DeepSeek-V3 layout) and channel scales are read dequantised:
a merge of an FP8 model gives the merge of the weights it encodes, and the output loads in
transformers without its quantization_config."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from test_run import load_dir

from mergekit_ortho.fp8 import quantise_blocks
from mergekit_ortho.testing.hf_models import load_causal_lm, tiny_llama

BLOCK = (16, 16)


def _expand(scale: torch.Tensor, shape) -> torch.Tensor:
    """Each block's scale over its block (written independently of fp8.py's repeat_interleave)."""
    return torch.kron(scale, torch.ones(BLOCK))[: shape[0], : shape[1]]


def _to_fp8(src, dst, extra: dict | None = None):
    """An FP8 copy of a float checkpoint: block scales on the projections, a channel scale on the
    head, an activation scale beside one projection; returns the weights it encodes."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    out, real = {}, {}
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            codes, scale = quantise_blocks(v, BLOCK)
            out[k], out[k + "_scale_inv"] = codes, scale
            real[k] = codes.float() * _expand(scale, v.shape)
        elif k == "lm_head.weight":
            scale = v.abs().amax(1, keepdim=True) / 448
            out[k], out[k + "_scale"] = (v / scale).to(torch.float8_e4m3fn), scale
            real[k] = out[k].float() * scale
        else:
            out[k] = real[k] = v
    out["model.layers.0.self_attn.q_proj.input_scale"] = torch.tensor(0.5)
    out.update(extra or {})
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return real


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    tiny_llama(root / "a", seed=0)
    tiny_llama(root / "b", seed=1)
    real = _to_fp8(root / "a", root / "a_fp8")
    return root, real


def _linear(models) -> str:
    return "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models)


def test_fp8_block_and_channel_scales_are_dequantised_and_the_output_loads(cli, tmp_path, fp8_models):
    root, real = fp8_models
    r = write_recipe(tmp_path / "r.yaml", _linear([root / "a_fp8", root / "b"]))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    assert "read dequantised" in err and "activation scale" in err
    got = load_dir(tmp_path / "out")
    b = load_file(str(root / "b" / "model.safetensors"))
    assert set(got) == set(b)  # no scale tensors written
    for k in b:
        want = 0.5 * real[k].float() + 0.5 * b[k].float()
        assert torch.allclose(got[k].float(), want, rtol=1e-6, atol=1e-7), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = load_causal_lm(tmp_path / "out")
    ref = load_causal_lm(root / "b")
    ref.load_state_dict({k: 0.5 * real[k].float() + 0.5 * b[k].float() for k in b}, strict=False)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_a_dequantised_fp8_model_alone_is_written_in_bf16(cli, tmp_path, fp8_models):
    root, real = fp8_models
    r = write_recipe(tmp_path / "r.yaml", _linear([root / "a_fp8", root / "a_fp8"]))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    got = load_dir(tmp_path / "out")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got[q].dtype == torch.bfloat16 and torch.equal(got[q], real[q].to(torch.bfloat16))


def test_fp8_without_scales_or_with_wrong_scales_is_one_line(cli, tmp_path, fp8_models):
    root, _ = fp8_models
    bad = tmp_path / "bad"
    shutil.copytree(root / "a_fp8", bad)
    sd = load_file(str(bad / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    del sd[q + "_scale_inv"]
    save_file(sd, str(bad / "model.safetensors"))
    r = write_recipe(tmp_path / "r.yaml", _linear([bad, root / "b"]))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and f"'{q}' is float8_e4m3fn without its scale" in err and "Traceback" not in err
    sd[q + "_scale_inv"] = torch.ones(1, 1)
    save_file(sd, str(bad / "model.safetensors"))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "needs [2, 2]" in err, err
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_family_head_vocabulary_and_fp8_scheme(cli, fp8_models):
    root, _ = fp8_models
    code, out, err = cli("inspect", root / "a_fp8")
    assert code == 0, err
    assert "family: LlamaForCausalLM" in out and "model.layers: 2 (config: 2)" in out
    assert "model.embed_tokens.weight (64 rows)" in out and "tied=False stored=True" in out
    assert "block + tensor/channel scales 16x16, 15 tensors" in out
    code, out, err = cli("inspect", root / "b")
    assert code == 0 and "quantisation" not in out
