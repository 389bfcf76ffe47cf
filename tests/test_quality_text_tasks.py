"""The real-model quality benchmark's text-task builders are deterministic and non-degenerate."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "text_tasks.py"


@pytest.fixture(scope="module")
def tasks():
    spec = importlib.util.spec_from_file_location("text_tasks", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_builders_are_deterministic_and_split_cleanly(tasks):
    assert len(tasks.BUILDERS) >= 6
    for name in tasks.BUILDERS:
        train, test = tasks.build_task(name, seed=0)
        assert (train, test) == tasks.build_task(name, seed=0), name
        assert len({label for _, label in train}) >= 2, name
        assert not set(train) & set(test), name
    assert tasks.build_task("shuffled", seed=0) != tasks.build_task("shuffled", seed=1)
