"""Nothing a user owns is destroyed: outputs stay clear of their inputs, --overwrite replaces only
our own outputs, a replacement survives a crash at any point, and leftovers are swept."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import sharded_copy, write_recipe
from mergekit_ortho import placement
from mergekit_ortho.errors import UserError

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]


def _copy_models(tiny_models, root: Path) -> dict[str, Path]:
    out = {}
    for k in ("base", "a", "b"):
        shutil.copytree(tiny_models[k], root / k)
        out[k] = root / k
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ta_recipe(root: Path, models: dict[str, Path], extra: str = "") -> Path:
    return write_recipe(root / "recipe.yaml", f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
                        f"models:\n  - model: {models['a']}\n  - model: {models['b']}\n{extra}")


@pytest.mark.parametrize("out_rel", [".", "a", "a/merged", "recipe.yaml", ".."])
def test_output_overlapping_an_input_is_refused_even_with_overwrite(tiny_models, tmp_path, out_rel, cli, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    models = _copy_models(tiny_models, work)
    (work / "notes.txt").write_text("mine")
    r = _ta_recipe(work, models)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(work)  # --out relative to the working directory, as a user types it
    for flag in ("--overwrite", "--force-replace"):
        code, _, err = cli("run", str(r), "--out", out_rel, flag)
        assert code == 2, err
        assert "input" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing written


def test_symlinked_output_onto_an_input_is_refused(tiny_models, tmp_path, cli):
    models = _copy_models(tiny_models, tmp_path)
    (tmp_path / "link").symlink_to(models["a"])
    r = _ta_recipe(tmp_path, models)
    code, _, err = cli("run", r, "--out", tmp_path / "link", "--force-replace")
    assert code == 2 and "is the input" in err
    assert (models["a"] / "model.safetensors").is_file()


def test_continual_export_onto_its_state_is_refused(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n")
    state = tmp_path / "state"
    assert cli("continual", "init", state, "--recipe", r)[0] == 0
    before = _snapshot(state)
    for out in (state, state / "export", tmp_path):
        for flag in ("--overwrite", "--force-replace"):
            code, _, err = cli("continual", "export", state, "--out", out, flag)
            assert code == 2 and "input" in err, err
    assert _snapshot(state) == before
    # exporting elsewhere works, and a second export replaces the first with --overwrite
    assert cli("continual", "export", state, "--out", tmp_path / "m")[0] == 0
    assert cli("continual", "export", state, "--out", tmp_path / "m", "--overwrite")[0] == 0


def test_overwrite_does_not_replace_a_continual_state(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n")
    state, other = tmp_path / "state", tmp_path / "other"
    assert cli("continual", "init", state, "--recipe", r)[0] == 0
    assert cli("continual", "init", other, "--recipe", r)[0] == 0
    code, _, err = cli("continual", "export", state, "--out", other, "--overwrite")
    assert code == 2 and "continual state" in err and (other / "state.json").is_file()


def test_overwrite_replaces_only_our_outputs_and_empty_dirs(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
                     f"  - model: {tiny_models['b']}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("run", r, "--out", empty, "--overwrite")[0] == 0
    assert (empty / ".mergekit-ortho").is_file()
    # an output written before the marker existed is recognised by our safetensors metadata
    (empty / ".mergekit-ortho").unlink()
    assert cli("run", r, "--out", empty, "--overwrite")[0] == 0
    user = tmp_path / "user"
    user.mkdir()
    (user / "model.safetensors").write_bytes((tiny_models["a"] / "model.safetensors").read_bytes())
    code, _, err = cli("run", r, "--out", user, "--overwrite")
    assert code == 2 and "not written by mergekit-ortho" in err
    assert (user / "model.safetensors").read_bytes() == (tiny_models["a"] / "model.safetensors").read_bytes()


def test_dry_run_never_checks_or_touches_the_output(tiny_models, tmp_path):
    models = _copy_models(tiny_models, tmp_path)
    r = _ta_recipe(tmp_path, models)
    p = subprocess.run(CLI + ["run", str(r), "--out", ".", "--dry-run"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# --- crash-safe replacement ------------------------------------------------------------------------

def _dir_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "content.txt").write_text(text)
    (path / placement.OWNER_MARKER).write_text("{}")
    return path


def test_replace_uses_an_atomic_exchange_and_leaves_nothing(tmp_path):
    target = _dir_with(tmp_path / "out", "old")
    new = _dir_with(tmp_path / ".out.partial-1-x", "new")
    placement.replace_atomically(new, target)
    assert (target / "content.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("crash_after", ["journal", "first_rename"])
def test_two_step_swap_is_repaired_after_a_crash(tmp_path, monkeypatch, crash_after):
    """Where RENAME_EXCHANGE is missing the swap is journaled; a crash between its steps is repaired
    by the next write to the same output: completed when the new copy is whole, never lost."""
    monkeypatch.setattr(placement, "_exchange", lambda a, b: False)
    pid = _dead_pid()
    monkeypatch.setattr(placement.os, "getpid", lambda: pid)
    target = _dir_with(tmp_path / "out", "old")
    new = _dir_with(tmp_path / f".out.partial-{pid}-aaaaaa", "new")
    real_rename = os.rename
    calls = []

    def crashing_rename(a, b):
        calls.append((a, b))
        if crash_after == "first_rename" and len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        return real_rename(a, b)

    if crash_after == "journal":
        monkeypatch.setattr(placement.os, "rename", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt))
    else:
        monkeypatch.setattr(placement.os, "rename", crashing_rename)
    with pytest.raises(KeyboardInterrupt):
        placement.replace_atomically(new, target)
    monkeypatch.setattr(placement.os, "rename", real_rename)
    monkeypatch.undo()
    assert list(tmp_path.glob(".out.swap-*.json"))  # the journal survived the crash
    placement.recover_and_sweep(target)
    # killed before the old copy moved: the commit never happened, the old output stays; killed
    # between the renames: the whole new copy is put in place
    expected = "old" if crash_after == "journal" else "new"
    assert (target / "content.txt").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_roll_back_when_the_new_copy_is_gone(tmp_path):
    pid = _dead_pid()
    old = _dir_with(tmp_path / f".out.old-{pid}-abcdef", "old")
    (tmp_path / f".out.swap-{pid}-abcdef.json").write_text(json.dumps(
        {"old": str(old), "new": str(tmp_path / f".out.partial-{pid}-abcdef")}))
    placement.recover_and_sweep(tmp_path / "out")
    assert (tmp_path / "out" / "content.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_dead_runs_are_swept_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    for kind in ("partial", "old", "state"):
        (tmp_path / f".out.{kind}-{dead}-aaaaaa").mkdir()
        (tmp_path / f".out.{kind}-{live}-bbbbbb").mkdir()
    (tmp_path / f".out.partial-{dead}-cccccc").write_text("a half-written kohya file")
    (tmp_path / ".other.partial-1-x").mkdir()  # another output's: not ours to judge here
    placement.recover_and_sweep(tmp_path / "out")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".out.{k}-{live}-bbbbbb" for k in ("partial", "old", "state")] + [".other.partial-1-x"])


def test_check_output_rules_unit(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    with pytest.raises(UserError, match="contains"):
        placement.check_output(tmp_path, True, [a / "x.safetensors", a], True)
    with pytest.raises(UserError, match="lies inside"):
        placement.check_output(a / "out", True, [a], True)
    placement.check_output(tmp_path / "b", False, [a])  # clear of the inputs, does not exist


# --- continual init is all or nothing --------------------------------------------------------------

def test_continual_init_with_a_corrupt_model_leaves_no_state(tiny_models, tmp_path, cli):
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = (tiny_models["b"] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n  - model: {bad}\n")
    state = tmp_path / "state"
    code, _, err = cli("continual", "init", state, "--recipe", r)
    assert code == 2 and str(bad) in err
    assert not state.exists() and not list(tmp_path.glob(".state*"))
    # the rerun after fixing the recipe succeeds
    write_recipe(r, f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                 f"models:\n  - model: {tiny_models['a']}\n  - model: {tiny_models['b']}\n")
    code, out, err = cli("continual", "init", state, "--recipe", r)
    assert code == 0, err
    assert "2 model(s) merged" in out


def test_continual_init_duplicate_model_advises_a_flag_init_has(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n  - model: {tiny_models['a']}\n    name: again\n")
    code, _, err = cli("continual", "init", tmp_path / "s", "--recipe", r)
    assert code == 2 and "--force" in err and not (tmp_path / "s").exists()
    code, out, err = cli("continual", "init", tmp_path / "s", "--recipe", r, "--force")
    assert code == 0 and "2 model(s) merged" in out, err


# --- containment: nothing outside a model is read ---------------------------------------------------

@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_outside_the_model_directory_is_refused(tiny_models, tmp_path, cli, how):
    model = sharded_copy(tiny_models["a"], tmp_path / "a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = "model-00002-of-00002.safetensors"
    shutil.move(model / shard, elsewhere / shard)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    if how == "symlink":
        (model / shard).symlink_to(elsewhere / shard)
    else:
        name = f"../elsewhere/{shard}" if how == "dotdot" else str(elsewhere / shard)
        index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {model}\n"
                     f"  - model: {tiny_models['b']}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "outside the model directory" in err and shard in err
    assert not (tmp_path / "out").exists()
    # named directly, a file elsewhere is the user's explicit choice
    from mergekit_ortho.sources.checkpoint import CheckpointSource

    CheckpointSource(str(elsewhere / shard)).close()


def test_symlinked_tokenizer_outside_the_model_is_refused(tiny_models, tmp_path, cli):
    model = tmp_path / "a"
    shutil.copytree(tiny_models["a"], model)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (model / "tokenizer.json").symlink_to(secret)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {model}\n"
                     f"  - model: {tiny_models['b']}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "tokenizer.json" in err and "outside the model directory" in err
    assert not (tmp_path / "out").exists()


def test_symlink_inside_the_model_and_hub_blobs_are_followed(tiny_models, tmp_path, cli):
    # a hub snapshot's files are symlinks into the repository's blobs folder: allowed
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_models["a"].iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {snap}\n"
                     f"  - model: {tiny_models['b']}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err


def test_fifo_where_a_checkpoint_is_expected_is_refused(tiny_models, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {fifo}\n"
                     f"  - model: {tiny_models['b']}\n")
    p = subprocess.run(CLI + ["run", str(r), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 2 and "not a regular file" in p.stderr


def test_adapter_weights_symlinked_outside_are_refused(tmp_path):
    from mergekit_ortho.adapters.lora import LoraSource

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    outside = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"base_model.model.l.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.l.lora_B.weight": torch.zeros(4, 2)}, str(outside))
    (d / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(UserError, match="outside the model directory"):
        LoraSource(d)


# --- results the output dtype cannot hold -------------------------------------------------------------

def test_result_overflowing_float16_is_refused_naming_tensor_and_dtype(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\nparameters: {{lambda: 1.0e+8}}\nout_dtype: float16\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "beyond the range of float16" in err and "tensor '" in err and "6.55e+04" in err, err
    assert not (tmp_path / "out").exists()
    # the same merge fits bfloat16
    write_recipe(r, r.read_text().replace("float16", "bfloat16"))
    assert cli("run", r, "--out", tmp_path / "out")[0] == 0


def test_lora_with_a_huge_alpha_written_as_float16_is_refused(tmp_path, cli):
    from mergekit_ortho.testing.loras import write_peft_dir

    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.layer.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.layer.lora_B.weight": torch.randn(8, 2, generator=g)}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 1e9, "target_modules": ["layer"]}
    a = write_peft_dir(tmp_path / "a", tensors, cfg)
    b = write_peft_dir(tmp_path / "b", tensors, cfg)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nmodels:\n  - model: {a}\n"
                     f"  - model: {b}\nout_dtype: float16\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "float16" in err and "lora_" in err, err
    assert not (tmp_path / "out").exists()


def test_cast_check_leaves_non_finite_values_the_input_already_had():
    from mergekit_ortho.dtypes import OutOfRange, cast_checked

    mask = torch.tensor([0.0, float("-inf"), 1.0])
    assert torch.equal(cast_checked(mask, torch.float16, "mask"), mask.half())
    with pytest.raises(OutOfRange, match="'w'.*float16"):
        cast_checked(torch.tensor([1.0, 7e4]), torch.float16, "w")
    assert cast_checked(torch.tensor([1.0, 7e4]), torch.bfloat16, "w").isfinite().all()



def test_a_latched_interrupt_stops_every_commit_point(tmp_path, monkeypatch):
    # A KeyboardInterrupt raised inside a finaliser is dropped by Python and the run goes on; the
    # CLI's handler also latches the signal, and no output may be committed after it.
    monkeypatch.setitem(placement.INTERRUPTED, "signal", 2)
    atomic = placement.AtomicDirectory(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with atomic as tmp:
            (tmp / "x.txt").write_text("x")
            atomic.commit()
    with pytest.raises(KeyboardInterrupt):
        with placement.AtomicFile(tmp_path / "f.safetensors") as tmp:
            tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setitem(placement.INTERRUPTED, "signal", None)
    with atomic as tmp:
        (tmp / "x.txt").write_text("x")
        atomic.commit()
    assert (tmp_path / "out" / "x.txt").read_text() == "x"
