"""Core Space operator (ops/core_space.py): widen_corespace.md B10 items 1-8, golden numbers and
the operator contract."""
from __future__ import annotations

import math

import pytest
import torch

from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import core_space as C
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import LoraTask

F64 = torch.float64
NAME = "model.layers.0.self_attn.q_proj.weight"


def factors(ranks=(4, 4, 4), m=64, n=48, seed=0, dtype=F64, zero_b=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, r in enumerate(ranks):
        A = torch.randn(r, n, generator=g, dtype=dtype)
        B = torch.randn(m, r, generator=g, dtype=dtype)
        if t in zero_b:
            B.zero_()
        out.append((A, B))
    return out


def dense(f):
    return [B.double() @ A.double() for A, B in f]


def rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def merged(f, method="task_arithmetic", **kw):
    A, B, rep = C.core_space_merge(f, method, name=NAME, **kw)
    return B.double() @ A.double(), rep


def run_op(f, params=None, model_params=None, index=None):
    op = registry.get("core_space")
    p = op.resolve_params(params or {})
    mps = [op.resolve_model_params(mp, f"m{i}") for i, mp in enumerate(model_params or [{}] * len(f))]
    task = LoraTask(NAME, f, p, mps, model_index=index or list(range(len(f))),
                    model_names=[f"m{i}" for i in range(len(f))])
    return op.fn(task)


# ----------------------------------------------------------------------------- registration


def test_registered_operator_contract():
    op = registry.get("core_space")
    assert op.fn is C.core_space and op.input_kind == "lora" and not op.needs_base
    names = [p.name for p in op.params]
    assert names[:3] == ["inner_method", "lambda", "isotropize"]
    p = op.resolve_params({})
    assert p["inner_method"] == "task_arithmetic" and p["lambda"] == 1.0 and p["isotropize"] is False
    assert p["density"] == 0.3 and p["dare_density"] == 0.7 and p["trim_rule"] == "kthvalue"
    assert set(dict((q.name, q) for q in op.params)["inner_method"].choices) == set(C.INNER_METHODS)
    assert "2509.17786" in op.details and "Part B" in op.spec
    with pytest.raises(ValueError, match="inner_method"):
        op.resolve_params({"inner_method": "magic"})
    assert op.resolve_model_params({}, "m") == {"weight": 1.0, "density": None}


# ----------------------------------------------------------------------------- B10.1 exactness


@pytest.mark.parametrize(
    "ranks,m,n,zero_b",
    [((4, 4, 4), 64, 48, ()), ((4, 8, 2), 64, 48, ()), ((4, 4, 4), 64, 48, (1,)), ((8, 8, 8), 20, 12, ())],
)
def test_ta_and_mean_exact_fp64(ranks, m, n, zero_b):
    f = factors(ranks, m, n, zero_b=zero_b)
    want = sum(dense(f))
    cs = C.decompose(f)
    ta = cs.reconstruct(C.merge_matrices(cs.cores, "task_arithmetic"))
    mean = cs.reconstruct(C.merge_matrices(cs.cores, "mean"))
    assert rel(ta, want) < 1e-12
    assert rel(mean, want / len(f)) < 1e-12
    # the folded low-rank output too, and against the full-space reference functions
    d, rep = merged(f)
    assert rel(d, want) < 1e-12
    assert rel(C.full_space_merge(f, "task_arithmetic"), want) < 1e-14
    assert rel(merged(f, "mean")[0], C.full_space_merge(f, "mean")) < 1e-12
    assert rep["total_rank"] == sum(ranks) and rep["out_rank"] <= min(m, n, sum(ranks))


def test_operator_ta_and_mean_fp32_relative_1e5():
    f32 = factors((16, 16, 8, 12), m=96, n=80, seed=3, dtype=torch.float32)
    want = sum(dense(f32))
    w = [0.5, 1.5, -0.25, 1.0]
    for params, target in (
        ({}, want),
        ({"lambda": 0.3}, 0.3 * want),
        ({"inner_method": "mean"}, want / 4),
        ({"inner_method": "mean", "lambda": 2.0}, 2.0 * want / 4),
    ):
        res = run_op(f32, params)
        assert res.A.dtype == torch.float32 and res.B.dtype == torch.float32 and res.delta is None
        assert res.A.shape[0] == res.B.shape[1] <= 52
        assert rel(res.B @ res.A, target) < 1e-5, params
    wsum = sum(wi * d for wi, d in zip(w, dense(f32)))
    res = run_op(f32, {"lambda": 0.7}, [{"weight": x} for x in w])
    assert rel(res.B @ res.A, 0.7 * wsum) < 1e-5
    res = run_op(f32, {"inner_method": "mean"}, [{"weight": x} for x in w])
    assert rel(res.B @ res.A, wsum / sum(w)) < 1e-5
    assert res.report["tasks"] == ["m0", "m1", "m2", "m3"] and res.report["core_shape"] == [52, 52]


def test_rectangular_core_saturated():
    # 20 x 12 weight, three rank-8 tasks: R = 24 > m, n; cores are min(m,R) x min(n,R) = 20 x 12
    f = factors((8, 8, 8), m=20, n=12, seed=5)
    cs = C.decompose(f)
    assert cs.core_shape == (20, 12) and all(M.shape == (20, 12) for M in cs.cores)
    assert rel(cs.reconstruct(sum(cs.cores)), sum(dense(f))) < 1e-12
    for method in C.INNER_METHODS:
        for iso in (False, True):
            d, rep = merged(f, method, isotropize_result=iso)
            assert torch.isfinite(d).all() and rep["saturated"] and rep["core_shape"] == [20, 12]
            assert rep["out_rank"] <= 12
    # TSV on a rectangular core: floor(min(20,12)/3) = 4 triplets per task
    assert C.tsv_keep_counts(3, (20, 12)) == [4, 4, 4]
    # saturated on one side only: R = 24 > n = 16 but < m = 40
    f = factors((8, 8, 8), m=40, n=16, seed=6)
    cs = C.decompose(f)
    assert cs.core_shape == (24, 16)
    assert rel(merged(f)[0], sum(dense(f))) < 1e-12
    assert torch.isfinite(merged(f, "tsv", isotropize_result=True)[0]).all()


def test_heterogeneous_ranks():
    f = factors((4, 8, 2), m=64, n=48, seed=7)
    cs = C.decompose(f)
    assert cs.core_shape == (14, 14) and cs.ranks == (4, 8, 2)
    # uniform TSV: floor(14/3) = 4 triplets each -> task 2 truncated to 4, task 3 has only rank 2
    d, rep = merged(f, "tsv")
    assert rep["out_rank"] == 4 + 4 + 2 and rep["warnings"]
    # rank TSV keeps every task's own rank: 14 triplets, and equals full-space TSV keeping r_t
    d_rank, rep = merged(f, "tsv", tsv_keep="rank")
    assert rep["out_rank"] == 14
    assert rel(d_rank, C.full_space_merge(f, "tsv", tsv_keep="rank")) < 1e-10


# ----------------------------------------------------------------------------- B10.2 / B10.3


@pytest.mark.parametrize("ranks,m,n", [((4, 8, 2), 64, 48), ((8, 8, 8), 20, 12), ((3, 5), 6, 30)])
def test_round_trip_and_orthonormal_bases(ranks, m, n):
    f = factors(ranks, m, n, seed=11)
    cs = C.decompose(f)
    R = sum(ranks)
    assert cs.U_ref.shape == (m, min(m, R)) and cs.V_ref.shape == (n, min(n, R))
    eye_b = torch.eye(cs.U_ref.shape[1], dtype=F64)
    eye_a = torch.eye(cs.V_ref.shape[1], dtype=F64)
    assert torch.allclose(cs.U_ref.mT @ cs.U_ref, eye_b, atol=1e-12)
    assert torch.allclose(cs.V_ref.mT @ cs.V_ref, eye_a, atol=1e-12)
    for M, d in zip(cs.cores, dense(f)):
        assert rel(cs.reconstruct(M), d) < 1e-12
    # the alignment form of B2 gives the same cores: M_t = R_t m_t Q_t
    for (A, B), M in zip(f, cs.cores):
        Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
        small = (Sb[:, None] * (Vhb @ Ua)) * Sa[None, :]
        assert torch.allclose((cs.U_ref.mT @ Ub) @ small @ (Vha @ cs.V_ref), M, atol=1e-10)


# ----------------------------------------------------------------------------- B10.4 gauge


def gauge(f, seed=1, shared=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    G0 = None
    for A, B in f:
        r = A.shape[0]
        if G0 is None or not shared:
            # well-conditioned: a rotation times a diagonal in [0.5, 2]
            Q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
            G0 = Q * (0.5 + 1.5 * torch.rand(r, generator=g, dtype=F64))
        out.append((G0 @ A, B @ torch.linalg.inv(G0)))
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_gauge_invariance(shared):
    f = factors((4, 4, 4), 64, 48, seed=2)
    h = gauge(f, shared=shared)
    for method, iso in (("task_arithmetic", False), ("mean", False), ("tsv", False), ("tsv", True),
                        ("task_arithmetic", True)):
        a, _ = merged(f, method, isotropize_result=iso)
        b, _ = merged(h, method, isotropize_result=iso)
        assert rel(b, a) < 1e-10, (method, iso)
    # TIES acts entry-wise on the cores: it may change, but stays finite and inside the span
    cs = C.decompose(h)
    t, _ = merged(h, "ties")
    assert torch.isfinite(t).all()
    assert _span_residual(cs, t) < 1e-12


def test_tsv_equals_full_space_tsv_with_r_triplets():
    # B10.4b: equal ranks r and R <= min(m, n): core TSV == full-space TSV keeping r per task
    f = factors((4, 4, 4), 64, 48, seed=9)
    core, rep = merged(f, "tsv")
    assert rep["out_rank"] == 12
    assert rel(core, C.full_space_merge(f, "tsv", tsv_keep="rank")) < 1e-10
    # Iso does not carry over: full space averages min(m, n) = 48 singular values, core R = 12
    iso_core, _ = merged(f, "tsv", isotropize_result=True)
    iso_full = C.full_space_merge(f, "tsv", tsv_keep="rank", isotropize_result=True)
    assert rel(iso_core, iso_full) > 0.5
    assert torch.linalg.matrix_rank(iso_full).item() == 48 and torch.linalg.matrix_rank(iso_core).item() == 12
    # the reference full-space TSV keeps floor(min(m,n)/T) = 16 triplets per task, 12 of them with
    # sigma = 0 and arbitrary vectors: a different merge (B8.5)
    assert C.tsv_keep_counts(3, (64, 48)) == [16, 16, 16]
    assert rel(merged(f, "tsv")[0], C.full_space_merge(f, "tsv")) > 1e-3


# ----------------------------------------------------------------------------- B10.5 span


def _span_residual(cs, d):
    P_u = torch.eye(cs.U_ref.shape[0], dtype=F64) - cs.U_ref @ cs.U_ref.mT
    P_v = torch.eye(cs.V_ref.shape[0], dtype=F64) - cs.V_ref @ cs.V_ref.mT
    return max(float((P_u @ d).norm()), float((d @ P_v).norm())) / float(d.norm())


@pytest.mark.parametrize("method", C.INNER_METHODS)
@pytest.mark.parametrize("iso", [False, True])
def test_span_invariant(method, iso):
    f = factors((3, 5, 4), 40, 30, seed=4)
    cs = C.decompose(f)
    d, rep = merged(f, method, isotropize_result=iso, seed=3)
    assert _span_residual(cs, d) < 1e-12
    assert torch.linalg.matrix_rank(d).item() <= min(cs.core_shape) == rep["core_shape"][0]


def test_full_space_ties_leaves_the_span():
    f = factors((3, 5, 4), 40, 30, seed=4)
    cs = C.decompose(f)
    full = C.full_space_merge(f, "ties")
    assert _span_residual(cs, full) > 1e-2  # element-wise trimming in full space mixes directions
    assert torch.linalg.matrix_rank(full).item() > 12


# ----------------------------------------------------------------------------- B10.6 single adapter


def test_single_adapter_returns_it():
    f = factors((6,), 32, 20, seed=8)
    want = dense(f)[0]
    for method, kw in (("task_arithmetic", {}), ("mean", {}), ("ties", {"density": 1.0}),
                       ("ties", {"density": 1.0, "trim_rule": "topk"}), ("tsv", {})):
        d, rep = merged(f, method, **kw)
        assert rel(d, want) < 1e-12, method
        assert rep["out_rank"] == 6
    d, _ = merged(f, "dare_ties", density=1.0, dare_density=1.0)
    assert rel(d, want) < 1e-12


# ----------------------------------------------------------------------------- B10.7 sign / permutation


def _signed_perm(k, seed):
    g = torch.Generator().manual_seed(seed)
    P = torch.eye(k, dtype=F64)[torch.randperm(k, generator=g)]
    return P * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).to(F64)


# TSV with unequal ranks and tsv_keep uniform keeps zero-sigma triplets whose vectors are arbitrary
# (B8.5): invariances hold for equal ranks, or with tsv_keep rank
RULES = [("task_arithmetic", (4, 6, 5), {}), ("mean", (4, 6, 5), {}), ("ties", (4, 6, 5), {}),
         ("tsv", (5, 5, 5), {}), ("tsv", (4, 6, 5), {"tsv_keep": "rank"})]


@pytest.mark.parametrize("method,ranks,kw", RULES)
def test_basis_sign_and_permutation_robustness(method, ranks, kw):
    f = factors(ranks, 50, 40, seed=12)
    cs = C.decompose(f)
    kB, kA = cs.core_shape
    Pu, Pv = _signed_perm(kB, 1), _signed_perm(kA, 2)
    U2, V2 = cs.U_ref @ Pu, cs.V_ref @ Pv
    cores2 = [Pu.mT @ M @ Pv for M in cs.cores]  # same deltas: U2 M2 V2^T = U M V^T
    a = cs.reconstruct(C.merge_matrices(cs.cores, method, ranks=ranks, **kw))
    b = U2 @ C.merge_matrices(cores2, method, ranks=ranks, **kw) @ V2.mT
    assert rel(b, a) < 1e-12


@pytest.mark.parametrize("method,iso", [("task_arithmetic", False), ("tsv", False), ("tsv", True)])
def test_basis_rotation_invariance(method, iso):
    f = factors((5, 5, 5), 50, 40, seed=13)
    cs = C.decompose(f)
    g = torch.Generator().manual_seed(0)
    Ou = torch.linalg.qr(torch.randn(cs.core_shape[0], cs.core_shape[0], generator=g, dtype=F64))[0]
    Ov = torch.linalg.qr(torch.randn(cs.core_shape[1], cs.core_shape[1], generator=g, dtype=F64))[0]
    rule = (lambda ms: C.isotropize(C.merge_matrices(ms, method))) if iso else (
        lambda ms: C.merge_matrices(ms, method))
    a = cs.reconstruct(rule(cs.cores))
    b = (cs.U_ref @ Ou) @ rule([Ou.mT @ M @ Ov for M in cs.cores]) @ (cs.V_ref @ Ov).mT
    assert rel(b, a) < 1e-10


@pytest.mark.parametrize("method,ranks,kw", RULES + [("dare_ties", (4, 6, 5), {"seed": 5})])
def test_task_order_invariance(method, ranks, kw):
    f = factors(ranks, 50, 40, seed=14)
    perm = [2, 0, 1]
    a, _ = merged(f, method, model_index=[0, 1, 2], **kw)
    b, _ = merged([f[i] for i in perm], method, model_index=perm, **kw)  # DARE masks follow the model
    assert rel(b, a) < 1e-10


# ----------------------------------------------------------------------------- B10.8 hand example


def _hand(rotated=False):
    A1, B1 = torch.tensor([[3.0, 0.0]], dtype=F64), torch.tensor([[2.0], [0.0]], dtype=F64)
    if rotated:
        s = 1 / math.sqrt(2)
        A2, B2 = torch.tensor([[s, s]], dtype=F64), torch.tensor([[s], [s]], dtype=F64)
    else:
        A2, B2 = torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[0.0], [1.0]], dtype=F64)
    return [(A1, B1), (A2, B2)]


