"""`merge run --shard i/N` on hub ids downloads only the weight files its own unit reads
(``schedule.plan_unit``), against the local fake Hub (tests/fakehub.py; no test touches the
network). Each unit runs as its own "machine" (its own Hugging Face cache) into one shared stage;
the server's log must show, per unit, every weight file's header once and the full body of exactly
the files holding a tensor of that unit (read from the units' receipts and the repositories' shard
indexes, not from the code under test), and `merge finalize` fetching headers only. The plan hash
does not depend on what a machine downloaded, so finalize accepts the units, and the output is
bit-identical to the serial run of the same recipe on the local folders; a unit computed before the
hub model got a new commit (same header, other values) is refused as stale."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fakehub import FakeHub, header_bytes, load_dir, run_cli, weight_files
from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

SHAPES = llama_shapes(hidden=64, layers=3, vocab=256, intermediate=128)
REPOS = ("base", "a", "b")
OUTPUT = "output:\n  shard_size: 120000\n"  # ~0.6 MB of float32 tensors in about six output shards


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrepos")
    write_checkpoint(root / "base", SHAPES, seed=0, dtype="float32", shards=4)
    for i, name in enumerate(("a", "b")):
        write_checkpoint(root / name, SHAPES, seed=i + 1, base=root / "base", noise=0.05, dtype="float32", shards=4)
    (root / "base" / "tokenizer_config.json").write_text("{}")
    server = FakeHub({f"org/{n}": root / n for n in REPOS})
    server.root = root
    yield server
    server.close()


def write(path: Path, refs: dict[str, str], method: str = "linear") -> Path:
    path.write_text(f"merge_method: {method}\nbase_model: {refs['base']}\nmodels:\n"
                    f"  - model: {refs['a']}\n    parameters: {{weight: 0.7}}\n"
                    f"  - model: {refs['b']}\n    parameters: {{weight: 0.3}}\n" + OUTPUT)
    return path


@pytest.fixture(scope="module")
def serial(hub, tmp_path_factory):
    """The merge in one process: of the local folders, and of the hub ids (everything downloaded)."""
    d = tmp_path_factory.mktemp("serial")
    r = write(d / "local.yaml", {n: str(hub.root / n) for n in REPOS})
    got = run_cli(hub, d, "run", r, "--out", d / "local")
    assert got.returncode == 0, got.stderr
    r = write(d / "hub.yaml", {n: f"org/{n}" for n in REPOS})
    got = run_cli(hub, d, "run", r, "--out", d / "hub")
    assert got.returncode == 0, got.stderr
    return d


def weight_map(hub, repo: str) -> dict[str, str]:
    return json.loads((hub.repos[repo] / "model.safetensors.index.json").read_text())["weight_map"]


def unit_tensors(stage: Path, i: int, n: int) -> set[str]:
    receipt = json.loads((stage / f"unit-{i:05d}-of-{n:05d}" / "receipt.json").read_text())
    return {t["name"] for f in receipt["files"] for t in f["tensors"]}


def assert_fetched(hub, repo: str, full: set[str]) -> None:
    """Every weight file's header once, and the whole body of the files in ``full`` only."""
    for f in weight_files(hub, repo):
        want = header_bytes(hub.repos[repo] / f) + ((hub.repos[repo] / f).stat().st_size if f in full else 0)
        assert hub.bytes_of(repo, f) == want, (repo, f, sorted(full))


