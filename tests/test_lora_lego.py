"""LoRA-LEGO (ops/lora_lego.py): spec lora_lego_rmm.md A11 hand example, property tests 1-7, and
the toolkit decisions (k clamping, empty clusters, heterogeneous ranks, report, registration)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import lora_lego as L
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import LoraTask


def rand_factors(ranks, d_out=7, d_in=5, seed=0, alphas=None):
    """Random LoRAs with scale alpha/r folded in as sqrt(s) into both factors (spec A2 step 0).
    Returns (folded factors, reference deltas sum_i s_i B_i A_i in float64)."""
    g = torch.Generator().manual_seed(seed)
    out, ref = [], torch.zeros(d_out, d_in, dtype=torch.float64)
    for i, r in enumerate(ranks):
        A = torch.randn(r, d_in, generator=g)
        B = torch.randn(d_out, r, generator=g)
        s = (alphas[i] / r) if alphas else 1.0
        ref += s * (B.double() @ A.double())
        q = math.sqrt(s)
        out.append((A * q, B * q))
    return out, ref


def delta(A, B):
    return B.double() @ A.double()


def rel_err(x, y):
    return float((x - y).norm() / y.norm())


def toy():
    # A11: d_in = d_out = 2, r = 1, s = 1; LoRA1 a = b = (1,0), LoRA2 a = b = (0,1)
    return [
        (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])),
    ]


def clustered_factors(seed=0, n=4, r=3, d_in=6, d_out=5, groups=3, noise=0.05):
    """n LoRAs whose MSUs come from `groups` well-separated prototypes (plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    protos = 10.0 * torch.randn(groups, d_in + d_out, generator=g)
    out = []
    for i in range(n):
        U = torch.stack([protos[(i + j) % groups] for j in range(r)])
        U = U + noise * torch.randn(U.shape, generator=g)
        out.append((U[:, :d_in].contiguous(), U[:, d_in:].T.contiguous()))
    return out


# ----------------------------------------------------------------------------- A11 hand example


def test_a11_k2_is_the_sum_and_output_reweighting():
    A, B, rep = L.lego_merge(toy(), 2, param_reweight=False, output_reweight=False)
    assert torch.equal(B @ A, torch.eye(2))
    assert rep["k"] == 2 and rep["cluster_sizes"] == [1, 1] and rep["inertia"] == 0.0
    A, B, rep = L.lego_merge(toy(), 2, param_reweight=False)  # r_ref = 1
    assert rep["r_ref"] == 1.0 and rep["gamma"] == pytest.approx(1 / math.sqrt(2))
    torch.testing.assert_close(B @ A, torch.eye(2) / math.sqrt(2))


@pytest.mark.parametrize("param_reweight,norm,factor,value", [
    (False, "inf", 2.0, 0.25),  # plain centroid (.5,.5,.5,.5): every entry 0.25
    (True, "2", math.sqrt(2), 0.5),  # member norms sqrt2, centroid norm 1
    (True, "inf", 2.0, 1.0),  # member norms 1, centroid norm 0.5
])
def test_a11_k1_reweighting_golden(param_reweight, norm, factor, value):
    A, B, rep = L.lego_merge(toy(), 1, param_reweight=param_reweight, norm=norm)
    torch.testing.assert_close(B @ A, torch.full((2, 2), value), rtol=1e-6, atol=1e-6)
    assert rep["k"] == 1 and rep["cluster_sizes"] == [2] and rep["gamma"] == 1.0
    assert rep["param_factors"] == [pytest.approx(factor)]
    assert rep["inertia"] == pytest.approx(2.0)  # each member is 4 x 0.5^2 away from the centroid
    assert rep["inertia_a"] == pytest.approx(1.0) and rep["inertia_b"] == pytest.approx(1.0)
    torch.testing.assert_close(A, torch.full((1, 2), math.sqrt(value)))


# ----------------------------------------------------------------------------- property tests A11


@pytest.mark.parametrize("seed", [0, 1])
def test_1_concatenation_summation(seed):
    factors, ref = rand_factors([2, 5, 3, 1], alphas=[4.0, 5.0, 1.5, 16.0], seed=seed)
    N = 11
    A, B, rep = L.lego_merge(factors, N, output_reweight=False)
    assert rep["k"] == N and not rep["clustered"] and rep["param_factors"] == [1.0] * N
    assert rel_err(delta(A, B), ref) < 1e-5
    # the operator, through a LoraTask with resolved parameters
    op = registry.get("lora_lego")
    res = op.fn(LoraTask("m.weight", factors, op.resolve_params({"rank": N, "output_reweight": False}),
                         [op.resolve_model_params({}, f"m{i}") for i in range(4)], [0, 1, 2, 3]))
    assert rel_err(delta(res.A, res.B), ref) < 1e-5


def test_2_identity_one_lora():
    (A0, B0), = rand_factors([4], seed=3)[0]
    A, B, rep = L.lego_merge([(A0, B0)])  # k defaults to r_ref = r = 4, both reweightings on
    assert rep["k"] == 4 and rep["gamma"] == 1.0 and rep["param_factors"] == [1.0] * 4
    assert torch.equal(B @ A, B0 @ A0) or rel_err(delta(A, B), delta(A0, B0)) < 1e-6
    # the ranks come back exactly, only reordered by content
    rows = sorted(map(tuple, torch.cat([A0, B0.T], 1).tolist()))
    assert sorted(map(tuple, torch.cat([A, B.T], 1).tolist())) == rows


def test_2_identity_identical_copies():
    (A0, B0), = rand_factors([3], seed=4)[0]
    A, B, rep = L.lego_merge([(A0, B0)] * 4, 3)  # N = 12 MSUs, 3 distinct
    assert rep["k"] == 3 and rep["cluster_sizes"] == [4, 4, 4] and rep["n_distinct"] == 3
    assert rep["inertia"] == 0.0 and rep["param_factors"] == [1.0] * 3 and rep["gamma"] == 1.0
    assert rel_err(delta(A, B), delta(A0, B0)) < 1e-6
    assert sorted(map(tuple, A.tolist())) == sorted(map(tuple, A0.tolist()))  # exact rows


def _shuffle(factors, seed):
    rng = random.Random(seed)
    out = []
    for A, B in factors:
        p = list(range(A.shape[0]))
        rng.shuffle(p)
        out.append((A[p].clone(), B[:, p].clone()))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("features", ["raw", "normalized"])
def test_3_permutation_invariance_bitwise(features):
    factors, _ = rand_factors([4, 6, 3, 5], d_out=9, d_in=8, seed=5)
    A1, B1, r1 = L.lego_merge(factors, 5, name="layer.q", features=features)
    assert r1["clustered"] and r1["k"] == 5
    for s in range(3):
        A2, B2, r2 = L.lego_merge(_shuffle(factors, s), 5, name="layer.q", features=features)
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
        assert r2["cluster_sizes"] == r1["cluster_sizes"] and r2["inertia"] == r1["inertia"]


def test_3_signed_zeros_do_not_break_bitwise_invariance():
    a = torch.tensor([[0.0, 1.0, 2.0]])
    b = torch.tensor([[1.0], [3.0]])
    f1, f2 = (a, b), (torch.tensor([[-0.0, 1.0, 2.0]]), b)  # equal values, different bits
    out = [L.lego_merge(fs, 2, output_reweight=False) for fs in ([f1, f2], [f2, f1])]
    for (A1, B1, _), (A2, B2, _) in [out]:
        assert torch.equal(A1.view(torch.int32), A2.view(torch.int32))
        assert torch.equal(B1.view(torch.int32), B2.view(torch.int32))


def test_3_permutation_without_sorting_well_separated():
    factors = clustered_factors(seed=1)
    A1, B1, r1 = L.lego_merge(factors, 3, sort_pool=False)
    assert r1["cluster_sizes"] == [4, 4, 4]
    for s in range(3):
        A2, B2, r2 = L.lego_merge(_shuffle(factors, s), 3, sort_pool=False)
        assert r2["cluster_sizes"] == [4, 4, 4]
        torch.testing.assert_close(delta(A2, B2), delta(A1, B1), rtol=1e-5, atol=1e-4)


def test_4_scaling_k_equals_n_output_reweighting():
    factors, ref = rand_factors([2, 4, 6], alphas=[2.0, 8.0, 3.0], seed=6)
    N, r_ref = 12, 4.0
    A, B, rep = L.lego_merge(factors, N)
    assert rep["r_ref"] == r_ref and rep["gamma"] == pytest.approx(math.sqrt(r_ref / N))
    assert rel_err(delta(A, B), math.sqrt(r_ref / N) * ref) < 1e-5
    # n equal ranks: sum / sqrt(n)
    factors, ref = rand_factors([3, 3, 3, 3], seed=7)
    A, B, _ = L.lego_merge(factors, 12)
    assert rel_err(delta(A, B), ref / 2.0) < 1e-5


def test_5_sign_pitfall_and_canonicalize_sign():
    (A1, B1), = rand_factors([1], seed=8)[0]
    pair = [(A1, B1), (-A1, -B1)]  # the same update twice, opposite signs
    A, B, rep = L.lego_merge(pair, 1)  # k = r1 = 1
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert float(delta(A, B).abs().max()) == 0.0  # the centroid cancels to exactly 0
    assert rep["reweight_skipped"] == [0] and rep["param_factors"] == [1.0]  # eps guard, no NaN/Inf
    A, B, rep = L.lego_merge(pair, 1, canonicalize_sign=True)
    assert rel_err(delta(A, B), delta(A1, B1)) < 1e-6 and rep["n_distinct"] == 1
    # rank 3: with canonicalisation the pool is each MSU twice -> the original LoRA
    (A3, B3), = rand_factors([3], seed=9)[0]
    pair3 = [(A3, B3), (-A3, -B3)]
    A, B, rep = L.lego_merge(pair3, 3, canonicalize_sign=True)
    assert rep["cluster_sizes"] == [2, 2, 2] and rel_err(delta(A, B), delta(A3, B3)) < 1e-6
    A, B, _ = L.lego_merge(pair3, 3)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_6_determinism_and_inertia_vs_n_init():
    factors, _ = rand_factors([8, 8, 8, 8], d_out=12, d_in=10, seed=10)
    A1, B1, r1 = L.lego_merge(factors, 6, name="mod", seed=3)
    A2, B2, r2 = L.lego_merge(factors, 6, name="mod", seed=3)
    assert torch.equal(A1, A2) and torch.equal(B1, B2) and r1 == r2
    inertias = [L.lego_merge(factors, 6, name="mod", seed=3, n_init=n)[2]["inertia"] for n in (1, 2, 4, 8, 16)]
    assert all(b <= a for a, b in zip(inertias, inertias[1:])), inertias
    # the kernel-form objective of kmeans: restart j is the same whatever n_init is
    X = torch.cat([torch.cat([A, B.T], 1) for A, B in factors])
    res = [L.kmeans(X, 6, n_init=n, generator=registry.generator(3, "mod")) for n in (3, 9)]
    assert res[1].run_inertias[:3] == res[0].run_inertias
    assert res[1].inertia == min(res[1].run_inertias) <= res[0].inertia
    # another seed or another module name draws differently
    r3 = L.lego_merge(factors, 6, name="mod", seed=3, n_init=1)[2]
    r4 = L.lego_merge(factors, 6, name="other", seed=3, n_init=1)[2]
    r5 = L.lego_merge(factors, 6, name="mod", seed=4, n_init=1)[2]
    assert r3["members"] != r4["members"] or r3["members"] != r5["members"]


def test_7_peft_adapter_reloads_with_scale_1(tmp_path):
    """A7 shapes and format: the merged adapter loads in peft with r = k, scale 1, and gives the
    same outputs as adding B'A' to the base weights directly."""
    from peft import PeftModel

    from mergekit_ortho.testing.loras import make_peft_adapter, write_peft_dir
    from mergekit_ortho.lora_out import layouts_of, to_peft
    from mergekit_ortho.adapters.keymap import match_to_base
    from mergekit_ortho.adapters.lora import LoraSource
    from mergekit_ortho.adapters.matched import MatchedLora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(6, 8)
            self.l2 = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    torch.manual_seed(0)
    base_sd = {k: v.clone() for k, v in Tiny().state_dict().items()}

    def base():
        m = Tiny()
        m.load_state_dict(base_sd)
        return m.eval()

    adapters = [make_peft_adapter(base(), tmp_path / f"a{i}", seed=20 + i, r=r, lora_alpha=a,
                                  target_modules=["l1", "l2"]) for i, (r, a) in enumerate([(2, 4), (4, 2)])]
    shapes = {k: tuple(v.shape) for k, v in base_sd.items()}
    srcs = []
    for ad in adapters:
        s = LoraSource(ad)
        srcs.append(MatchedLora(s, match_to_base(s, list(shapes), shapes)))
    op = registry.get("lora_lego")
    params = op.resolve_params({"rank": 4})
    modules = {}
    for key in ("l1.weight", "l2.weight"):
        factors = [s.factors_for(key, fold="sqrt") for s in srcs]
        res = op.fn(LoraTask(key, factors, params, [op.resolve_model_params({}, m) for m in "ab"], [0, 1]))
        assert res.A.shape[0] == 4 == res.report["k"]
        modules[key] = (res.A, res.B)
    tensors, cfg = to_peft(modules, None, shapes=shapes, layouts=layouts_of(srcs))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == cfg["r"] and cfg["rank_pattern"] == {}
    out = write_peft_dir(tmp_path / "merged", tensors, cfg)

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = PeftModel.from_pretrained(base(), out).eval()(x)
        want_model = base()
        for key, (A, B) in modules.items():
            want_model.state_dict()[key].add_(B @ A)
        want = want_model(x)
        assert not torch.allclose(want, base()(x), atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- toolkit decisions


def test_k_is_clamped_to_the_pool():
    factors, ref = rand_factors([2, 3], seed=11)
    A, B, rep = L.lego_merge(factors, 100, output_reweight=False)
    assert rep["k_requested"] == 100 and rep["k_clamped"] == 5 and rep["k"] == 5
    assert any("clamped" in w for w in rep["warnings"])
    assert rel_err(delta(A, B), ref) < 1e-5


def test_fewer_distinct_msus_than_k_drops_empty_clusters():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0], [-1.0]])
    lora = (torch.cat([a, a]), torch.cat([b, b], 1))  # rank 2, both ranks identical
    A, B, rep = L.lego_merge([lora, lora], 2)  # N = 4, one distinct MSU, k = 2
    assert rep["k"] == 1 and rep["empty_dropped"] == 1 and rep["cluster_sizes"] == [4]
    assert any("empty" in w for w in rep["warnings"])
    # gamma uses the actual rank: sqrt(r_ref / 1) = sqrt(2)
    assert rep["gamma"] == pytest.approx(math.sqrt(2))
    torch.testing.assert_close(B @ A, math.sqrt(2) * (b @ a))