def test_hand_example():
    f = _hand()
    cs = C.decompose(f)
    assert torch.allclose(cs.U_ref.abs(), torch.eye(2, dtype=F64), atol=1e-15)
    assert torch.allclose(cs.V_ref.abs(), torch.eye(2, dtype=F64), atol=1e-15)
    assert torch.allclose(cs.cores[0].abs(), torch.diag(torch.tensor([6.0, 0.0], dtype=F64)), atol=1e-14)
    assert torch.allclose(cs.cores[1].abs(), torch.diag(torch.tensor([0.0, 1.0], dtype=F64)), atol=1e-14)
    expect = {
        "task_arithmetic": [[6.0, 0.0], [0.0, 1.0]],
        "mean": [[3.0, 0.0], [0.0, 0.5]],
    }
    for method, want in expect.items():
        w = torch.tensor(want, dtype=F64)
        assert torch.allclose(merged(f, method)[0], w, atol=1e-14)
        assert torch.allclose(C.full_space_merge(f, method), w, atol=1e-14)
    ties_want = torch.tensor([[6.0, 0.0], [0.0, 1.0]], dtype=F64)
    assert torch.allclose(merged(f, "ties", density=1.0)[0], ties_want, atol=1e-14)
    assert torch.allclose(C.full_space_merge(f, "ties", density=1.0), ties_want, atol=1e-14)
    # TSV keeps floor(2/2) = 1 triplet per task: the two orthogonal rank-1 tasks survive intact
    assert torch.allclose(merged(f, "tsv")[0], ties_want, atol=1e-14)
    # isotropize: singular values (6, 1) -> 3.5 each
    assert torch.allclose(merged(f, isotropize_result=True)[0], 3.5 * torch.eye(2, dtype=F64), atol=1e-13)
    # rotated task 2: TA in core must still be B1 A1 + B2 A2
    rot = torch.tensor([[6.5, 0.5], [0.5, 0.5]], dtype=F64)
    assert torch.allclose(merged(_hand(True))[0], rot, atol=1e-13)
    assert torch.allclose(merged(_hand(True), "mean")[0], rot / 2, atol=1e-13)


