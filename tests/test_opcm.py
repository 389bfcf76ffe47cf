"""OPCM operator: projection goldens (magmax_opcm_baselines.md D2), loop goldens (D3), robust
guards (B9.3), the projectable-tensor rule (B5), and the fold form (FOLD: step, reduce, finish) against the in-memory
B3 reference ``opcm_merge``."""
from __future__ import annotations

import json
import math

import pytest
import torch

import mergekit_ortho.ops.opcm as opcm_mod
from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.opcm import FOLD, is_projectable, opcm_merge, project, split_rank
from mergekit_ortho.ops.registry import TensorTask

F64 = torch.float64
W, B = "layer.W.weight", "layer.b.bias"  # a linear weight (projectable) and a bias (identity path)


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def _E(i, j, n=3):
    e = torch.zeros(n, n, dtype=F64)
    e[i, j] = 1.0
    return e


def _close(a, b, tol=1e-9):
    a = a if isinstance(a, torch.Tensor) else _t(a)
    b = b if isinstance(b, torch.Tensor) else _t(b)
    assert a.shape == b.shape
    assert torch.allclose(a.to(F64), b.to(F64), atol=tol, rtol=0), f"\n{a}\n!=\n{b}"


def _norm(d: dict) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in d.values()))


def _params(**kw):
    return registry.get("opcm").resolve_params(kw)


def _fold(name, prev, tau, t, params):
    """FOLD.step for model t (1-based) of tensor ``name``: (S_t, stats)."""
    return FOLD.step(prev, tau, t - 1, TensorTask(name, None, [], params, []))


def _export(state, scalars, params):
    """FOLD.finish with the reduced scalars: S_t / lambda_t."""
    return FOLD.finish(state, TensorTask("w", None, [], params, [], scalars=scalars))


def _sequential(base, models, **kw):
    """Drive FOLD like continual.py: fold every tensor, sum stats, reduce, export.
    Returns (per-step exported merged models, per-step scalars, final state)."""
    params = _params(**kw)
    state: dict[str, torch.Tensor] = {}
    scalars: dict = {}
    merged_steps, scalar_steps = [], []
    for t, model in enumerate(models, start=1):
        stats_acc: dict[str, float] = {}
        new_state = {}
        for name in base:
            tau = model[name].to(torch.promote_types(model[name].dtype, torch.float32)) - base[name]
            new, stats = _fold(name, state.get(name), tau, t, params)
            assert new.shape == tau.shape  # the state has the tensor's shape: memory constant in t
            new_state[name] = new
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + float(v)
        state = new_state
        scalars = FOLD.reduce(stats_acc, scalars, t, params)
        scalars = json.loads(json.dumps(scalars))  # must survive state.json
        merged_steps.append({n: base[n] + _export(state[n], scalars, params) for n in base})
        scalar_steps.append(scalars)
    return merged_steps, scalar_steps, state


def _full_svd_projection(tbar, tau, alpha, zero_diagonal=True):
    """Independent reference: full-matrices SVD and an explicit mask, as the FusionBench code does."""
    U, s, Vh = torch.linalg.svd(tbar, full_matrices=True)
    ratio = torch.cumsum(s, 0) / s.sum()
    r = int(torch.argmax((ratio > alpha).to(torch.int8)))  # argmax of all-False is 0
    M = U.mT @ tau @ Vh.mT
    mask = torch.zeros_like(M, dtype=torch.bool)
    mask[:r, :r] = True
    if zero_diagonal:
        mask.fill_diagonal_(True)  # only indices < k exist on the diagonal of the m x n matrix
    return U @ torch.where(mask, torch.zeros_like(M), M) @ Vh, r


TBAR = torch.diag(_t([3.0, 2.0, 1.0]))
SWAP = _t([[0, 1, 0], [1, 0, 0], [0, 0, 0]])


# -- D2: projection goldens -------------------------------------------------------------------------


