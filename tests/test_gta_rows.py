"""The bounded-memory TIES-family path (ops/gta_rows.py, issue 17): two passes over row blocks,
bit-identical to the in-memory merge (ops/gta.py) - on tensors with long runs of equal magnitudes
(bf16 / fp16 task vectors) whose trim threshold falls inside such a run and whose row blocks cut
through it, for ties, dare_ties / dare_linear (seeded), breadcrumbs(_ties) and della(_linear), with
rescale on and off, inf and NaN entries, densities 0 and 1, negative weights -
and end to end through `merge run` with the budget lowered so that small tensors take it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_ortho.ops import gta, gta_rows, prepare
from mergekit_ortho.ops.kernels import _chunks, topk
from mergekit_ortho.ops.registry import Params, TensorTask
from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

SHAPE = (97, 37)  # 3589 entries; blocks of 2 rows (74 entries) never align with the 64-entry chunks


@pytest.fixture
def small(monkeypatch):
    """Every kernel pass in many chunks, the radix kernel on small tensors, blocks of 2 rows, and
    every tensor above the budget."""
    monkeypatch.setattr(_chunks, "CHUNK", 64)
    monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 16)
    monkeypatch.setattr(topk, "PIVOT_MIN", 16)
    monkeypatch.setattr(gta_rows, "BLOCK", 2 * SHAPE[1] + 5)
    monkeypatch.setattr(gta_rows, "STREAM_MIN_BYTES", 0)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.int32)


def task_vectors(dtype, n: int = 3, seed: int = 0, special: str = "") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and n task vectors whose entries come from a handful of values (rounded through
    ``dtype``), so that most magnitudes are tied; ``special``: "inf" / "nan" entries put in."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g).to(dtype).float()
    levels = torch.tensor([0.0, -0.0, 0.01, -0.01, 0.02, -0.02, 0.03, 0.005, -0.005])
    deltas = []
    for i in range(n):
        d = levels[torch.randint(0, len(levels), SHAPE, generator=g)].to(dtype).float()
        if special == "inf":
            d.view(-1)[[5 + i, 400, 1000 + 7 * i]] = torch.tensor([float("inf"), -float("inf"), float("inf")])
        if special == "nan":
            d.view(-1)[[11 + i, 2000]] = float("nan")
        deltas.append(d)
    return base, deltas


def make_task(method: str, n: int, params: dict, per_model: list[dict]) -> TensorTask:
    op_params = {"lambda": 1.0, "normalize": gta.VARIANTS[method].normalize,
                 "rescale": gta.VARIANTS[method].rescale, "trim_rule": "topk", "seed": 7, "int8_mask": False}
    op_params.update(params)
    models = [Params({"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15, **pm}) for pm in per_model]
    return TensorTask("model.embed_tokens.weight", None, [], Params(op_params), models, [f"m{i}" for i in range(n)],
                      torch.float32)


def in_memory(method, base, deltas, params, per_model):
    task = make_task(method, len(deltas), params, per_model)
    task.inputs = [d.clone() for d in deltas]
    return gta.merge(task, gta.VARIANTS[method]).add_(base)


def by_rows(method, base, deltas, params, per_model, reads=None):
    task = make_task(method, len(deltas), params, per_model)
    assert gta_rows.applies(method, task, SHAPE, torch.float32)

    def rows(i, r0, r1, out):
        if reads is not None:
            reads.append((i, r0, r1))
        out.copy_(deltas[i][r0:r1].reshape(-1))

    return gta_rows.merge_rows(task, method, SHAPE, rows, lambda r0, r1: base[r0:r1].clone(), torch.float32)


CASES = [
    ("ties", {}, [{"density": 0.5}, {"density": 0.3, "weight": 0.7}, {"density": 0.8, "weight": 1.3}]),
    ("ties", {"rescale": True}, [{"density": 0.5}, {"density": 0.3, "weight": -0.7}, {"density": 0.1}]),
    ("ties", {"normalize": False, "lambda": 0.6}, [{"density": 0.0}, {"density": 1.0}, {"density": 0.45}]),
    ("ties", {}, [{"density": 0.9999}, {"density": 0.2}]),  # k = n - 1, and two models
    ("dare_ties", {}, [{"density": 0.5}, {"density": 0.3, "weight": 0.7}, {"density": 0.8}]),
    ("dare_ties", {"rescale": False, "seed": 11}, [{"density": 0.5}, {"density": 0.0}, {"density": 1.0}]),
    ("dare_linear", {}, [{"density": 0.4, "weight": 0.5}, {"density": 0.6, "weight": 0.5}, {"density": 0.2}]),
    ("breadcrumbs", {}, [{"density": 0.5, "gamma": 0.05}, {"density": 0.3, "gamma": 0.0}, {"density": 0.9, "gamma": 0.2}]),
    ("breadcrumbs", {"rescale": True, "normalize": True}, [{"density": 0.5}, {"density": 0.7, "gamma": 0.1}]),
    ("breadcrumbs_ties", {"lambda": 1.5}, [{"density": 0.4, "gamma": 0.02}, {"density": 0.6}, {"density": 0.0}]),
    ("della", {}, [{"density": 0.5, "epsilon": 0.1}, {"density": 0.3, "epsilon": 0.2, "weight": 0.7},
                   {"density": 0.8, "epsilon": 0.15}]),
    ("della_linear", {"rescale": False, "seed": 3}, [{"density": 0.4, "epsilon": 0.1}, {"density": 1.0},
                                                     {"density": 0.0}]),
]


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("method, params, per_model", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bit_identical_to_the_in_memory_merge(small, monkeypatch, method, params, per_model, dtype, workers):
    """Also with the blocks split over 2 and 3 kernel workers (a tensor the executor runs alone)."""
    base, deltas = task_vectors(dtype, n=len(per_model))
    want = in_memory(method, base, deltas, params, per_model)
    monkeypatch.setattr(_chunks, "workers", lambda: workers)
    got = by_rows(method, base, deltas, params, per_model)
    assert torch.equal(bits(got), bits(want))


def test_independent_blocks_are_split_over_the_workers(small, monkeypatch):
    """A test that cannot fail is a defect: the split above happens (ties' passes run on two
    threads), and DARE's pass of draws stays on the calling thread."""
    import threading

    monkeypatch.setattr(_chunks, "workers", lambda: 2)
    base, deltas = task_vectors(torch.bfloat16)
    threads = {"ties": set(), "dare_ties": set()}
    for method in threads:  # dare without rescale: nothing read in pass 1, its draws in pass 2
        task = make_task(method, 3, {"rescale": False} if method == "dare_ties" else {}, [{"density": 0.5}] * 3)

        def rows(i, r0, r1, out, _seen=threads[method]):
            _seen.add(threading.current_thread().name)
            out.copy_(deltas[i][r0:r1].reshape(-1))
        gta_rows.merge_rows(task, method, SHAPE, rows, lambda r0, r1: base[r0:r1].clone(), torch.float32)
    assert len({t for t in threads["ties"] if t.startswith("kernels")}) >= 2 and threads["dare_ties"] == {threading.current_thread().name}


