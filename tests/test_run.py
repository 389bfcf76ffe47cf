"""End-to-end `merge run` on tiny checkpoints: results, output layout, metadata, atomicity."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import slow_env, write_recipe


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def recipe_text(models, method, base=None, params="", model_params=None, extra=""):
    lines = [f"merge_method: {method}"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for i, m in enumerate(models):
        lines.append(f"  - model: {m}")
        if model_params:
            lines.append(f"    parameters: {model_params[i]}")
    if params:
        lines.append(f"parameters: {params}")
    return "\n".join(lines) + "\n" + extra


def test_linear_equals_manual_average(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[k] for k in "abc"], "linear"))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged = load_dir(tmp_path / "out")
    models = [load_dir(tiny_models[k]) for k in "abc"]
    assert set(merged) == set(models[0])
    for k, v in merged.items():
        assert torch.allclose(v, sum(m[k] for m in models) / 3, atol=1e-6), k


def test_ties_end_to_end_matches_operator(tiny_models, tmp_path, cli):
    from mergekit_ortho.ops import registry
    from mergekit_ortho.ops.registry import TensorTask

    mp = ["{weight: 1.0, density: 0.5}", "{weight: 0.5, density: 0.3}"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"], tiny_models["b"]], "ties",
                                                      tiny_models["base"], "{lambda: 0.8}", mp))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged = load_dir(tmp_path / "out")
    base, a, b = (load_dir(tiny_models[k]) for k in ("base", "a", "b"))
    op = registry.get("ties")
    params = op.resolve_params({"lambda": 0.8})
    mps = [op.resolve_model_params({"weight": 1.0, "density": 0.5}, "a"),
           op.resolve_model_params({"weight": 0.5, "density": 0.3}, "b")]
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        expect = base[k] + op.fn(TensorTask(k, base[k], [a[k] - base[k], b[k] - base[k]], params, mps))
        assert torch.allclose(merged[k], expect, atol=1e-6)
    # a merge actually happened: not the base, not a model
    q = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(merged[q], base[q]) and not torch.allclose(merged[q], a[q])


def test_base_listed_among_models_is_skipped_like_mergekit(tiny_models, tmp_path, cli):
    r1 = write_recipe(tmp_path / "r1.yaml", recipe_text([tiny_models["base"], tiny_models["a"]], "task_arithmetic",
                                                        tiny_models["base"], "{lambda: 0.5}"))
    r2 = write_recipe(tmp_path / "r2.yaml", recipe_text([tiny_models["a"]], "task_arithmetic",
                                                        tiny_models["base"], "{lambda: 0.5}"))
    assert cli("run", r1, "--out", tmp_path / "o1")[0] == 0
    assert cli("run", r2, "--out", tmp_path / "o2")[0] == 0
    m1, m2 = load_dir(tmp_path / "o1"), load_dir(tmp_path / "o2")
    assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_output_layout_shards_index_config_card_modes(tiny_models, tmp_path, cli):
    (tiny_models["base"] / "tokenizer.json").write_text('{"version": "1.0"}')
    extra = "out_dtype: bfloat16\noutput:\n  shard_size: 4KB\n"
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"], tiny_models["b"]], "task_arithmetic",
                                                      tiny_models["base"], "{lambda: 0.3}", extra=extra))
    out = tmp_path / "out"
    code, _, err = cli("run", r, "--out", out)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    merged = load_dir(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and str(tiny_models["a"]) in card
    with safe_open(str(shards[0]), "pt") as h:
        meta = h.metadata()
    assert json.loads(meta["merge_recipe"])["parameters"] == {"lambda": 0.3}
    assert meta["format"] == "pt"
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    (tiny_models["base"] / "tokenizer.json").unlink()


def test_copy_files_false_writes_the_tensors_and_no_donor_file(tiny_models, tmp_path, cli):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_models["base"], base)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "generation_config.json").write_text("{}")
    models = [tiny_models["a"], tiny_models["b"]]
    for copy_files, out in ((True, tmp_path / "with"), (False, tmp_path / "without")):
        extra = f"output:\n  copy_files: {str(copy_files).lower()}\n"
        r = write_recipe(tmp_path / f"r{copy_files}.yaml", recipe_text(models, "task_arithmetic", base, extra=extra))
        code, _, err = cli("run", r, "--out", out)
        assert code == 0, err
        donor_files = {f for f in ("config.json", "tokenizer.json", "generation_config.json") if (out / f).exists()}
        assert donor_files == ({"config.json", "tokenizer.json", "generation_config.json"} if copy_files else set())
        assert (out / "README.md").is_file()  # our card, not a donor file
    with_, without = load_dir(tmp_path / "with"), load_dir(tmp_path / "without")
    assert set(with_) == set(without) and all(torch.equal(with_[k], without[k]) for k in with_)


def test_non_float_and_excluded_tensors_come_from_base(tmp_path, cli):
    from safetensors.torch import save_file

    base = {"w": torch.zeros(4, 4), "head.weight": torch.zeros(3, 4), "ids": torch.arange(5)}
    for name, fill in (("base", 0.0), ("m1", 1.0), ("m2", 3.0)):
        d = tmp_path / name
        d.mkdir()
        t = {k: (v + fill if v.is_floating_point() else v + int(fill)) for k, v in base.items()}
        save_file(t, str(d / "model.safetensors"))
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tmp_path / "m1", tmp_path / "m2"], "task_arithmetic",
                                                      tmp_path / "base", extra="exclude: ['^head\\.']\n"))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    out = load_dir(tmp_path / "out")
    assert torch.equal(out["w"], torch.full((4, 4), 4.0))
    assert torch.equal(out["head.weight"], torch.zeros(3, 4))
    assert torch.equal(out["ids"], torch.arange(5)) and out["ids"].dtype == torch.int64


def test_pickle_bin_source_and_single_file(tmp_path, tiny_models, cli):
    a = load_dir(tiny_models["a"])
    d = tmp_path / "legacy"
    d.mkdir()
    torch.save(a, d / "pytorch_model.bin")
    single = tmp_path / "b.safetensors"
    from safetensors.torch import save_file

    save_file(load_dir(tiny_models["b"]), str(single))
    r = write_recipe(tmp_path / "r.yaml", recipe_text([d, single], "linear"))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged = load_dir(tmp_path / "out")
    b = load_dir(tiny_models["b"])
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(merged[k], (a[k] + b[k]) / 2)


def test_dry_run_reads_no_data_and_writes_nothing(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"], tiny_models["b"]], "ties",
                                                      tiny_models["base"]))
    code, out, err = cli("run", r, "--out", tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert "merged" in out and "peak memory" in out
    assert not (tmp_path / "out").exists()


def test_validate_methods_inspect(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"]], "task_arithmetic", tiny_models["base"]))
    code, out, _ = cli("validate", r)
    assert code == 0 and "ok" in out
    code, out, _ = cli("methods")
    assert code == 0 and "ties" in out and "dare_linear" in out
    code, out, _ = cli("methods", "ties")
    assert code == 0 and "density" in out
    code, out, _ = cli("inspect", tiny_models["a"])
    assert code == 0 and "tensors: 21" in out and "float32" in out


def test_overwrite_replaces_existing(tiny_models, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"]], "linear"))
    code, _, err = cli("run", r, "--out", out)
    assert code == 2 and "--overwrite" in err and (out / "stale.txt").exists()
    # a directory this tool did not write is replaced only with --force-replace
    code, _, err = cli("run", r, "--out", out, "--overwrite")
    assert code == 2 and "--force-replace" in err and (out / "stale.txt").exists()
    code, _, err = cli("run", r, "--out", out, "--force-replace")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    # our own output is replaced with --overwrite
    code, _, err = cli("run", r, "--out", out, "--overwrite")
    assert code == 0, err
    assert (out / "model.safetensors").exists() and (out / ".mergekit-ortho").is_file()


def test_hub_id_from_prepopulated_offline_cache(tiny_models, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as hc

    commit = "a" * 40
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-base"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in tiny_models["base"].iterdir():
        shutil.copy(f, snap / f.name)
    empty = tmp_path / "hf" / "hub" / "models--tiny-org--no-weights"
    (empty / "snapshots" / commit).mkdir(parents=True)
    (empty / "refs").mkdir()
    (empty / "refs" / "main").write_text(commit)
    (empty / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    from mergekit_ortho.errors import UserError
    from mergekit_ortho.sources import hub

    assert hub.resolve("tiny-org/tiny-base") == snap
    assert hub.resolve(f"tiny-org/tiny-base@{commit}") == snap
    with pytest.raises(UserError, match="no weight files"):
        hub.resolve("tiny-org/no-weights")
    with pytest.raises(UserError, match="not in the local cache"):
        hub.resolve("tiny-org/absent")
    from mergekit_ortho.sources.checkpoint import CheckpointSource

    src = CheckpointSource("tiny-org/tiny-base")
    assert len(src.infos) == 21 and src.directory == snap


# --- atomicity: a killed or interrupted run leaves no output ---------------------------------------


def _spawn_run(recipe: Path, out: Path, delay: str) -> subprocess.Popen:
    env = slow_env(float(delay))
    return subprocess.Popen([sys.executable, "-m", "mergekit_ortho.cli", "run", str(recipe), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(parent: Path, name: str, timeout: float = 60) -> Path:
    end = time.time() + timeout
    while time.time() < end:
        parts = [p for p in parent.glob(f".{name}.partial-*") if any(p.glob("*.safetensors"))]
        if parts:
            return parts[0]
        time.sleep(0.05)
    raise AssertionError("the run never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_leaves_no_output(tiny_models, tmp_path, sig):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"], tiny_models["b"]], "linear",
                                                      extra="output:\n  shard_size: 4KB\n"))
    out = tmp_path / "out"
    proc = _spawn_run(r, out, "0.2")
    _wait_for_partial(tmp_path, "out")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err
        assert not list(tmp_path.glob(".out.partial-*"))  # cleaned up
    # the next run sweeps what a killed run left and succeeds
    done = subprocess.run([sys.executable, "-m", "mergekit_ortho.cli", "run", str(r), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.fixture(scope="module")
def half_models(tmp_path_factory):
    """bf16 base and fine-tunes, plus one fp16 fine-tune and one float32 legacy pickle."""
    from conftest import TINY
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    root = tmp_path_factory.mktemp("half")
    shapes = llama_shapes(**TINY)
    write_checkpoint(root / "base", shapes, seed=0, dtype="bfloat16")
    write_checkpoint(root / "a", shapes, seed=1, base=root / "base", noise=0.05, dtype="bfloat16")
    write_checkpoint(root / "b", shapes, seed=2, base=root / "base", noise=0.05, dtype="float16")
    write_checkpoint(root / "c", shapes, seed=3, base=root / "base", noise=0.05, dtype="float32")
    sd = load_dir(root / "c")
    (root / "c_bin").mkdir()
    torch.save(sd, root / "c_bin" / "pytorch_model.bin")
    return root


@pytest.mark.parametrize("method,params,model_params", [
    ("linear", "", ["{weight: 0.7}", "{weight: 1.0}", "{weight: 0.3}"]),
    ("task_arithmetic", "{lambda: 0.9}", ["{weight: 0.7}", "{weight: 1.0}", "{weight: -0.4}"]),
    ("ties", "{lambda: 0.9}", ["{density: 0.5}", "{density: 0.4}", "{density: 0.7}"]),
    ("magmax", "", None),
])
def test_stored_half_precision_inputs_are_exactly_the_float32_reference(half_models, tmp_path, cli, method,
                                                                        params, model_params):
    # the engine converts bf16/fp16 inside the arithmetic (no fp32 copy); the values must be
    # bit-for-bit those of converting every input to float32 first
    from mergekit_ortho.ops import registry
    from mergekit_ortho.ops.registry import TensorTask

    models = [half_models / n for n in ("a", "b", "c_bin")]
    r = write_recipe(tmp_path / "r.yaml", recipe_text(models, method, None if method == "linear" else
                                                      half_models / "base", params, model_params,
                                                      extra="out_dtype: float32\n"))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged = load_dir(tmp_path / "out")
    base = {k: v.float() for k, v in load_dir(half_models / "base").items()}
    inputs = [{k: v.float() for k, v in load_dir(half_models / n).items()} for n in ("a", "b")]
    inputs.append({k: v.float() for k, v in torch.load(half_models / "c_bin" / "pytorch_model.bin").items()})
    op = registry.get(method)
    p = op.resolve_params(yaml_load(params))
    mps = [op.resolve_model_params(yaml_load(mp), "m") for mp in (model_params or ["{}"] * 3)]
    for k, v in merged.items():
        if op.reads == "deltas":
            want = base[k] + op.fn(TensorTask(k, base[k], [m[k] - base[k] for m in inputs], p, mps))
        else:
            want = op.fn(TensorTask(k, None, [m[k].clone() for m in inputs], p, mps))
        assert torch.equal(v, want), (method, k)
    # the pickle was only read: a later load gives the same tensors
    again = torch.load(half_models / "c_bin" / "pytorch_model.bin")
    assert all(torch.equal(again[k], v) for k, v in load_dir(half_models / "c").items())


def yaml_load(text: str):
    import yaml

    return yaml.safe_load(text) if text else {}


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_raw_weight_folds_equal_the_prepared_input_folds(monkeypatch, chunk, method):
    # the engine hands raw_weights folds the stored bf16/fp16 weights, prepared chunk by chunk
    from mergekit_ortho.ops import registry
    from mergekit_ortho.ops.kernels import convert
    from mergekit_ortho.ops.registry import TensorTask

    if chunk:  # many chunks, the last one partial
        monkeypatch.setattr(convert, "FOLD_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 11, generator=g).to(torch.bfloat16)
    ws = [(base.float() + 0.1 * torch.randn(5, 11, generator=g)).to(dt)
          for dt in (torch.bfloat16, torch.float16, torch.float32)]
    op = registry.get(method)
    p = op.resolve_params({"normalize": True} if method == "linear" else {"lambda": 0.7})
    mps = [op.resolve_model_params({"weight": w}) for w in (0.37, 1.0, -0.2)]
    deltas = op.reads == "deltas"
    b = base.float() if deltas else None
    want = op.fn(TensorTask("w", b, [w.float() - base.float() if deltas else w.float() for w in ws], p, mps))
    task = TensorTask("w", base if deltas else None, [], p, mps, dtype=torch.float32, raw_inputs=True)
    state = op.fold.start(task)
    for i, w in enumerate(ws):
        state = op.fold.step(state, w.clone(), i, task)
    assert torch.equal(op.fold.finish(state, task), want)