def test_kmeans_empty_cluster_reseed_and_drop():
    X = torch.tensor([[0.0], [1.0], [10.0], [11.0], [50.0]])
    # centre 3 starts on a duplicate of centre 0's point, so its cluster is empty at once
    X = torch.cat([X, X[:1]])  # point 5 == point 0
    res = L.kmeans(X, 4, init=[0, 2, 4, 5], empty_clusters="reseed")
    assert res.k == 4 and res.reseeded >= 1 and res.dropped == 0
    assert sorted(torch.bincount(res.labels).tolist()) == [1, 1, 2, 2]
    # the farthest point (1, at distance 1 from centre 0) re-seeds it: {0,0}, {1}, {10,11}, {50}
    assert res.labels[1] == 3 and res.inertia == pytest.approx(0.5)
    res = L.kmeans(X, 4, init=[0, 2, 4, 5], empty_clusters="drop")
    assert res.k == 3 and res.dropped == 1 and res.reseeded == 0
    assert int(res.labels.max()) == 2 and torch.bincount(res.labels).min() >= 1


def test_kmeans_recovers_separated_clusters_and_weights_equal_duplicates():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    X = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres])
    res = L.kmeans(X, 3, generator=torch.Generator().manual_seed(1))
    truth = torch.arange(3).repeat_interleave(5)
    for t in range(3):
        assert len(set(res.labels[truth == t].tolist())) == 1
    assert res.converged and len(set(res.labels.tolist())) == 3
    # weight 3 on a point == the point three times
    w = torch.tensor([3.0] + [1.0] * 14)
    Xd = torch.cat([X[:1], X[:1], X])
    rw = L.kmeans(X, 3, weights=w, generator=torch.Generator().manual_seed(2))
    rd = L.kmeans(Xd, 3, generator=torch.Generator().manual_seed(2))
    assert rw.inertia == pytest.approx(rd.inertia, rel=1e-9)


