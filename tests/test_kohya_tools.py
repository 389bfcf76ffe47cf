"""`merge resize` / `merge extract` (kohya resize_lora / extract_lora_from_models semantics) and the
one-alpha kohya output that diffusers loads right.

Goldens: ../shared/specs/adapters.md P21 (resize rank table, fixed-rank delta), P22/P23 (the SVD +
signed-quantile clamp shared by svd_merge_lora and extract_lora_from_models). References are
independent of the code under test: torch SVDs of the dense deltas, PEFT's merge_and_unload,
diffusers' own kohya loader.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_ortho.adapters.extract import extract_module
from mergekit_ortho.adapters.keymap import kohya_default_name
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.resize import resize_module, select_rank
from mergekit_ortho.lora_out import to_kohya
from mergekit_ortho.testing.checkpoints import write_safetensors
from mergekit_ortho.testing.loras import SD15_BASE, SD15_KOHYA, kohya_tensors, write_peft_adapter


def g(shape, a, b, s):
    """The spec's P0 generator (float64)."""
    k = torch.arange(math.prod(shape), dtype=torch.float64)
    return (s * torch.sin(a * k * k + b)).reshape(shape)


P21_DOWN = g((4, 6), 1.3, 0.5, 0.5)
P21_UP = g((8, 4), 0.9, 0.2, 0.5)  # alpha 2, r 4: scale 0.5


# ------------------------------------------------------------------------------- P21 goldens

@pytest.mark.parametrize("rule,t,rank,alpha,fro", [
    ("sv_ratio", 2, 3, 1.5, 0.999089199), ("sv_ratio", 5, 4, 2.0, 1.0),
    ("sv_cumulative", 0.5, 3, 1.5, 0.999089199), ("sv_cumulative", 0.7, 3, 1.5, 0.999089199),
    ("sv_cumulative", 0.9, 4, 2.0, 1.0), ("sv_fro", 0.5, 2, 1.0, 0.941888393),
    ("sv_fro", 0.9, 3, 1.5, 0.999089199), ("sv_fro", 0.99, 4, 2.0, 1.0),
])
def test_p21_dynamic_rank_table(rule, t, rank, alpha, fro):
    A, B = P21_DOWN.float(), (0.5 * P21_UP).float()
    r = resize_module(A, B, 0.5, 4, rule, t).report
    assert (r["rank_out"], r["alpha_out"]) == (rank, alpha)
    assert r["fro_retained"] == pytest.approx(fro, rel=1e-6)
    assert r["rel_error"] == pytest.approx(math.sqrt(max(0.0, 1 - fro * fro)), abs=1e-6)


def test_p21_cap_and_fixed_rank_golden():
    A, B = P21_DOWN.float(), (0.5 * P21_UP).float()
    assert resize_module(A, B, 0.5, 2, "sv_ratio", 1000).report["rank_out"] == 2
    res = resize_module(A, B, 0.5, 2, None, None)
    assert res.report["rank_out"] == 2 and res.report["alpha_out"] == 1.0
    assert res.report["rel_error"] == pytest.approx(0.335925967, rel=1e-6)
    d = (res.B @ res.A).double()
    assert float(d.sum()) == pytest.approx(0.1546492452, rel=1e-6)
    assert float(d.norm()) == pytest.approx(0.9205568042, rel=1e-6)
    want = [0.00268444251, -0.0118190824, 0.00120451811, 0.00935104986, 0.000564916068, -0.00481270729]
    torch.testing.assert_close(d[0, :6], torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-8)


def test_select_rank_rules_edge_cases():
    S = torch.tensor([3.0, 1.0, 0.5, 0.0, 0.0])
    assert select_rank(torch.zeros(5), 4, "sv_fro", 0.9) == 1  # a zero module: rank 1
    assert select_rank(S, None, "sv_ratio", 1.0) == 2  # idx clamped to >= 1, then + 1
    assert select_rank(S, None, "sv_cumulative", 1.0) == 4  # kohya's "+1" past the last useful one
    assert select_rank(S, 3, "sv_cumulative", 1.0) == 3
    assert select_rank(S, 7, None, None) == 7


