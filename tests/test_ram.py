"""ram and ramplus_tl: mergekit's golden numbers (../shared/specs/mergekit_compat.md M25), their
invariants, the folds against mergekit's own formulation, errors and recipe runs."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho.errors import UserError
from mergekit_ortho.execute import apply_dense
from mergekit_ortho.ops import ram as ram_mod
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask

B = torch.tensor([[0.5, -1, 2], [1.5, 0, -0.5]])
T1 = torch.tensor([[0.375, 0, 0.625], [0, 0.5, -0.75]])  # R1 = B + T1
T2 = torch.tensor([[-0.5, 0.125, 0], [0, -0.375, 0.875]])  # R2 = B + T2
METHODS = ("ram", "ramplus_tl")


def task(method, base, taus, params=None, inputs=True):
    op = registry.get(method)
    return op, TensorTask("w", base, [t.clone() for t in taus] if inputs else [], op.resolve_params(params or {}),
                          [op.resolve_model_params({})] * len(taus))


def direct(method, base, taus, params=None):
    op, t = task(method, base, taus, params)
    return op.fn(t)


def folded(method, base, taus, params=None):
    op, t = task(method, base, taus, params, inputs=False)
    return apply_dense(op, t, lambda: (x.clone() for x in taus))


def mergekit_form(taus, r=None, alpha=None, eps=1e-5):
    """The spec's formulation as written: unique entries (scaled by lambda_i), plus each active
    overlapping entry divided by c, summed over the models."""
    tv = torch.stack(taus).reshape(len(taus), -1)
    active = tv.abs() > eps
    c = active.sum(0, keepdim=True)
    unique, overlap = c == 1, c > 1
    lam = torch.ones(len(taus), 1)
    if r is not None:
        rho = (active & overlap).sum(1) / (active & unique).sum(1).clamp(min=eps)
        lam = (1 + r * rho.clamp(0, alpha)).unsqueeze(-1)
    z = tv * active
    return (z * unique * lam + z * overlap / c.clamp(min=1)).sum(0).reshape(taus[0].shape)


GOLDEN = [
    ("ram", {}, [[0.4375, -0.875, 2.625], [1.5, 0.0625, -0.4375]]),
    ("ramplus_tl", {}, [[0.4375, -0.8725, 2.6375], [1.5, 0.0625, -0.4375]]),
    ("ramplus_tl", {"r": 0.5, "alpha": 1.0}, [[0.4375, -0.8125, 2.9375], [1.5, 0.0625, -0.4375]]),
]


@pytest.mark.parametrize("form", [direct, folded])
@pytest.mark.parametrize("method, params, expect", GOLDEN)
def test_golden_numbers_from_mergekit(form, method, params, expect):
    out = B + form(method, B, [T1, T2], params)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expect), rtol=1e-6, atol=1e-7), out


def test_lambda_of_the_golden_example():
    # each model: 3 active entries shared (c = 2), 1 unique: rho = 3, clamped to alpha
    assert ram_mod.unique_scale(3, 1, 0.1, 0.2, 1e-5) == pytest.approx(1.02)
    assert ram_mod.unique_scale(3, 1, 0.5, 1.0, 1e-5) == 1.5
    assert ram_mod.unique_scale(0, 4, 0.1, 0.2, 1e-5) == 1.0  # nothing shared: no boost
    assert ram_mod.unique_scale(2, 0, 0.1, 0.2, 1e-5) == pytest.approx(1.02)  # no unique entry: rho huge


def _random(n, shape=(6, 9), seed=0, sparsity=0.5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=g)
        x[torch.rand(shape, generator=g) < sparsity] = 0
        x[torch.rand(shape, generator=g) < 0.1] = 3e-6  # below epsilon: inactive
        out.append(x)
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fold_equals_direct_form_bit_for_bit_and_mergekit_to_rounding(method, n):
    taus = _random(n, seed=n)
    d, f = direct(method, B.new_zeros(6, 9), taus), folded(method, B.new_zeros(6, 9), taus)
    assert torch.equal(d, f)
    ref = mergekit_form(taus, *((0.1, 0.2) if method == "ramplus_tl" else ()))
    assert torch.allclose(d, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_disjoint_supports_give_the_plain_sum(method):
    g = torch.Generator().manual_seed(7)
    owner = torch.randint(0, 3, (5, 8), generator=g)
    taus = [torch.where(owner == i, torch.randn(5, 8, generator=g), torch.zeros(())) for i in range(3)]
    assert torch.equal(direct(method, B.new_zeros(5, 8), taus), taus[0] + taus[1] + taus[2])


@pytest.mark.parametrize("method", METHODS)
def test_identical_models_give_that_model(method):
    (tau,) = _random(1, seed=3)
    out = direct(method, B.new_zeros(6, 9), [tau] * 3)
    assert torch.allclose(out, torch.where(tau.abs() > 1e-5, tau, torch.zeros(())), atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_permutation_invariance(method):
    taus = _random(3, seed=11)
    ref = direct(method, B.new_zeros(6, 9), taus)
    for perm in itertools.permutations(range(3)):
        assert torch.allclose(direct(method, B.new_zeros(6, 9), [taus[i] for i in perm]), ref, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_epsilon_decides_what_is_active(method):
    a, b = torch.tensor([0.5, 1e-3, 1e-6]), torch.tensor([0.25, 0.0, 0.0])
    # ramplus_tl: a has one shared and one unique entry, rho = 1 -> lambda = 1 + 0.1 * 0.2
    unique = 1e-3 * (1.02 if method == "ramplus_tl" else 1.0)
    assert torch.allclose(direct(method, torch.zeros(3), [a, b]), torch.tensor([0.375, unique, 0.0]), rtol=1e-6, atol=0)
    # a larger epsilon drops 1e-3 too
    assert torch.equal(direct(method, torch.zeros(3), [a, b], {"epsilon": 1e-2}), torch.tensor([0.375, 0, 0]))


@pytest.mark.parametrize("method", METHODS)
def test_base_alone_gives_the_base_and_shapes_must_agree(method):
    assert torch.equal(direct(method, B, []), torch.zeros_like(B))
    assert torch.equal(folded(method, B, []), torch.zeros_like(B))
    with pytest.raises(UserError, match="ram: tensor 'w' has shape"):
        folded(method, B, [T1, T1[:1]])


def test_contract_and_parameters():
    for method, params in (("ram", {"epsilon": 1e-5}), ("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5})):
        op = registry.get(method)
        assert (op.reads, op.needs_base, op.model_count, op.min_models, op.base_input) == ("deltas", True, None, 1, False)
        assert op.resolve_params({}) == params and op.model_params == ()
        assert op.fold is not None and op.folds_one_model_at_a_time == (method == "ram")
    assert registry.get("ram").fold.gather is None  # one model at a time (state: sum and count)
    assert registry.get("ramplus_tl").fold.gather is not None  # counts first


@pytest.mark.parametrize("method", METHODS)
def test_recipe_runs(tiny_models, tmp_path, cli, method):
    base = tiny_models["base"]
    models = [tiny_models[k] for k in "ab"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text(models, method, base))
    code, _, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, err
    out, bw = load_dir(tmp_path / "o"), load_dir(base)
    ws = [load_dir(m) for m in models]
    for k, v in out.items():
        assert torch.allclose(v, bw[k] + direct(method, bw[k], [w[k] - bw[k] for w in ws]), atol=1e-6), k


def test_continual_takes_ram_and_refuses_ramplus_tl(tiny_models, tmp_path, cli):
    # ram's sum and count are stored part by part (bit for bit: test_continual); ramplus_tl counts first
    assert registry.get("ram").fold.parts is not None
    r = write_recipe(tmp_path / "plus.yaml", recipe_text([tiny_models["a"]], "ramplus_tl", tiny_models["base"]))
    code, out, err = cli("continual", "init", tmp_path / "plus", "--recipe", r)
    assert code == 2 and "'ramplus_tl' is not one of them" in err and "Traceback" not in err + out
    takes = err.split("(", 1)[1].split(")", 1)[0].split(", ")  # the methods it does take
    assert {"ram", "model_stock", "linear"} <= set(takes) and "ramplus_tl" not in takes