def test_split_rank_off_by_one_and_edges():
    s = _t([3.0, 2.0, 1.0])  # shares 0.5, 0.833, 1.0
    assert split_rank(s, 0.5) == 1  # 0.5 is not > 0.5: the crossing index is excluded
    assert split_rank(s, 0.49) == 0
    assert split_rank(s, 0.9) == 2
    assert split_rank(s, 0.0) == 0
    assert split_rank(s, 1.0) == 0  # no share exceeds 1: reference argmax-of-all-False
    assert split_rank(_t([1.0, 0.0, 0.0]), 0.5) == 0  # rank 1
    assert split_rank(_t([0.0, 0.0, 0.0]), 0.5) == 0  # zero: NaN shares
    assert split_rank(_t([1.0, 1.0, 1.0, 1.0]), 0.5) == 2  # sigma sum, not sigma^2 (would be the same here)
    assert split_rank(_t([4.0, 2.0, 1.0, 1.0]), 0.6) == 1  # sigma shares .5 .75; squared would be .727 -> 1 too
    assert split_rank(_t([3.0, 2.0, 2.0]), 0.6) == 1  # sigma: .43 .71 -> 1; squared: .53 .76 -> 1
    assert split_rank(_t([2.0, 1.0, 1.0]), 0.55) == 1  # sigma: .5 .75 -> 1; squared .667 -> would give 0


def test_projection_alpha_half_masks_only_the_diagonal():
    P, info = project(TBAR, SWAP, alpha=0.5)
    assert info["r"] == 1
    _close(P, SWAP)  # off-diagonal: kept
    _close(project(TBAR, torch.eye(3, dtype=F64), alpha=0.5)[0], torch.zeros(3, 3))
    _close(project(TBAR, _E(0, 2), alpha=0.5)[0], _E(0, 2))


def test_projection_alpha_09_also_masks_the_block():
    P, info = project(TBAR, SWAP, alpha=0.9)
    assert info["r"] == 2
    _close(P, torch.zeros(3, 3))
    _close(project(TBAR, _E(0, 2), alpha=0.9)[0], _E(0, 2))


def test_projection_rank_one_zero_and_alpha_zero_give_r0():
    assert project(_E(0, 0), torch.ones(3, 3, dtype=F64), alpha=0.5)[1]["r"] == 0
    assert project(_E(0, 0), torch.ones(3, 3, dtype=F64), alpha=0.5, robust=False)[1]["r"] == 0
    assert project(torch.zeros(3, 3, dtype=F64), torch.ones(3, 3, dtype=F64), alpha=0.5, robust=False)[1]["r"] == 0
    assert project(TBAR, SWAP, alpha=0.0)[1]["r"] == 0
    # rank 1 with alpha 0.5: only u_1 v_1^T is removed
    _close(project(_E(0, 0), torch.ones(3, 3, dtype=F64), alpha=0.5)[0], torch.ones(3, 3) - _E(0, 0))


@pytest.mark.parametrize("tbar", [torch.diag(_t([2.0, 1.0])), torch.diag(_t([2.0, 1.0, 0.0]))])
def test_duplicate_direction(tbar):
    # shares [2/3, 1]: r = 0, so only the diagonal (when zeroed) removes anything
    _close(project(tbar, 2 * tbar, alpha=0.5)[0], torch.zeros_like(tbar))
    P, info = project(tbar, 2 * tbar, alpha=0.5, zero_diagonal=False)
    assert info["r"] == 0
    _close(P, 2 * tbar)
    assert abs(float(P.norm()) - 4.472136) < 1e-6


def test_zero_diagonal_false_keeps_component_along_tbar():
    P, _ = project(TBAR, torch.eye(3, dtype=F64), alpha=0.5, zero_diagonal=False)
    _close(P, torch.diag(_t([0.0, 1.0, 1.0])))  # only the r x r block (0,0) goes
    assert float((P * TBAR).sum()) == pytest.approx(3.0)  # not orthogonal to tbar