# ------------------------------------------------------------------------------- P22 / P23 golden

def test_p22_p23_svd_and_signed_quantile_clamp_golden():
    down2, up2 = g((2, 6), 0.77, 0.1, 0.5), g((8, 2), 0.33, 0.9, 0.5)
    W = 0.7 * 0.5 * P21_UP @ P21_DOWN + 0.6 * 1.5 * up2 @ down2  # tuned - org
    A, B, rep = extract_module(W, 2, clamp_quantile=0.99)
    assert rep["rank_out"] == 2 and rep["clamped_entries"] == 1
    assert rep["rel_error"] == pytest.approx(0.425979814, rel=1e-6)
    P = B.double() @ A.double()
    assert float(P.sum()) == pytest.approx(0.8672306293, rel=1e-6)
    assert float(P.norm()) == pytest.approx(0.8758041613, rel=1e-6)
    want = [0.113187041, 0.146675349, -0.180450966, 0.0159794427, 0.194490858, 0.0105203749]
    torch.testing.assert_close(P[0, :6], torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    _, _, plain = extract_module(W, 2)
    assert plain["rel_error"] == pytest.approx(0.425241342, rel=1e-6)  # unclamped


# ------------------------------------------------------------------------------- resize, kohya

ALPHAS = {m: a for m, a in zip(SD15_KOHYA, (2.0, 4.0, 1.0, 8.0, 3.0, 4.0))}
SS_META = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
           "ss_base_model_version": "sd_v1", "ss_training_comment": "my lora", "modelspec.title": "t",
           "modelspec.architecture": "stable-diffusion-v1/lora", "sshs_model_hash": "stale"}


@pytest.fixture()
def sd15_lora(tmp_path) -> Path:
    t = kohya_tensors(SD15_KOHYA, SD15_BASE, rank=4, alphas=ALPHAS, seed=3)
    return write_safetensors(tmp_path / "in.safetensors", t, SS_META)


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    src = LoraSource(path)
    return {m: src.delta(m).double() for m in src.modules}


