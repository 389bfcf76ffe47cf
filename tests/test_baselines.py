"""Golden numbers and invariants of the baseline operators (spec magmax_opcm_baselines.md C, D4)."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask
from mergekit_ortho.ops.sparsify import magnitude_trim


def run_op(name, inputs, params=None, model_params=None, tensor="t", base=None):
    op = registry.get(name)
    mps = [op.resolve_model_params(mp, f"m{i}") for i, mp in enumerate(model_params or [{}] * len(inputs))]
    task = TensorTask(tensor, base, [x.clone() for x in inputs], op.resolve_params(params or {}), mps)
    return op.fn(task)


def run_stream(name, inputs, params=None, model_params=None, tensor="t"):
    op = registry.get(name)
    mps = [op.resolve_model_params(mp, f"m{i}") for i, mp in enumerate(model_params or [{}] * len(inputs))]
    task = TensorTask(tensor, None, [], op.resolve_params(params or {}), mps)
    state = op.fold.start(task)
    for i, x in enumerate(inputs):
        state = op.fold.step(state, x.clone(), i, task)
    return op.fold.finish(state, task)


D4 = torch.tensor([[3.0, -1, 2, 0], [-2, -2, -1, 1], [1, 3, -4, 0]], dtype=torch.float64)


def test_ties_no_trim_dis_mean_golden():
    out = run_op("ties", list(D4))
    assert torch.equal(out, torch.tensor([2.0, 3, -2.5, 1], dtype=torch.float64))


def test_ties_no_trim_dis_sum_golden():
    out = run_op("ties", list(D4), {"normalize": False})
    assert torch.equal(out, torch.tensor([4.0, 3, -5, 1], dtype=torch.float64))


def test_ties_trim_reference_rule_keeps_one_more():
    x = torch.tensor([4.0, -3, 2, 1])
    assert torch.equal(magnitude_trim(x, 0.5, "kthvalue"), torch.tensor([4.0, -3, 2, 0]))
    assert torch.equal(magnitude_trim(x, 0.5, "topk"), torch.tensor([4.0, -3, 0, 0]))
    # d = 10, K = 20 %: the reference keeps int(d*K) + 1 = 3 entries, mergekit's topk keeps 2
    y = torch.arange(1.0, 11.0)
    assert int((magnitude_trim(y, 0.2, "kthvalue") != 0).sum()) == 3
    assert int((magnitude_trim(y, 0.2, "topk") != 0).sum()) == 2


def test_ties_identity_all_equal_no_trim():
    tau = torch.randn(5, 7, dtype=torch.float64)
    out = run_op("ties", [tau, tau, tau])
    assert torch.allclose(out, tau, atol=1e-12)


def test_ties_weights_and_lambda_match_mergekit_formula():
    torch.manual_seed(0)
    taus = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    out = run_op("ties", taus, {"lambda": 0.7}, [{"weight": wi, "density": 0.4} for wi in w])
    # independent re-derivation: top int(0.4*30)=12 magnitudes, weighted, sign of sum >= 0 positive
    trimmed = []
    for t, wi in zip(taus, w):
        flat = t.flatten()
        keep = flat.abs().argsort(descending=True)[:12]
        m = torch.zeros_like(flat)
        m[keep] = 1
        trimmed.append((flat * m).reshape(t.shape) * wi)
    s = torch.stack(trimmed)
    sign = torch.where(s.sum(0) >= 0, 1.0, -1.0).to(s.dtype)
    mask = s.sign() == sign
    mixed = (s * mask).sum(0)
    div = (torch.tensor(w, dtype=s.dtype).view(3, 1, 1) * mask).sum(0)
    div[div == 0] = 1
    assert torch.allclose(out, 0.7 * mixed / div, atol=1e-12)


def test_linear_golden_and_normalisation():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(run_op("linear", [a, b]), torch.tensor([2.0, 4.0]))
    # [2,1] and [10,5] are the same merge when normalized, different when not
    w21 = run_op("linear", [a, b], model_params=[{"weight": 2}, {"weight": 1}])
    w105 = run_op("linear", [a, b], model_params=[{"weight": 10}, {"weight": 5}])
    assert torch.allclose(w21, w105) and torch.allclose(w21, (2 * a + b) / 3)
    raw = run_op("linear", [a, b], {"normalize": False}, [{"weight": 2}, {"weight": 1}])
    assert torch.allclose(raw, 2 * a + b)


def test_linear_all_equal_returns_input_and_order_invariant():
    torch.manual_seed(1)
    x = torch.randn(4, 4)
    assert torch.allclose(run_op("linear", [x, x, x]), x, atol=1e-6)
    xs = [torch.randn(4, 4) for _ in range(4)]
    w = [{"weight": v} for v in (0.1, 0.2, 0.3, 0.4)]
    fwd = run_op("linear", xs, model_params=w)
    rev = run_op("linear", xs[::-1], model_params=w[::-1])
    assert torch.allclose(fwd, rev, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
def test_stream_fold_equals_batch(name):
    torch.manual_seed(2)
    xs = [torch.randn(3, 5) for _ in range(3)]
    mp = [{"weight": v} for v in (0.3, -0.5, 1.5)]
    assert torch.equal(run_op(name, xs, model_params=mp), run_stream(name, xs, model_params=mp))


def test_task_arithmetic_lambda_one_over_t_is_average():
    torch.manual_seed(3)
    taus = [torch.randn(3, 3, dtype=torch.float64) for _ in range(4)]
    out = run_op("task_arithmetic", taus, {"lambda": 0.25})
    assert torch.allclose(out, torch.stack(taus).mean(0), atol=1e-12)


def test_dare_is_seeded_per_tensor_and_model():
    torch.manual_seed(4)
    taus = [torch.randn(50, 40) for _ in range(2)]
    mp = [{"density": 0.3}] * 2
    a = run_op("dare_linear", taus, {"seed": 7}, mp, tensor="layer.0.w")
    b = run_op("dare_linear", taus, {"seed": 7}, mp, tensor="layer.0.w")
    c = run_op("dare_linear", taus, {"seed": 8}, mp, tensor="layer.0.w")
    d = run_op("dare_linear", taus, {"seed": 7}, mp, tensor="layer.1.w")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_dare_rescale_preserves_expectation_and_density():
    # Changed with the move to mergekit >= 0.1.0's rescale (mergekit_compat.md M15 step 3, B5):
    # survivors are multiplied by the L1 ratio |tau|_1 / |tau~|_1 = n / kept, not divided by the
    # density, so they equal n / kept (about 1 / density) and the mean is exactly preserved.
    torch.manual_seed(5)
    tau = torch.ones(200_000)
    out = run_op("dare_linear", [tau], {"seed": 1}, [{"density": 0.25}])
    n_kept = int((out != 0).sum())
    assert abs(n_kept / tau.numel() - 0.25) < 0.01
    ratio = torch.tensor(tau.numel() / n_kept, dtype=torch.float32)
    assert torch.equal(out[out != 0], torch.full((n_kept,), float(ratio)))
    assert abs(out.double().sum().item() - tau.numel()) < 1e-3 * tau.numel() * 1e-3
    no_rescale = run_op("dare_linear", [tau], {"seed": 1, "rescale": False}, [{"density": 0.25}])
    assert torch.equal(no_rescale != 0, out != 0) and no_rescale.max().item() == 1.0


def test_dare_ties_density_one_equals_ties():
    taus = list(D4)
    assert torch.equal(run_op("dare_ties", taus, {"normalize": True}), run_op("ties", taus))


def test_unknown_method_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        registry.get("tie")


def test_parameter_validation_messages():
    op = registry.get("ties")
    with pytest.raises(ValueError, match="unknown parameter 'lamda'.*'lambda'"):
        op.resolve_params({"lamda": 1})
    with pytest.raises(ValueError, match="must be a number"):
        op.resolve_params({"lambda": "big"})
    with pytest.raises(ValueError, match="must be <= 1"):
        op.resolve_model_params({"density": 1.5}, "m")


# --- exact top-k trimming: the deterministic tie rule, the radix fast path, in-place operators ---

import numpy as np  # noqa: E402

from mergekit_ortho.ops.kernels import _chunks, dare_drop, topk  # noqa: E402
from mergekit_ortho.ops.registry import generator  # noqa: E402
from mergekit_ortho.ops.sparsify import l1_norm, random_drop  # noqa: E402


def brute_order(x: torch.Tensor) -> torch.Tensor:
    """Flat indices by decreasing magnitude, equal magnitudes by increasing index (a full sort)."""
    mags = x.reshape(-1).abs().double().numpy()
    return torch.from_numpy(np.lexsort((np.arange(mags.size), -mags)).copy())  # last key primary


def brute_trim(x: torch.Tensor, density: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """The spec rule by brute force: order by (-|x|, flat index), keep the first max(int(d*n), 1)."""
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x.clone()
    if density <= 0.0:  # changed: density 0 keeps nothing (mergekit_compat.md M15.1; it kept one)
        return torch.zeros_like(x)
    k = max(int(density * n), 1)
    order = brute_order(x) if order is None else order
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, x.reshape(-1), torch.zeros((), dtype=x.dtype)).reshape(x.shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal including the sign of zeros (torch.equal treats -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[a.dtype]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _trim_inputs():
    g = torch.Generator().manual_seed(10)
    yield "randn", torch.randn(1000, generator=g)
    yield "tiny1", torch.tensor([-2.0])
    yield "tiny2", torch.tensor([0.5, -0.5])
    yield "ties_small_int", torch.randint(-3, 4, (37, 29), generator=g).float()  # zeros and ties
    yield "signed_zeros", torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, 0.0, -0.0])
    yield "all_zero", torch.zeros(64)
    yield "all_neg_zero", torch.full((50,), -0.0)
    yield "all_equal_mag", torch.tensor([1.5, -1.5] * 40)
    yield "subnormal_and_huge", torch.tensor([1e-45, -1e-45, 3e38, -3e38, 1e-40, 0.0, -1e-40, 7.0])
    yield "inf", torch.tensor([float("inf"), 1.0, -float("inf"), 2.0, 0.0, -3.0])
    yield "quantised", (torch.randn(5000, generator=g) * 8).round() / 8  # bf16-delta-like ties
    yield "float64_ties", torch.randint(-2, 3, (301,), generator=g).double()
    yield "float64_randn", torch.randn(17, 13, generator=g, dtype=torch.float64)
    yield "bf16", (torch.randn(999, generator=g) * 4).round().to(torch.bfloat16)
    yield "fp16", torch.randn(700, generator=g).to(torch.float16)


DENSITIES = (0.0, 1e-6, 0.01, 0.1, 0.25, 0.5, 0.7, 0.99, 0.999999, 1.0)


@pytest.mark.parametrize("path", ["sort", "radix", "radix_pivot", "radix_chunked"])
@pytest.mark.parametrize("name,x", list(_trim_inputs()), ids=[n for n, _ in _trim_inputs()])
def test_topk_trim_equals_brute_force_tie_rule(monkeypatch, path, name, x):
    if path != "sort":  # every size through the radix select
        monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 1)
    if path != "radix":  # try the pivot on any level-1 bucket holding >= 1/32 of the entries
        monkeypatch.setattr(topk, "PIVOT_MIN", 1)
    if path == "radix_chunked":  # the chunked passes split into many small steps
        monkeypatch.setattr(_chunks, "CHUNK", 7)
    before = x.clone()
    order = brute_order(x)
    for d in DENSITIES:
        got = magnitude_trim(x, d, "topk")
        assert bits_equal(got, brute_trim(x, d, order)), (name, d)
        if d < 1.0:
            assert int((got != 0).sum()) <= max(int(d * x.numel()), 1)
    assert bits_equal(x, before)  # the public function never writes its input


@pytest.mark.parametrize("pivot", [True, False, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_trim_radix_large_random_and_ties(monkeypatch, dtype, pivot):
    """pivot True/False: the radix select (the path of other devices) with and without its pivot
    test; None: the CPU's partition select."""
    tried = []
    if pivot is not None:
        monkeypatch.setattr(topk, "CPU_SELECT", "radix")
    if pivot:  # record the pivot tests, to check that the heavy tensor takes (and passes) one
        real = topk.pivot_threshold
        monkeypatch.setattr(topk, "pivot_threshold",
                            lambda *a: tried.append(real(*a)) or tried[-1])
    elif pivot is False:
        monkeypatch.setattr(topk, "PIVOT_MIN", 1 << 62)
    # well above the default radix size (the default configuration takes the fast path), with
    # realistic bucket sizes
    n = max(topk.RADIX_MIN_NUMEL, 1 << 19) + 12_345
    g = torch.Generator().manual_seed(11)
    cont = torch.randn(n, generator=g, dtype=dtype)
    ties = torch.randint(-40, 41, (n,), generator=g).to(dtype) / 16  # ~40 distinct magnitudes
    ties[::7] = -0.0
    # bf16-delta-like: one magnitude fills most of its level-1 bucket, a few neighbours share it
    heavy = (torch.randn(n, generator=g, dtype=dtype) * 0.01).to(torch.bfloat16).to(dtype)
    heavy[::101] += 2.0 ** -20
    for x in (cont, ties, heavy):
        order = brute_order(x)
        for d in (0.0, 0.013, 0.5, 0.8765):
            assert bits_equal(magnitude_trim(x, d), brute_trim(x, d, order)), (d, x is ties)
    assert not pivot or any(r is not None for r in tried)


