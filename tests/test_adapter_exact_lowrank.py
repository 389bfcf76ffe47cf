"""Exact low-rank forms of Tucker LoCon, LoHa and LoKr (spec adapters.md P24): their factors
reproduce the dense delta, and linear / task arithmetic into a LoRA output stays exact with the
ranks summed (no SVD, no approximation report)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora
from mergekit_ortho.testing.checkpoints import random_base, write_safetensors
from mergekit_ortho.testing.loras import kohya_tensors

BASE = {"lin.weight": (8, 6), "conv.weight": (6, 4, 3, 3), "lin2.weight": (8, 6), "lin3.weight": (16, 16),
        "conv2.weight": (6, 4, 3, 3), "lin4.weight": (8, 6), "conv3.weight": (6, 4, 3, 3)}
LYCO = {  # module -> (stored role shapes, alpha)
    "conv": ({"lora_down.weight": (2, 4, 1, 1), "lora_mid.weight": (2, 2, 3, 3), "lora_up.weight": (6, 2, 1, 1)}, 1.0),
    "lin": ({"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 3), "hada_w2_b": (3, 6)}, 1.0),
    "conv3": ({"hada_w1_a": (6, 2), "hada_w1_b": (2, 36), "hada_w2_a": (6, 2), "hada_w2_b": (2, 36)}, 4.0),
    "lin2": ({"lokr_w1": (2, 2), "lokr_w2": (4, 3)}, None),
    "lin3": ({"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}, 2.0),
    "conv2": ({"lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 3), "lokr_w2_b": (1, 2)}, 1.0),
    "lin4": ({"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 3)}, 1.0),
}
TYPES = {"conv": "LoCon (Tucker)", "lin": "LoHa", "conv3": "LoHa", "lin2": "LoKr", "lin3": "LoKr", "conv2": "LoKr",
         "lin4": "LoKr"}


def _matched(path: Path, base: dict) -> MatchedLora:
    src = LoraSource(path)
    return MatchedLora(src, match_to_base(src, list(base), {k: v.shape for k, v in base.items()}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    base = write_safetensors(root / "base.safetensors", random_base(BASE))
    g = torch.Generator().manual_seed(11)
    t = {}
    for mod, (roles, alpha) in LYCO.items():
        for role, shape in roles.items():
            t[f"lora_unet_{mod}.{role}"] = 0.4 * torch.randn(*shape, generator=g)
        if alpha is not None:
            t[f"lora_unet_{mod}.alpha"] = torch.tensor(alpha)
    lyco = write_safetensors(root / "lyco.safetensors", t, {"ss_network_module": "lycoris.kohya"})
    mods = {f"lora_unet_{k.removesuffix('.weight')}": k for k in BASE}
    plain = write_safetensors(root / "plain.safetensors", kohya_tensors(mods, BASE, rank=3, seed=4,
                                                                        alphas={m: 1.5 for m in mods}))
    return {"root": root, "base": base, "lyco": lyco, "plain": plain, "b": load_file(str(base))}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_exact_factors_reproduce_the_dense_delta(files):
    src = _matched(files["lyco"], files["b"])
    for mod, kind in TYPES.items():
        key = f"{mod}.weight"
        assert src.type_name(src.by_base[key]) == kind and not src.is_factors_for(key)
        A, B = src.exact_factors_for(key)
        d = src.delta_for(key, BASE[key])
        assert _rel((B @ A).reshape(d.shape), d) < 1e-6, mod
    # the ranks: Tucker LoCon r, LoHa r1*r2, LoKr rank(w1)*rank(w2) (a full factor counts its smaller side)
    ranks = {m: src.exact_factors_for(f"{m}.weight")[0].shape[0] for m in TYPES}
    assert ranks == {"conv": 2, "lin": 6, "conv3": 4, "lin2": 2 * 3, "lin3": 1, "conv2": 2 * 1, "lin4": 2 * 1}


def test_loha_tucker_has_no_exact_form(tmp_path, files):
    t = {"lora_unet_conv.hada_w1_a": torch.randn(2, 6), "lora_unet_conv.hada_w1_b": torch.randn(2, 4),
         "lora_unet_conv.hada_w2_a": torch.randn(2, 6), "lora_unet_conv.hada_w2_b": torch.randn(2, 4),
         "lora_unet_conv.hada_t1": torch.randn(2, 2, 3, 3), "lora_unet_conv.hada_t2": torch.randn(2, 2, 3, 3)}
    src = _matched(write_safetensors(tmp_path / "t.safetensors", t, {"ss_network_module": "lycoris.kohya"}),
                   files["b"])
    assert src.exact_factors_for("conv.weight") is None


@pytest.mark.parametrize("method,params,norm", [("task_arithmetic", {}, 1.0), ("linear", {}, 0.7 + 0.5)])
def test_linear_merge_into_a_lora_output_is_exact_and_keeps_the_rank_sum(files, tmp_path, cli, method, params, norm):
    w = {"lyco": 0.7, "plain": -0.4 if method == "task_arithmetic" else 0.5}
    doc = {"merge_method": method, "base_model": str(files["base"]), "output": {"format": "kohya"},
           "models": [{"model": str(files[n]), "parameters": {"weight": w[n]}} for n in w]}
    if params:
        doc["parameters"] = params
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "o.safetensors")
    assert code == 0, out + err
    got = _matched(tmp_path / "o.safetensors", files["b"])
    ly, pl = _matched(files["lyco"], files["b"]), _matched(files["plain"], files["b"])
    for key, shape in BASE.items():
        want = (w["lyco"] * ly.delta_for(key, shape) + w["plain"] * pl.delta_for(key, shape)) / norm
        assert _rel(got.delta_for(key, shape), want) < 1e-6, key
        r_in = ly.exact_factors_for(key)[0].shape[0] + 3
        assert got.rank(got.by_base[key]) == r_in, key
