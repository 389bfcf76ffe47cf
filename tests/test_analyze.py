"""`merge analyze` (issue 18): statistics against direct computations, the streaming pass and CLI
on tiny models, reports (JSON, HTML with decodable PNGs, a headless browser when installed)."""
from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mergekit_ortho.analysis import advice, stats
from mergekit_ortho.analysis.names import group_of, layer_key

PNG = b"\x89PNG\r\n\x1a\n"


def test_cosine_and_norms_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    G = stats.gram(ts)
    for i in range(3):
        assert math.isclose(math.sqrt(G[i][i]), float(ts[i].double().norm()), rel_tol=1e-12)
        for j in range(3):
            direct = float(torch.nn.functional.cosine_similarity(ts[i].reshape(1, -1).double(),
                                                                  ts[j].reshape(1, -1).double()))
            assert math.isclose(stats.cosine(G[i][j], G[i][i], G[j][j]), direct, rel_tol=1e-9)
    assert stats.cosine(0.0, 0.0, 1.0) is None
    x, b = torch.randn(4, 4, generator=g).bfloat16(), torch.randn(4, 4, generator=g)
    assert stats.task_vector_sq_norm(x, b) == float((x.float() - b).double().square().sum())


def test_sign_conflict_by_hand():
    # density 0.5 of 4 entries keeps the 2 largest magnitudes of each vector
    a = torch.tensor([3.0, -2.0, 0.1, 0.0])  # keeps 3, -2
    b = torch.tensor([-1.0, -4.0, 0.2, 0.0])  # keeps -1, -4
    c = stats.sign_conflict([a, b], [0.5, 0.5])
    # entry 0: +3 and -1 -> conflict, elected +, 1 against; entry 1: -2, -4 agree (elected -)
    assert (c.active, c.conflicted) == (2, 1) and c.rate == 0.5
    assert c.agree_mass == 3 + 2 + 4 and c.against_mass == 1 and c.dropped_mass == 1 / 10
    assert c.overlap(0, 1) == 1.0  # both keep entries 0 and 1
    # weights enter the election: b weighted 4 makes entry 0 negative (3 - 4 < 0)
    c = stats.sign_conflict([a, b], [0.5, 0.5], [1.0, 4.0])
    assert c.against_mass == 3
    # a zero sum elects + (the ties operator's rule)
    c = stats.sign_conflict([torch.tensor([1.0]), torch.tensor([-1.0])], [1.0, 1.0])
    assert c.agree_mass == 1 and c.against_mass == 1 and c.rate == 1.0


def test_sign_conflict_uses_the_ties_operators_trim_and_election():
    from mergekit_ortho.ops.gta import disjoint_merge_plain
    from mergekit_ortho.ops.sparsify import magnitude_trim

    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(200, generator=g) for _ in range(3)]
    c = stats.sign_conflict(ts, [0.3, 0.3, 0.3])
    kept = [magnitude_trim(t, 0.3) for t in ts]
    merged_sum = disjoint_merge_plain(kept, [1.0] * 3, normalize=False, lam=1.0)
    # what the disjoint sum keeps is exactly the agreeing mass' signed sum
    assert math.isclose(float(merged_sum.abs().sum()), c.agree_mass, rel_tol=1e-5)
    assert math.isclose(c.agree_mass + c.against_mass, sum(float(k.abs().sum()) for k in kept), rel_tol=1e-6)


def test_mask_overlap_is_jaccard():
    a = torch.tensor([5.0, 4.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.0, 4.0, 5.0, 0.0, 1.0])
    c = stats.sign_conflict([a, b], [0.4, 0.4])  # k = 2: a keeps {0, 1}, b keeps {1, 2}
    assert c.inter[(0, 1)] == 1 and c.union[(0, 1)] == 3 and c.overlap(0, 1) == pytest.approx(1 / 3)