def test_topk_trim_same_set_as_topk_when_magnitudes_distinct():
    # without ties at the threshold the kept set is topk's, on both paths
    g = torch.Generator().manual_seed(12)
    for n in (500, topk.RADIX_MIN_NUMEL + 3, (1 << 20) + 3):
        x = torch.randn(n, generator=g)
        k = n // 3
        idx = torch.topk(x.abs(), k).indices
        ref = torch.zeros_like(x)
        ref[idx] = x[idx]
        assert bits_equal(magnitude_trim(x, k / n), ref)


def test_topk_trim_shapes_and_noncontiguous():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(40, 30, generator=g).t()  # non-contiguous view
    out = magnitude_trim(x, 0.3)
    assert out.shape == x.shape
    assert bits_equal(out.contiguous(), brute_trim(x.contiguous(), 0.3))
    assert magnitude_trim(torch.empty(0), 0.5).numel() == 0


# DARE draws recorded from the implementation before the in-place rewrite (same generator, same
# draws in the same order): the masks and values must not change.
DARE_X = torch.linspace(-1.5, 1.25, 12).reshape(3, 4)
DARE_DROP = [-3.75, 0.0, -2.5, 0.0, 0.0, -0.625, 0.0, 0.0, 0.0, 1.875, 2.5, 3.125]
DARE_DROP_NO_RESCALE = [-1.5, 0.0, -1.0, 0.0, 0.0, -0.25, 0.0, 0.0, 0.0, 0.75, 1.0, 1.25]
DARE_XS = [torch.linspace(-1, 1, 10) * (i + 1) * (-1) ** i + 0.1 * i for i in range(3)]
# DARE_LINEAR / DARE_TIES changed with the L1 rescale (mergekit >= 0.1.0, mergekit_compat.md M15
# step 3): the masks are the same draws (DARE_DROP above checks them), the survivors are now
# multiplied by |tau|_1 / |tau~|_1 instead of divided by the density. Recorded from the new
# implementation after test_operators_match_plain_reference re-derived it.
DARE_LINEAR = [1.465116262435913, -0.9074074029922485, 0.11929376423358917, 0.02971579134464264,
               -0.05986218899488449, 0.12962961196899414, -0.23901809751987457, -0.9767441749572754,
               0.9074074029922485, -1.6744184494018555]
