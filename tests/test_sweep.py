"""`merge sweep` (issue 18): every grid point equals a plain `merge run` with that value, bit for bit;
the cache's hit path equals its miss path; a corrupt entry is recomputed; bad input is one line,
exit 2, no output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ortho.sweep.driver import sweep
from mergekit_ortho.testing.checkpoints import llama_shapes
from mergekit_ortho.testing.loras import write_peft_adapter

TINY = dict(hidden=16, layers=2, vocab=32, intermediate=24)


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.name}:{k}"] = v
    assert out, f"no tensors in {d}"
    return out


def assert_bit_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.contiguous().reshape(-1).view(torch.uint8), w.contiguous().reshape(-1).view(torch.uint8)), k


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def plain_run(cli, tmp_path: Path, doc: dict, name: str) -> dict:
    r = write(tmp_path / f"{name}.yaml", doc)
    code, out, err = cli("run", r, "--out", tmp_path / name)
    assert code == 0, out + err
    return tensors_of(tmp_path / name)


def with_values(doc: dict, values: dict) -> dict:
    """The recipe a plain run would use for a point (the sweep's values written in by hand)."""
    d = json.loads(json.dumps(doc))
    for k, v in values.items():
        if k.startswith("models["):
            i, name = int(k[7:k.index("]")]), k[k.index(".") + 1:]
            d["models"][i].setdefault("parameters", {})[name] = v
        else:
            d.setdefault("parameters", {})[k] = v
    return d


def dense_doc(tiny_models, method: str, **params) -> dict:
    return {"merge_method": method, "base_model": str(tiny_models["base"]),
            "models": [{"model": str(tiny_models[k])} for k in "abc"], "parameters": dict(params)}


def check_grid(cli, tmp_path: Path, doc: dict, sets: list[str], expect_cached: bool) -> list:
    r = write(tmp_path / "sweep.yaml", doc)
    res = sweep(r, sets, tmp_path / "swept", work_dir=tmp_path / "wd")
    assert len(res.points) >= 2
    for p in res.points:
        want = plain_run(cli, tmp_path, with_values(doc, p.values), f"plain{p.index}")
        assert_bit_equal(tensors_of(tmp_path / "swept" / p.name), want)
        assert p.cached == expect_cached
    return res.points


# -- every point equals a plain run ------------------------------------------------------------------


def test_tsv_lambda_points_equal_plain_runs_and_reuse_the_svds(tiny_models, tmp_path, cli):
    doc = dense_doc(tiny_models, "tsv")
    doc["models"][1]["parameters"] = {"weight": 0.5}
    points = check_grid(cli, tmp_path, doc, ["lambda=0.3,1,1.7"], True)
    merged = points[0].misses
    assert merged == 21 and points[0].hits == 0  # every merged tensor of the tiny model
    assert all(p.hits == merged and p.misses == 0 for p in points[1:])


def test_tsv_per_model_weight_axis_misses_and_equals_plain_runs(tiny_models, tmp_path, cli):
    points = check_grid(cli, tmp_path, dense_doc(tiny_models, "tsv", **{"lambda": 0.8}),
                        ["models[1].weight=0.5,1.5", "lambda=0.5,1"], True)
    assert [p.hits > 0 for p in points] == [False, True, False, True]  # the weight changes the SVD merge


def test_ties_grid_of_lambda_and_density_equals_plain_runs(tiny_models, tmp_path, cli):
    points = check_grid(cli, tmp_path, dense_doc(tiny_models, "ties"), ["density=0.3,0.7", "lambda=0.5,1,2"], True)
    assert [p.misses == 0 for p in points] == [False, True, True, False, True, True]


def test_dare_ties_seeded_masks_are_cached_exactly(tiny_models, tmp_path, cli):
    check_grid(cli, tmp_path, dense_doc(tiny_models, "dare_ties", density=0.5, seed=3), ["lambda=0.5,1.5"], True)


def test_linear_has_no_cache_and_equals_plain_runs(tiny_models, tmp_path, cli):
    doc = {"merge_method": "linear", "models": [{"model": str(tiny_models[k])} for k in "ab"]}
    points = check_grid(cli, tmp_path, doc, ["models[0].weight=0.25,0.75"], False)
    assert all(p.hits == p.misses == 0 for p in points)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("sweep_loras")
    shapes = llama_shapes(**TINY)
    out = []
    for i in range(3):
        write_peft_adapter(root / f"l{i}", shapes, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8, seed=10 + i)
        out.append(root / f"l{i}")
    return out


@pytest.mark.parametrize("inner, fmt", [("tsv", "peft"), ("ties", "full")])
def test_core_space_points_equal_plain_runs(tiny_models, loras, tmp_path, cli, inner, fmt):
    doc = {"merge_method": "core_space", "base_model": str(tiny_models["base"]),
           "models": [{"model": str(p)} for p in loras], "parameters": {"inner_method": inner, "isotropize": True},
           "output": {"format": fmt}}
    points = check_grid(cli, tmp_path, doc, ["lambda=0.5,1,1.5"], True)
    assert points[0].misses == 6 and all(p.hits == 6 and p.misses == 0 for p in points[1:])


# -- the cache ------------------------------------------------------------------------------------


def test_hit_path_equals_miss_path_across_sweeps(tiny_models, tmp_path):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "tsv"))
    first = sweep(r, ["lambda=0.5,2"], tmp_path / "one", work_dir=tmp_path / "wd")
    again = sweep(r, ["lambda=0.5,2"], tmp_path / "two", work_dir=tmp_path / "wd")
    assert first.points[0].misses == 21 and all(p.misses == 0 and p.hits == 21 for p in again.points)
    for a, b in zip(first.points, again.points):
        assert_bit_equal(tensors_of(tmp_path / "two" / b.name), tensors_of(tmp_path / "one" / a.name))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "swap"])