def _best(d: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _file_hash_ok(path: Path, meta: dict) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_resize_kohya_fixed_rank(sd15_lora, tmp_path, cli):
    out = tmp_path / "out.safetensors"
    code, so, se = cli("resize", sd15_lora, "--out", out, "--rank", "2")
    assert code == 0, so + se
    before, after = _deltas(sd15_lora), _deltas(out)
    assert set(before) == set(after)
    for m, d in before.items():
        torch.testing.assert_close(after[m], _best(d, 2), rtol=1e-5, atol=1e-6)
    tensors = load_file(str(out))
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 1  # one alpha for every module (diffusers-safe)
    assert all(v.shape[0] == 2 for k, v in tensors.items() if k.endswith("lora_down.weight"))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 2; my lora"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == str(alphas.pop())
    assert meta["modelspec.title"] == "t" and meta["ss_base_model_version"] == "sd_v1"  # kept
    _file_hash_ok(out, meta)
    rep = json.loads(out.with_suffix(".report.json").read_text())
    errs = {m: r["rel_error"] for m, r in rep["modules"].items()}
    for m, d in before.items():
        assert errs[m] == pytest.approx(float((d - _best(d, 2)).norm() / d.norm()), rel=1e-5)
    assert "rank in→out" in so and "4→2" in so


def test_resize_kohya_alpha_mode_writes_scale_times_rank(sd15_lora, tmp_path, cli):
    out = tmp_path / "k.safetensors"
    assert cli("resize", sd15_lora, "--out", out, "--rank", "2", "--kohya-alpha")[0] == 0
    t = load_file(str(out))
    for m, a in ALPHAS.items():
        assert float(t[m + ".alpha"]) == pytest.approx(a / 4 * 2)
    before, after = _deltas(sd15_lora), _deltas(out)
    for m, d in before.items():
        torch.testing.assert_close(after[m], _best(d, 2), rtol=1e-5, atol=1e-6)


def test_resize_at_or_above_input_rank_is_exact(sd15_lora, tmp_path, cli):
    for rank in ("4", "9"):
        out = tmp_path / f"r{rank}.safetensors"
        assert cli("resize", sd15_lora, "--out", out, "--rank", rank)[0] == 0
        before, after = _deltas(sd15_lora), _deltas(out)
        for m, d in before.items():
            torch.testing.assert_close(after[m], d, rtol=1e-6, atol=1e-7)
        rep = json.loads(out.with_suffix(".report.json").read_text())
        assert all(r["rank_out"] == 4 and r["rel_error"] == 0 for r in rep["modules"].values())


def test_resize_dynamic_and_conv_rank(sd15_lora, tmp_path, cli):
    out = tmp_path / "dyn.safetensors"
    code, so, se = cli("resize", sd15_lora, "--out", out, "--rule", "sv_fro", "--threshold", "0.9",
                       "--conv-rank", "1")
    assert code == 0, so + se
    src = LoraSource(sd15_lora)
    rep = json.loads(out.with_suffix(".report.json").read_text())["modules"]
    for m in src.modules:
        conv = len(src.stored_shapes(m)[0]) == 4  # conv1 3x3 and proj_in 1x1 both count as conv
        d = src.delta(m).double()
        S = torch.linalg.svdvals(d)
        want = 1 if conv else min(select_rank(S, None, "sv_fro", 0.9), 4)
        assert rep[m]["rank_out"] == want, m
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 4; ")


def test_resize_peft_adapter_matches_peft_merge(tmp_path, cli):
    from mergekit_ortho.testing.hf_models import load_causal_lm, tiny_llama
    from mergekit_ortho.testing.loras import make_peft_adapter, peft_merged_deltas

    base = tiny_llama(tmp_path / "base")
    a = make_peft_adapter(load_causal_lm(base), tmp_path / "a", seed=1, r=4, lora_alpha=8,
                          target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 3})
    want = peft_merged_deltas(load_causal_lm(base), a)
    for rank in ("4", "2"):
        out = tmp_path / f"out{rank}"
        code, so, se = cli("resize", a, "--out", out, "--rank", rank)
        assert code == 0, so + se
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == int(rank)
        got = peft_merged_deltas(load_causal_lm(base), out)  # the output loads in peft itself
        assert set(got) == set(want)
        for k, d in want.items():
            ref = d if rank == "4" else _best(d.double(), 2).float()
            torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-6)
        assert (out / "merge_report.json").is_file()


# ------------------------------------------------------------------------------- extract

@pytest.fixture()
def sd15_pair(tmp_path):
    gen = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=gen) * 0.1 for k, s in SD15_BASE.items()}
    tuned = {}
    for k, v in base.items():
        if v.dim() >= 2:
            rows, cols = v.shape[0], v[0].numel()
            low = torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen) * 0.02
            tuned[k] = v + low.reshape(v.shape) + 1e-3 * torch.randn(v.shape, generator=gen)
        else:
            tuned[k] = v + 0.01
    meta = {"modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "base"}
    return (write_safetensors(tmp_path / "base.safetensors", base, meta),
            write_safetensors(tmp_path / "tuned.safetensors", tuned, dict(meta, **{"modelspec.title": "tuned"})),
            base, tuned)


def _apply(base_path: Path, lora: Path, tmp: Path, cli) -> dict[str, torch.Tensor]:
    import yaml

    r = tmp / f"apply-{lora.name}.yaml"
    r.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base_path),
                                 "models": [{"model": str(lora)}], "output": {"format": "full"}}))
    code, so, se = cli("run", r, "--out", tmp / f"applied-{lora.name}")
    assert code == 0, so + se
    return load_file(str(tmp / f"applied-{lora.name}" / "model.safetensors"))


