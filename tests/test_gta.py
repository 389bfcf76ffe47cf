"""Generalized task arithmetic (ops/gta.py, ops/sparsify.py) and sce (ops/sce.py): mergekit's golden
numbers (../shared/specs/mergekit_compat.md M15, M16), the sparsifiers' goldens, della's keep
probabilities and frequencies, the L1 invariant, the randomness properties of M27, the errors."""
from __future__ import annotations

import math

import pytest
import torch

from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import gta, registry
from mergekit_ortho.ops import sparsify as sp
from mergekit_ortho.ops.kernels import topk
from mergekit_ortho.ops.registry import TensorTask, generator

B = torch.tensor([[0.5, -1, 2], [1.5, 0, -0.5]])
M1 = torch.tensor([[0.875, -1.25, 2.625], [1.375, 0.5, -1.25]])
M2 = torch.tensor([[0, -0.875, 2.3125], [1.75, -0.375, 0.375]])
M3 = torch.tensor([[0.6875, -1.625, 1.9375], [1.625, 0.3125, -0.0625]])


def task(method, deltas, params=None, model_params=None, name="w", base=None):
    op = registry.get(method)
    mps = [op.resolve_model_params(mp, f"m{i}") for i, mp in enumerate(model_params or [{}] * len(deltas))]
    return op, TensorTask(name, B.clone() if base is None else base, [d.clone() for d in deltas],
                          op.resolve_params(params or {}), mps)


def merged(method, models, params=None, weights=None, **per_model):
    """theta = B + the operator's merged delta; per-model lists as in mergekit's merge_tensors."""
    n = len(models)
    mps = [{} for _ in range(n)]
    for key, values in dict(per_model, weight=weights).items():
        if values is not None:
            for mp, v in zip(mps, values if isinstance(values, list) else [values] * n):
                mp[key] = v
    op, t = task(method, [m - B for m in models], params, mps)
    return B + op.fn(t)


def close(got, want):
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)


# --- M15 golden rows ------------------------------------------------------------------------------

GOLDEN = [
    ("task_arithmetic", [M1, M2], {}, dict(weights=[1, 0.5]),
     [[0.625, -1.1875, 2.78125], [1.5, 0.3125, -0.8125]]),
    ("task_arithmetic", [M1, M2], {"lambda": 0.7}, dict(weights=[1, 0.5]),
     [[0.587499976, -1.13125002, 2.546875], [1.5, 0.21875, -0.71875]]),
    ("task_arithmetic", [M1, M2], {"normalize": True}, dict(weights=[1, 0.5]),
     [[0.583333313, -1.125, 2.52083325], [1.5, 0.208333328, -0.708333313]]),
    ("ties", [M1, M2], {}, dict(weights=[1, 0.5], density=0.5),
     [[0, -1, 2.625], [1.5, 0.5, -1.25]]),
    ("ties", [M1, M2], {"normalize": False}, dict(weights=[1, 0.5], density=0.5),
     [[0.25, -1, 2.625], [1.5, 0.5, -1.25]]),
    ("ties", [M1, M2], {"rescale": True}, dict(weights=[1, 0.5], density=0.5),
     [[-0.196428597, -1, 2.875], [1.5, 0.699999988, -1.54999995]]),
    ("ties", [M1, M2], {}, dict(weights=[1, 0.5], density=0.1), [[0.5, -1, 2], [1.5, 0, -1.25]]),
    ("ties", [M1, M2], {}, dict(weights=[1, 0.5], density=0.0), B.tolist()),
    ("ties", [M1, M2], {}, dict(weights=[1, -1], density=1.0),
     [[1.375, -1.375, 2.625], [1.125, 0.875, -2.125]]),
    ("ties", [M1, M2, M3], {}, dict(weights=1, density=1.0),
     [[0.78125, -1.4375, 2.46875], [1.6875, 0.40625, 0.15625]]),
    ("ties", [M1, M2, M3], {"lambda": 2}, dict(density=[0.5, 0.5, 0.34]),
     [[-0.5, -2.25, 3.25], [1.5, 1, 0.8125]]),
    ("dare_ties", [M1, M2], {}, dict(weights=[1, 0.5], density=1.0),
     [[0.875, -1.25, 2.78125], [1.625, 0.5, -1.25]]),
    ("breadcrumbs", [M1, M2], {}, dict(weights=1, density=0.5, gamma=0.2),
     [[0.375, -1, 2.9375], [1.5, 0.125, -0.5]]),
    ("breadcrumbs", [M1, M2], {}, dict(weights=1, density=0.5, gamma=0.01),
     [[0, -1, 2.625], [1.5, 0.125, -0.375]]),
    ("breadcrumbs", [M1, M2], {}, dict(weights=1, density=1.0, gamma=0.2),
     [[0.375, -1.125, 2.9375], [1.625, 0.125, -0.375]]),
    ("breadcrumbs", [M1, M2], {}, dict(weights=1, density=0.5, gamma=0.6),
     [[0.875, -1.125, 2.3125], [1.625, 0, -0.5]]),
    ("breadcrumbs_ties", [M1, M2], {}, dict(weights=1, density=0.5, gamma=0.2),
     [[0, -1, 2.9375], [1.5, 0.5, -0.5]]),
    ("breadcrumbs_ties", [M1, M2], {"normalize": True}, dict(weights=[1, 0.5], density=0.5, gamma=0.2),
     [[0.875, -1, 2.52083325], [1.5, 0.5, -0.5]]),
]