def test_a_corrupt_cache_entry_is_recomputed(tiny_models, tmp_path, damage):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "tsv"))
    first = sweep(r, ["lambda=0.7"], tmp_path / "one", work_dir=tmp_path / "wd")
    files = sorted((tmp_path / "wd").glob("*.safetensors"))
    assert len(files) == 21
    for i, f in enumerate(files):
        raw = bytearray(f.read_bytes())
        if damage == "flip":
            raw[-3] ^= 0x40  # one bit of the tensor data: the file still loads
        elif damage == "truncate":
            raw = raw[: len(raw) // 2]
        elif damage == "garbage":
            raw = bytearray(b"not a safetensors file")
        else:  # another entry's (valid) file under this key
            raw = bytearray(files[(i + 1) % len(files)].read_bytes())
        f.write_bytes(bytes(raw))
    again = sweep(r, ["lambda=0.7"], tmp_path / "two", work_dir=tmp_path / "wd")
    assert again.corrupt == 21 and again.points[0].misses == 21
    assert_bit_equal(tensors_of(tmp_path / "two" / again.points[0].name),
                     tensors_of(tmp_path / "one" / first.points[0].name))
    third = sweep(r, ["lambda=0.7"], tmp_path / "three", work_dir=tmp_path / "wd")
    assert third.corrupt == 0 and third.points[0].hits == 21  # the recomputed entries were stored


def test_cache_is_bounded_and_evicts_older_sweeps_first(tiny_models, tmp_path):
    from mergekit_ortho.sweep.cache import Cache

    big = {"x": torch.arange(200, dtype=torch.float32)}
    probe = Cache(tmp_path / "probe", 1 << 20)
    probe.put("k0", big)
    size = probe.total_bytes  # one entry's bytes (keys of one length: all entries the same size)
    c = Cache(tmp_path / "c", 3 * size + 10)
    assert c.put("k1", big) and c.put("k2", big) and c.put("k3", big)
    assert not c.put("k4", big) and c.skipped == 1  # full of this process's own entries: not stored
    later = Cache(tmp_path / "c", 3 * size + 10)  # a later sweep: the earlier entries may go, oldest first
    assert later.get("k2") is not None
    assert later.put("k4", big)
    assert later.get("k1") is None and later.get("k2") is not None and later.get("k4") is not None
    assert later.total_bytes <= 3 * size + 10
    assert torch.equal(later.get("k4")["x"], big["x"])


def test_the_key_depends_on_inputs_name_and_prepared_parameters_only():
    from mergekit_ortho.ops import registry
    from mergekit_ortho.ops.registry import TensorTask
    from mergekit_ortho.sweep.cache import task_key

    op = registry.get("tsv")
    x = [torch.randn(8, 8), torch.randn(8, 8)]
    mps = [op.resolve_model_params({})] * 2

    def key(inputs, name="w", **params):
        return task_key("tsv", TensorTask(name, None, inputs, op.resolve_params(params), mps), ("lambda",))

    k = key(x)
    assert key(x, **{"lambda": 0.3}) == k  # lambda is applied after the prepared part
    assert key([x[0], x[1].clone()]) == k
    y = x[1].clone()
    y[3, 3] = torch.nextafter(y[3, 3], torch.tensor(10.0))  # one ulp in one input
    assert key([x[0], y]) != k
    assert key(x, name="v") != k
    assert key(x, embedding_pattern="") != k
    assert key([t.double() for t in x]) != k


# -- the ops' split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tsv", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                                    "della", "della_linear"])
@pytest.mark.parametrize("shape", [(24, 16), (160, 130), (40,), (3, 4, 2, 2)])
def test_apply_of_prepare_is_the_operator_bit_for_bit(method, shape):
    from mergekit_ortho.ops import registry
    from mergekit_ortho.ops.prepare import preparation
    from mergekit_ortho.ops.registry import TensorTask

    op = registry.get(method)
    prep = preparation(method)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(shape, generator=g) for _ in range(3)]
    xs[1].view(-1)[:5] = xs[0].view(-1)[:5]  # ties at the trimming threshold
    names = {p.name for p in op.model_params}
    mp = [op.resolve_model_params({k: v for k, v in {"weight": w, "density": 0.4, "epsilon": 0.1}.items()
                                   if k in names}) for w in (1.0, 0.5, 1.5)]
    for lam in (1.0, 0.37, -2.0):
        params = op.resolve_params({"lambda": lam})
        want = op.fn(TensorTask("t.weight", None, [x.clone() for x in xs], params, mp))
        task = TensorTask("t.weight", None, [x.clone() for x in xs], params, mp)
        got = prep.apply(task, prep.prepare(task))
        assert_bit_equal({"t": got}, {"t": want})


