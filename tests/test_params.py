"""The typed parameters every operator receives: resolved once, defaults filled, read-only."""
from __future__ import annotations

import copy
import json
import pickle

import pytest

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import Params


def test_resolved_params_fill_defaults_and_read_as_attributes():
    p = registry.get("ties").resolve_params({"lambda": 0.5})
    assert isinstance(p, Params)
    assert p["lambda"] == 0.5 and p.rescale is False and p.trim_rule == "topk"
    mp = registry.get("ties").resolve_model_params({"density": 0.25}, "m")
    assert isinstance(mp, Params) and mp.density == 0.25 and mp.weight == 1.0
    with pytest.raises(AttributeError, match="no parameter 'densty'"):
        p.densty  # noqa: B018


def test_params_are_read_only_and_survive_json_pickle_and_copies():
    p = registry.get("ties").resolve_params({})
    for mutate in (lambda: p.__setitem__("lambda", 2.0), lambda: p.update(x=1), lambda: p.pop("lambda"),
                   lambda: p.setdefault("x", 1), p.clear, p.popitem):
        with pytest.raises(TypeError, match="read-only"):
            mutate()
    assert p["lambda"] == 1.0 and len(p) == 5
    assert json.loads(json.dumps(p)) == dict(p)
    back = pickle.loads(pickle.dumps(p))
    assert isinstance(back, Params) and back == p
    assert copy.deepcopy(p) is p and copy.copy(p) is p