SHAPES = [(6, 6), (8, 5), (5, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_projection_invariants_random(shape, alpha):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1] + int(alpha * 1000))
    tbar = torch.randn(*shape, generator=g, dtype=F64)
    tau = torch.randn(*shape, generator=g, dtype=F64)
    P, info = project(tbar, tau, alpha=alpha)
    r = info["r"]
    scale = float(tau.norm() * tbar.norm())
    assert abs(float((P * tbar).sum())) < 1e-13 * scale  # <P(tau), tbar> = 0
    _close(project(tbar, P, alpha=alpha)[0], P, 1e-12)  # idempotent
    U, s, Vh = torch.linalg.svd(tbar, full_matrices=False)
    if alpha == 0.9:
        assert r >= 2
    if r:
        assert float((U[:, :r].mT @ P @ Vh[:r].mT).abs().max()) < 1e-12  # block removed
    assert float(P.norm()) <= float(tau.norm()) + 1e-12
    full, r_full = _full_svd_projection(tbar, tau, alpha)
    assert r_full == r
    _close(P, full, 5e-14)  # thin == full SVD
    # the explicit thin-SVD formula of B2
    d = torch.einsum("mi,mn,in->i", U[:, r:], tau, Vh[r:])
    form = tau - U[:, :r] @ (U[:, :r].mT @ tau @ Vh[:r].mT) @ Vh[:r] - (U[:, r:] * d) @ Vh[r:]
    _close(P, form, 1e-12)
    # any positive multiple of tbar gives the same projection (why the state may hold the sum)
    _close(project(3.7 * tbar, tau, alpha=alpha)[0], P, 1e-12)
    # zero_diagonal=False is the reference without the diagonal step
    _close(project(tbar, tau, alpha=alpha, zero_diagonal=False)[0],
           _full_svd_projection(tbar, tau, alpha, zero_diagonal=False)[0], 5e-14)


def test_projection_float32_default_and_dtype_kept():
    g = torch.Generator().manual_seed(1)
    tbar, tau = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    P32, _ = project(tbar, tau)
    assert P32.dtype == torch.float32
    P64, _ = project(tbar, tau, svd_dtype="float64")
    assert P64.dtype == torch.float32
    ref, _ = _full_svd_projection(tbar.double(), tau.double(), 0.5)
    _close(P32, ref, 1e-5)
    _close(P64, ref.float(), 1e-6)


# -- robust guard (B9.3) ----------------------------------------------------------------------------


def test_zero_merged_update_is_not_projected():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(5, 4, generator=g, dtype=F64)
    zero = torch.zeros(5, 4, dtype=F64)
    P, info = project(zero, tau)
    assert info["identity"] and torch.equal(P, tau)
    bad, _ = project(zero, tau, robust=False)  # the reference: diagonal zeroed in an arbitrary basis
    assert not torch.allclose(bad, tau)


def test_loop_layer_untouched_by_first_model_takes_second_in_full():
    base = {W: torch.zeros(3, 3, dtype=F64), B: torch.zeros(3, dtype=F64)}
    m1 = {W: torch.zeros(3, 3, dtype=F64), B: _t([1.0, 0, 0])}
    m2 = {W: _t([[1.0, 2, 0], [0, 1, 0], [0, 0, 1]]), B: _t([0.0, 0, 0])}
    out = opcm_merge(base, [m1, m2])
    lam = _norm({W: m2[W], B: m1[B]}) / ((1 + float(m2[W].norm())) / 2)
    _close(out[W], m2[W] / lam)
    _close(out[B], m1[B] / lam)
    bad = opcm_merge(base, [m1, m2], robust=False)
    assert not torch.allclose(bad[W] * bad[W].norm(), out[W] * out[W].norm())


def test_rank_deficient_update_leaves_its_null_space_alone():
    g = torch.Generator().manual_seed(3)
    tbar = torch.randn(6, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64)  # rank 2
    tau = torch.randn(6, 6, generator=g, dtype=F64)
    U, s, Vh = torch.linalg.svd(tbar)
    QL = torch.eye(6, dtype=F64) - U[:, :2] @ U[:, :2].mT
    QR = torch.eye(6, dtype=F64) - Vh[:2].mT @ Vh[:2]
    for alpha in (0.1, 0.5, 0.9):
        P, info = project(tbar, tau, alpha=alpha)
        assert info["rank"] == 2 and info["r"] <= 2
        _close(QL @ P @ QR, QL @ tau @ QR, 1e-12)  # null x null components untouched
        assert abs(float((P * tbar).sum())) < 1e-12 * float(tau.norm() * tbar.norm())
        _close(project(tbar, P, alpha=alpha)[0], P, 1e-12)
        bad, _ = project(tbar, tau, alpha=alpha, robust=False)
        assert not torch.allclose(QL @ bad @ QR, QL @ tau @ QR, atol=1e-6)  # reference deletes some
        assert abs(float((bad * tbar).sum())) < 1e-10 * float(tau.norm() * tbar.norm())


