"""RMM math (ops/rmm.py) and the bundle format (bundle.py); spec lora_lego_rmm.md B2-B11."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mergekit_ortho import bundle as B
from mergekit_ortho.inputs import lora_task_from_deltas
from mergekit_ortho.ops import lowrank
from mergekit_ortho.ops import rmm as R
from mergekit_ortho.ops.registry import LoraTask, get


def rand_factors(n=4, d_out=6, d_in=5, r=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def deltas(factors):
    return [Bm.double() @ A.double() for A, Bm in factors]


# ----------------------------------------------------------------------------- hand example B11


def test_hand_example_one_position():
    # left position 0 (row 0 of lora_B) holds x1=(1,0), x2=(0,1), x3=(1,1); d_in=1 with A rows = 1
    xs = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    factors = [(torch.ones(2, 1), torch.tensor([list(x)])) for x in xs]
    t0, s0 = R.build_module_basis(factors, p=0)
    assert torch.allclose(t0["left.mean"], torch.tensor([[2 / 3, 2 / 3]]), atol=1e-7)
    # p=0: every x^ = mu, error = 4/3 on the left; the right factor is identical for all tasks
    assert s0["rel_error_left"] * 4.0 == pytest.approx(4 / 3, abs=1e-12)  # ||X||^2 = 1+1+2 = 4
    assert s0["rel_error_right"] == pytest.approx(0.0, abs=1e-15)

    t1, s1 = R.build_module_basis(factors, p=1)
    u = t1["left.basis"][0, :, 0]
    c = t1["left.coef"][:, 0, 0]
    h = 1 / math.sqrt(2)
    assert torch.allclose(u, torch.tensor([h, -h]), atol=1e-7)  # tie -> first entry positive
    assert torch.allclose(c, torch.tensor([h, -h, 0.0]), atol=1e-7)
    want = [(7 / 6, 1 / 6), (1 / 6, 7 / 6), (2 / 3, 2 / 3)]
    for i, w in enumerate(want):
        _, Bh = R.revert_module(t1, i)
        assert torch.allclose(Bh[0], torch.tensor(w), atol=1e-6)
    assert s1["rel_error_left"] * 4.0 == pytest.approx(1 / 3, abs=1e-7)  # discarded sigma^2

    t2, s2 = R.build_module_basis(factors, p=2)  # p = n-1: exact
    assert s2["p"] == 2 and s2["rel_error_left"] < 1e-14
    for i, x in enumerate(xs):
        assert torch.allclose(R.revert_module(t2, i)[1][0], torch.tensor(x), atol=1e-6)


# ----------------------------------------------------------------------------- property tests B11


def test_exact_at_full_p_and_monotone():
    f = rand_factors(n=4, d_out=6, d_in=5, r=3)
    lefts, rights, dl, mx = [], [], [], []
    for p in range(4):
        t, s = R.build_module_basis(f, p)
        e = R.reconstruction_error(f, t)
        lefts.append(e["rel_error_left"])
        rights.append(e["rel_error_right"])
        dl.append(max(e["rel_error_delta"]))
        mx.append(e["max_abs_delta"])
        # stats computed from singular values agree with the measured errors
        assert s["rel_error_left"] == pytest.approx(e["rel_error_left"], abs=1e-7)
        assert s["rel_error_right"] == pytest.approx(e["rel_error_right"], abs=1e-7)
        assert s["max_rel_error_delta"] == pytest.approx(max(e["rel_error_delta"]), abs=1e-7)
    assert mx[3] < 1e-5 and dl[3] < 1e-12 and lefts[3] < 1e-12 and rights[3] < 1e-12
    for seq in (lefts, rights, dl, mx):
        assert all(a > b for a, b in zip(seq, seq[1:])), seq
    # p beyond min(r, n-1) clamps and stays exact
    t, s = R.build_module_basis(f, 7)
    assert s["p"] == 3 and s["p_requested"] == 7 and any("clamped" in w for w in s["warnings"])
    assert R.reconstruction_error(f, t)["max_abs_delta"] < 1e-5


def test_exact_when_r_smaller_than_n():
    f = rand_factors(n=6, d_out=7, d_in=4, r=2, seed=3)
    t, s = R.build_module_basis(f, 5)
    assert s["p"] == 2  # min(r, n-1)
    assert R.reconstruction_error(f, t)["max_abs_delta"] < 1e-5


def test_p0_is_factor_average():
    f = rand_factors(n=5, seed=1)
    t, s = R.build_module_basis(f, 0)
    Am = torch.stack([A for A, _ in f]).mean(0)
    Bm = torch.stack([b for _, b in f]).mean(0)
    for i in range(5):
        A, Bh = R.revert_module(t, i)
        assert torch.allclose(A, Am, atol=1e-6) and torch.allclose(Bh, Bm, atol=1e-6)
    assert t["left.basis"].shape == (6, 3, 0) and t["left.coef"].shape == (5, 6, 0)
    assert s["storage_ratio"] == pytest.approx(1 / 5)  # p=0: only the mean, r/(rn)


def test_eckart_young_per_position():
    f = rand_factors(n=5, d_out=4, d_in=3, r=4, seed=2)
    X = torch.stack([Bm.double() for _, Bm in f])  # (n, d_out, r)
    for p in range(5):
        t, _ = R.build_module_basis(f, p)
        for j in range(4):
            Xc = (X[:, j, :] - X[:, j, :].mean(0)).T  # (r, n)
            sig = torch.linalg.svdvals(Xc)
            want = float(sig[p:].pow(2).sum())
            got = sum(float((R.revert_module(t, i)[1][j].double() - X[i, j]).pow(2).sum()) for i in range(5))
            assert got == pytest.approx(want, rel=1e-5, abs=1e-10)


def test_centering_and_orthonormal_basis():
    f = rand_factors(n=6, d_out=8, d_in=7, r=4, seed=4)
    t, _ = R.build_module_basis(f, 3)
    for side in ("left", "right"):
        coef = t[f"{side}.coef"]
        assert coef.abs().max() > 0.1
        assert coef.sum(0).abs().max() < 1e-5  # per position, over tasks
        U = t[f"{side}.basis"].double()
        gram = U.transpose(1, 2) @ U
        assert torch.allclose(gram, torch.eye(3, dtype=torch.float64).expand_as(gram), atol=1e-6)


def test_storage_ratio_formula_and_table():
    table = {16: (0.3125, 0.5, 0.6875, 0.875), 32: (0.28125, 0.4375, 0.59375, 0.75),
             64: (0.265625, 0.40625, 0.546875, 0.6875)}
    for r, row in table.items():
        for p, want in zip((1, 2, 3, 4), row):
            assert R.storage_ratio(r, 8, p) == pytest.approx(want, abs=1e-12)
    assert R.storage_ratio(16, 8, 2, center=False) == pytest.approx(2 * 24 / 128)
    # the stored element count of a real module equals (d_out+d_in)(p(r+n)+r)
    f = rand_factors(n=8, d_out=10, d_in=6, r=16, seed=5)
    t, s = R.build_module_basis(f, 3)
    assert sum(x.numel() for x in t.values()) == s["stored_elements"] == (10 + 6) * (3 * 24 + 16)
    assert s["storage_ratio"] == pytest.approx(0.6875)
    assert not s["warnings"]


def test_storage_warning_when_ratio_ge_1():
    _, s = R.build_module_basis(rand_factors(n=2, r=4), 1)
    assert s["storage_ratio"] == pytest.approx((6 + 4) / 8) and any(">= 1" in w for w in s["warnings"])


def test_uncentred():
    f = rand_factors(n=4, seed=6)
    t, s = R.build_module_basis(f, 3, center=False)
    assert "left.mean" not in t and s["p"] == 3  # min(r, n)
    assert R.reconstruction_error(f, t)["max_abs_delta"] < 1e-5
    t2, s2 = R.build_module_basis(f, 2, center=False)
    assert s2["rel_error_left"] > 1e-3
    assert sum(x.numel() for x in t2.values()) == (6 + 5) * 2 * (3 + 4)


def test_order_invariance_and_determinism():
    f = rand_factors(n=5, d_out=6, d_in=5, r=4, seed=7)
    perm = [3, 0, 4, 1, 2]
    t, _ = R.build_module_basis(f, 2)
    t_again, _ = R.build_module_basis(f, 2)
    for k in t:
        assert torch.equal(t[k], t_again[k]), k  # bitwise deterministic
    tp, _ = R.build_module_basis([f[i] for i in perm], 2)
    for side in ("left", "right"):
        assert torch.allclose(tp[f"{side}.mean"], t[f"{side}.mean"], atol=1e-6)
        assert torch.allclose(tp[f"{side}.basis"], t[f"{side}.basis"], atol=1e-5)
        assert torch.allclose(tp[f"{side}.coef"], t[f"{side}.coef"][perm], atol=1e-5)


def test_sign_canonicalisation():
    f = rand_factors(n=4, seed=8)
    t, _ = R.build_module_basis(f, 2)
    for side in ("left", "right"):
        U = t[f"{side}.basis"]
        idx = U.abs().argmax(dim=1, keepdim=True)
        assert (torch.gather(U, 1, idx) > 0).all()
    # flipping the sign of every task's factors flips X; the basis keeps its canonical sign
    tn, _ = R.build_module_basis([(-A, -Bm) for A, Bm in f], 2)
    for side in ("left", "right"):
        assert torch.allclose(tn[f"{side}.basis"], t[f"{side}.basis"], atol=1e-6)
        assert torch.allclose(tn[f"{side}.coef"], -t[f"{side}.coef"], atol=1e-6)


def test_duplicate_task_needs_no_extra_basis():
    f = rand_factors(n=3, seed=9)
    f4 = f + [f[0]]
    t, s = R.build_module_basis(f4, 2)  # distinct count - 1 = 2
    e = R.reconstruction_error(f4, t)
    assert e["max_abs_delta"] < 1e-5
    # the third direction is numerically zero: stored as zeros (reproducible files)
    t3, _ = R.build_module_basis(f4, 3)
    assert t3["left.basis"][:, :, 2].abs().max() == 0 and t3["left.coef"][:, :, 2].abs().max() == 0


def test_identical_tasks_zero_basis():
    f = rand_factors(n=1, seed=10) * 3
    t, s = R.build_module_basis(f, 2)
    assert s["p"] == 2 and t["left.basis"].abs().max() == 0
    assert R.reconstruction_error(f, t)["max_abs_delta"] < 1e-6


def test_mixed_ranks_refused_or_padded():
    g = torch.Generator().manual_seed(11)
    f = [(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)),
         (torch.randn(4, 5, generator=g), torch.randn(6, 4, generator=g)),
         (torch.randn(4, 5, generator=g), torch.randn(6, 4, generator=g))]
    with pytest.raises(ValueError, match=r"layers\.3\.q_proj.*\[2, 4, 4\]"):
        R.build_module_basis(f, 2, name="layers.3.q_proj")
    t, s = R.build_module_basis(f, 2, name="m", pad_ranks=True)
    assert s["rank"] == 4 and s["task_ranks"] == [2, 4, 4] and s["padded"]
    assert s["full_elements"] == (2 + 4 + 4) * 11
    A0, B0 = R.revert_module(t, 0)
    assert A0.shape == (4, 5)
    assert torch.allclose(B0.double() @ A0.double(), deltas(f)[0], atol=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        R.build_module_basis([(torch.ones(2, 5), torch.ones(6, 2)), (torch.ones(2, 4), torch.ones(6, 2))])
    with pytest.raises(ValueError, match="no task factors"):
        R.build_module_basis([])
    with pytest.raises(ValueError, match="basis_size"):
        R.build_module_basis(rand_factors(), -1)


# ----------------------------------------------------------------------------- PT-SVD


def test_svd_factors():
    g = torch.Generator().manual_seed(12)
    d = torch.randn(7, 5, generator=g)
    A, Bm = lowrank.svd_factors(d, 5)
    assert A.shape == (5, 5) and Bm.shape == (7, 5) and A.dtype == torch.float32
    assert (Bm @ A - d).abs().max() < 1e-5
    A2, B2 = lowrank.svd_factors(d, 2)
    best = torch.linalg.svdvals(d.double())
    err = float((B2.double() @ A2.double() - d.double()).pow(2).sum())
    assert err == pytest.approx(float(best[2:].pow(2).sum()), rel=1e-5)
    idx = B2.abs().argmax(0)
    assert (B2[idx, torch.arange(2)] > 0).all()  # canonical sign of each u
    # balanced split: ||b_q|| = ||a_q|| = sqrt(sigma_q)
    assert torch.allclose(B2.norm(dim=0), A2.norm(dim=1), atol=1e-5)
    An, Bn = lowrank.svd_factors(-d, 2)  # sign gauge: u stays canonical, v absorbs the flip
    assert torch.allclose(Bn, B2, atol=1e-5) and torch.allclose(An, -A2, atol=1e-5)
    A9, _ = lowrank.svd_factors(d, 9)
    assert A9.shape[0] == 5  # clamped to min(d_out, d_in)
    with pytest.raises(ValueError, match="2-D"):
        lowrank.svd_factors(torch.ones(3), 1)


# ----------------------------------------------------------------------------- the operator


def test_operator_lora_task():
    op = get("rmm")  # registered on import of ops.rmm (above)
    assert op.input_kind == "lora"
    params = op.resolve_params({"basis_size": 3})
    assert params == {"basis_size": 3, "center": True, "rank": None, "pad_ranks": False}
    f = rand_factors()
    task = LoraTask(name="l.q.weight", factors=f, params=params,
                    model_params=[op.resolve_model_params({}, m) for m in "abcd"],
                    model_index=[0, 1, 2, 3], model_names=["a", "b", "c", "d"])
    res = op.fn(task)
    assert res.A is None and res.B is None and res.delta is None
    rep = res.report
    assert rep["tasks"] == ["a", "b", "c", "d"] and rep["p"] == 3
    tensors = res.bundle.tensors
    json.dumps(rep, allow_nan=False)  # the report is JSON-safe (the tensors are in res.bundle)
    assert R.reconstruction_error(f, tensors)["max_abs_delta"] < 1e-5


def test_operator_dense_task_ptsvd():
    op = get("rmm")
    g = torch.Generator().manual_seed(13)
    ds = [torch.randn(6, 5, generator=g) for _ in range(3)]
    params = op.resolve_params({"rank": 5, "basis_size": 2})
    mps = [op.resolve_model_params({}, m) for m in "xyz"]
    # the executor's PT-SVD: the task vectors truncated to `rank` become the operator's factors
    task = lora_task_from_deltas(op, "w", ds, params, mps, ["x", "y", "z"])
    assert task.svd_rank == 5 and task.factors[0][0].shape == (5, 5)
    res = op.fn(task)
    rep = res.report
    assert rep["tasks"] == ["x", "y", "z"] and not any("rank applies" in w for w in rep["warnings"])
    t = res.bundle.tensors
    for i, d in enumerate(ds):
        A, Bm = R.revert_module(t, i)
        assert (Bm @ A - d).abs().max() < 1e-5
    with pytest.raises(ValueError, match="rank"):
        lora_task_from_deltas(op, "w", ds, op.resolve_params({}), mps, ["x", "y", "z"])
    with pytest.raises(ValueError, match=">= 0"):
        op.resolve_params({"basis_size": -1})


# ----------------------------------------------------------------------------- bundle


def make_bundle(tmp_path, p=2, center=True):
    mods = {"m.q.weight": rand_factors(n=3, d_out=6, d_in=5, r=3, seed=20),
            "m.v.weight": rand_factors(n=3, d_out=4, d_in=5, r=2, seed=21)}
    names = ["t0", "t1", "t2"]
    tensors, reports = {}, {}
    for key, f in mods.items():
        t, s = R.build_module_basis(f, p, center)
        tensors[key] = t
        reports[key] = {"tasks": names, **s}
    # a module adapted only by t2 and t0 (in that order)
    f_k = rand_factors(n=2, d_out=3, d_in=5, r=2, seed=22)
    t, s = R.build_module_basis(f_k, p, center)
    tensors["m.k.weight"], reports["m.k.weight"] = t, {"tasks": ["t2", "t0"], **s}
    mods["m.k.weight"] = f_k
    manifest = B.build_manifest(names, reports, p=p, center=center, base_model="tiny")
    d = tmp_path / "bundle"
    d.mkdir()
    written = B.write_bundle(d, tensors, manifest)
    return d, mods, written


def test_bundle_round_trip(tmp_path):
    d, mods, written = make_bundle(tmp_path, p=2)
    b = B.read_bundle(d)
    assert b.tasks == ["t0", "t1", "t2"] and b.format_version == B.FORMAT_VERSION
    m = json.loads((d / B.MANIFEST).read_text())
    assert m["format_version"] == 1 and m["modules"]["m.q.weight"]["rank"] == 3
    stored = sum(e["stored_elements"] for e in m["modules"].values())
    full = sum(e["full_elements"] for e in m["modules"].values())
    assert m["storage_ratio"] == pytest.approx(stored / full) and 0 < m["storage_ratio"] < 2
    # p = 2 = n-1 is exact: every task comes back
    for ti, task in enumerate(b.tasks):
        out = b.revert(task)
        assert set(out) == ({"m.q.weight", "m.v.weight", "m.k.weight"} if task != "t1"
                            else {"m.q.weight", "m.v.weight"})
        for key, (A, Bm) in out.items():
            row = m["modules"][key]["tasks"].index(task)
            A0, B0 = mods[key][row]
            assert (Bm @ A - B0 @ A0).abs().max() < 1e-5
    # tensors on disk equal the in-memory basis bitwise
    t, _ = R.build_module_basis(mods["m.v.weight"], 2)
    for k, v in b.module_tensors("m.v.weight").items():
        assert torch.equal(v, t[k])


def test_bundle_lossy_p_matches_in_memory(tmp_path):
    d, mods, _ = make_bundle(tmp_path, p=1)
    b = B.read_bundle(d)
    f = mods["m.q.weight"]
    t, s = R.build_module_basis(f, 1)
    A, Bm = b.revert("t1")["m.q.weight"]
    A_mem, B_mem = R.revert_module(t, 1)
    assert torch.equal(A, A_mem) and torch.equal(Bm, B_mem)
    assert (Bm @ A - f[1][1] @ f[1][0]).abs().max() > 1e-2  # lossy at p=1 < n-1
    assert b.manifest["modules"]["m.q.weight"]["rel_error_left"] == pytest.approx(s["rel_error_left"])


def test_bundle_unknown_task(tmp_path):
    d, _, _ = make_bundle(tmp_path)
    b = B.read_bundle(d)
    with pytest.raises(ValueError, match=r"unknown task 't3'.*known tasks: t0, t1, t2"):
        b.revert("t3")


def test_bundle_newer_version(tmp_path):
    d, _, _ = make_bundle(tmp_path)
    m = json.loads((d / B.MANIFEST).read_text())
    m["format_version"] = B.FORMAT_VERSION + 1
    (d / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="version 2 is newer.*upgrade") as ei:
        B.read_bundle(d)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("key", ["tasks", "modules", "files", "p"])
def test_bundle_missing_manifest_key(tmp_path, key):
    d, _, _ = make_bundle(tmp_path)
    m = json.loads((d / B.MANIFEST).read_text())
    del m[key]
    (d / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"rmm_manifest\.json.*missing key '{key}'"):
        B.read_bundle(d)


def test_bundle_missing_module_key_and_bad_json(tmp_path):
    d, _, _ = make_bundle(tmp_path)
    text = (d / B.MANIFEST).read_text()
    m = json.loads(text)
    del m["modules"]["m.v.weight"]["rank"]
    (d / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="module 'm.v.weight' lacks key 'rank'"):
        B.read_bundle(d)
    (d / B.MANIFEST).write_text(text[:-40])
    with pytest.raises(ValueError, match=r"rmm_manifest\.json: corrupt RMM manifest, not valid JSON"):
        B.read_bundle(d)
    (d / B.MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"rmm_manifest\.json: missing RMM manifest"):
        B.read_bundle(d)


def test_bundle_truncated_or_corrupt_tensors(tmp_path):
    d, _, _ = make_bundle(tmp_path)
    tpath = d / B.TENSORS
    data = tpath.read_bytes()
    tpath.write_bytes(data[:-64])
    with pytest.raises(ValueError, match=r"rmm_basis\.safetensors: corrupt or truncated"):
        B.read_bundle(d)
    # same size, one flipped byte in the data: caught by the sha256
    bad = bytearray(data)
    bad[-5] ^= 0xFF
    tpath.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"rmm_basis\.safetensors: corrupt \(sha256"):
        B.read_bundle(d)
    # truncated file whose recorded size was also edited: safetensors' own check, named file
    tpath.write_bytes(data[:-64])
    m = json.loads((d / B.MANIFEST).read_text())
    m["files"][B.TENSORS]["bytes"] = len(data) - 64
    (d / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"rmm_basis\.safetensors: corrupt safetensors file"):
        B.read_bundle(d, verify=False)
    tpath.unlink()
    with pytest.raises(ValueError, match=r"rmm_basis\.safetensors: missing"):
        B.read_bundle(d)


def test_bundle_shape_mismatch_and_write_checks(tmp_path):
    d, _, _ = make_bundle(tmp_path)
    m = json.loads((d / B.MANIFEST).read_text())
    m["modules"]["m.q.weight"]["p"] = 1
    (d / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"m\.q\.weight\.left\.basis' has shape \(6, 3, 2\), manifest implies \(6, 3, 1\)"):
        B.read_bundle(d)
    f = rand_factors(n=2)
    t, s = R.build_module_basis(f, 1)
    man = B.build_manifest(["a", "b"], {"x": {"tasks": ["a", "b"], **s}}, p=1, center=True)
    with pytest.raises(ValueError, match="does not exist"):
        B.write_bundle(tmp_path / "nope", {"x": t}, man)
    (tmp_path / "w").mkdir()
    with pytest.raises(ValueError, match="disagree"):
        B.write_bundle(tmp_path / "w", {"y": t}, man)
    with pytest.raises(ValueError, match="lacks tensor 'left.coef'"):
        B.write_bundle(tmp_path / "w", {"x": {k: v for k, v in t.items() if k != "left.coef"}}, man)
    with pytest.raises(ValueError, match="not in the task list"):
        B.build_manifest(["a"], {"x": {"tasks": ["a", "b"], **s}}, p=1, center=True)


def test_bundle_uncentred_round_trip(tmp_path):
    d, mods, _ = make_bundle(tmp_path, p=3, center=False)
    b = B.read_bundle(d)
    assert "left.mean" not in b.module_tensors("m.q.weight")
    A, Bm = b.revert("t0")["m.q.weight"]
    A0, B0 = mods["m.q.weight"][0]
    assert (Bm @ A - B0 @ A0).abs().max() < 1e-5