DARE_TIES = [-4.069767475128174, -1.4403291940689087, -1.4298889636993408, -0.8156499862670898,
             -0.2014111578464508, 0.20576129853725433, 1.0270664691925049, 2.7131783962249756,
             1.4403291940689087, 4.651162624359131]


@pytest.mark.parametrize("chunk", [None, 5])
def test_dare_draws_unchanged(monkeypatch, chunk):
    if chunk:  # the draws taken in several chunks from the one generator: still the same numbers
        monkeypatch.setattr(_chunks, "CHUNK", chunk)
    x = DARE_X.clone()
    out = random_drop(x, 0.4, generator(11, "blk.3.w\x000"))
    assert torch.equal(out.flatten(), torch.tensor(DARE_DROP)) and out.shape == (3, 4)
    out = random_drop(x, 0.4, generator(11, "blk.3.w\x000"), rescale=False)
    assert torch.equal(out.flatten(), torch.tensor(DARE_DROP_NO_RESCALE))
    assert torch.equal(x, DARE_X)  # input untouched
    dl = run_op("dare_linear", DARE_XS, {"seed": 3, "lambda": 0.9},
                [{"density": 0.5, "weight": 0.7}, {"density": 0.3, "weight": 1.0},
                 {"density": 0.8, "weight": -0.4}], tensor="a.b")
    assert torch.equal(dl, torch.tensor(DARE_LINEAR))
    dt = run_op("dare_ties", DARE_XS, {"seed": 3, "normalize": True},
                [{"density": 0.5, "weight": 0.7}, {"density": 0.3, "weight": 1.0},
                 {"density": 0.8, "weight": 0.4}], tensor="a.b")
    assert torch.equal(dt, torch.tensor(DARE_TIES))