def test_kmeans_ends_at_a_lloyd_fixed_point():
    X = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = L.kmeans(X, 8, tol=0.0, generator=torch.Generator().manual_seed(1))
    assert res.converged and res.n_iter > 2 and res.k == 8
    C = torch.stack([X[res.labels == t].mean(0) for t in range(8)])
    D = torch.cdist(X, C).pow(2)
    assert torch.equal(D.argmin(1), res.labels)  # every point is at its nearest centroid
    assert res.inertia == pytest.approx(float(D.gather(1, res.labels[:, None]).sum()), rel=1e-10)
    assert res.inertia == min(res.run_inertias) and len(res.run_inertias) == 10


def test_heterogeneous_ranks_and_reference_rank():
    factors, ref = rand_factors([2, 4, 8], seed=12)
    _, _, rep = L.lego_merge(factors)  # r_ref = mean 14/3 -> k = 5
    assert rep["ranks"] == [2, 4, 8] and rep["n_msu"] == 14
    assert rep["r_ref"] == pytest.approx(14 / 3) and rep["k"] == 5
    assert rep["gamma"] == pytest.approx(math.sqrt(14 / 15))
    assert sum(rep["cluster_sizes"]) == 14
    for rule, r_ref, k in (("max", 8.0, 8), ("min", 2.0, 2), (6, 6.0, 6), ("3.5", 3.5, 4)):
        A, B, rep = L.lego_merge(factors, ref_rank=rule)
        assert rep["r_ref"] == r_ref and rep["k"] == k == A.shape[0] == B.shape[1]
        assert rep["gamma"] == pytest.approx(math.sqrt(r_ref / k))
    A, B, _ = L.lego_merge(factors, 14, output_reweight=False)
    assert rel_err(delta(A, B), ref) < 1e-5