# ----------------------------------------------------------------------------- TIES / DARE golden


def test_ties_rule_golden_numbers():
    m1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=F64)
    m2 = torch.tensor([[-2.0, -1.0], [1.0, 0.1]], dtype=F64)
    keep1, keep2 = m1.clone(), m2.clone()
    # kthvalue (reference): keep |x| >= 2nd smallest -> 3 entries each; signs (+,-,+,+); disjoint mean
    out = C.merge_matrices([m1, m2], "ties", density=0.5)
    assert torch.equal(out, torch.tensor([[3.0, -1.0], [1.0, 2.0]], dtype=F64))
    # topk: exactly 2 per task, the |1| tie goes to the lower index; a zero sum elects +
    out = C.merge_matrices([m1, m2], "ties", density=0.5, trim_rule="topk")
    assert torch.equal(out, torch.tensor([[3.0, -1.0], [0.0, 2.0]], dtype=F64))
    # normalize false: disjoint sum
    out = C.merge_matrices([m1, m2], "ties", density=0.5, normalize=False)
    assert torch.equal(out, torch.tensor([[3.0, -2.0], [1.0, 2.0]], dtype=F64))
    # per-task density and weights: task 2 untrimmed and weighted 2 -> (-4, -2, 2, 0.2)
    out = C.merge_matrices([m1, m2], "ties", densities=[0.5, 1.0], weights=[1.0, 2.0])
    # sum (-1, -3, 2, 2.2): signs (-, -, +, +); kept: [-4], [-1, -2], [2], [2, 0.2]; mean by weight
    want = torch.tensor([[-4.0 / 2, -3.0 / 3], [2.0 / 2, 2.2 / 3]], dtype=F64)
    assert torch.allclose(out, want, atol=1e-15)
    assert torch.equal(m1, keep1) and torch.equal(m2, keep2)  # inputs never modified


