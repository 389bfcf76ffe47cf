"""FP8 output (``out_dtype: float8_e4m3fn`` / ``float8_e5m2``): the weights an FP8 input stores
quantised are written re-quantised with fresh block scales (``<name>_scale_inv``, float32, the
DeepSeek-V3 layout), everything else in bfloat16, and config.json says so; our reader, `merge
inspect` and transformers read the output back (issue 15)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from test_fp8 import BLOCK, _to_fp8
from test_run import load_dir

from mergekit_ortho.testing.hf_models import tiny_llama

FMAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
REL = {"float8_e4m3fn": 2.0 ** -4, "float8_e5m2": 2.0 ** -3}  # half an ulp: 3 / 2 mantissa bits
FLOOR = {"float8_e4m3fn": 2.0 ** -10, "float8_e5m2": 2.0 ** -17}  # half the smallest subnormal


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8out")
    tiny_llama(root / "a", seed=0)
    tiny_llama(root / "b", seed=1)
    real = _to_fp8(root / "a", root / "a_fp8")
    return root, real


def _qdq(w: torch.Tensor, block, dtype: str):
    """Quantise-dequantise by the rule (written here independently of fp8_out): per block,
    scale = amax / finfo.max, codes = fp8(w / scale), value = codes * scale."""
    rows, cols = w.shape
    r, c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scale = torch.ones(r, c)
    out = torch.empty_like(w)
    for i in range(r):
        for j in range(c):
            blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            amax = blk.abs().max()
            s = amax / FMAX[dtype] if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = \
                (blk / s).to(getattr(torch, dtype)).float() * s
    return out, scale


def _recipe(tmp_path, root, out_dtype, extra=""):
    return write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nout_dtype: {out_dtype}\nmodels:\n"
                                             f"  - model: {root / 'a_fp8'}\n    parameters: {{weight: 0.5}}\n"
                                             f"  - model: {root / 'b'}\n    parameters: {{weight: 0.5}}\n" + extra)


def _reread(d):
    from mergekit_ortho.fp8 import dequantised
    from mergekit_ortho.sources.checkpoint import CheckpointSource

    src = dequantised(CheckpointSource(str(d), "out"), json.loads((d / "config.json").read_text()))
    try:
        return {k: src.get(k).float() for k in src.infos}, src
    finally:
        src.close()


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_round_trip_is_the_quantise_dequantise_of_the_merge(cli, tmp_path, models, dtype):
    root, real = models
    code, out, err = cli("run", _recipe(tmp_path, root, dtype), "--out", tmp_path / "out")
    assert code == 0, err
    assert "15 weight(s) the input scheme quantised re-quantised with fresh scales; 6 other tensor(s) written in " \
           "bfloat16" in err and "re-quantised with fresh scales (1 activation scale" in err
    b = load_file(str(root / "b" / "model.safetensors"))
    stored = load_dir(tmp_path / "out")
    got, src = _reread(tmp_path / "out")
    assert set(got) == set(b) and src.scheme.startswith(f"FP8 ({dtype}), block scales 16x16, 15 tensors")
    for k in b:
        merged = 0.5 * real[k].float() + 0.5 * b[k].float()
        if k + "_scale_inv" not in stored:
            assert stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], merged.to(torch.bfloat16)), k
            continue
        want, scale = _qdq(merged, BLOCK, dtype)
        assert stored[k].dtype == getattr(torch, dtype) and stored[k].shape == merged.shape
        assert stored[k + "_scale_inv"].dtype == torch.float32
        assert torch.equal(stored[k + "_scale_inv"], scale), k
        assert torch.equal(got[k], want), k
        bound = REL[dtype] * merged.abs() + FLOOR[dtype] * torch.kron(scale, torch.ones(BLOCK))[: merged.shape[0],
                                                                                              : merged.shape[1]]
        assert bool(((got[k] - merged).abs() <= bound * (1 + 1e-6)).all()), k
        assert float((got[k] - merged).abs().max()) > 0  # it really was quantised
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": dtype[7:11], "activation_scheme": "dynamic",
                                          "weight_block_size": list(BLOCK),
                                          "modules_to_not_convert": ["model.embed_tokens"]}
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    code, out, err = cli("inspect", tmp_path / "out")
    assert code == 0 and f"quantisation: FP8 ({dtype}), block scales 16x16, 15 tensors" in out, out


def test_several_shards_and_transformers_loads_it(cli, tmp_path, models):
    """Scales go in the last shard(s), the index names every tensor; transformers (on CPU it
    dequantises fine-grained FP8 on load) gives the weights our reader gives."""
    from transformers import LlamaForCausalLM

    root, _ = models
    code, out, err = cli("run", _recipe(tmp_path, root, "float8_e4m3fn", "output: {shard_size: 8000}\n"),
                         "--out", tmp_path / "out")
    assert code == 0, err
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3
    scale_files = {f for k, f in index.items() if k.endswith("_scale_inv")}
    assert len([k for k in index if k.endswith("_scale_inv")]) == 15
    assert not scale_files & {f for k, f in index.items() if not k.endswith("_scale_inv")}
    got, _ = _reread(tmp_path / "out")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    sd = model.state_dict()
    for k, v in got.items():
        assert torch.allclose(sd[k].float(), v, rtol=2 ** -8, atol=1e-6), k


def test_fp8_output_needs_an_fp8_input(cli, tmp_path, models):
    root, _ = models
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nout_dtype: float8_e4m3fn\nmodels:\n"
                                          f"  - model: {root / 'a'}\n  - model: {root / 'b'}\n")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no input is FP8" in err
    assert not (tmp_path / "out").exists()
    code, out, err = cli("run", _recipe(tmp_path, root, "float8_e4m3fn"), "--shard", "1/2", "--stage",
                         tmp_path / "stage")
    assert code == 2 and "not supported yet: --shard with an FP8 out_dtype" in err, err


def test_encode_default_blocks_partial_and_zero():
    from mergekit_ortho.fp8_out import Fp8Output, requested

    assert requested("float8_e4m3fn") == requested("fp8") == "float8_e4m3fn"
    assert requested("e5m2") == "float8_e5m2" and requested("bfloat16") is None
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)
    w[128:256, :128] = 0  # an all-zero block: scale 1, codes 0
    out = Fp8Output("float8_e4m3fn", (128, 128), {"w": "w_scale_inv"})
    (n1, codes), (n2, scale) = out.encode("w", w)
    assert (n1, n2) == ("w", "w_scale_inv") and codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    assert scale[1, 0] == 1 and not bool(codes[128:256, :128].float().any())
    want, want_scale = _qdq(w, (128, 128), "float8_e4m3fn")
    assert torch.equal(scale, want_scale)
    back = codes.float() * torch.kron(scale, torch.ones(128, 128))[:300, :200]
    assert torch.equal(back, want)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        out.encode("w", w)