def test_report_contents_and_membership():
    factors = clustered_factors(seed=2)
    A, B, rep = L.lego_merge(factors, 3, model_ids=[10, 11, 12, 13])
    for key in ("k", "cluster_sizes", "inertia", "n_iter", "gamma", "param_factors", "members", "r_ref",
                "seed", "n_init", "norm", "empty_reseeded", "empty_dropped", "converged"):
        assert key in rep
    json.dumps(rep)  # JSON-safe as it stands
    assert rep["cluster_sizes"] == [4, 4, 4] and rep["converged"] and rep["n_iter"] >= 1
    pairs = sorted(tuple(p) for c in rep["members"] for p in c)
    assert pairs == sorted((10 + i, j) for i in range(4) for j in range(3))
    assert [len(c) for c in rep["members"]] == rep["cluster_sizes"]
    # each cluster holds the MSUs of one prototype: (i + j) % 3 constant
    for c in rep["members"]:
        assert len({(i - 10 + j) % 3 for i, j in c}) == 1
    assert all(f >= 1.0 for f in rep["param_factors"])  # norm decay is corrected upwards


def test_cluster_order_is_size_then_content():
    factors = clustered_factors(seed=3, n=5, r=2, groups=3)  # 10 MSUs from 3 prototypes
    _, _, rep = L.lego_merge(factors, 3)
    assert rep["cluster_sizes"] == sorted(rep["cluster_sizes"], reverse=True)