def run_unit(hub, tmp_path: Path, r: Path, stage: Path, i: int, n: int, machine: str = "") -> set[str]:
    """Unit i of n on a machine of its own (a fresh cache); the weight files it must have downloaded
    (per repository, the same names: the three models share one layout)."""
    hub.reset()
    got = run_cli(hub, tmp_path / (machine or f"machine{i}"), "run", r, "--shard", f"{i}/{n}", "--stage", stage)
    assert got.returncode == 0, got.stderr
    names = unit_tensors(stage, i, n)
    full = {weight_map(hub, "org/a")[t] for t in names}
    for repo in REPOS:
        assert_fetched(hub, f"org/{repo}", full)
    return full


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def same_as_serial(serial: Path, out: Path) -> None:
    """Bit-identical to the serial run of the same recipe (every file), and every tensor
    bit-identical to the serial run on the local folders (whose headers name other paths)."""
    import torch

    a, b = tree(serial / "hub"), tree(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    local, got = load_dir(serial / "local"), load_dir(out)
    assert local.keys() == got.keys() and len([k for k in b if k.endswith(".safetensors")]) >= 3
    assert all(local[k].dtype == got[k].dtype and torch.equal(local[k], got[k]) for k in local)


def test_each_unit_downloads_only_its_files_and_finalize_equals_serial(hub, serial, tmp_path):
    n = 3  # the two-unit split is the stale-unit test's
    r = write(tmp_path / "r.yaml", {k: f"org/{k}" for k in REPOS})
    stage = tmp_path / "stage"
    fetched = [run_unit(hub, tmp_path, r, stage, i, n) for i in reversed(range(n))]
    every = set(weight_files(hub, "org/a"))
    assert set().union(*fetched) == every  # together the units read every file ...
    assert all(f < every for f in fetched)  # ... and each only part of them
    hub.reset()
    got = run_cli(hub, tmp_path / "finalizer", "finalize", r, "--stage", stage, "--out", tmp_path / "out")
    assert got.returncode == 0, got.stderr
    for repo in REPOS:
        assert_fetched(hub, f"org/{repo}", set())  # finalize of a plain merge: headers only
    same_as_serial(serial, tmp_path / "out")


def test_a_fold_with_a_reduce_finalize_downloads_the_base_alone(hub, tmp_path):
    """OPCM: the units fold their tensors (their files only); finalize's second map reads the base."""
    import torch

    local = write(tmp_path / "local.yaml", {n: str(hub.root / n) for n in REPOS}, "opcm")
    got = run_cli(hub, tmp_path, "run", local, "--out", tmp_path / "serial")
    assert got.returncode == 0, got.stderr
    r = write(tmp_path / "r.yaml", {k: f"org/{k}" for k in REPOS}, "opcm")
    stage = tmp_path / "stage"
    fetched = [run_unit(hub, tmp_path, r, stage, i, 2) for i in range(2)]
    assert all(f < set(weight_files(hub, "org/a")) for f in fetched)
    hub.reset()
    got = run_cli(hub, tmp_path / "finalizer", "finalize", r, "--stage", stage, "--out", tmp_path / "out")
    assert got.returncode == 0, got.stderr
    assert_fetched(hub, "org/base", set(weight_files(hub, "org/base")))
    for repo in ("org/a", "org/b"):
        assert_fetched(hub, repo, set())
    want, out = load_dir(tmp_path / "serial"), load_dir(tmp_path / "out")
    assert want.keys() == out.keys() and all(torch.equal(want[k], out[k]) for k in want)


def test_a_unit_of_an_older_commit_is_refused_as_stale(hub, tmp_path):
    r = write(tmp_path / "r.yaml", {k: f"org/{k}" for k in REPOS})
    stage = tmp_path / "stage"
    run_unit(hub, tmp_path, r, stage, 0, 2)
    old_folder, old_sha = hub.repos["org/b"], hub.shas["org/b"]
    new = tmp_path / "b2"  # model b pushed again: one tensor's values change, every header is the same
    shutil.copytree(old_folder, new)
    f = new / "model-00004-of-00004.safetensors"
    tensors = load_file(str(f))
    victim = sorted(tensors)[0]
    tensors[victim] = tensors[victim] + 1.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert header_bytes(f) == header_bytes(old_folder / f.name)
    hub.commit("org/b", new)
    try:
        run_unit(hub, tmp_path, r, stage, 1, 2)
        got = run_cli(hub, tmp_path / "finalizer", "finalize", r, "--stage", stage, "--out", tmp_path / "out")
        assert got.returncode == 2, got.stderr
        assert "unit 0/2" in got.stderr and "stale" in got.stderr and "Traceback" not in got.stderr
        assert f"org/b is at commit {hub.shas['org/b'][:12]} now" in got.stderr, got.stderr
        assert not (tmp_path / "out").exists()
        run_unit(hub, tmp_path, r, stage, 0, 2, "another")  # recomputed at the new commit: accepted
        got = run_cli(hub, tmp_path / "finalizer", "finalize", r, "--stage", stage, "--out", tmp_path / "out")
        assert got.returncode == 0, got.stderr
    finally:
        hub.repos["org/b"], hub.shas["org/b"] = old_folder, old_sha