@pytest.mark.parametrize("special", ["inf", "nan"])
@pytest.mark.parametrize("method, params", [("ties", {}), ("ties", {"rescale": True}), ("dare_ties", {}),
                                            ("breadcrumbs_ties", {"rescale": True}), ("della", {})])
def test_bit_identical_with_inf_and_nan_entries(small, method, params, special):
    per_model = [{"density": 0.5, "epsilon": 0.04}, {"density": 0.3, "weight": 0.7, "epsilon": 0.04},
                 {"density": 0.05, "epsilon": 0.04}]
    base, deltas = task_vectors(torch.bfloat16, special=special)
    want = in_memory(method, base, deltas, params, per_model)
    got = by_rows(method, base, deltas, params, per_model)
    assert torch.equal(bits(got), bits(want))


def test_the_cases_cut_inside_runs_of_equal_magnitudes_across_blocks(small):
    """The threshold of a ties model falls in a run of equal magnitudes that the cut index c
    splits, and c lies inside a row block, not on its edge: the flat-order tie break is exercised."""
    method, params, per_model = CASES[0]
    _, deltas = task_vectors(torch.bfloat16)
    task = make_task(method, 3, params, per_model)
    block = (gta_rows.BLOCK // SHAPE[1]) * SHAPE[1]
    n = deltas[0].numel()
    cuts = [prepare.ties_cut(d.reshape(-1).clone(), i, task)["cut"].tolist() for i, d in enumerate(deltas)]
    assert all(c < n and c % block and c % _chunks.CHUNK for _, c in cuts), cuts
    for (t, c), d in zip(cuts, deltas):
        mags = d.reshape(-1).abs().view(torch.int32)
        assert int((mags[:c] == t).sum()) >= 2 and int((mags[c:] == t).sum()) >= 2  # tied on both sides of c


def test_one_task_vector_at_a_time_in_pass_one(small, monkeypatch):
    """Pass 1 reads model 0's rows, then model 1's, ...; pass 2 reads every model's block in turn.
    TIES without rescale streams the magnitudes, each model's rows once on one thread (pass 2
    finds the cut's index in flat order); split over workers, twice (fill, then the count of the
    entries equal to the threshold) and once more the block where the cut falls among them.
    DARE without rescale has nothing to find in pass 1."""
    import itertools

    monkeypatch.setattr(_chunks, "workers", lambda: 1)  # reads in order
    base, deltas = task_vectors(torch.bfloat16)
    reads: list = []
    blocks = -(-SHAPE[0] // 2)
    by_rows("ties", base, deltas, {"rescale": True}, [{"density": 0.5}] * 3, reads)
    assert [i for i, _, _ in reads[:3 * blocks]] == [0] * blocks + [1] * blocks + [2] * blocks
    assert [i for i, _, _ in reads[3 * blocks:]] == [0, 1, 2] * blocks
    reads.clear()
    by_rows("ties", base, deltas, {}, [{"density": 0.5}] * 3, reads)
    assert [i for i, _, _ in reads] == [0] * blocks + [1] * blocks + [2] * blocks + [0, 1, 2] * blocks
    reads.clear()
    monkeypatch.setattr(_chunks, "workers", lambda: 2)
    by_rows("ties", base, deltas, {}, [{"density": 0.5}] * 3, reads)
    pass1 = reads[:len(reads) - 3 * blocks]
    runs = [(i, len(list(g))) for i, g in itertools.groupby(i for i, _, _ in pass1)]
    assert [i for i, _ in runs] == [0, 1, 2] and all(n in (2 * blocks, 2 * blocks + 1) for _, n in runs), runs
    monkeypatch.setattr(_chunks, "workers", lambda: 1)
    reads.clear()
    by_rows("dare_ties", base, deltas, {"rescale": False}, [{"density": 0.5}] * 3, reads)
    assert [i for i, _, _ in reads] == [0, 1, 2] * blocks


def test_which_tensors_take_the_path(monkeypatch):
    task = make_task("ties", 3, {}, [{"density": 0.5}] * 3)
    big = (32000, 2048)  # TinyLlama's embeddings: 3 x 262 MB of float32
    assert gta_rows.applies("ties", task, big, torch.float32)
    assert gta_rows.applies("ties", task, (5632, 2048), torch.float32)  # TinyLlama's MLP matrix: 138 MB together
    assert not gta_rows.applies("ties", task, (2816, 1024), torch.float32)  # the 271M benchmark's: 35 MB
    assert not gta_rows.applies("ties", task, big, torch.bfloat16)  # half compute dtype: in memory
    assert not gta_rows.applies("sce", task, big, torch.float32)  # not generalized task arithmetic
    assert not gta_rows.applies("sce", task, big, torch.float32)
    kth = make_task("ties", 3, {"trim_rule": "kthvalue"}, [{"density": 0.5}] * 3)
    assert not gta_rows.applies("ties", kth, big, torch.float32)
    for method in ("dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        assert gta_rows.applies(method, task, big, torch.float32)
    monkeypatch.setattr(gta_rows, "STREAM_MIN_BYTES", 0)
    assert not gta_rows.applies("ties", task, (100,), torch.float32)  # below the radix kernel's size
    assert gta_rows.applies("ties", task, (1 << 16,), torch.float32)
    assert not gta_rows.applies("della", task, (1 << 16,), torch.float32)  # one row: ranks over the whole tensor


# ----------------------------------------------------------------------------- end to end

TINY = dict(hidden=32, layers=1, vocab=160, intermediate=48)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows_models")
    shapes = llama_shapes(**TINY)
    write_checkpoint(root / "base", shapes, seed=0)
    for i, name in enumerate(("a", "b", "c")):
        write_checkpoint(root / name, shapes, seed=i + 1, base=root / "base", shards=2 if name == "b" else 1)
    return root


def run(cli, tmp_path: Path, doc: dict, name: str) -> dict:
    r = tmp_path / f"{name}.yaml"
    r.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out, err = cli("run", r, "--out", tmp_path / name)
    assert code == 0, out + err
    return {f"{f.name}:{k}": v for f in sorted((tmp_path / name).glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method, params", [("ties", {}), ("ties", {"rescale": True, "dtype": "float16"}),
                                            ("dare_ties", {"seed": 5}), ("breadcrumbs", {}), ("della", {"epsilon": 0.1})])
def test_merge_run_by_rows_equals_in_memory(tiny_models, tmp_path, cli, monkeypatch, method, params):
    doc = {"merge_method": method, "base_model": str(tiny_models / "base"),
           "models": [{"model": str(tiny_models / m), "parameters": {"weight": w, "density": d}}
                      for m, w, d in (("a", 1.0, 0.5), ("b", 0.6, 0.3), ("c", 1.2, 0.7))],
           "parameters": {k: v for k, v in params.items() if k != "dtype"}}
    if "dtype" in params:
        doc["dtype"] = params["dtype"]
    monkeypatch.setattr(_chunks, "CHUNK", 256)
    monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 64)
    want = run(cli, tmp_path, doc, "memory")
    monkeypatch.setattr(gta_rows, "STREAM_MIN_BYTES", 3 * 160 * 32 * 4)  # the embeddings and head only
    monkeypatch.setattr(gta_rows, "BLOCK", 3 * 32 + 7)
    calls: list = []
    real = gta_rows.merge_rows
    monkeypatch.setattr(gta_rows, "merge_rows", lambda task, *a: calls.append(task.name) or real(task, *a))
    got = run(cli, tmp_path, doc, "rows")
    assert sorted(calls) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)), k


