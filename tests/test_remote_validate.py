"""Hub ids read header-first (sources/hub_remote.py), against a local HTTP server standing in for the
Hub (HF_ENDPOINT=http://127.0.0.1:PORT; no test touches the network).

The server (tests/fakehub.py) logs every byte of a file's body it sends. `merge validate` and
`--dry-run` must fetch exactly 8 + n bytes of each weight file (its header) and the config files
(a process fetches a header once); `merge run` must then download
only the weight files the plan reads; a bad shape must be found before any weight byte is sent.
The files are > 100 kB, so a fixed 100 kB range request (huggingface_hub's
``get_safetensors_metadata``) would fail the assertions."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fakehub import FakeHub, header_bytes, load_dir, run_cli, weight_files
from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

SHAPES = llama_shapes(hidden=64, layers=2, vocab=256, intermediate=128)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrepos")
    write_checkpoint(root / "base", SHAPES, seed=0, dtype="float32", shards=2)
    for i, name in enumerate(("a", "b")):
        write_checkpoint(root / name, SHAPES, seed=i + 1, base=root / "base", noise=0.05, dtype="float32", shards=2)
    bad = root / "bad"  # model a with one tensor of another shape
    write_checkpoint(bad, SHAPES, seed=1, base=root / "base", noise=0.05, dtype="float32", shards=2)
    f = bad / "model-00002-of-00002.safetensors"
    tensors = load_file(str(f))
    victim = sorted(tensors)[0]
    tensors[victim] = torch.zeros(tensors[victim].shape[0], 3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    (root / "base" / "tokenizer_config.json").write_text("{}")
    server = FakeHub({f"org/{n}": root / n for n in ("base", "a", "b", "bad")})
    server.victim = victim
    yield server
    server.close()


def second_shard_names(hub) -> list[str]:
    index = json.loads((hub.repos["org/a"] / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(k for k, v in index.items() if v == "model-00002-of-00002.safetensors")


def recipe(tmp_path: Path, models, exclude=()) -> Path:
    lines = ["merge_method: linear", "base_model: org/base", "models:"] + [f"  - model: {m}" for m in models]
    if exclude:
        lines.append("exclude:")
        lines += [f"  - '^{re.escape(n)}$'" for n in exclude]
    p = tmp_path / "r.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_validate_and_dry_run_fetch_only_headers_and_config(hub, tmp_path):
    hub.reset()
    r = recipe(tmp_path, ["org/a", "org/b"])
    got = run_cli(hub, tmp_path, "validate", r)
    assert got.returncode == 0, got.stderr
    assert "ok" in got.stdout
    got = run_cli(hub, tmp_path, "run", r, "--dry-run", "--out", tmp_path / "out")
    assert got.returncode == 0, got.stderr
    assert not (tmp_path / "out").exists()
    for repo in ("org/base", "org/a", "org/b"):
        for f in weight_files(hub, repo):
            # two runs: each fetched exactly the 8-byte length and the header, no tensor byte
            assert hub.bytes_of(repo, f) == 2 * header_bytes(hub.repos[repo] / f), (repo, f)
        for f in hub.files(repo):
            if f.endswith(".json"):
                assert hub.bytes_of(repo, f) == (hub.repos[repo] / f).stat().st_size, (repo, f)  # cached after once
    assert header_bytes(hub.repos["org/a"] / "model-00001-of-00002.safetensors") < 100_000 < \
        (hub.repos["org/a"] / "model-00001-of-00002.safetensors").stat().st_size
    assert not any(p.name.startswith(".mergekit-ortho-view") for p in (tmp_path / "hf" / "hub").iterdir())


def test_bad_shape_found_before_any_weight_download(hub, tmp_path):
    hub.reset()
    r = recipe(tmp_path, ["org/a", "org/bad"])
    for args in (("validate", r), ("run", r, "--out", tmp_path / "out")):
        got = run_cli(hub, tmp_path, *args)
        assert got.returncode == 2, got.stderr
        assert hub.victim in got.stderr and "shape" in got.stderr and "Traceback" not in got.stderr
    assert not (tmp_path / "out").exists()
    for repo in ("org/base", "org/a", "org/bad"):
        for f in weight_files(hub, repo):
            assert hub.bytes_of(repo, f) == 2 * header_bytes(hub.repos[repo] / f), (repo, f)


def test_run_downloads_only_the_files_the_plan_reads(hub, tmp_path):
    hub.reset()
    skipped = second_shard_names(hub)  # every tensor of the models' second shard: copied from the base
    r = recipe(tmp_path, ["org/a", "org/b"], exclude=skipped)
    got = run_cli(hub, tmp_path, "run", r, "--out", tmp_path / "out")
    assert got.returncode == 0, got.stderr
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    for repo in ("org/a", "org/b"):
        size = (hub.repos[repo] / first).stat().st_size
        assert hub.bytes_of(repo, first) == header_bytes(hub.repos[repo] / first) + size  # header, then the file
        assert hub.bytes_of(repo, second) == header_bytes(hub.repos[repo] / second)  # never downloaded
    for f in (first, second):  # the base: both read (merged and copied tensors)
        assert hub.bytes_of("org/base", f) >= (hub.repos["org/base"] / f).stat().st_size
    # the result equals the same merge of the local folders
    local = tmp_path / "local.yaml"
    local.write_text(r.read_text().replace("org/base", str(hub.repos["org/base"])).replace(
        "org/a", str(hub.repos["org/a"])).replace("org/b", str(hub.repos["org/b"])))
    got = run_cli(hub, tmp_path, "run", local, "--out", tmp_path / "out_local")
    assert got.returncode == 0, got.stderr
    merged, ref = (load_dir(tmp_path / d) for d in ("out", "out_local"))
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert not any(p.name.startswith(".mergekit-ortho-view") for p in (tmp_path / "hf" / "hub").iterdir())
    # validating again on this machine: the views of headers never write into the downloaded files
    got = run_cli(hub, tmp_path, "validate", r)
    assert got.returncode == 0, got.stderr
    for repo in ("org/base", "org/a", "org/b"):
        snap = next((tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        for f in snap.iterdir():
            assert f.read_bytes() == (hub.repos[repo] / f.name).read_bytes(), (repo, f.name)


def test_a_header_only_file_is_checked_against_its_real_size_and_never_read(tmp_path):
    from mergekit_ortho.errors import UserError
    from mergekit_ortho.io.safetensors import SafetensorsFile

    full = tmp_path / "full.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(full))
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(full.read_bytes()[:header_bytes(full)])
    h = SafetensorsFile(stub, remote_size=full.stat().st_size)
    assert h.entries["w"].shape == (4, 4)
    with pytest.raises(UserError, match="only its header"):
        h.read("w")
    with pytest.raises(UserError, match="truncated or padded"):
        SafetensorsFile(stub, remote_size=full.stat().st_size + 4)
    with pytest.raises(UserError, match="truncated or padded"):
        SafetensorsFile(stub)  # without the real size it is a truncated file