# -- eval and keep ------------------------------------------------------------------------------------


def _score_cmd() -> str:
    # the score: -|lambda - 0.5|, read from the point's directory name
    code = "import sys; n = sys.argv[1]; print('loss 3 score', -abs(float(n.rsplit('=', 1)[1]) - 0.5))"
    return f"{sys.executable} -c \"{code}\" {{out}}"


def test_eval_keep_best_keeps_only_the_best_point(tiny_models, tmp_path, cli):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "ties", density=0.5))
    code, out, err = cli("sweep", r, "--set", "lambda=0.1,0.5,0.9", "--eval", _score_cmd(), "--keep", "best",
                         "--out", tmp_path / "o", "--work-dir", tmp_path / "wd")
    assert code == 0, out + err
    kept = sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir())
    assert kept == ["001-lambda=0.5"]
    summary = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert summary["best"] == "001-lambda=0.5"
    assert [p["score"] for p in summary["points"]] == pytest.approx([-0.4, 0.0, -0.4])
    assert "score" in out and "hit" in out


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------


BAD = [
    (["--set", "lamda=0.1,0.2"], "did you mean 'lambda'"),
    (["--set", "lambda"], "expected NAME=VALUE"),
    (["--set", "lambda=0.1,,0.3"], "empty value"),
    (["--set", "lambda=abc"], "must be a number"),
    (["--set", "lambda=1:0:0.1"], "range"),
    (["--set", "models[7].weight=1"], "models[0] to models[2]"),
    (["--set", "models[0].lambda=1"], "method-level parameter"),
    (["--set", "zz.weight=1"], "no model labelled 'zz'"),
    (["--set", "lambda=0:10:0.1", "--set", "density=0:1:0.1"], "pass --yes"),
    (["--set", "lambda=1", "--keep", "best"], "--keep best needs --eval"),
    (["--set", "lambda=1", "--eval", "true"], "{out}"),
    (["--set", "lambda=0.5,1", "--eval", f"{sys.executable} -c 'import sys; sys.exit(3)' {{out}}"], "status 3"),
    (["--set", "lambda=0.5,1", "--eval", f"{sys.executable} -c 'print(\"no score\")' {{out}}"], "printed no number"),
    (["--set", "lambda=1", "--cache-max", "lots"], "--cache-max"),
]


@pytest.mark.parametrize("args, needle", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_models, tmp_path, cli, args, needle):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "ties", density=0.5))
    code, out, err = cli("sweep", r, *args, "--out", tmp_path / "o", "--work-dir", tmp_path / "wd")
    assert code == 2, out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in out + err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no partial directory