def test_top_energy_exact_and_randomised():
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    v, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
    s = torch.tensor([0.8 ** k for k in range(120)])
    m = (u[:, :120] * s) @ v.T
    exact = float(s[:4].square().sum() / s.square().sum())
    top, total = stats.top_energy(m, 4)  # 4 + 8 probes < 120: randomised
    assert math.isclose(total, float(s.double().square().sum()), rel_tol=1e-4)
    assert top / total <= exact + 1e-5 and top / total == pytest.approx(exact, rel=1e-3)
    small = torch.randn(6, 5, generator=g)  # exact branch
    sv = torch.linalg.svdvals(small.double())
    assert stats.top_energy(small, 2)[0] == pytest.approx(float(sv[:2].square().sum()))
    assert stats.top_energy(torch.zeros(3, 3), 2) == (0.0, 0.0)
    with pytest.raises(ValueError):
        stats.top_energy(torch.zeros(3), 1)


def test_lora_spectrum_from_factors():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g)
    direct = torch.linalg.svdvals(2.0 * B.double() @ A.double())
    assert torch.allclose(stats.lora_singular_values(A, B, 2.0), direct[:4], rtol=1e-9)
    f = stats.lora_module(A, B, 2.0)
    assert f.rank == 4 and f.energy == pytest.approx(float((2.0 * B @ A).double().square().sum()))
    assert f.top_energy == pytest.approx(float(direct[0] ** 2 / direct.square().sum()))


def test_names_and_rules():
    assert group_of("model.layers.3.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
    assert layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_key("lm_head.weight") == "other"
    fake = {"overall": {"cosine": {"a|b": 0.9}, "top_energy": {}, "norm": {"a": 1.0, "b": 5.0},
                        "sign_conflict": 0.5, "dropped_mass": 0.3}, "loras": {}}
    ids = {r["id"] for r in advice.recommend(fake)}
    assert ids == {"aligned", "heavy_sign_conflict", "norm_imbalance"}
    root = Path(__file__).resolve().parents[1]
    for r in advice.RULES:  # every cited benchmark file exists
        for path in re.findall(r"benchmarks/\S+\.md", r["evidence"]):
            assert (root / path).is_file(), path


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src=['\"]data:image/png;base64,([A-Za-z0-9+/=]+)['\"]", html)]


def test_cli_models_json_html(tiny_models, tmp_path, cli):
    j, h = tmp_path / "r.json", tmp_path / "r.html"
    m = tiny_models
    code, out, err = cli("analyze", "--base", m["base"], m["a"], m["b"], m["c"], "--json", j, "--html", h)
    assert code == 0, err
    assert "sign conflict" in out and "recommendations" in out
    data = json.loads(j.read_text())
    assert data["models"] == ["a", "b", "c"] and data["density"] == 0.2
    assert set(data["by_layer"]) == {"model.layers.0", "model.layers.1", "other"}
    assert "model.layers.*.mlp.up_proj.weight" in data["by_kind"]
    # the aggregate equals a direct computation over the whole model
    from safetensors.torch import load_file

    base = load_file(str(m["base"] / "model.safetensors"))
    ta = {k: load_file(str(m[k] / "model.safetensors")) for k in "ab"}
    va = torch.cat([(ta["a"][n] - base[n]).reshape(-1) for n in base]).double()
    vb = torch.cat([(ta["b"][n] - base[n]).reshape(-1) for n in base]).double()
    assert data["overall"]["norm"]["a"] == pytest.approx(float(va.norm()), rel=1e-6)
    assert data["overall"]["cosine"]["a|b"] == pytest.approx(float(va @ vb / va.norm() / vb.norm()), abs=1e-6)
    row = next(r for r in data["tensors"] if r["name"] == "model.layers.0.mlp.up_proj.weight")
    n = "model.layers.0.mlp.up_proj.weight"
    c = stats.sign_conflict([tiny_models_tv(m, k, n) for k in "abc"], [0.2] * 3)
    assert row["sign_conflict"] == pytest.approx(c.rate) and row["mask_overlap"]["a|b"] == pytest.approx(c.overlap(0, 1))
    assert data["recommendations"] and all("benchmarks/" in r["evidence"] or "none of ours" in r["evidence"]
                                           for r in data["recommendations"])
    pngs = _pngs(h.read_text())
    assert len(pngs) == 3 and all(p.startswith(PNG) for p in pngs)
    # refuses to overwrite without --overwrite; replaces its own report with it
    code, _, err = cli("analyze", "--base", m["base"], m["a"], "--json", j)
    assert code == 2 and "--overwrite" in err
    assert cli("analyze", "--base", m["base"], m["a"], "--json", j, "--overwrite", "--top-rank", "0")[0] == 0
    assert json.loads(j.read_text())["models"] == ["a"]
    other = tmp_path / "mine.json"
    other.write_text("{}")
    code, _, err = cli("analyze", "--base", m["base"], m["a"], "--json", other, "--overwrite")
    assert code == 2 and other.read_text() == "{}"