@pytest.mark.parametrize("radix", [False, True], ids=["sort", "radix"])
@pytest.mark.parametrize("method,models,params,per_model,want", GOLDEN, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)])
def test_m15_golden(monkeypatch, radix, method, models, params, per_model, want):
    if radix:  # the radix top-k / rank band on these 6-entry tensors too
        monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 1)
    close(merged(method, models, params, **per_model), want)


@pytest.mark.parametrize("method,models,params,per_model,want",
                         [g for g in GOLDEN if g[3].get("density") == 1.0 and g[0] == "ties"])
def test_density_one_random_rows_reproduce_the_deterministic_goldens(method, models, params, per_model, want):
    # M27 property 4: at density 1 nothing is random; della is ties' consensus with normalize
    close(merged("della", models, params, **per_model), want)
    close(merged("dare_ties", models, dict(params, normalize=True), **per_model), want)
    ta = merged("task_arithmetic", models, {}, weights=per_model["weights"])
    for method in ("dare_linear", "della_linear", "breadcrumbs"):
        torch.testing.assert_close(merged(method, models, {}, weights=per_model["weights"], density=1.0), ta)


def test_seeded_dare_through_the_injected_mask(monkeypatch):
    # M15 / M27 property 3: mergekit's seeded mask [[1,0,1],[1,1,0]]; the arithmetic after it is exact
    mask = torch.tensor([[1.0, 0, 1], [1, 1, 0]])
    monkeypatch.setattr(sp, "random_", lambda x, d, gen: x.mul_(mask))
    d1 = M1 - B
    op, t = task("dare_linear", [d1], {}, [{"density": 0.5}])
    assert sp.rescale_factor(sp.l1_norm(d1), sp.l1_norm(d1 * mask)) == pytest.approx(2.625 / 1.625, rel=1e-15)
    close(op.fn(t), [[0.605769217, 0, 1.00961542], [-0.201923072, 0.807692289, 0]])
    close(merged("dare_linear", [M1], {}, weights=1, density=0.5),
          [[1.10576916, -1, 3.00961542], [1.29807687, 0.807692289, -0.5]])


def test_sce_golden():
    close(merged("sce", [M1, M2, M3]),
          [[0.811141253, -1.37771738, 2.47384763], [1.70557654, 0.436141312, 0.219518006]])
    want = [[0.827408254, -1, 2], [1.5, 0.452408224, 0.279188633]]
    close(merged("sce", [M1, M2, M3], {"select_topk": 0.5}), want)
    close(merged("sce", [M1, M2, M3], {"select_topk": 0.5, "int8_mask": True}), want)
    torch.testing.assert_close(merged("sce", [M1, M2, M3], {"select_topk": 0.0}), B)
    torch.testing.assert_close(merged("sce", [M1, M2, M1]), merged("sce", [M1, M2, M1]))  # deterministic


def test_sce_weights_and_base_alone():
    deltas = [m - B for m in (M1, M2, M3)]
    omega = [float((d.double() ** 2).mean()) for d in deltas]
    omega = [w / sum(omega) for w in omega]
    assert omega == pytest.approx([0.407614782, 0.381858903, 0.210526316], rel=1e-8)
    assert not registry.get("sce").model_params  # no per-model weights
    op, t = task("sce", [])
    assert torch.equal(op.fn(t), torch.zeros_like(B))


# --- the sparsifiers ---------------------------------------------------------------------------