def test_a_shadowed_top_level_axis_is_refused(tiny_models, tmp_path, cli):
    doc = dense_doc(tiny_models, "ties")
    doc["models"][2]["parameters"] = {"density": 0.4}
    r = write(tmp_path / "r.yaml", doc)
    code, out, err = cli("sweep", r, "--set", "density=0.2,0.6", "--out", tmp_path / "o")
    assert code == 2 and "models[2].parameters sets 'density'" in err
    assert not (tmp_path / "o").exists()


def test_grid_ranges_and_products():
    from mergekit_ortho.ops import registry
    from mergekit_ortho.sweep import grid

    axes = grid.parse_axes(["lambda=0.1:0.5:0.2", "b.weight=1,2"], registry.get("tsv"), ["a", "b"])
    assert axes[0].values == (0.1, 0.3, 0.5) and axes[1].model == 1
    pts = grid.points(axes)
    assert len(pts) == 6 and pts[1] == (0.1, 2.0)
    assert grid.check_size(axes, False) == 6
    raw = {"merge_method": "tsv", "models": ["x", {"model": "y"}]}
    assert grid.point_recipe(raw, axes, pts[1]) == {
        "merge_method": "tsv", "models": ["x", {"model": "y", "parameters": {"weight": 2.0}}],
        "parameters": {"lambda": 0.1}}
    assert raw == {"merge_method": "tsv", "models": ["x", {"model": "y"}]}


# -- ties: the per-model threshold part ----------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.77])
def test_ties_with_cached_cuts_is_the_operator_bit_for_bit(quantized, density):
    from mergekit_ortho.ops import registry
    from mergekit_ortho.ops.prepare import preparation
    from mergekit_ortho.ops.registry import TensorTask

    op, prep = registry.get("ties"), preparation("ties")
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(170, 130, generator=g) for _ in range(3)]  # 22100 entries: the radix kernel's size
    if quantized:  # few distinct magnitudes: many entries equal to the threshold, cut inside the tie group
        xs = [torch.round(x * 4) / 4 for x in xs]
        xs[0].view(-1)[100] = -0.0
    mp = [op.resolve_model_params({"weight": w, "density": density}) for w in (1.0, 0.6, 1.4)]
    params = op.resolve_params({"lambda": 0.9})
    want = op.fn(TensorTask("t", None, [x.clone() for x in xs], params, mp))
    task = TensorTask("t", None, [x.clone() for x in xs], params, mp)
    parts = [prep.part.compute(x, i, task) for i, x in enumerate(task.inputs)]
    assert all("cut" in p for p in parts)
    if quantized:
        n = xs[0].numel()
        assert any(int(p["cut"][1]) < n for p in parts)  # the tie group at t is split by index
    got = prep.apply(task, prep.prepare(task, parts))
    assert_bit_equal({"t": got}, {"t": want})


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """base + 3 fine-tunes with one 170x130 weight (big enough for the radix top-k) and a norm."""
    from mergekit_ortho.testing.checkpoints import write_safetensors

    root = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(170, 130, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(130)}
    out = {}
    for name in ("base", "a", "b", "c"):
        ts = base if name == "base" else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        write_safetensors(root / name / "model.safetensors", ts, {"format": "pt"})
        (root / name / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
        out[name] = root / name
    return out


def test_ties_one_models_density_axis_reuses_the_other_models_thresholds(wide_models, tmp_path, cli):
    doc = dense_doc(wide_models, "ties", density=0.4)
    points = check_grid(cli, tmp_path, doc, ["models[0].density=0.2,0.5,0.8"], True)
    assert [p.part_hits for p in points] == [0, 2, 2]  # models 1 and 2 keep their cut of the weight
    assert all(p.misses == 2 for p in points)  # the weight and the norm are merged anew


def test_a_work_dir_inside_an_input_is_refused(tiny_models, tmp_path, cli):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "tsv"))
    code, out, err = cli("sweep", r, "--set", "lambda=1", "--out", tmp_path / "o",
                         "--work-dir", tiny_models["a"] / "cache")
    assert code == 2 and "--work-dir" in err and "lies inside the input" in err
    assert not (tiny_models["a"] / "cache").exists() and not (tmp_path / "o").exists()


def test_minimize_keeps_the_lowest_score(tiny_models, tmp_path, cli):
    r = write(tmp_path / "r.yaml", dense_doc(tiny_models, "ties", density=0.5))
    code, out, err = cli("sweep", r, "--set", "lambda=0.5,0.2,0.9", "--eval", _score_cmd(), "--keep", "best",
                         "--minimize", "--out", tmp_path / "o", "--work-dir", tmp_path / "wd")
    assert code == 0, out + err
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == ["002-lambda=0.9"]