def test_dare_ties_determinism_and_semantics():
    f = factors((4, 6, 5), 50, 40, seed=15)
    cs = C.decompose(f)
    before = [M.clone() for M in cs.cores]
    kw = dict(density=1.0, dare_density=0.5, seed=7, name=NAME)
    a = C.merge_matrices(cs.cores, "dare_ties", **kw)
    b = C.merge_matrices(cs.cores, "dare_ties", **kw)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(cs.cores, before))  # cached cores untouched (B8.7)
    c = C.merge_matrices(cs.cores, "dare_ties", **{**kw, "seed": 8})
    assert not torch.equal(a, c)
    # the mask of task t is drawn from (seed, module, model index): changing one task's index
    # changes only what that task contributes
    d = C.merge_matrices(cs.cores, "dare_ties", model_index=[0, 1, 9], **kw)
    assert not torch.equal(a, d)
    # single task, no trimming, normalize: each entry is 0 or M / dare_density, about half kept
    one = C.merge_matrices(cs.cores[:1], "dare_ties", **kw)
    M = cs.cores[0]
    kept = one != 0
    assert torch.allclose(one[kept], M[kept] / 0.5, rtol=0, atol=1e-12)
    frac = kept.double().mean().item()
    assert 0.35 < frac < 0.65
    no_rescale = C.merge_matrices(cs.cores[:1], "dare_ties", rescale=False, **kw)
    assert torch.equal(no_rescale[kept], M[kept])
    # through the operator: same seed -> identical factors, and the mask follows the model index
    f32 = [(A.float(), B.float()) for A, B in f]
    r1 = run_op(f32, {"inner_method": "dare_ties", "seed": 3})
    r2 = run_op(f32, {"inner_method": "dare_ties", "seed": 3})
    assert torch.equal(r1.A, r2.A) and torch.equal(r1.B, r2.B)
    r3 = run_op(f32, {"inner_method": "dare_ties", "seed": 4})
    assert not torch.equal(r1.B @ r1.A, r3.B @ r3.A)