@pytest.mark.parametrize("radix", [False, True], ids=["sort", "radix"])
def test_sparsifier_goldens(monkeypatch, radix):
    if radix:
        monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 1)
    x = torch.arange(1.0, 101.0)
    assert int((sp.magnitude_trim(x, 0.29) != 0).sum()) == 28  # 0.29 * 100 = 28.999... in double
    assert int((sp.magnitude_trim(x, 0.57) != 0).sum()) == 56
    kept = sp.outliers_(x.clone(), 0.5, 0.1)
    assert kept[kept != 0].tolist() == list(range(41, 91))
    kept = sp.outliers_(x.clone(), 0.5, 0.6)
    assert kept[kept != 0].tolist() == list(range(1, 51))
    assert torch.equal(sp.outliers_(x.clone(), 1.0, 0.6), x)  # gamma ignored at density 1
    assert not sp.outliers_(x.clone(), 0.0, 0.1).any()


def test_outliers_with_gamma_zero_is_the_magnitude_trim():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4000, generator=g) * 4).round()  # many equal magnitudes: the tie rule agrees
    for d in (0.01, 0.3, 0.77):
        assert torch.equal(sp.outliers_(x.clone(), d, 0.0), sp.magnitude_trim(x, d))


def test_della_probabilities():
    row = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.05]])
    p = sp.della_keep_prob(sp.row_ranks_plain(row.abs()), 5, 0.5, 0.15)
    torch.testing.assert_close(p, torch.tensor([[0.425, 0.65, 0.575, 0.5, 0.35]]), rtol=1e-6, atol=1e-7)


def _binomial_ok(freq: torch.Tensor, p: torch.Tensor, n: int) -> bool:
    sigma = torch.sqrt(p * (1 - p) / n)
    return bool(((freq - p).abs() <= 5 * sigma + 1e-9).all())  # 5 sigma: no flake, still tight


def test_della_keep_frequencies_by_rank_along_dim_1():
    n = 20_000
    row = torch.tensor([0.1, -0.4, 0.3, 0.2, -0.05])
    x = row.repeat(n, 1)
    kept = sp.della_(x.clone(), 0.5, 0.15, torch.Generator().manual_seed(0)) != 0
    assert _binomial_ok(kept.double().mean(0), torch.tensor([0.425, 0.65, 0.575, 0.5, 0.35], dtype=torch.float64), n)
    # [*, 2, 2] with epsilon 0.4: ranks along dim 1, per index of the last dimension
    y = torch.empty(n, 2, 2)
    y[:, 0, 0], y[:, 1, 0], y[:, 0, 1], y[:, 1, 1] = 1.0, 2.0, 3.0, -0.5
    freq = (sp.della_(y.clone(), 0.5, 0.4, torch.Generator().manual_seed(1)) != 0).double().mean(0)
    assert _binomial_ok(freq, torch.tensor([[0.1, 0.9], [0.9, 0.1]], dtype=torch.float64), n)


def test_della_length_one_rows_keep_with_probability_density():
    # mergekit divides 0 by 0 there and crashes (A5); here p = d
    n = 20_000
    for x in (torch.ones(n, 1), torch.ones(1)):
        freq = (sp.della_(x.clone(), 0.3, 0.1, torch.Generator().manual_seed(2)) != 0).double().mean()
        assert _binomial_ok(freq, torch.tensor(0.3, dtype=torch.float64), x.numel())


def test_dare_keep_frequency():
    n = 200_000  # mergekit observed 0.2989 for d = 0.3 (M27)
    freq = (sp.random_(torch.ones(n), 0.3, torch.Generator().manual_seed(3)) != 0).double().mean()
    assert _binomial_ok(freq, torch.tensor(0.3, dtype=torch.float64), n)


# --- rescale, randomness, errors ------------------------------------------------------------------


def test_l1_norm_is_the_plain_sum(monkeypatch):
    from mergekit_ortho.ops.kernels import _chunks
    monkeypatch.setattr(_chunks, "CHUNK", 7)
    x = torch.randn(1001, generator=torch.Generator().manual_seed(4))
    assert sp.l1_norm(x) == pytest.approx(float(x.double().abs().sum()), rel=1e-14)


@pytest.mark.parametrize("method,extra", [("ties", {}), ("dare_linear", {}), ("breadcrumbs", {"gamma": 0.05}),
                                          ("della_linear", {"epsilon": 0.2})])