def test_robust_equals_reference_for_full_rank():
    g = torch.Generator().manual_seed(4)
    tbar, tau = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, 5, generator=g, dtype=F64)
    for alpha in (0.1, 0.5, 0.9):
        assert torch.equal(project(tbar, tau, alpha=alpha)[0], project(tbar, tau, alpha=alpha, robust=False)[0])


def test_lambda_guards_no_nan():
    base = {B: torch.zeros(3, dtype=F64)}
    zeros = [{B: torch.zeros(3, dtype=F64)} for _ in range(3)]
    hist: list = []
    out = opcm_merge(base, zeros, history=hist)
    assert torch.equal(out[B], torch.zeros(3, dtype=F64)) and [h["lambda"] for h in hist] == [1.0, 1.0, 1.0]
    cancel = [{B: _t([1.0, 2, 0])}, {B: _t([-1.0, -2, 0])}]  # Delta = 0 while nu > 0
    out = opcm_merge(base, cancel)
    assert torch.equal(out[B], torch.zeros(3, dtype=F64))
    steps, scal, _ = _sequential(base, cancel)
    assert scal[1]["lambda"] == 1.0 and torch.equal(steps[1][B], torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="not finite"):
        opcm_merge(base, [{B: _t([1.0, 0, 0])}, {B: _t([math.nan, 0, 0])}])


# -- D3: the loop -----------------------------------------------------------------------------------


def _toy(W_=None, b=None):
    return {W: torch.zeros(3, 3, dtype=F64) if W_ is None else _t(W_),
            B: torch.zeros(3, dtype=F64) if b is None else _t(b)}


BASE = _toy()


def test_orthogonal_linear_inputs_sum_then_divide_by_sqrt_t():
    r7 = math.sqrt(7)
    m1 = _toy([[3, 0, 0], [0, 2, 0], [0, 0, 1]])
    m2 = _toy([[0, r7, 0], [r7, 0, 0], [0, 0, 0]])
    hist: list = []
    out = opcm_merge(BASE, [m1, m2], history=hist)
    assert hist[1]["lambda"] == pytest.approx(math.sqrt(2), abs=1e-12)
    assert hist[1]["proj_norms"][W] == pytest.approx(math.sqrt(14), abs=1e-12)  # P(tau_2) = tau_2
    _close(out[W], [[2.121320, 1.870829, 0], [1.870829, 1.414214, 0], [0, 0, 0.707107]], 1e-6)
    assert _norm(out) == pytest.approx(math.sqrt(14), abs=1e-12)


def test_bias_only_orthogonal():
    models = [_toy(b=[1.0 if j == i else 0.0 for j in range(3)]) for i in range(3)]
    hist: list = []
    out = opcm_merge(BASE, models, history=hist)
    assert [h["lambda"] for h in hist] == pytest.approx([1, math.sqrt(2), math.sqrt(3)], abs=1e-12)
    _close(out[B], [0.577350] * 3, 1e-6)
    _close(out[W], torch.zeros(3, 3))