def tiny_models_tv(m, k, name):
    from safetensors.torch import load_file

    return load_file(str(m[k] / "model.safetensors"))[name] - load_file(str(m["base"] / "model.safetensors"))[name]


def test_recipe_density_and_lora(tiny_models, tmp_path, cli):
    from mergekit_ortho.testing.checkpoints import llama_shapes
    from mergekit_ortho.testing.loras import write_peft_adapter
    from tests.conftest import TINY

    lora = tmp_path / "lora"
    write_peft_adapter(lora, llama_shapes(**TINY), ("q_proj", "v_proj"), rank=4, alpha=8, seed=1)
    r = tmp_path / "r.yaml"
    r.write_text(f"merge_method: ties\nbase_model: {tiny_models['base']}\nmodels:\n"
                 f"  - model: {tiny_models['a']}\n    parameters: {{density: 0.5, weight: 1}}\n"
                 f"  - model: {lora}\n    parameters: {{density: 0.5, weight: 1}}\n")
    j = tmp_path / "r.json"
    code, out, err = cli("analyze", r, "--json", j)
    assert code == 0, err
    data = json.loads(j.read_text())
    assert data["method"] == "ties" and data["density"] == "recipe"
    assert all(row["density"] == [0.5] for row in data["tensors"])
    f = data["loras"]["lora"]
    assert f["modules"] == 4 and f["ranks"] == {"4": 4} and f["scales"] == {"2.0": 4} and f["energy"] > 0
    assert any(r["id"] == "loras" for r in data["recommendations"])


def test_bad_input_one_line_exit_2(tiny_models, tmp_path, cli):
    code, _, err = cli("analyze", "--base", tiny_models["base"], tmp_path / "nope")
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("analyze", tmp_path / "missing.yaml")
    assert code == 2 and "not found" in err
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    other = tmp_path / "other"  # another architecture: wider
    write_checkpoint(other, llama_shapes(hidden=8, layers=3, vocab=32, intermediate=12), seed=5, dtype="float32")
    code, _, err = cli("analyze", "--base", tiny_models["base"], tiny_models["a"], other)
    assert code == 2 and len(err.strip().splitlines()) == 1 and ("shape" in err or "missing" in err), err


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_html_renders_in_a_headless_browser(tiny_models, tmp_path, cli):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (install Chromium from the "
                    "system packages to render the report)")
    h = tmp_path / "r.html"
    assert cli("analyze", "--base", tiny_models["base"], tiny_models["a"], tiny_models["b"], "--html", h)[0] == 0
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", h.as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    pngs = _pngs(dom)
    assert len(pngs) == 3 and all(p.startswith(PNG) for p in pngs)