def test_l1_invariant(method, extra):
    # M27 property 2: |tau~|_1 = |tau|_1 after the rescale, for any non-empty mask
    tau = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    op, t = task(method, [tau], {"rescale": True}, [dict(extra, density=0.3)])
    out = op.fn(t)
    assert (out != 0).float().mean() < 0.5
    assert sp.l1_norm(out) == pytest.approx(sp.l1_norm(tau), rel=1e-6)


def test_empty_mask_skips_the_rescale():
    out = merged("dare_linear", [M1], {}, weights=1, density=1e-9)
    torch.testing.assert_close(out, B)  # a zero delta, no division by zero


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_rows_are_seeded_per_tensor_and_model(method):
    taus = [torch.randn(40, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    mp = [{"density": 0.5}] * 2

    def run(seed, name, order=(0, 1)):
        op, t = task(method, [taus[i] for i in order], {"seed": seed}, mp, name=name)
        return op.fn(t)

    a = run(7, "layer.0.w")
    assert torch.equal(a, run(7, "layer.0.w"))
    assert not torch.equal(a, run(8, "layer.0.w")) and not torch.equal(a, run(7, "layer.1.w"))
    # the mask belongs to the model index, not to the tensor's contents
    assert not torch.equal(a, run(7, "layer.0.w", order=(1, 0)))


def test_della_epsilon_is_checked():
    for d, eps in ((0.9, 0.15), (0.1, 0.1), (0.5, 0.5)):
        with pytest.raises(UserError, match="'w'.*density \\+/- epsilon"):
            merged("della", [M1, M2], {}, density=d, epsilon=eps)
    merged("della", [M1, M2], {}, density=1.0)  # d >= 1 is not checked (nothing is random)
    merged("della_linear", [M1, M2], {}, density=0.0)


def test_parameter_table_matches_mergekit():
    # M13: defaults of every row, per-model parameters
    want = {"ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True),
            "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False), "della": (True, True),
            "della_linear": (False, True), "task_arithmetic": (False, False)}
    for name, (normalize, rescale) in want.items():
        op = registry.get(name)
        p = op.resolve_params({})
        assert (p.normalize, p.rescale, p["lambda"], p.int8_mask) == (normalize, rescale, 1.0, False), name
        mp = op.resolve_model_params({})
        assert (mp.weight, mp.density) == (1.0, 1.0)
    assert registry.get("breadcrumbs").resolve_model_params({}).gamma == 0.01
    assert registry.get("della_linear").resolve_model_params({}).epsilon == 0.15
    assert registry.get("sce").resolve_params({}) == {"select_topk": 1.0, "int8_mask": False}
    for name in ("breadcrumbs", "ties"):
        assert "seed" not in registry.get(name).resolve_params({})
    assert set(gta.VARIANTS) == {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                                 "della", "della_linear"}


def test_task_arithmetic_density_and_rescale_have_no_effect():
    op = registry.get("task_arithmetic")
    for p in (op.params, op.model_params):
        for param in p:
            if param.name in ("density", "rescale", "int8_mask"):
                assert "no effect" in param.help
    plain = merged("task_arithmetic", [M1, M2], {}, weights=[1, 0.5])
    close(merged("task_arithmetic", [M1, M2], {"rescale": True, "int8_mask": True}, weights=[1, 0.5],
                 density=[0.3, 0.5]), plain.tolist())
    # and its streaming fold takes the same parameters
    _, t = task("task_arithmetic", [], {"rescale": True}, [{"density": 0.2, "weight": 1}, {"weight": 0.5}])
    state = op.fold.start(t)
    for i, m in enumerate((M1, M2)):
        state = op.fold.step(state, m - B, i, t)
    assert torch.equal(B + op.fold.finish(state, t), plain)


def test_ties_rescale_is_not_ignored():
    # the old operator accepted rescale for ties and ignored it (spec B4)
    a = merged("ties", [M1, M2], {}, weights=[1, 0.5], density=0.5)
    b = merged("ties", [M1, M2], {"rescale": True}, weights=[1, 0.5], density=0.5)
    assert not torch.equal(a, b)


def test_della_rescale_restores_the_expected_mass():
    tau = torch.randn(256, 128, generator=torch.Generator().manual_seed(6))
    out = sp.della_(tau.clone(), 0.4, 0.1, generator(0, "t\x000"))
    kept = (out != 0).double().mean().item()
    assert math.isclose(kept, 0.4, abs_tol=0.01)
