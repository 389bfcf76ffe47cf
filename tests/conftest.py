"""Shared fixtures: tiny checkpoints built on the fly (no network, no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network

from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint  # noqa: E402

TINY = dict(hidden=16, layers=2, vocab=32, intermediate=24)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tunes, float32, single-file safetensors; built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    shapes = llama_shapes(**TINY)
    write_checkpoint(root / "base", shapes, seed=0, dtype="float32")
    out = {"base": root / "base"}
    for i, name in enumerate(("a", "b", "c")):
        write_checkpoint(root / name, shapes, seed=i + 1, base=root / "base", noise=0.05, dtype="float32")
        out[name] = root / name
    return out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def cli():
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from mergekit_ortho.cli import app

    def invoke(*args: str):
        runner = CliRunner()
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return invoke


def sharded_copy(src: Path, dst: Path) -> Path:
    """A two-shard copy (with its index) of a tiny single-file checkpoint."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    names = sorted(tensors)
    dst.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(dst / fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    return dst
