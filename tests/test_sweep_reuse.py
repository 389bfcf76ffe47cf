"""`merge sweep` reuse across points (issue 18): inputs hashed once per sweep, cache hits that read
no model input, a changed input (during or between sweeps), WIDEN's statistics and OPCM's SVDs
cached with every point still equal to a plain `merge run`."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ortho.errors import UserError
from mergekit_ortho.sweep.driver import sweep
from test_sweep import assert_bit_equal, check_grid, dense_doc, plain_run, tensors_of, with_values, write


def test_inputs_are_hashed_once_and_hits_read_no_model_tensor(tiny_models, tmp_path, cli, monkeypatch):
    import mergekit_ortho.inputs as inputs_mod

    reads = []
    real = inputs_mod.model_tensor
    monkeypatch.setattr(inputs_mod, "model_tensor", lambda *a, **k: reads.append(1) or real(*a, **k))
    seen = []
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "ties", density=0.5))
    res = sweep(r, ["lambda=0.5,1,1.5"], tmp_path / "o", work_dir=tmp_path / "wd",
                on_point=lambda p: seen.append(len(reads)))
    assert res.points[0].misses == 21 and seen[0] == 21 * 3  # every merged tensor of the 3 models, once
    assert seen[1] == seen[2] == seen[0]  # later points: base and cache entry only, no model tensor
    assert res.hashed == 21 * 3
    assert json.loads((tmp_path / "o" / "sweep.json").read_text())["inputs_hashed"] == 21 * 3
    monkeypatch.setattr(inputs_mod, "model_tensor", real)
    for p in res.points:
        want = plain_run(cli, tmp_path, with_values(dense_doc(tiny_models, "ties", density=0.5), p.values),
                         f"plain{p.index}")
        assert_bit_equal(tensors_of(tmp_path / "o" / p.name), want)


def test_a_density_axis_reuses_the_digests(tiny_models, tmp_path):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "ties"))
    res = sweep(r, ["density=0.3,0.6"], tmp_path / "o", work_dir=tmp_path / "wd")
    assert [p.misses for p in res.points] == [21, 21] and res.hashed == 21 * 3  # merged again, not hashed again


@pytest.fixture
def own_models(tiny_models, tmp_path):
    out = {}
    for k, p in tiny_models.items():
        shutil.copytree(p, tmp_path / "models" / k)
        out[k] = tmp_path / "models" / k
    return out


def test_an_input_changed_during_the_sweep_stops_it_with_no_output(own_models, tmp_path):
    r = write(tmp_path / "r.yaml", dense_doc(own_models, "tsv"))
    f = next(own_models["b"].glob("*.safetensors"))

    def touch(p):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    with pytest.raises(UserError, match="changed during the sweep"):
        sweep(r, ["lambda=0.5,1"], tmp_path / "o", work_dir=tmp_path / "wd", on_point=touch)
    assert not (tmp_path / "o").exists()


def test_an_input_changed_between_sweeps_misses_the_cache(own_models, tmp_path, cli):
    doc = dense_doc(own_models, "tsv")
    r = write(tmp_path / "r.yaml", doc)
    sweep(r, ["lambda=0.5,1"], tmp_path / "one", work_dir=tmp_path / "wd")
    f = next(own_models["b"].glob("*.safetensors"))
    ts = load_file(str(f))
    name = "model.layers.0.mlp.up_proj.weight"
    ts[name] = ts[name] + 0.01
    save_file(ts, str(f), metadata={"format": "pt"})
    again = sweep(r, ["lambda=0.5,1"], tmp_path / "two", work_dir=tmp_path / "wd")
    assert again.points[0].misses == 1 and again.points[0].hits == 20  # only the changed tensor
    for p in again.points:
        assert_bit_equal(tensors_of(tmp_path / "two" / p.name),
                         plain_run(cli, tmp_path, with_values(doc, p.values), f"plain{p.index}"))


def test_widen_points_equal_plain_runs_and_reuse_the_statistics(tiny_models, tmp_path, cli):
    points = check_grid(cli, tmp_path, dense_doc(tiny_models, "widen"),
                        ["threshold=0.5,1", "temperature=0.5,2"], True)
    assert points[0].misses == 21 and points[0].hits == 0
    assert all(p.hits == 21 and p.misses == 0 for p in points[1:])


def test_widen_unit_rule_is_part_of_the_statistics_key(tiny_models, tmp_path, cli):
    doc = dense_doc(tiny_models, "widen")
    points = check_grid(cli, tmp_path, doc, ["transpose_pattern=down_proj,up_proj"], True)
    assert points[1].misses == 21  # another unit rule: no statistics reused


def test_opcm_points_equal_plain_runs_and_reuse_the_first_svds(tiny_models, tmp_path, cli):
    points = check_grid(cli, tmp_path, dense_doc(tiny_models, "opcm"), ["alpha=0.3,0.6,0.9"], True)
    projectable = points[0].misses // 2  # models 2 and 3 each project every projectable tensor
    assert projectable > 0 and points[0].hits == 0
    for p in points[1:]:
        assert p.hits >= projectable  # step 2 projects against S_1 = tau_1 whatever alpha is
        assert p.hits + p.misses == 2 * projectable


def test_per_model_parts_only_where_a_grid_can_reuse_them():
    from mergekit_ortho.ops import registry
    from mergekit_ortho.sweep import grid
    from mergekit_ortho.sweep.driver import parts_help

    def axes(*sets):
        return grid.parse_axes(list(sets), registry.get("ties"), ["a", "b"])

    assert not parts_help(axes("lambda=0.5,1")) and not parts_help(axes("density=0.2,0.4", "lambda=1,2"))
    assert parts_help(axes("models[0].density=0.2,0.4")) and parts_help(axes("b.weight=1,2"))