def reference_merge(taus, mps, params, sparsify, tensor):
    """Plain re-derivation of ties / dare_* from the module docstring (no in-place tricks)."""
    ds = []
    for i, (t, mp) in enumerate(zip(taus, mps)):
        dens, w = mp.get("density", 1.0), mp.get("weight", 1.0)
        if sparsify == "magnitude":
            y = brute_trim(t, dens)
        elif dens >= 1.0:
            y = t.clone()
        else:
            u = torch.rand(t.shape, generator=generator(params.get("seed", 0), f"{tensor}\x00{i}"))
            y = torch.where(u < dens, t, torch.zeros((), dtype=t.dtype))
        # the L1 rescale (mergekit >= 0.1.0; this reference divided by the density before)
        if params.get("rescale", sparsify != "magnitude") and dens < 1.0:
            # the norms by the library's chunked float64 sum: the scale is then the same float, and
            # the rest must match bit for bit (test_gta checks l1_norm against abs().sum())
            before, after = l1_norm(t), l1_norm(y)
            if before >= 1e-7 and after >= 1e-7:
                y = y * (before / after)
        ds.append(y * w if w != 1.0 else y)
    weights = [mp.get("weight", 1.0) for mp in mps]
    if sparsify == "magnitude" or params.get("consensus", True):
        positive = sum(ds) >= 0  # sums in model order
        kept = [torch.where(positive, d > 0, d < 0) for d in ds]
        mixed = sum(torch.where(k, d, 0.0) for k, d in zip(kept, ds))
        div = sum(k.to(t.dtype) * w for k, w in zip(kept, weights))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = sum(ds[1:], ds[0])  # d_0 + d_1 + ... (a -0.0 sum stays -0.0)
        tw = float(sum(weights))
        div = 1.0 if abs(tw) < 1e-8 else tw
    normalize = params.get("normalize", sparsify == "magnitude")
    out = mixed / div if normalize else mixed
    return out * params.get("lambda", 1.0)