def test_duplicate_model_is_deleted_by_the_projection():
    m = _toy([[3, 0, 0], [0, 2, 0], [0, 0, 1]])
    hist: list = []
    out = opcm_merge(BASE, [m, m], history=hist)
    assert hist[1]["lambda"] == pytest.approx(1.0, abs=1e-12)
    _close(out[W], torch.diag(_t([3.0, 2, 1])), 1e-12)
    # with a bias, the bias doubles while W does not
    mb = _toy([[3, 0, 0], [0, 2, 0], [0, 0, 1]], [0, 0, math.sqrt(14)])
    hist = []
    out = opcm_merge(BASE, [mb, mb], history=hist)
    assert hist[1]["lambda"] == pytest.approx(math.sqrt(70 / 28), abs=1e-12)
    assert hist[1]["lambda"] == pytest.approx(1.581139, abs=1e-6)
    _close(out[W], torch.diag(_t([1.897367, 1.264911, 0.632456])), 1e-6)
    _close(out[B], [0, 0, 4.732864], 1e-6)
    assert _norm(out) == pytest.approx(math.sqrt(28), abs=1e-12)


M1 = _toy([[3, 0, 0], [0, 2, 0], [0, 0, 1]], [1, 0, 0])
M2 = _toy([[1, 1, 0], [1, 0, 0], [0, 0, 0]], [0, 1, 0])
M3 = _toy([[0, 0, 2], [0, 1, 0], [1, 0, 0]], [0, 0, 1])


def test_three_step_golden_default():
    hist: list = []
    out = opcm_merge(BASE, [M1, M2, M3], history=hist)
    h2, h3 = hist[1], hist[2]
    assert h2["ranks"][W] == 1 and h2["proj_norms"][W] == pytest.approx(1.414214, abs=1e-6)
    assert h2["nu"] == pytest.approx(2.936492, abs=1e-6) and h2["lambda"] == pytest.approx(1.444799, abs=1e-6)
    two = opcm_merge(BASE, [M1, M2])
    _close(torch.linalg.svdvals(two[W]), [2.5042, 0.9565, 0.6921], 1e-4)
    assert h3["ranks"][W] == 0 and h3["proj_norms"][W] == pytest.approx(2.323790, abs=1e-6)
    assert h3["nu"] == pytest.approx(2.839578, abs=1e-6) and h3["lambda"] == pytest.approx(1.739567, abs=1e-6)
    _close(out[W], [[1.494625, 0.689827, 1.149712], [0.689827, 1.379654, 0], [0.574856, 0, 0.574856]], 1e-6)
    _close(out[B], [0.574856] * 3, 1e-6)
    assert _norm(out) == pytest.approx((math.sqrt(15) + 2 + math.sqrt(7)) / 3, abs=1e-12)


def test_three_step_golden_no_diagonal_zeroing():
    hist: list = []
    out = opcm_merge(BASE, [M1, M2, M3], history=hist, zero_diagonal=False)
    assert hist[2]["lambda"] == pytest.approx(1.896466, abs=1e-6)
    _close(out[W], [[1.581889, 0.527296, 1.054593], [0.527296, 1.581889, 0], [0.527296, 0, 0.527296]], 1e-6)
    _close(out[B], [0.527296] * 3, 1e-6)


def test_three_step_golden_alpha_09():
    hist: list = []
    out = opcm_merge(BASE, [M1, M2, M3], history=hist, alpha=0.9)
    assert [hist[1]["ranks"][W], hist[2]["ranks"][W]] == [2, 2]
    assert [h["lambda"] for h in hist[1:]] == pytest.approx([1.362170, 1.651800], abs=1e-6)
    _close(out[W], [[1.8162, 0, 1.2108], [0, 1.2108, 0], [0.6054, 0, 0.6054]], 1e-4)


@pytest.mark.parametrize("kw", [{}, {"zero_diagonal": False}, {"alpha": 0.9}])
def test_three_step_sequential_matches_reference_and_goldens(kw):
    ref_hist: list = []
    ref = opcm_merge(BASE, [M1, M2, M3], history=ref_hist, **kw)
    steps, scal, state = _sequential(BASE, [M1, M2, M3], **kw)
    for t in range(3):
        assert scal[t]["lambda"] == pytest.approx(ref_hist[t]["lambda"], abs=1e-12)
        assert scal[t]["nu"] == pytest.approx(ref_hist[t]["nu"], abs=1e-12)
        assert scal[t]["t"] == t + 1
        _close(steps[t][W], opcm_merge(BASE, [M1, M2, M3][: t + 1], **kw)[W], 1e-12)
    _close(steps[2][W], ref[W], 1e-12)
    _close(steps[2][B], ref[B], 1e-12)
    # the state is the UN-normalised sum: state = lambda_T * (merged - base)
    _close(state[W], scal[2]["lambda"] * ref[W], 1e-12)
    assert scal[2]["merged_norm"] == pytest.approx(scal[2]["lambda"] * scal[2]["nu"], abs=1e-12)