def test_extract_kohya_round_trip_reproduces_the_finetune_to_the_reported_error(sd15_pair, tmp_path, cli):
    bpath, tpath, base, tuned = sd15_pair
    out = tmp_path / "x.safetensors"
    code, so, se = cli("extract", bpath, tpath, "--out", out, "--rank", "2", "--conv-rank", "2")
    assert code == 0, so + se
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["skipped"] == {"not a weight": 1}  # the conv bias
    merged = _apply(bpath, out, tmp_path, cli)
    for k, r in rep["modules"].items():
        d = (tuned[k] - base[k]).double()
        err = float((merged[k].double() - tuned[k].double()).norm() / d.norm())
        assert err == pytest.approx(r["rel_error"], rel=1e-3, abs=1e-5), k
        assert 0.01 < r["rel_error"] < 0.9  # rank 2 of a rank-3 + noise delta: lossy, not useless
    assert set(rep["modules"]) == {k for k in SD15_BASE if len(SD15_BASE[k]) >= 2}
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and "modelspec.title" not in meta
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    _file_hash_ok(out, meta)


def test_full_rank_extract_is_exact_peft_and_kohya(sd15_pair, tmp_path, cli):
    bpath, tpath, base, tuned = sd15_pair
    for fmt in ("kohya", "peft"):
        out = tmp_path / f"full-{fmt}"
        code, so, se = cli("extract", bpath, tpath, "--out", out, "--rank", "1000", "--conv-rank", "1000",
                           "--format", fmt)
        assert code == 0, so + se
        rep = json.loads((out / "merge_report.json").read_text())
        assert max(r["rel_error"] for r in rep["modules"].values()) < 1e-5
        lora = out / f"{out.name}.safetensors" if fmt == "kohya" else out  # a kohya directory holds the file
        merged = _apply(bpath, lora, tmp_path, cli)
        for k in rep["modules"]:
            torch.testing.assert_close(merged[k], tuned[k], rtol=1e-5, atol=1e-6)


def test_extract_skips_unchanged_and_kxk_without_conv_rank(sd15_pair, tmp_path, cli):
    bpath, _, base, tuned = sd15_pair
    k0 = "down_blocks.0.attentions.0.proj_in.weight"
    part = dict(base, **{k0: tuned[k0]})
    tp = write_safetensors(tmp_path / "part.safetensors", part)
    out = tmp_path / "p.safetensors"
    code, so, se = cli("extract", bpath, tp, "--out", out, "--rank", "4")
    assert code == 0, so + se
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert list(rep["modules"]) == [k0]
    assert rep["skipped"]["conv kxk (pass --conv-rank)"] == 1 and rep["skipped"]["unchanged"] == 4


# ------------------------------------------------------------------------------- diffusers

def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=4)