def test_normalized_features_and_balance():
    u = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])  # d_in = 3, d_out = 2
    v = torch.tensor([-4.0, 1.0, 2.0, -1.0, 5.0])

    def lora(x):
        return (x[:3].reshape(1, 3), x[3:].reshape(2, 1))

    factors = [lora(u), lora(2 * u), lora(v)]
    _, _, rep = L.lego_merge(factors, 2, features="normalized")
    assert rep["n_distinct"] == 2 and rep["cluster_sizes"] == [2, 1]
    assert sorted(rep["members"][0]) == [[0, 0], [1, 0]]
    # balancing and sign canonicalisation keep every MSU's update: k = N is still the sum
    fs, ref = rand_factors([3, 2], seed=13)
    A, B, _ = L.lego_merge(fs, 5, output_reweight=False, balance_msu=True, canonicalize_sign=True)
    assert rel_err(delta(A, B), ref) < 1e-5
    Xb = L.balance(torch.cat([torch.cat([a, b.T], 1) for a, b in fs]).double(), 5)
    torch.testing.assert_close(Xb[:, :5].norm(dim=1), Xb[:, 5:].norm(dim=1))


# ----------------------------------------------------------------------------- registry and errors


def test_registered_with_schema():
    from mergekit_ortho.ops import lora_lego  # noqa: F401

    op = registry.get("lora_lego")
    assert op.fn is L.lora_lego and op.input_kind == "lora" and not op.needs_base
    p = op.resolve_params({})
    assert p == {"rank": None, "param_reweight": True, "output_reweight": True, "norm": "inf",
                 "ref_rank": "mean", "seed": 0, "n_init": 10, "max_iter": 300, "tol": 1e-4,
                 "features": "raw", "sort_pool": True, "canonicalize_sign": False,
                 "balance_msu": False, "empty_clusters": "reseed"}
    assert op.resolve_params({"norm": 2})["norm"] == "2"
    assert op.resolve_params({"norm": float("inf")})["norm"] == "inf"
    assert op.resolve_params({"ref_rank": 8})["ref_rank"] == 8.0
    assert op.resolve_params({"ref_rank": "max"})["ref_rank"] == "max"
    for bad in ({"norm": 1}, {"ref_rank": "median"}, {"ref_rank": -2}, {"rank": 0}, {"n_init": 0},
                {"features": "cosine"}, {"ranks": 4}):
        with pytest.raises(ValueError):
            op.resolve_params(bad)
    assert "MSU" in op.details or "minimal semantic unit" in op.details