def _variant(src, dst, edit):
    """A copy of checkpoint ``src`` at ``dst`` with its tensors passed through ``edit``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    ts = edit(load_file(str(f)))
    save_file(ts, str(f), metadata={"format": "pt"})
    return dst


def test_a_plan_refusal_is_a_finding_and_the_rest_is_analysed(tiny_models, tmp_path, cli):
    m = tiny_models
    gone = "model.layers.1.mlp.down_proj.weight"
    lacking = _variant(m["b"], tmp_path / "lacking", lambda ts: {k: v for k, v in ts.items() if k != gone})

    def wider_vocab(ts):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in ts:
                ts[k] = torch.cat([ts[k], torch.zeros(4, ts[k].shape[1])])
        return ts

    vocab = _variant(m["c"], tmp_path / "vocab", wider_vocab)
    # merge run refuses it
    r = tmp_path / "r.yaml"
    r.write_text(f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['a']}\n"
                 f"  - model: {lacking}\n  - model: {vocab}\nparameters: {{density: 0.5}}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "merged")
    assert code == 2 and "vocabulary rows" in err
    j = tmp_path / "r.json"
    code, out, err = cli("analyze", r, "--json", j, "--top-rank", "0")
    assert code == 0, out + err
    data = json.loads(j.read_text())
    fails: dict = {}
    for f in data["findings"]:
        if f["level"] == "fail":
            fails[f["what"]] = fails.get(f["what"], "") + " | " + f["detail"]
    assert "merge run would refuse" in fails["plan"] and "vocabulary rows" in fails["plan"]
    assert "leaves out the 3 tensor(s)" in fails["plan"]  # down_proj of layer 1, the embeddings, the head
    assert gone in fails["missing tensor"] and "lacking" in fails["missing tensor"]
    assert "'model.embed_tokens.weight' is [32, 16] in base but [36, 16] in vocab" in fails["vocabulary"]
    assert "vocabulary rows differ" in fails["vocabulary"]  # the header comparison of compat.findings too
    names = {row["name"] for row in data["tensors"]}
    assert gone not in names and "model.embed_tokens.weight" not in names
    assert "model.layers.0.mlp.down_proj.weight" in names and len(names) >= 15
    assert data["models"] == ["a", "lacking", "vocab"]
    assert "merge run would refuse" in out


def test_overwrite_replaces_only_our_own_reports(tiny_models, tmp_path, cli):
    from mergekit_ortho.placement import written_by_us

    m = tiny_models
    j, h = tmp_path / "r.json", tmp_path / "r.html"
    args = ("analyze", "--base", m["base"], m["a"], m["b"], "--top-rank", "0")
    assert cli(*args, "--json", j, "--html", h)[0] == 0
    assert written_by_us(j) and written_by_us(h)
    before = h.read_text()
    # ours: --overwrite replaces both
    code, _, err = cli(*args[:4], "--top-rank", "0", "--json", j, "--html", h, "--overwrite")
    assert code == 0, err
    assert json.loads(j.read_text())["models"] == ["a"] and h.read_text() != before
    # not ours (the mark later in the file, or none): refused with --overwrite, nothing written ...
    for text in ('{"note": "generator: mergekit-ortho merge analyze"}', "<html>mine</html>"):
        mine = tmp_path / "mine.html"
        mine.write_text(text)
        assert not written_by_us(mine)
        code, _, err = cli(*args, "--html", mine, "--overwrite")
        assert code == 2 and "not written by mergekit-ortho" in err and "--force-replace" in err
        assert mine.read_text() == text
    # ... and replaced with --force-replace
    assert cli(*args, "--html", mine, "--force-replace")[0] == 0 and written_by_us(mine)
    # a refused second target leaves the first untouched (checked before the analysis runs)
    j.write_text("{}")
    code, _, err = cli(*args, "--json", tmp_path / "new.json", "--html", j, "--overwrite")
    assert code == 2 and not (tmp_path / "new.json").exists() and j.read_text() == "{}"