# -- loop invariants --------------------------------------------------------------------------------


NAMES = {
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.mlp.up_proj.weight": (8, 5),
    "model.layers.0.mlp.down_proj.weight": (5, 8),
    "model.layers.0.mlp.down_proj.bias": (5,),
    "model.norm.weight": (6,),
    "model.embed_tokens.weight": (10, 6),
    "visual.conv1.weight": (4, 3, 2, 2),
}


def _random_models(n, dtype=F64, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g, dtype=dtype) for k, s in NAMES.items()}
    base["model.position_ids"] = torch.arange(6)
    models = []
    for _ in range(n):
        m = {k: v + scale * torch.randn(*v.shape, generator=g, dtype=dtype) for k, v in base.items() if v.is_floating_point()}
        m["model.position_ids"] = torch.arange(6) + 100  # must be ignored
        models.append(m)
    return base, models


def _float(d):
    return {k: v for k, v in d.items() if v.is_floating_point()}


def test_sequential_equals_reference_every_step_float64():
    base, models = _random_models(4)
    fbase = _float(base)
    steps, scal, state = _sequential(fbase, [_float(m) for m in models])
    ref_hist: list = []
    opcm_merge(base, models, history=ref_hist)
    for t in range(1, 5):
        ref = opcm_merge(base, models[:t])
        assert torch.equal(ref["model.position_ids"], base["model.position_ids"])
        for k in fbase:
            _close(steps[t - 1][k], ref[k], 1e-12)
        assert scal[t - 1]["lambda"] == pytest.approx(ref_hist[t - 1]["lambda"], abs=1e-12)
        assert scal[t - 1]["projected_norm"] == pytest.approx(ref_hist[t - 1]["projected_norm"], abs=1e-12)
        assert scal[t - 1]["nu"] == pytest.approx(ref_hist[t - 1]["nu"], abs=1e-12)
        # ||merged - base|| = mean task-vector norm, after every step
        mean_norm = sum(_norm({k: models[i][k] - base[k] for k in fbase}) for i in range(t)) / t
        assert _norm({k: steps[t - 1][k] - fbase[k] for k in fbase}) == pytest.approx(mean_norm, rel=1e-12)
    assert scal[3]["projected_tensors"] == 3  # three linear weights; embedding, bias, norm, conv are not
    assert set(scal[3]) == set(scal[0])  # constant-size scalars
    for k, v in state.items():
        assert v.shape == fbase[k].shape


def test_sequential_equals_reference_float32():
    base, models = _random_models(3, dtype=torch.float32, seed=5)
    steps, _, _ = _sequential(_float(base), [_float(m) for m in models])
    ref = opcm_merge(base, models)
    ref64 = opcm_merge({k: v.double() if v.is_floating_point() else v for k, v in base.items()},
                       [{k: v.double() if v.is_floating_point() else v for k, v in m.items()} for m in models])
    for k in _float(base):
        assert ref[k].dtype == torch.float32
        _close(steps[2][k], ref[k], 1e-5)
        _close(ref[k], ref64[k], 1e-5)