MIX_CASES = [
    ({}, [{"density": 0.5}] * 3),
    ({"lambda": 0.8, "normalize": False},
     [{"density": 0.3, "weight": 0.7}, {"density": 0.9, "weight": 1.3}, {"density": 0.2, "weight": -0.4}]),
    ({"normalize": True}, [{"density": 1.0, "weight": 0.3}, {"density": 0.6, "weight": 0.3},
                           {"density": 0.05, "weight": 0.3}]),
    ({"lambda": 1.5, "normalize": True},
     [{"density": 0.4, "weight": 1.0}, {"density": 0.4, "weight": -1.0}, {"density": 0.7, "weight": 2.0}]),
    ({"normalize": True}, [{"density": 0.5, "weight": 2.0}]),
    ({"normalize": True}, [{"density": 0.6}, {"density": 0.6}]),
]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("case", range(len(MIX_CASES)))
@pytest.mark.parametrize("shape,dtype,chunk", [
    ((23, 41), torch.float32, None),  # below the radix size: the sorting trim
    ((300, 250), torch.float32, None),  # radix trim, several default chunks
    ((300, 250), torch.float32, 997),
    ((31, 7), torch.float64, None),
    ((200, 120), torch.float64, 997),
])
def test_operators_match_plain_reference(monkeypatch, method, case, shape, dtype, chunk):
    if chunk:  # every chunked pass in many chunks, the last one partial
        monkeypatch.setattr(_chunks, "CHUNK", chunk)
        monkeypatch.setattr(topk, "PIVOT_MIN", 1)
    params, mps = MIX_CASES[case]
    g = torch.Generator().manual_seed(20 + case)
    taus = [torch.randn(shape, generator=g, dtype=dtype) * (i + 1) for i in range(len(mps))]
    taus[0].view(-1)[::5] = 0.0  # exact zeros and ties with zero
    taus[-1].view(-1)[1::9] = -0.0
    p = dict(params)
    if method != "ties":
        p["seed"] = 9
    out = run_op(method, taus, p, mps, tensor="w.q")
    ref = reference_merge(taus, mps, dict(p, consensus=method != "dare_linear"),
                          "magnitude" if method == "ties" else "random", "w.q")
    assert out.dtype == dtype and out.shape == shape
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert bits_equal(out, ref)  # the same operations in the same order: identical, zero signs too


