"""Shared fixtures: tiny checkpoints built on the fly (no network, no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network

from mergekit_ortho.testing.checkpoints import llama_shapes, sharded_copy, write_checkpoint  # noqa: E402,F401

TINY = dict(hidden=16, layers=2, vocab=32, intermediate=24)

_SLOW_SITE = """\
# written by the test suite: slows every sink's put() so that a test can kill the process mid-run
import time

from mergekit_ortho import sinks

def _slowed(put, delay):
    def slow_put(self, *args, **kwargs):
        put(self, *args, **kwargs)
        time.sleep(delay)
    return slow_put

for _cls in (sinks.FullModel, sinks.Adapter, sinks.Bundle, sinks.StateVersion, sinks.UnitShards):
    _cls.put = _slowed(_cls.put, {delay})
"""


def slow_env(delay: float) -> dict[str, str]:
    """The environment of a child `merge` process whose every output item takes ``delay`` s more
    (a ``sitecustomize`` in a fresh temporary directory, first on PYTHONPATH); crash tests kill
    it mid-run. No hook in the package itself."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="mergekit-ortho-slow-"))
    (directory / "sitecustomize.py").write_text(_SLOW_SITE.format(delay=float(delay)))
    path = os.pathsep.join([str(directory)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path)


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