def test_dare_ties_with_keep_all_equals_ties():
    f = factors((4, 6, 5), 50, 40, seed=16)
    a, _ = merged(f, "ties", density=0.4)
    b, _ = merged(f, "dare_ties", density=0.4, dare_density=1.0)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- TSV details


def test_tsv_polar_and_isotropize_units():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 4, generator=g, dtype=F64)
    P = C.polar_factor(X)
    assert torch.allclose(P.mT @ P, torch.eye(4, dtype=F64), atol=1e-12)
    # the polar factor is the orthonormal matrix nearest X: X = P H with H symmetric PSD
    H = P.mT @ X
    assert torch.allclose(H, H.mT, atol=1e-12) and torch.linalg.eigvalsh(H).min() > 0
    M = torch.randn(5, 3, generator=g, dtype=F64)
    Mi = C.isotropize(M)
    s, si = torch.linalg.svdvals(M), torch.linalg.svdvals(Mi)
    assert torch.allclose(si, s.mean().expand(3), atol=1e-12)
    # two tasks with orthogonal supports: TSV reproduces their sum
    a = torch.zeros(6, 6, dtype=F64)
    b = torch.zeros(6, 6, dtype=F64)
    a[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    b[3:, 3:] = torch.randn(3, 3, generator=g, dtype=F64)
    assert torch.allclose(C.tsv_merge([a, b]), a + b, atol=1e-12)


def test_lambda_after_isotropize_and_weights_in_tsv():
    f = factors((4, 4, 4), 30, 25, seed=17)
    d1, _ = merged(f, "tsv", isotropize_result=True)
    d2, _ = merged(f, "tsv", isotropize_result=True, lam=0.2)
    assert rel(d2, 0.2 * d1) < 1e-12
    # weighting every task by w scales TSV by w (it only changes singular values)
    d3, _ = merged(f, "tsv", weights=[2.0, 2.0, 2.0])
    assert rel(d3, 2.0 * merged(f, "tsv")[0]) < 1e-12


# ----------------------------------------------------------------------------- edge cases / bad input


def test_all_zero_adapters_and_rank_zero_tasks():
    f = factors((4, 4), 12, 10, seed=18, zero_b=(0, 1))
    for method in C.INNER_METHODS:
        A, B, rep = C.core_space_merge(f, method)
        assert rep["out_rank"] == 1 and float((B @ A).abs().max()) == 0.0
    g = factors((3,), 12, 10, seed=19)
    empty = [(torch.zeros(0, 10, dtype=F64), torch.zeros(12, 0, dtype=F64))]
    d, rep = merged(empty + g)
    assert rel(d, dense(g)[0]) < 1e-12 and rep["ranks"] == [0, 3]
    A, B, rep = C.core_space_merge(empty)
    assert A.shape == (1, 10) and B.shape == (12, 1) and float(B.abs().sum()) == 0.0


def test_full_checkpoints_are_refused_by_the_plan(tiny_models):
    # LoRA inputs only: the plan refuses a full checkpoint before the operator (or a tensor read)
    from mergekit_ortho import plan, recipe

    r = recipe.from_dict({"merge_method": "core_space", "base_model": str(tiny_models["base"]),
                          "models": [{"model": str(tiny_models["a"])}, {"model": str(tiny_models["b"])}]})
    with pytest.raises(UserError, match="full checkpoint") as e:
        plan.build_plan(r)
    assert "\n" not in str(e.value) and "core_space" in str(e.value)


def test_bad_input_messages():
    f = factors((4, 4), 12, 10)
    with pytest.raises(UserError, match=r"core_space: module 'mod\.x'.*task 1 adapts a 12x11 weight"):
        C.core_space_merge([f[0], (torch.randn(4, 11, dtype=F64), f[1][1])], name="mod.x")
    with pytest.raises(UserError, match=r"module 'mod\.x', task 0: factors must be A"):
        C.core_space_merge([(torch.randn(4, 10), torch.randn(12, 3))], name="mod.x")
    with pytest.raises(UserError, match="has no task factors"):
        C.core_space_merge([], name="mod.x")
    with pytest.raises(UserError, match="NaN or Inf"):
        C.core_space_merge([(torch.full((2, 10), float("nan")), torch.randn(12, 2))], name="mod.x")
    with pytest.raises(UserError, match="unknown inner_method 'magic'"):
        C.core_space_merge(f, "magic", name="mod.x")
    with pytest.raises(UserError, match="weights sum to 0"):
        C.core_space_merge(f, "mean", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="density"):
        registry.get("core_space").resolve_params({"density": 1.5})
    # the message is one line
    try:
        run_op([f[0], (torch.randn(4, 11), torch.randn(13, 4))])
    except UserError as e:
        assert "\n" not in str(e) and NAME in str(e)
    else:  # pragma: no cover
        pytest.fail("no error")