def test_first_model_copied_unchanged():
    base, models = _random_models(1, dtype=torch.float32, seed=6)
    out = opcm_merge(base, models)
    for k, v in models[0].items():
        if k != "model.position_ids":
            assert torch.equal(out[k], v) and out[k] is not v
    assert torch.equal(out["model.position_ids"], base["model.position_ids"])
    fb = _float(base)
    taus = {k: models[0][k] - fb[k] for k in fb}
    params = _params()
    for k in fb:
        S, stats = _fold(k, None, taus[k], 1, params)
        assert torch.equal(S, taus[k]) and S is not taus[k]
        assert stats["projected"] == 0.0
    scal = FOLD.reduce({"tau_sq": 4.0, "sum_sq": 4.0, "proj_sq": 4.0}, {}, 1, params)
    assert scal["lambda"] == 1.0 and scal["nu"] == 2.0 and scal["norm_sum"] == 2.0 and scal["t"] == 1
    q = taus["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(_export(q, scal, params), q)  # lambda_1 = 1 exactly


def test_identity_path_only_model_is_rescaled_task_arithmetic():
    base, models = _random_models(3, seed=7)
    ident = {k: v for k, v in base.items() if v.dim() != 2 or "embed" in k}
    ms = [{k: m[k] for k in ident} for m in models]
    out = opcm_merge(ident, ms)
    fk = [k for k in ident if ident[k].is_floating_point()]
    taus = [{k: m[k] - ident[k] for k in fk} for m in ms]
    total = {k: sum(t[k] for t in taus) for k in fk}
    nu = sum(_norm(t) for t in taus) / 3
    for k in fk:
        _close(out[k], ident[k] + total[k] * nu / _norm(total), 1e-12)


def test_resume_from_saved_state_is_bit_identical(tmp_path):
    from safetensors.torch import load_file, save_file

    base, models = _random_models(3, dtype=torch.float32, seed=8)
    fbase = _float(base)
    models = [_float(m) for m in models]
    _, _, state_full = _sequential(fbase, models)
    # interrupted after 2: state tensors through safetensors, scalars through JSON
    params = _params()
    _, scal2, state2 = _sequential(fbase, models[:2])
    save_file({k: v.contiguous() for k, v in state2.items()}, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(scal2[-1]))
    loaded = load_file(str(tmp_path / "s.safetensors"))
    scalars = json.loads((tmp_path / "s.json").read_text())
    acc: dict[str, float] = {}
    resumed = {}
    for k in fbase:
        resumed[k], st = _fold(k, loaded[k], models[2][k] - fbase[k], 3, params)
        for a, v in st.items():
            acc[a] = acc.get(a, 0.0) + v
    scal3 = FOLD.reduce(acc, scalars, 3, params)
    for k in fbase:
        assert torch.equal(resumed[k], state_full[k])
        assert torch.equal(_export(resumed[k], scal3, params),
                           _export(state_full[k], json.loads(json.dumps(scal3)), params))


def test_order_matters_but_norm_is_nu():
    base, models = _random_models(3, seed=9, scale=1.0)
    a = opcm_merge(base, models)
    b = opcm_merge(base, models[::-1])
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(a[k], b[k], atol=1e-6)
    fk = list(_float(base))
    assert _norm({n: a[n] - base[n] for n in fk}) == pytest.approx(_norm({n: b[n] - base[n] for n in fk}), rel=1e-12)


def test_sequential_protocol_errors():
    p = _params()
    x = torch.ones(3, 3, dtype=F64)
    with pytest.raises(ValueError, match="no stored state"):
        _fold(W, None, x, 2, p)
    with pytest.raises(ValueError, match="stored state at step 1"):
        _fold(W, x, x, 1, p)
    with pytest.raises(ValueError, match="shape"):
        _fold(W, torch.ones(3, 2, dtype=F64), x, 2, p)
    with pytest.raises(ValueError, match="scalars of step 1"):
        FOLD.reduce({"tau_sq": 1.0, "sum_sq": 1.0}, {}, 2, p)


# -- projectable rule (B5) --------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,expected", [
    ("model.layers.0.self_attn.q_proj.weight", (4, 4), True),
    ("vision_model.encoder.layers.0.mlp.fc1.weight", (8, 4), True),
    ("transformer.resblocks.0.attn.in_proj_weight", (12, 4), True),  # open_clip packed qkv
    ("lm_head.weight", (10, 4), True),
    ("gpt_neox.embed_out.weight", (10, 4), True),  # output head, a linear map
    ("model.layers.0.self_attn.q_proj.bias", (4,), False),
    ("model.norm.weight", (4,), False),
    ("model.embed_tokens.weight", (10, 4), False),
    ("vision_model.embeddings.position_embedding.weight", (5, 4), False),  # 2-D but an Embedding
    ("transformer.wte.weight", (10, 4), False),
    ("transformer.wpe.weight", (10, 4), False),
    ("shared.weight", (10, 4), False),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4), False),
    ("text_projection", (4, 4), False),  # a bare parameter, not '...weight'
    ("visual.conv1.weight", (4, 3, 2, 2), False),
    ("vision_model.embeddings.class_embedding", (4,), False),
])
def test_projectable_rule(name, shape, expected):
    assert is_projectable(name, torch.zeros(shape)) is expected


