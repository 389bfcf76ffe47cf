"""Shared fixtures: tiny checkpoints built on the fly (no network, no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network

from mergekit_ortho.testing.checkpoints import llama_shapes, sharded_copy, write_checkpoint  # noqa: E402,F401

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

