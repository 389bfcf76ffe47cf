"""Item lanes (execute._lanes, issue 17): several items of a full-model merge computed at once, each
on one thread. Outputs are bit-identical to one item at a time on one thread, for every method kind
(one pass, two passes, seeded masks, SVDs, folds); the sink gets items in order; the estimated
peak stays the serial loop's; an error in a lane stops the run with nothing more written; the
shared pieces (positioned reads, the buffer pool) are safe under threads."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_ortho import buffers, outputs
from mergekit_ortho import plan as plan_mod
from mergekit_ortho import recipe as recipe_mod
from mergekit_ortho.errors import UserError
from mergekit_ortho.execute import Work, execute, lanes_for

METHODS = [
    ("linear", {}, {"weight": 0.4}),
    ("task_arithmetic", {}, {"weight": 0.7}),
    ("ties", {}, {"density": 0.5, "weight": 1.0}),
    ("dare_ties", {"seed": 3}, {"density": 0.4, "weight": 1.0}),
    ("della", {}, {"density": 0.5, "epsilon": 0.1, "weight": 1.0}),
    ("model_stock", {}, {}),
    ("magmax", {}, {}),
    ("tsv", {}, {}),
    ("slerp", {"t": 0.3}, {}),
]


def plan_for(tiny_models, tmp_path: Path, method: str, params: dict, per_model: dict):
    names = ("a",) if method == "slerp" else ("a", "b", "c")
    doc = {"merge_method": method, "base_model": str(tiny_models["base"]),
           "models": [{"model": str(tiny_models[m]), **({"parameters": per_model} if per_model else {})}
                      for m in names]}
    if params:
        doc["parameters"] = params
    r = tmp_path / f"{method}.yaml"
    r.write_text(yaml.safe_dump(doc))
    return plan_mod.build_plan(recipe_mod.load(r))


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


@pytest.mark.parametrize("method,params,per_model", METHODS, ids=[m[0] for m in METHODS])
def test_lanes_give_the_bits_of_one_item_at_a_time(tiny_models, tmp_path, method, params, per_model):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = outputs.run(plan_for(tiny_models, tmp_path, method, params, per_model), tmp_path / "one", lanes=1)
        torch.set_num_threads(4)
        p = plan_for(tiny_models, tmp_path, method, params, per_model)
        assert lanes_for(p) == 4
        laned = outputs.run(p, tmp_path / "four")
    finally:
        torch.set_num_threads(threads)
    want, got = files(serial), files(laned)
    assert want and want.keys() == got.keys()
    for k in want:
        assert want[k] == got[k], k


def test_lanes_are_not_used_where_state_is_shared(tiny_models, tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        p = plan_for(tiny_models, tmp_path, "linear", {}, {"weight": 0.5})
        assert lanes_for(p) == 3
        p.device = "cuda"
        assert lanes_for(p) == 1
        torch.set_num_threads(1)
        assert lanes_for(plan_for(tiny_models, tmp_path, "linear", {}, {"weight": 0.5})) == 1
    finally:
        torch.set_num_threads(threads)


class ListSink:
    def __init__(self):
        self.got: list[str] = []

    def put(self, name, value, report):
        self.got.append(name)


def test_items_overlap_within_the_serial_peak_and_reach_the_sink_in_order():
    sizes = {"s0": 10, "s1": 10, "big": 100, "s2": 10, "s3": 40, "s4": 40, "s5": 10, "s6": 10}
    items = [Work(n, 0, b, True) for n, b in sizes.items()]
    lock = threading.Lock()
    running: dict[str, int] = {}
    worst = {"bytes": 0, "count": 0, "big_with": set()}

    def compute(name):
        with lock:
            running[name] = sizes[name]
            worst["bytes"] = max(worst["bytes"], sum(running.values()))
            worst["count"] = max(worst["count"], len(running))
            if "big" in running:
                worst["big_with"] |= set(running) - {"big"}
        time.sleep(0.02)
        with lock:
            del running[name]
        return torch.zeros(2), None

    sink = ListSink()
    execute(items, compute, sink, lanes=3)
    assert sink.got == list(sizes)
    assert worst["count"] > 1  # they did overlap
    assert worst["bytes"] <= 100 and not worst["big_with"]  # never above the largest single item


def test_an_error_in_a_lane_stops_the_run_and_nothing_after_it_is_put():
    items = [Work(f"t{i}", 0, 1, True) for i in range(12)]

    def compute(name):
        if name == "t4":
            raise UserError("t4: bad tensor")
        time.sleep(0.01)
        return torch.ones(3), None

    sink = ListSink()
    with pytest.raises(UserError, match="t4: bad tensor"):
        execute(items, compute, sink, lanes=3)
    assert sink.got == ["t0", "t1", "t2", "t3"]


def test_a_non_finite_result_found_in_a_lane_names_the_tensor():
    items = [Work(f"t{i}", 0, 1, True) for i in range(5)]

    def compute(name):
        return torch.tensor([1.0, float("nan") if name == "t2" else 0.0]), None

    sink = ListSink()
    with pytest.raises(UserError, match="t2"):
        execute(items, compute, sink, lanes=2, inputs_hint="a, b")
    assert sink.got == ["t0", "t1"]


def test_positioned_reads_from_many_threads_give_each_tensor(tmp_path):
    from safetensors.torch import save_file

    from mergekit_ortho.io.safetensors import SafetensorsFile

    want = {f"w{i}": torch.randn(64 + i, 33).to(torch.bfloat16) for i in range(16)}
    save_file(want, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    bad: list[str] = []

    def reader(k: int):
        for j in range(40):
            name = f"w{(k * 7 + j) % 16}"
            got = f.read(name).clone()
            rows = f.read_rows(name, 3, 9).clone()
            if not (torch.equal(got, want[name]) and torch.equal(rows, want[name][3:9])):
                bad.append(name)

    ts = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    f.close()
    assert not bad


def test_the_buffer_pool_never_hands_one_buffer_to_two_threads():
    size = buffers.MIN_BYTES // 4 + 1000
    clashes: list[int] = []

    def worker(k: int):
        for _ in range(30):
            t = buffers.empty((size,), torch.float32)
            t.fill_(k)
            time.sleep(0.001)
            if not bool((t == k).all()):
                clashes.append(k)
            del t

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    buffers.release()
    assert not clashes


def test_chunk_loops_split_over_workers_give_the_same_bits(monkeypatch):
    """The chunk loops an item that runs alone splits (_chunks.over_ranges): TIES's disjoint mean,
    SCE's variance, mask (with its float64 sums) and energy merge, the L1 norm of the rescale and
    slerp's fold (dot products, then the mix into bf16), for widths 1, 2 and 3."""
    from mergekit_ortho.ops import sce, sparsify
    from mergekit_ortho.ops.kernels import _chunks, convert, sign_election
    from mergekit_ortho.ops.kernels.arc import slerp_fold

    monkeypatch.setattr(_chunks, "CHUNK", 64)
    monkeypatch.setattr(convert, "FOLD_CHUNK", 64)
    g = torch.Generator().manual_seed(11)
    taus = [torch.randn(1000, generator=g) * 0.01 for _ in range(3)]
    taus[1][17] = float("nan")
    taus[2][900] = float("inf")

    def run(width: int):
        with _chunks.width(width):
            ties = sign_election.disjoint_merge_([t.clone() for t in taus], [1.0, 0.5, 2.0], True, 0.7)
            var = sce._variance([t.clone() for t in taus])
            masked = [t.clone() for t in taus]
            sums = sce._mask_(masked, var.clone(), (int(var.view(torch.int32)[5]) & 0x7FFFFFFF, 300))
            energy = sign_election.energy_merge_([t.clone() for t in taus], [0.2, 0.3, 0.5])
            l1 = sparsify.l1_norm(taus[0])
            arc = slerp_fold(taus[0].bfloat16(), taus[1].nan_to_num(0.0), lambda d, a, b: (d / (a + b), 0.5),
                             torch.float32, out_dtype=torch.bfloat16)
        return [x.view(torch.int32) for x in (ties, var, energy, *masked)] + [arc.view(torch.int16)], sums + [l1]

    want, want_sums = run(1)
    for width in (2, 3):
        got, sums = run(width)
        assert torch.equal(torch.tensor(sums, dtype=torch.float64).view(torch.int64),
                           torch.tensor(want_sums, dtype=torch.float64).view(torch.int64))
        assert all(torch.equal(a, b) for a, b in zip(want, got))