def test_projectable_rule_non_float_and_override():
    assert not is_projectable("a.weight", torch.zeros(3, 3, dtype=torch.int64))
    p = _params(projectable=r"embed_tokens|text_projection")
    assert is_projectable("model.embed_tokens.weight", torch.zeros(4, 4), p)
    assert is_projectable("text_projection", torch.zeros(4, 4), p)
    assert not is_projectable("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 4), p)
    assert not is_projectable("model.embed_tokens.weight", torch.zeros(4), p)  # still 2-D only


def test_embedding_takes_identity_path_in_the_loop():
    E = "model.embed_tokens.weight"
    base = {E: torch.zeros(3, 3, dtype=F64), W: torch.zeros(3, 3, dtype=F64)}
    m = {E: torch.diag(_t([3.0, 2, 1])), W: torch.diag(_t([3.0, 2, 1]))}
    out = opcm_merge(base, [m, m])  # W duplicate is deleted, the embedding is summed
    lam = math.sqrt(14 + 56) / math.sqrt(28)
    _close(out[E], 2 * m[E] / lam, 1e-12)
    _close(out[W], m[W] / lam, 1e-12)
    both = opcm_merge(base, [m, m], projectable=r"weight$")  # now both are projected
    _close(both[E], m[E], 1e-12)
    _close(both[W], m[W], 1e-12)
    steps, _, _ = _sequential(base, [m, m], projectable=r"weight$")
    _close(steps[1][E], m[E], 1e-12)


# -- registry ---------------------------------------------------------------------------------------


def test_registered_operator():
    op = registry.get("opcm")
    assert op is opcm_mod.OPERATOR and op.fold is not None and op.fold.reduce is not None and not op.merges_one_tensor_alone and op.reads == "deltas" and op.input_kind == "dense"
    assert _params() == {"alpha": 0.5, "zero_diagonal": True, "robust": True, "projectable": None,
                         "svd_dtype": "float32"}
    with pytest.raises(ValueError):
        op.resolve_params({"alpha": 1.5})
    with pytest.raises(ValueError):
        op.resolve_params({"svd_dtype": "float16"})
    task = TensorTask(W, torch.zeros(3, 3), [torch.ones(3, 3)] * 2, _params(), [{}, {}])
    with pytest.raises(UserError, match="FOLD"):
        op.fn(task)


# -- integration: the protocol as continual.py drives it --------------------------------------------


def test_continual_state_matches_reference(tiny_models, tmp_path):
    from safetensors import safe_open

    from mergekit_ortho import continual

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    recipe = tmp_path / "opcm.yaml"
    recipe.write_text(f"merge_method: opcm\nbase_model: {tiny_models['base']}\n")
    state = tmp_path / "state"
    continual.init(state, recipe)
    for m in "abc":
        continual.add(state, str(tiny_models[m]), name=m)
    st = continual.State.load(state)
    sc = st.data["scalars"]
    assert sc["t"] == 3 and sc["projected_tensors"] == 15  # 7 linear weights x 2 layers + lm_head
    continual.export(state, tmp_path / "out")
    got = load(tmp_path / "out")
    base = load(tiny_models["base"])
    hist: list = []
    ref = opcm_merge(base, [load(tiny_models[m]) for m in "abc"], history=hist)
    assert sc["lambda"] == pytest.approx(hist[-1]["lambda"], rel=1e-6)
    stored = load(st.tensor_dir)
    for k in base:
        assert stored[k].shape == base[k].shape and stored[k].dtype == torch.float32
        _close(got[k], ref[k], 1e-5)
