"""`merge run` / `merge revert` / `merge inspect` on LoRA inputs, end to end.

References are independent of the engine: PEFT's own merge_and_unload for the inputs' deltas, and
the operators applied to those dense deltas directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ortho.testing.checkpoints import random_base, write_safetensors
from mergekit_ortho.testing.hf_models import load_causal_lm, tiny_llama
from mergekit_ortho.testing.loras import (
    SD15_BASE, SD15_KOHYA, SDXL_BASE, SDXL_KOHYA, kohya_tensors, make_peft_adapter, peft_merged_deltas,
)
from mergekit_ortho.ops import registry
from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base = tiny_llama(root / "base")
    a = make_peft_adapter(load_causal_lm(base), root / "a", seed=1, r=4, lora_alpha=8, target_modules=TARGETS)
    b = make_peft_adapter(load_causal_lm(base), root / "b", seed=2, r=2, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "o_proj"])
    c = make_peft_adapter(load_causal_lm(base), root / "c", seed=3, r=4, lora_alpha=4, target_modules=TARGETS,
                          rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 8})
    d = make_peft_adapter(load_causal_lm(base), root / "d", seed=4, r=4, lora_alpha=16, target_modules=TARGETS)
    deltas = {n: peft_merged_deltas(load_causal_lm(base), root / n) for n in "abcd"}
    return {"root": root, "base": base, "a": a, "b": b, "c": c, "d": d, "deltas": deltas}


def _recipe(path: Path, method: str, models: list[tuple[str, Path, dict]], base: Path | None = None,
            params: dict | None = None, output: dict | None = None) -> Path:
    import yaml

    doc = {"merge_method": method, "models": [{"model": str(p), "name": n, "parameters": mp} for n, p, mp in models]}
    if base is not None:
        doc["base_model"] = str(base)
    if params:
        doc["parameters"] = params
    if output:
        doc["output"] = output
    path.write_text(yaml.safe_dump(doc))
    return path


def _expected(deltas: list[dict[str, torch.Tensor]], coeffs: list[float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d, c in zip(deltas, coeffs):
        for k, v in d.items():
            out[k] = out.get(k, torch.zeros_like(v)) + c * v
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_task_arithmetic_on_peft_gives_a_peft_adapter_that_loads_and_is_exact(peft_setup, tmp_path, cli):
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic",
                [("a", s["a"], {"weight": 0.7}), ("b", s["b"], {"weight": -0.4}), ("c", s["c"], {})],
                base=s["base"], params={"lambda": 0.9})
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"]  # scale 1
    # exact concatenation: rank = sum of the input ranks per module
    sd = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    q = next(v for k, v in sd.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    assert q.shape[0] == 4 + 2 + 4
    expected = _expected([s["deltas"][n] for n in "abc"], [0.9 * 0.7, 0.9 * -0.4, 0.9])
    from peft import PeftModel

    ref = load_causal_lm(s["base"])
    sd_ref = ref.state_dict()
    with torch.no_grad():
        for k, v in expected.items():
            sd_ref[k].add_(v)
    model = PeftModel.from_pretrained(load_causal_lm(s["base"]), tmp_path / "out").eval()
    ids = torch.arange(12).reshape(2, 6)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload().state_dict()
    base_sd = load_causal_lm(s["base"]).state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k] - base_sd[k], v, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["modules"]


def test_linear_on_loras_full_output_equals_base_plus_mean_delta(peft_setup, tmp_path, cli):
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "linear", [("a", s["a"], {}), ("d", s["d"], {"weight": 3.0})],
                base=s["base"], output={"format": "full"})
    code, out, err = cli("run", r, "--out", tmp_path / "full")
    assert code == 0, out + err
    got = load_file(str(tmp_path / "full" / "model.safetensors"))
    base = load_file(str(s["base"] / "model.safetensors"))
    expected = _expected([s["deltas"]["a"], s["deltas"]["d"]], [0.25, 0.75])
    for k, v in got.items():
        want = base[k] + expected.get(k, 0)
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "full" / "config.json").is_file()


def test_ties_on_loras_equals_ties_on_the_dense_deltas(peft_setup, tmp_path, cli):
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "ties", [("a", s["a"], {"density": 0.5}), ("c", s["c"], {"density": 0.5}),
                                             ("d", s["d"], {"density": 0.5})], base=s["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "t")
    assert code == 0, out + err  # auto: ties is not low rank, so a full model
    got = load_file(str(tmp_path / "t" / "model.safetensors"))
    base = load_file(str(s["base"] / "model.safetensors"))
    op = registry.get("ties")
    params = op.resolve_params({})
    touched = set().union(*(s["deltas"][n] for n in "acd"))
    for k, v in base.items():
        if k not in touched:
            assert torch.equal(got[k], v)  # no LoRA adapts it: copied from the base
            continue
        ins = [s["deltas"][n].get(k, torch.zeros_like(v)).clone() for n in "acd"]
        task = registry.TensorTask(k, v.clone(), ins, params, [op.resolve_model_params({"density": 0.5})] * 3)
        torch.testing.assert_close(got[k], v + op.fn(task), rtol=1e-5, atol=1e-6)


def test_dense_method_to_lora_needs_output_rank_and_extracts_it(peft_setup, tmp_path, cli):
    s = peft_setup
    models = [("a", s["a"], {}), ("d", s["d"], {})]
    r = _recipe(tmp_path / "r.yaml", "magmax", models, base=s["base"], output={"format": "peft"})
    code, out, err = cli("run", r, "--out", tmp_path / "x")
    assert code == 2 and "output.rank" in (out + err) and not (tmp_path / "x").exists()
    r = _recipe(tmp_path / "r2.yaml", "magmax", models, base=s["base"], output={"format": "peft", "rank": 64})
    code, out, err = cli("run", r, "--out", tmp_path / "y")
    assert code == 0, out + err
    # rank 64 >= every module's dimension: the extraction is exact
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_causal_lm(s["base"]), tmp_path / "y").merge_and_unload().state_dict()
    base = load_causal_lm(s["base"]).state_dict()
    op = registry.get("magmax")
    params = op.resolve_params({})
    for k in s["deltas"]["a"]:
        ins = [s["deltas"][n].get(k, torch.zeros_like(base[k])).clone() for n in "ad"]
        want = op.fn(registry.TensorTask(k, base[k].clone(), ins, params, [{}, {}]))
        torch.testing.assert_close(merged[k] - base[k], want, rtol=1e-4, atol=1e-5)


def test_output_rank_truncates_exactly_like_svd(peft_setup, tmp_path, cli):
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic", [("a", s["a"], {}), ("d", s["d"], {})], base=s["base"],
                output={"rank": 3})
    code, out, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, out + err
    src = LoraSource(tmp_path / "o")
    base = load_file(str(s["base"] / "model.safetensors"))
    src = MatchedLora(src, match_to_base(src, list(base), {k: v.shape for k, v in base.items()}))
    for k in s["deltas"]["a"]:
        full = s["deltas"]["a"][k] + s["deltas"]["d"][k]
        u, sv, vh = torch.linalg.svd(full.double())
        best = (u[:, :3] * sv[:3]) @ vh[:3]
        assert src.rank(src.by_base[k]) == 3
        torch.testing.assert_close(src.delta_for(k).double(), best, rtol=1e-4, atol=1e-5)


def _rank_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact rank-r factorisation (A, B) of a PEFT delta, independent of the adapter's files:
    any exact one is a gauge transform of the adapter's own, and TA / TSV / Iso are gauge-invariant."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return Vh[:r].float(), (U[:, :r] * S[:r]).float()


def test_core_space_ta_on_mixed_peft_adapters_loads_in_peft_and_is_exact(peft_setup, tmp_path, cli):
    # rsLoRA (b), rank_pattern / alpha_pattern (c), modules only some adapters touch (o_proj)
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "core_space",
                [("a", s["a"], {"weight": 0.7}), ("b", s["b"], {"weight": -0.4}), ("c", s["c"], {})],
                base=s["base"], params={"lambda": 0.9})
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"]
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(s["base"]), tmp_path / "out").eval()
    merged = model.merge_and_unload().state_dict()
    base_sd = load_causal_lm(s["base"]).state_dict()
    expected = _expected([s["deltas"][n] for n in "abc"], [0.9 * 0.7, 0.9 * -0.4, 0.9])
    assert set(expected) == {k for k in base_sd if not torch.equal(merged[k], base_sd[k])}
    for k, v in expected.items():
        torch.testing.assert_close(merged[k] - base_sd[k], v, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    q = report["modules"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["ranks"] == [4, 2, 4] and q["out_rank"] <= 10 and q["inner_method"] == "task_arithmetic"
    assert report["modules"]["model.layers.0.self_attn.o_proj.weight"]["ranks"] == [2]  # b only


def test_core_space_tsv_iso_full_output_equals_the_rule_on_independent_factors(peft_setup, tmp_path, cli):
    from mergekit_ortho.ops import core_space as C

    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "core_space", [("a", s["a"], {}), ("d", s["d"], {})], base=s["base"],
                params={"inner_method": "tsv", "isotropize": True, "lambda": 0.8}, output={"format": "full"})
    code, out, err = cli("run", r, "--out", tmp_path / "full")
    assert code == 0, out + err
    got = load_file(str(tmp_path / "full" / "model.safetensors"))
    base = load_file(str(s["base"] / "model.safetensors"))
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert changed == set(s["deltas"]["a"]) | set(s["deltas"]["d"])
    for k in changed:
        factors = [_rank_factors(s["deltas"][n][k], 4) for n in "ad"]
        A, B, _ = C.core_space_merge(factors, "tsv", lam=0.8, isotropize_result=True)
        torch.testing.assert_close(got[k] - base[k], B @ A, rtol=1e-4, atol=1e-6)


def test_lora_lego_of_one_adapter_gives_it_back_through_peft(peft_setup, tmp_path, cli):
    # LEGO identity (spec A11 property 2): one LoRA, k = its rank -> the same delta
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "lora_lego", [("d", s["d"], {})], base=s["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "lego")
    assert code == 0, out + err
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_causal_lm(s["base"]), tmp_path / "lego").merge_and_unload().state_dict()
    base_sd = load_causal_lm(s["base"]).state_dict()
    for k, v in s["deltas"]["d"].items():
        torch.testing.assert_close(merged[k] - base_sd[k], v, rtol=1e-5, atol=1e-6)
    sd = load_file(str(tmp_path / "lego" / "adapter_model.safetensors"))
    assert {v.shape[0] for k, v in sd.items() if "lora_A" in k} == {4}


@pytest.fixture(scope="module")
def kohya_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    base = write_safetensors(root / "sd15.safetensors", random_base(SD15_BASE))
    one = write_safetensors(root / "one.safetensors", kohya_tensors(SD15_KOHYA, SD15_BASE, rank=4, seed=1,
                                                                     alphas={m: 2.0 for m in SD15_KOHYA}),
                            metadata={"ss_base_model_version": "sd_v1"})
    two = write_safetensors(root / "two.safetensors", kohya_tensors(SD15_KOHYA, SD15_BASE, rank=8, seed=2),
                            metadata={"ss_base_model_version": "sd_v1"})
    xl_base = write_safetensors(root / "sdxl.safetensors", random_base(SDXL_BASE))
    xl = write_safetensors(root / "xl.safetensors", kohya_tensors(SDXL_KOHYA, SDXL_BASE, rank=4, seed=3))
    return {"root": root, "base": base, "one": one, "two": two, "xl_base": xl_base, "xl": xl}


def _kohya_deltas(path: Path, base_path: Path) -> dict[str, torch.Tensor]:
    base = load_file(str(base_path))
    src = LoraSource(path)
    src = MatchedLora(src, match_to_base(src, list(base), {k: v.shape for k, v in base.items()}))
    return {k: src.delta_for(k, base[k].shape) for k in src.by_base}


@pytest.mark.parametrize("with_base", [True, False])
def test_kohya_task_arithmetic_writes_a_kohya_file_that_round_trips(kohya_setup, tmp_path, cli, with_base):
    k = kohya_setup
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic", [("one", k["one"], {"weight": 0.5}), ("two", k["two"], {})],
                base=k["base"] if with_base else None)
    code, out, err = cli("run", r, "--out", tmp_path / "merged.safetensors")
    assert code == 0, out + err
    got = _kohya_deltas(tmp_path / "merged.safetensors", k["base"])
    d1, d2 = _kohya_deltas(k["one"], k["base"]), _kohya_deltas(k["two"], k["base"])
    assert set(got) == set(d1)
    for key in d1:
        torch.testing.assert_close(got[key], 0.5 * d1[key] + d2[key], rtol=1e-5, atol=1e-6)
    src = LoraSource(tmp_path / "merged.safetensors")
    assert src.format == "kohya" and src.metadata.get("ss_base_model_version") == "sd_v1"
    assert "merge_recipe" in src.metadata
    # an existing output is never replaced without --overwrite
    code, out, err = cli("run", r, "--out", tmp_path / "merged.safetensors")
    assert code == 2 and "already exists" in (out + err)


def test_core_space_on_kohya_conv_and_linear_loras_writes_kohya(kohya_setup, tmp_path, cli):
    # ranks 4 and 8, alpha folded, 1x1 and 3x3 conv LoRAs (flattened to 2-D) and no base model
    k = kohya_setup
    r = _recipe(tmp_path / "r.yaml", "core_space", [("one", k["one"], {"weight": 0.5}), ("two", k["two"], {})],
                params={"inner_method": "mean"})
    code, out, err = cli("run", r, "--out", tmp_path / "cs.safetensors")
    assert code == 0, out + err
    got = _kohya_deltas(tmp_path / "cs.safetensors", k["base"])
    d1, d2 = _kohya_deltas(k["one"], k["base"]), _kohya_deltas(k["two"], k["base"])
    assert set(got) == set(d1)
    for key in d1:
        torch.testing.assert_close(got[key], (0.5 * d1[key] + d2[key]) / 1.5, rtol=1e-5, atol=1e-6)


def test_mixed_architectures_are_refused(kohya_setup, tmp_path, cli):
    k = kohya_setup
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic", [("one", k["one"], {}), ("xl", k["xl"], {})])
    code, out, err = cli("run", r, "--out", tmp_path / "x")
    assert code == 2 and "different model families" in (out + err) and not (tmp_path / "x").exists()


def test_lora_for_another_base_is_refused_naming_the_module(kohya_setup, peft_setup, tmp_path, cli):
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic", [("xl", kohya_setup["xl"], {})], base=peft_setup["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "x")
    assert code == 2 and "match no tensor of the base model" in (out + err) and "lora_unet_" in (out + err)


def test_lora_method_given_a_full_checkpoint_is_refused(tiny_models, tmp_path, cli):
    r = _recipe(tmp_path / "r.yaml", "rmm", [("a", tiny_models["a"], {}), ("b", tiny_models["b"], {})],
                base=tiny_models["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "x")
    assert code == 2 and "full checkpoint" in (out + err) and "rank" in (out + err)


def test_dense_method_on_lora_without_base_is_refused(peft_setup, tmp_path, cli):
    r = _recipe(tmp_path / "r.yaml", "ties", [("a", peft_setup["a"], {}), ("d", peft_setup["d"], {})])
    code, out, err = cli("run", r, "--out", tmp_path / "x")
    assert code == 2 and "base_model" in (out + err)


def test_inspect_describes_a_lora(peft_setup, kohya_setup, cli):
    code, out, _ = cli("inspect", peft_setup["c"])
    assert code == 0 and "LoRA (peft)" in out and "ranks" in out
    code, out, _ = cli("inspect", kohya_setup["one"])
    assert code == 0 and "LoRA (kohya)" in out and "SD1.5" in out.replace("sd15", "SD1.5")


def test_dry_run_on_loras_reads_nothing_and_writes_nothing(peft_setup, tmp_path, cli):
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic", [("a", s["a"], {}), ("d", s["d"], {})], base=s["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "o", "--dry-run")
    assert code == 0 and "output: peft" in out and "modules: 6" in out
    assert not (tmp_path / "o").exists()


# --- RMM through the CLI ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rmm_bundle(peft_setup, tmp_path_factory):
    from typer.testing import CliRunner

    from mergekit_ortho.cli import app

    s = peft_setup
    root = tmp_path_factory.mktemp("rmm")
    r = _recipe(root / "r.yaml", "rmm", [("a", s["a"], {}), ("d", s["d"], {}), ("c2", s["a"].parent / "d", {})],
                base=s["base"], params={"basis_size": 2})
    res = CliRunner().invoke(app, ["run", str(r), "--out", str(root / "bundle")])
    assert res.exit_code == 0, res.stdout + res.stderr
    return root / "bundle"


def test_rmm_bundle_reverts_each_task_exactly_as_peft(peft_setup, rmm_bundle, tmp_path, cli):
    s = peft_setup
    manifest = json.loads((rmm_bundle / "rmm_manifest.json").read_text())
    assert manifest["tasks"] == ["a", "d", "c2"] and manifest["p"] == 2
    code, out, err = cli("revert", rmm_bundle, "--model", "a", "--out", tmp_path / "a")
    assert code == 0, out + err
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_causal_lm(s["base"]), tmp_path / "a").merge_and_unload().state_dict()
    base = load_causal_lm(s["base"]).state_dict()
    for k, v in s["deltas"]["a"].items():  # p = n - 1 with centring: exact
        torch.testing.assert_close(merged[k] - base[k], v, rtol=1e-5, atol=1e-6)
    code, out, err = cli("revert", rmm_bundle, "--model", "d", "--out", tmp_path / "full", "--format", "full")
    assert code == 0, out + err
    got = load_file(str(tmp_path / "full" / "model.safetensors"))
    for k, v in load_file(str(s["base"] / "model.safetensors")).items():
        torch.testing.assert_close(got[k], v + s["deltas"]["d"].get(k, 0), rtol=1e-5, atol=1e-6)


def test_rmm_bundle_inspect_and_bad_task(rmm_bundle, tmp_path, cli):
    code, out, _ = cli("inspect", rmm_bundle)
    assert code == 0 and "RMM bundle" in out and "storage ratio" in out
    code, out, err = cli("revert", rmm_bundle, "--model", "nope", "--out", tmp_path / "z")
    assert code == 2 and "unknown task 'nope'" in (out + err) and not (tmp_path / "z").exists()


def test_rmm_on_full_finetunes_with_rank(tiny_models, tmp_path, cli):
    r = _recipe(tmp_path / "r.yaml", "rmm", [("a", tiny_models["a"], {}), ("b", tiny_models["b"], {})],
                base=tiny_models["base"], params={"rank": 4, "basis_size": 1})
    code, out, err = cli("run", r, "--out", tmp_path / "bundle")
    assert code == 0, out + err
    code, out, err = cli("revert", tmp_path / "bundle", "--model", "b", "--out", tmp_path / "b", "--format", "full")
    assert code == 0, out + err
    got = load_file(str(tmp_path / "b" / "model.safetensors"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    want = load_file(str(tiny_models["b"] / "model.safetensors"))
    for k, v in got.items():
        if v.ndim == 2:  # p = n - 1: the rank-4 truncation of the task vector is reverted exactly
            u, sv, vh = torch.linalg.svd((want[k] - base[k]).double(), full_matrices=False)
            best = (u[:, :4] * sv[:4]) @ vh[:4]
            torch.testing.assert_close((v - base[k]).double(), best, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(v, base[k])


def test_continual_accepts_loras_as_base_plus_delta(peft_setup, tmp_path, cli):
    s = peft_setup
    r = _recipe(tmp_path / "r.yaml", "task_arithmetic", [], base=s["base"])
    code, out, err = cli("continual", "init", tmp_path / "st", "--recipe", r)
    assert code == 0, out + err
    for n in "ad":
        code, out, err = cli("continual", "add", tmp_path / "st", s[n])
        assert code == 0, out + err
    code, out, err = cli("continual", "export", tmp_path / "st", "--out", tmp_path / "o")
    assert code == 0, out + err
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    base = load_file(str(s["base"] / "model.safetensors"))
    expected = _expected([s["deltas"]["a"], s["deltas"]["d"]], [1.0, 1.0])
    for k, v in got.items():
        torch.testing.assert_close(v, base[k] + expected.get(k, 0), rtol=1e-5, atol=1e-6)