def test_the_plans_peak_estimate_follows(tiny_models, tmp_path, monkeypatch):
    from mergekit_ortho import plan as plan_mod
    from mergekit_ortho import recipe as recipe_mod
    from mergekit_ortho.row_merge import by_rows

    doc = {"merge_method": "ties", "base_model": str(tiny_models / "base"),
           "models": [{"model": str(tiny_models / m), "parameters": {"density": 0.5}} for m in "abc"]}
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(doc))
    p = plan_mod.build_plan(recipe_mod.load(r))
    in_memory_peak = p.peak_bytes
    assert by_rows(p, "lm_head.weight") is None
    monkeypatch.setattr(gta_rows, "STREAM_MIN_BYTES", 3 * 160 * 32 * 4)
    monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 64)
    assert by_rows(p, "lm_head.weight") is not None and by_rows(p, "model.layers.0.mlp.up_proj.weight") is None
    mlp = 48 * 32 * (3 * 4 + 2 + 4 + 4)  # the largest in-memory step now: an MLP matrix
    assert p.peak_bytes < in_memory_peak and p.peak_bytes - in_memory_peak == mlp - 160 * 32 * (3 * 4 + 2 + 4 + 4)


def test_row_reads_are_slices_of_the_stored_tensor(tmp_path):
    from safetensors.torch import save_file

    from mergekit_ortho.sources.checkpoint import CheckpointSource

    t = {"w": torch.randn(7, 3, 2).to(torch.bfloat16), "v": torch.arange(5, dtype=torch.float32),
         "s": torch.tensor(1.5)}
    save_file(t, str(tmp_path / "model.safetensors"))
    src = CheckpointSource(str(tmp_path))
    for r0, r1 in ((0, 7), (2, 5), (6, 7), (3, 3)):
        got = src.get_rows("w", r0, r1)
        assert got.dtype == torch.bfloat16 and torch.equal(got, t["w"][r0:r1])
    assert torch.equal(src.get_rows("v", 1, 4), t["v"][1:4])
    assert src.reads_rows("w") and src.reads_rows("v") and not src.reads_rows("s")  # a 0-d tensor has no rows