def test_operator_report_uses_model_index():
    factors = clustered_factors(seed=4, n=2)
    op = registry.get("lora_lego")
    res = op.fn(LoraTask("blk.0.q.weight", factors, op.resolve_params({"rank": 3}),
                         [op.resolve_model_params({}, m) for m in "ab"], [5, 7]))
    assert {i for c in res.report["members"] for i, _ in c} == {5, 7}
    assert res.A.dtype == torch.float32 and res.A.shape == (3, 6) and res.B.shape == (5, 3)


@pytest.mark.parametrize("factors,match", [
    ([], "no LoRA factors"),
    ([(torch.randn(2, 5), torch.randn(7, 3))], "factors must be A"),
    ([(torch.randn(2, 5), torch.randn(7, 2)), (torch.randn(2, 4), torch.randn(7, 2))], "different shapes"),
    ([(torch.full((2, 5), float("nan")), torch.randn(7, 2))], "NaN or Inf"),
    ([(torch.zeros(0, 5), torch.zeros(7, 0))], "rank 0"),
])
def test_bad_input_names_the_module(factors, match):
    with pytest.raises(UserError, match=match) as e:
        L.lego_merge(factors, name="model.layers.3.mlp.up_proj.weight")
    assert "model.layers.3.mlp.up_proj.weight" in str(e.value)


def test_bad_parameters():
    factors, _ = rand_factors([2, 2])
    with pytest.raises(UserError, match="norm"):
        L.lego_merge(factors, norm="l1")
    with pytest.raises(UserError, match="rank k"):
        L.lego_merge(factors, 0, name="m")
    with pytest.raises(UserError, match="ref_rank"):
        L.lego_merge(factors, ref_rank="avg")


def test_full_checkpoints_are_refused_by_the_plan(tiny_models):
    # LoRA inputs only: the plan refuses a full checkpoint before the operator (or a tensor read)
    from mergekit_ortho import plan, recipe

    r = recipe.from_dict({"merge_method": "lora_lego", "base_model": str(tiny_models["base"]),
                          "models": [{"model": str(tiny_models["a"])}], "parameters": {"rank": 2}})
    with pytest.raises(UserError, match="full checkpoint") as e:
        plan.build_plan(r)
    assert "\n" not in str(e.value) and "lora_lego" in str(e.value)