def _diffusers_deltas(unet, path: Path) -> dict[str, torch.Tensor]:
    """{base key: fused - original} after diffusers' own kohya loader and fuse_lora."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    sd = {k: v.clone() for k, v in unet.state_dict().items()}
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="x")
    unet.fuse_lora()
    after = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    return {k: after[k] - sd[k] for k in sd if k in after}


def test_kohya_output_with_mixed_ranks_loads_exactly_in_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    unet = _tiny_unet()
    sd = {k: v.clone() for k, v in unet.state_dict().items()}
    keys = [k for k, v in sd.items() if v.dim() in (2, 4) and ".attentions.0." in k and k.endswith("weight")][:12]
    gen = torch.Generator().manual_seed(0)
    mods, shapes = {}, {}
    for i, k in enumerate(keys):  # ranks 2, 4, 3: under alpha = r per module diffusers renders most wrong
        r, s = (2, 4, 3)[i % 3], tuple(sd[k].shape)
        mods[k] = (0.1 * torch.randn(r, math.prod(s[1:]), generator=gen), 0.1 * torch.randn(s[0], r, generator=gen))
        shapes[k] = s
    tensors, meta = to_kohya(mods, shapes=shapes)
    assert {float(v) for n, v in tensors.items() if n.endswith(".alpha")} == {4.0}  # the most common rank
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_network_dim"] == "Dynamic"
    f = write_safetensors(tmp_path / "mixed.safetensors", tensors, meta)
    got = _diffusers_deltas(unet, f)
    for k, (A, B) in mods.items():
        want = (B @ A).reshape(shapes[k])
        assert float((got[k] - want).norm() / want.norm()) < 1e-5, k
    ours = LoraSource(f)  # and our own reader agrees
    for k, (A, B) in mods.items():
        torch.testing.assert_close(ours.delta(kohya_default_name(k)), B @ A, rtol=1e-5, atol=1e-7)


def test_dynamic_resize_output_loads_exactly_in_diffusers(tmp_path, cli):
    pytest.importorskip("diffusers")
    unet = _tiny_unet()
    keys = [k for k, v in unet.state_dict().items() if v.dim() == 2 and ".attentions.0." in k][:10]
    gen = torch.Generator().manual_seed(5)
    t = {}
    for i, k in enumerate(keys):  # per-module alphas 1, 2, 4, 8 and decaying spectra: ranks differ after resize
        o, n = unet.state_dict()[k].shape
        name = kohya_default_name(k)
        t[name + ".lora_down.weight"] = torch.randn(4, n, generator=gen)
        t[name + ".lora_up.weight"] = 0.1 * torch.randn(o, 4, generator=gen) * (0.3 + 0.2 * i) ** torch.arange(4.0)
        t[name + ".alpha"] = torch.tensor(float(2 ** (i % 4)))
    src = write_safetensors(tmp_path / "in.safetensors", t)
    out = tmp_path / "dyn.safetensors"
    assert cli("resize", src, "--out", out, "--rule", "sv_fro", "--threshold", "0.95")[0] == 0
    ranks = {r["rank_out"] for r in json.loads(out.with_suffix(".report.json").read_text())["modules"].values()}
    assert len(ranks) > 1
    ours = LoraSource(out)
    got = _diffusers_deltas(unet, out)
    for k in keys:
        want = ours.delta(kohya_default_name(k))
        assert float((got[k] - want).norm() / want.norm()) < 1e-5, k


# ------------------------------------------------------------------------------- bad input

def _one_line_exit_2(res, out: Path):
    code, so, se = res
    assert code == 2, so + se
    assert len(se.strip().splitlines()) == 1 and se.startswith("error:"), se
    assert not out.exists() and not out.with_suffix(".report.json").exists()
    assert not list(out.parent.glob(f".{out.name}.partial*"))


def test_bad_input_one_line_exit_2_no_output(sd15_lora, sd15_pair, tmp_path, cli):
    bpath, tpath, base, _ = sd15_pair
    out = tmp_path / "bad.safetensors"
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out, "--rank", "0"), out)
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out, "--rank", "-3"), out)
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out), out)
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out, "--rule", "sv_fro"), out)
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out, "--rule", "sv_fro", "--threshold", "1.5"), out)
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out, "--rule", "svd", "--threshold", "0.5"), out)
    _one_line_exit_2(cli("resize", bpath, "--out", out, "--rank", "2"), out)  # a checkpoint, not a LoRA
    _one_line_exit_2(cli("resize", sd15_lora, "--out", out, "--rank", "2", "--conv-rank", "0"), out)
    _one_line_exit_2(cli("extract", bpath, tpath, "--out", out, "--rank", "0"), out)
    _one_line_exit_2(cli("extract", bpath, tpath, "--out", out, "--rank", "2", "--format", "lycoris"), out)
    _one_line_exit_2(cli("extract", bpath, sd15_lora, "--out", out, "--rank", "2"), out)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    wrong = write_safetensors(tmp_path / "wrong.safetensors", dict(base, **{k: torch.zeros(16, 8)}))
    res = cli("extract", bpath, wrong, "--out", out, "--rank", "2")
    _one_line_exit_2(res, out)
    assert k in res[2] and "[16, 8]" in res[2]
    _one_line_exit_2(cli("extract", bpath, bpath, "--out", out, "--rank", "2"), out)  # nothing differs


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, cli):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 8)}
    a = tmp_path / "a"
    write_peft_adapter(a, shapes, ("q_proj",), rank=2, alpha=4, seed=0)
    out = tmp_path / "o"
    assert cli("resize", a, "--out", out, "--rank", "1")[0] == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    code, so, se = cli("resize", a, "--out", out, "--rank", "2")
    assert code == 2 and len(se.strip().splitlines()) == 1, so + se
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert cli("resize", a, "--out", out, "--rank", "2", "--overwrite")[0] == 0
    assert LoraSource(out).rank(LoraSource(out).modules[0]) == 2
