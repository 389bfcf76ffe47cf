"""`merge run --shard i/N --stage DIR` + `merge finalize`: bit-identical to a serial run for every
method family (OPCM's map -> reduce -> map included), receipts refuse missing / truncated / stale /
tampered units, a unit killed with -9 and re-run gives the same result."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import slow_env, write_recipe
from test_run import recipe_text

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]
SHARD = "output:\n  shard_size: 3000\n"  # the tiny models' ~30 tensors in about ten shards


def recipe(path: Path, method: str, models, base=None, params: str = "", model_params=None) -> Path:
    return write_recipe(path, recipe_text(models, method, base, params, model_params, extra=SHARD))


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def sharded(cli, r: Path, stage: Path, out: Path, n: int, order=None) -> None:
    for i in (order or range(n)):
        code, _, err = cli("run", r, "--shard", f"{i}/{n}", "--stage", stage)
        assert code == 0, err
    code, _, err = cli("finalize", r, "--stage", stage, "--out", out)
    assert code == 0, err


def assert_same_as_serial(cli, tmp_path, r: Path, n: int = 3) -> dict[str, bytes]:
    code, _, err = cli("run", r, "--out", tmp_path / "serial")
    assert code == 0, err
    sharded(cli, r, tmp_path / "stage", tmp_path / "sharded", n, order=reversed(range(n)))
    a, b = tree(tmp_path / "serial"), tree(tmp_path / "sharded")
    assert len([k for k in a if k.endswith(".safetensors")]) >= n
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a.get(k) != b.get(k)]
    return a


CASES = {
    "linear": ("linear", "abc", False, "", ["{weight: 1.0}", "{weight: 0.5}", "{weight: 0.25}"]),
    "ties": ("ties", "ab", True, "{lambda: 0.8}", ["{weight: 1.0, density: 0.5}", "{weight: 0.5, density: 0.3}"]),
    "dare_ties": ("dare_ties", "abc", True, "{density: 0.5, seed: 11}", None),
    "magmax": ("magmax", "abc", True, "", None),
    "tsv": ("tsv", "abc", True, "", None),
    "opcm": ("opcm", "abc", True, "", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_run_is_bit_identical_to_serial(case, tiny_models, tmp_path, cli):
    method, names, with_base, params, mp = CASES[case]
    r = recipe(tmp_path / "r.yaml", method, [tiny_models[k] for k in names],
               tiny_models["base"] if with_base else None, params, mp)
    files = assert_same_as_serial(cli, tmp_path, r, n=3)
    assert "model.safetensors.index.json" in files and "config.json" in files and "README.md" in files
    receipt = json.loads((tmp_path / "stage" / "unit-00001-of-00003" / "receipt.json").read_text())
    assert receipt["phase"] == ("fold" if method == "opcm" else "shards")
    assert all(t["finite"] and len(t["sha256"]) == 64 for f in receipt["files"] for t in f["tensors"])


def test_lora_inputs_to_full_model_sharded_equals_serial(tiny_models, tmp_path, cli):
    from mergekit_ortho.testing.checkpoints import llama_shapes
    from mergekit_ortho.testing.loras import write_peft_adapter
    from conftest import TINY

    shapes = llama_shapes(**TINY)
    for k, seed in (("la", 1), ("lb", 2)):
        write_peft_adapter(tmp_path / k, shapes, ("q_proj", "v_proj"), rank=2, alpha=4, seed=seed)
    r = recipe(tmp_path / "r.yaml", "ties", [tmp_path / "la", tmp_path / "lb"], tiny_models["base"],
               "{density: 0.5}")
    assert_same_as_serial(cli, tmp_path, r, n=2)


def test_adapter_output_shards_by_modules(tiny_models, tmp_path, cli):
    """An adapter output splits into runs of modules (tests/test_shard_adapter.py has the rest)."""
    from mergekit_ortho.testing.checkpoints import llama_shapes
    from mergekit_ortho.testing.loras import write_peft_adapter
    from conftest import TINY

    shapes = llama_shapes(**TINY)
    write_peft_adapter(tmp_path / "la", shapes, ("q_proj",), rank=2, alpha=4, seed=1)
    write_peft_adapter(tmp_path / "lb", shapes, ("q_proj",), rank=2, alpha=4, seed=2)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tmp_path / 'la'}\n  - model: {tmp_path / 'lb'}\noutput:\n  format: peft\n")
    code, _, err = cli("run", r, "--shard", "0/3", "--stage", tmp_path / "st")
    assert code == 2 and "2 module(s)" in err and "at most 2" in err
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    sharded(cli, r, tmp_path / "st", tmp_path / "out", 2)
    assert tree(tmp_path / "out") == tree(tmp_path / "serial")


def test_bad_shard_arguments(tiny_models, tmp_path, cli):
    r = recipe(tmp_path / "r.yaml", "linear", [tiny_models[k] for k in "ab"])
    for arg, msg in (("3/3", "0..N-1"), ("x", "write i/N"), ("0/999", "at most")):
        code, _, err = cli("run", r, "--shard", arg, "--stage", tmp_path / "st")
        assert code == 2 and msg in err, (arg, err)
    code, _, err = cli("run", r, "--shard", "0/2")
    assert code == 2 and "go together" in err
    code, _, err = cli("finalize", r, "--stage", tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and "no unit in stage" in err
    code, out, err = cli("run", r, "--shard", "1/2", "--stage", tmp_path / "st", "--dry-run")
    assert code == 0 and "unit 1/2" in out and not (tmp_path / "st").exists()


@pytest.fixture
def staged(tiny_models, tmp_path, cli):
    r = recipe(tmp_path / "r.yaml", "ties", [tiny_models[k] for k in "ab"], tiny_models["base"], "{density: 0.5}")
    for i in range(3):
        assert cli("run", r, "--shard", f"{i}/3", "--stage", tmp_path / "st")[0] == 0
    return r, tmp_path / "st"


def _finalize_fails(cli, r, stage, out, *words):
    code, _, err = cli("finalize", r, "--stage", stage, "--out", out)
    assert code == 2, err
    assert "unit 1/3" in err and all(w in err for w in words), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_finalize_refuses_a_missing_unit(staged, tmp_path, cli):
    import shutil

    r, st = staged
    shutil.rmtree(st / "unit-00001-of-00003")
    _finalize_fails(cli, r, st, tmp_path / "out", "missing", "--shard 1/3")


def test_finalize_refuses_a_truncated_unit(staged, tmp_path, cli):
    r, st = staged
    f = sorted((st / "unit-00001-of-00003").glob("model-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-5])
    _finalize_fails(cli, r, st, tmp_path / "out", "truncated", f.name)


def test_finalize_refuses_a_tampered_unit(staged, tmp_path, cli):
    r, st = staged
    f = sorted((st / "unit-00001-of-00003").glob("model-*.safetensors"))[-1]
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x40
    f.write_bytes(bytes(raw))
    _finalize_fails(cli, r, st, tmp_path / "out", "tampered", "does not match its receipt")


def test_finalize_refuses_a_stale_unit(staged, tiny_models, tmp_path, cli):
    r, st = staged
    other = recipe(tmp_path / "other.yaml", "ties", [tiny_models[k] for k in "ab"], tiny_models["base"],
                   "{density: 0.6}")
    assert cli("run", other, "--shard", "1/3", "--stage", st)[0] == 0  # replaces unit 1 only
    _finalize_fails(cli, r, st, tmp_path / "out", "stale", "another plan")
    # re-running the unit of the right recipe mends the stage
    assert cli("run", r, "--shard", "1/3", "--stage", st)[0] == 0
    assert cli("finalize", r, "--stage", st, "--out", tmp_path / "out")[0] == 0


def test_units_of_several_counts_are_refused(staged, tmp_path, cli):
    r, st = staged
    assert cli("run", r, "--shard", "0/2", "--stage", st)[0] == 0
    code, _, err = cli("finalize", r, "--stage", st, "--out", tmp_path / "out")
    assert code == 2 and "several runs" in err


def test_unit_killed_with_sigkill_then_rerun_gives_the_same_result(tiny_models, tmp_path, cli):
    r = recipe(tmp_path / "r.yaml", "dare_ties", [tiny_models[k] for k in "abc"], tiny_models["base"],
               "{density: 0.5, seed: 3}")
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    st = tmp_path / "st"
    for i in (0, 2):
        assert cli("run", r, "--shard", f"{i}/3", "--stage", st)[0] == 0
    proc = subprocess.Popen(CLI + ["run", str(r), "--shard", "1/3", "--stage", str(st)], env=slow_env(0.05),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 60
    while not list(st.glob(".unit-00001-of-00003.partial-*/*.safetensors")) and proc.poll() is None \
            and time.time() < end:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (st / "unit-00001-of-00003").exists()
    code, _, err = cli("finalize", r, "--stage", st, "--out", tmp_path / "out")
    assert code == 2 and "missing" in err
    assert cli("run", r, "--shard", "1/3", "--stage", st)[0] == 0
    assert not list(st.glob(".unit-*"))  # the killed unit's leftovers were swept
    assert cli("finalize", r, "--stage", st, "--out", tmp_path / "out")[0] == 0
    assert tree(tmp_path / "serial") == tree(tmp_path / "out")


def test_unit_assignment_covers_every_shard_once():
    from types import SimpleNamespace

    from mergekit_ortho.schedule import unit_shards

    for s in (1, 2, 5, 10, 17):
        plan = SimpleNamespace(shards=[[]] * s)
        for n in range(1, s + 1):
            got = [unit_shards(plan, i, n) for i in range(n)]
            assert [x for g in got for x in g] == list(range(s)) and all(got)
