"""model_stock: mergekit's golden numbers (../shared/specs/mergekit_compat.md M21), its invariants,
the one-pass fold against the pairwise form (and where they differ), errors, a recipe run."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho.errors import UserError
from mergekit_ortho.execute import apply_dense
from mergekit_ortho.ops import model_stock as ms
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask

B = torch.tensor([[0.5, -1, 2], [1.5, 0, -0.5]])
D1 = torch.tensor([[0.375, -0.25, 0.625], [-0.125, 0.5, -0.75]])
D2 = torch.tensor([[-0.5, 0.125, 0.3125], [0.25, -0.375, 0.875]])
D3 = torch.tensor([[0.1875, -0.625, -0.0625], [0.125, 0.3125, 0.4375]])
OP = registry.get("model_stock")


def task(base, deltas, filter_wise=False, inputs=True):
    return TensorTask("w", base, [d.clone() for d in deltas] if inputs else [],
                      OP.resolve_params({"filter_wise": filter_wise}), [OP.resolve_model_params({})] * len(deltas))


def direct(base, deltas, filter_wise=False):
    return OP.fn(task(base, deltas, filter_wise))


def folded(base, deltas, filter_wise=False):
    return apply_dense(OP, task(base, deltas, filter_wise, inputs=False), lambda: (d.clone() for d in deltas))


# mergekit forms t mean(theta_i) + (1 - t) theta_0 in float32, so its values carry a rounding of
# about ulp(|t| max|theta|) that cancels (exact float64 arithmetic lands that far from them); each
# row's atol is 2 such ulps: |t| = 3.76, 0.86 and 62.6 (filter_wise row 2, 1 + c = 0.031)
GOLDEN = [
    ([D1, D2], False, [[0.735053778, -0.764945745, 0.237094879], [1.26494551, -0.235053912, -0.735053778]], 2e-6),
    ([D1, D2, D3], False, [[0.482104868, -0.785258174, 1.74946773], [1.42841935, -0.125266075, -0.661056399]], 5e-7),
    ([D1, D2], True, [[0.506643355, -0.993356645, 1.95017493], [-3.78842163, -5.28843021, -5.78842926]], 3e-5),
]


@pytest.mark.parametrize("form", [direct, folded])
@pytest.mark.parametrize("deltas, fw, expect, atol", GOLDEN)
def test_golden_numbers_from_mergekit(form, deltas, fw, expect, atol):
    out = B + form(B, deltas, fw)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expect), rtol=1e-6, atol=atol), out


@pytest.mark.parametrize("form", [direct, folded])
def test_one_dimensional_filter_wise_orthogonal_models_give_the_base(form):
    b = torch.tensor([1.0, 2.0, 3.0])
    out = b + form(b, [torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])], True)  # c = 0, t = 0
    assert torch.equal(out, b)


def test_intermediates_match_the_spec():
    def cos(a, b):
        return float(a.double().flatten() @ b.double().flatten() / (a.double().norm() * b.double().norm()))

    c = cos(D1, D2)
    assert abs(c - -0.652829776) < 1e-8
    assert abs(2 * c / (1 + c) - -3.76086272) < 1e-7
    pairs = [cos(D1, D2), cos(D1, D3), cos(D2, D3)]
    assert [round(p, 5) for p in pairs] == [-0.65283, 0.0, 0.10664]
    c = sum(pairs) / 3
    assert abs(c - -0.182064) < 1e-6 and abs(3 * c / (1 + 2 * c) - -0.858967) < 1e-6
    # the merged delta is t * mean(tau)
    assert torch.allclose(direct(B, [D1, D2, D3]), (3 * c / (1 + 2 * c)) * (D1 + D2 + D3) / 3, atol=1e-6)


@pytest.mark.parametrize("form", [direct, folded])
@pytest.mark.parametrize("fw", [False, True])
def test_identical_models_give_that_model(form, fw):
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(5, 7, generator=g)
    for n in (2, 3, 5):
        assert torch.allclose(form(B.new_zeros(5, 7), [tau] * n, fw), tau, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fw", [False, True])
def test_permutation_invariance(fw):
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(4, 6, generator=g) + 0.5 for _ in range(4)]
    ref = direct(B.new_zeros(4, 6), taus, fw)
    for perm in itertools.permutations(range(4)):
        for form in (direct, folded):
            out = form(B.new_zeros(4, 6), [taus[i] for i in perm], fw)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), perm


def _cases():
    """Non-degenerate inputs of every kind the fold distinguishes, flat and per row."""
    g = torch.Generator().manual_seed(3)
    for n in (2, 3, 5):
        for shape in ((7,), (6, 5), (3, 4, 5)):
            taus = [torch.randn(shape, generator=g) for _ in range(n)]
            yield f"random-{n}-{shape}", taus
            z = [t.clone() for t in taus]
            z[1].zero_()  # one model leaves the tensor unchanged (frozen layer)
            if len(shape) > 1:
                z[0][0].zero_()  # and another a row
            yield f"zeros-{n}-{shape}", z
            yield f"tiny-{n}-{shape}", [t * 1e-5 for t in taus]  # every product below the 1e-6 guard
            yield f"scaled-{n}-{shape}", [t * s for t, s in zip(taus, (1e-3, 1.0, 30.0, 1e-2, 3.0))]
    # near-opposite models: 1 + (N-1) c is small and t large, amplifying rounding
    a = torch.randn(50, generator=g)
    yield "near-opposite", [a, -a + 0.05 * torch.randn(50, generator=g)]


def _allowed(taus, fw, dc=1e-6):
    """|delta t| * |mean tau| per vector for a float32-rounding change dc of c: t = N c / (1 + (N-1) c)
    has dt/dc = N / (1 + (N-1) c)^2, which near-opposite models make large."""
    n = len(taus)
    rows = [ms._rows(t.double(), fw) for t in taus]
    norms = [r.norm(dim=-1) for r in rows]
    c = sum((rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            for i in range(n) for j in range(i + 1, n)) / (n * (n - 1) / 2)
    dt = n * dc / (1 + (n - 1) * c) ** 2
    mean = sum(rows) / n
    return (dt.unsqueeze(-1) * mean.abs()).float().reshape(taus[0].shape)


@pytest.mark.parametrize("fw", [False, True])
@pytest.mark.parametrize("name, taus", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_fold_equals_the_pairwise_form(name, taus, fw):
    base = torch.zeros_like(taus[0])
    want, got = direct(base, taus, fw), folded(base, taus, fw)
    tol = _allowed(taus, fw) + 1e-6 * want.abs() + 1e-30
    assert bool(((want - got).abs() <= tol).all()), (name, float(((want - got).abs() / tol).max()))


def test_the_rounding_bound_is_not_loose():
    # the near-opposite case really needs its conditioning factor: a flat 1e-5 bound fails it
    # (the fold's norms and dot products sum float32 chunk products in float64: 2.0e-5 here)
    name, taus = list(_cases())[-1]
    want, got = direct(torch.zeros(50), taus), folded(torch.zeros(50), taus)
    assert float((want - got).abs().max()) > 1e-5 * float(want.abs().max())


def test_fold_handles_the_guard_exactly_when_all_pairs_are_small():
    # norms 1e-4: every pair term is <tau_i, tau_j> / 1e-6, not the cosine
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(30, generator=g) * 2e-5 for _ in range(3)]
    c_guarded = sum(float(taus[i] @ taus[j]) / 1e-6 for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    t = 3 * c_guarded / (1 + 2 * c_guarded)
    mean = sum(taus) / 3
    for form in (direct, folded):
        assert torch.allclose(form(torch.zeros(30), taus), t * mean, rtol=1e-5, atol=1e-12)


def test_the_documented_split_case():
    """Norms 1, 1e-7 and 1: in the order a, b, c the third model sees one earlier pair above the
    1e-6 guard (a) and one below (b); the fold then takes the true cosine for the small pair."""
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(40, generator=g) for _ in range(3))
    a, b, c = a / a.norm(), b / b.norm() * 1e-7, c / c.norm()
    base = torch.zeros(40)
    # order a, c, b: b (tiny) comes last and sees a and c on the same side: exact
    assert torch.allclose(direct(base, [a, c, b]), folded(base, [a, c, b]), rtol=1e-5, atol=1e-7)
    # order a, b, c: c sees a (large pair) and b (small pair): split
    st = ms._step(None, a.clone(), 0, task(base, [a, b, c], inputs=False))
    for i, x in ((1, b), (2, c)):
        st = ms._step(st, x.clone(), i, task(base, [a, b, c], inputs=False))
    assert st.split == 1
    cos = lambda u, v: float(u @ v) / (float(u.norm()) * float(v.norm()))  # noqa: E731
    pair = cos(a, c) + float(a @ b) / 1e-6 + cos(b, c)  # the fold: true cosine for (b, c)
    assert abs(float(st.pair_sum) - pair) < 1e-5
    exact = cos(a, c) + float(a @ b) / 1e-6 + float(b @ c) / 1e-6  # the spec
    cb = 3 * (exact / 3) / (1 + 2 * exact / 3)
    assert torch.allclose(direct(base, [a, b, c]), cb * (a + b + c) / 3, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", [direct, folded])
def test_singular_point_gives_the_base(form):
    # two opposite models: c = -1, 1 + (N-1) c = 0 -> t = 0
    assert torch.equal(form(B, [D1, -D1]), torch.zeros_like(B))


def test_negative_cosine_extrapolates_away_from_the_models():
    out = direct(B, [D1, D2])  # t = -3.76: not clamped
    assert torch.allclose(out, -3.76086272 * (D1 + D2) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", [direct, folded])
def test_one_model_is_a_one_line_error_and_none_gives_the_base(form):
    with pytest.raises(UserError, match="model_stock: tensor 'w' has 1 model.*at least 2"):
        form(B, [D1])
    assert torch.equal(form(B, []), torch.zeros_like(B))


def test_contract_and_parameters():
    assert (OP.reads, OP.needs_base, OP.min_models, OP.model_count, OP.base_input) == ("deltas", True, 2, None, False)
    assert OP.resolve_params({}) == {"filter_wise": False}
    with pytest.raises(ValueError, match="filter_wise"):
        OP.resolve_params({"filter_wise": "sometimes"})
    assert OP.fold is not None and OP.merges_one_tensor_alone
    assert OP.folds_one_model_at_a_time and OP.fold.parts is not None  # continual stores its parts


def test_recipe_runs_and_matches_the_pairwise_form(tiny_models, tmp_path, cli):
    base = tiny_models["base"]
    models = [tiny_models[k] for k in "abc"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text(models, "model_stock", base, "{filter_wise: true}"))
    code, _, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, err
    out, bw = load_dir(tmp_path / "o"), load_dir(base)
    ws = [load_dir(m) for m in models]
    for k, v in out.items():
        want = bw[k] + direct(bw[k], [w[k] - bw[k] for w in ws], True)
        assert torch.allclose(v, want, rtol=1e-5, atol=1e-6), k
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(out[q], bw[q])


def test_continual_export_of_one_model_is_the_one_line_error(tiny_models, tmp_path, cli):
    # continual merging takes model_stock (bit for bit with `merge run`: test_continual); with one
    # model folded in, export says what is missing
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"]], "model_stock", tiny_models["base"]))
    code, out, err = cli("continual", "init", tmp_path / "state", "--recipe", r)
    assert code == 0, err
    code, out, err = cli("continual", "export", tmp_path / "state", "--out", tmp_path / "o")
    assert code == 2 and "has 1 model(s) besides the base" in err and "Traceback" not in err + out
    assert not (tmp_path / "o").exists()
    assert cli("continual", "add", tmp_path / "state", tiny_models["b"])[0] == 0
    assert cli("continual", "export", tmp_path / "state", "--out", tmp_path / "o")[0] == 0