def test_operators_may_consume_inputs_but_not_aliased_ones():
    g = torch.Generator().manual_seed(30)
    tau = torch.randn(50, 20, generator=g)
    want = run_op("ties", [tau, tau * -0.5, tau], {}, [{"density": 0.4}] * 3)
    # the same tensor object for two models must not be trimmed twice through in-place writes
    op = registry.get("ties")
    mps = [op.resolve_model_params({"density": 0.4}, f"m{i}") for i in range(3)]
    shared = tau.clone()
    task = TensorTask("t", None, [shared, tau * -0.5, shared], op.resolve_params({}), mps)
    assert bits_equal(op.fn(task), want)
    # a non-contiguous input is copied, not written through a view
    t2 = tau.t().contiguous().t()
    assert not t2.is_contiguous()
    task = TensorTask("t", None, [t2, tau * -0.5, tau.clone()], op.resolve_params({}), mps)
    assert bits_equal(op.fn(task), want) and torch.equal(t2, tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 1e-9, 0.3, 0.7, 0.5, 0.9999999])
def test_dare_keep_mask_is_torchs_comparison(dtype, density):
    # draws at, just below and just above float32(density), plus random ones
    d32 = torch.tensor(density, dtype=torch.float32)
    edge = torch.stack([d32, torch.nextafter(d32, torch.tensor(0.0)), torch.nextafter(d32, torch.tensor(1.0)),
                        torch.tensor(0.0), torch.tensor(0.99999994)])
    u = torch.cat([edge, torch.rand(2000, generator=torch.Generator().manual_seed(1))]).clamp(0, 0.99999994)
    x = torch.randn(u.numel(), generator=torch.Generator().manual_seed(2)).to(dtype)
    x[:4] = torch.tensor([float("nan"), -float("inf"), -0.0, -1.0], dtype=dtype)
    want = torch.where(u < density, x, torch.zeros((), dtype=dtype))
    got = x.clone()
    dare_drop.keep_below_(got, u.clone(), density)
    assert bits_equal(torch.nan_to_num(got), torch.nan_to_num(want))
    assert torch.equal(got.isnan(), want.isnan())


def test_trim_nan_counts_as_largest(monkeypatch):
    x = torch.tensor([1.0, float("nan"), 3.0, -2.0])
    for radix in (False, True):
        if radix:
            monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 1)
        out = magnitude_trim(x, 0.5)
        assert out.isnan().tolist() == [False, True, False, False] and out[[0, 2, 3]].tolist() == [0, 3, 0]
        out = magnitude_trim(x, 0.25)  # the threshold itself is the NaN
        assert out.isnan().tolist() == [False, True, False, False] and out[[0, 2, 3]].tolist() == [0, 0, 0]


def test_ties_nan_inputs_match_plain_reference():
    # a NaN in a task vector: the old formulation elects the negative sign there (NaN >= 0 is
    # false) and never keeps the NaN itself; the in-place version must do the same
    g = torch.Generator().manual_seed(40)
    taus = [torch.randn(60, generator=g) for _ in range(3)]
    taus[0][::7] = float("nan")
    taus[2][3::11] = float("inf")
    taus[1][5::13] = -float("inf")
    for params, mps in MIX_CASES[:4]:
        mps = [dict(mp, density=1.0) for mp in mps]
        out = run_op("ties", taus, params, mps)
        ref = reference_merge(taus, mps, dict(params, consensus=True), "magnitude", "t")
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
