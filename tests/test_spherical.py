"""nuslerp, multislerp, karcher: mergekit's golden numbers (../shared/specs/mergekit_compat.md M18,
M19, M20), their invariants, the spec's edge cases and errors, and recipe runs end to end."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask
from mergekit_ortho.ops.spherical import karcher_mean, nuslerp_pairs

B = torch.tensor([[0.5, -1, 2], [1.5, 0, -0.5]])
M1 = torch.tensor([[0.875, -1.25, 2.625], [1.375, 0.5, -1.25]])
M2 = torch.tensor([[0, -0.875, 2.3125], [1.75, -0.375, 0.375]])
M3 = torch.tensor([[0.6875, -1.625, 1.9375], [1.625, 0.3125, -0.0625]])


def run(name, base, inputs, params=None, weights=None):
    op = registry.get(name)
    mps = [op.resolve_model_params({} if w is None else {"weight": w}) for w in (weights or [None] * len(inputs))]
    return op.fn(TensorTask("w", base, [x.clone() for x in inputs], op.resolve_params(params or {}), mps))


def close(out, expect, rtol=1e-6, atol=2e-7):
    expect = torch.as_tensor(expect, dtype=out.dtype)
    return out.shape == expect.shape and torch.allclose(out, expect, rtol=rtol, atol=atol)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------- nuslerp (M18)

NUSLERP_GOLDEN = [  # merge_tensors([M1, M2], "nuslerp", weight [1, 3] -> t = 0.75)
    (None, {}, [1, 3], [[0.233086392, -1.00909936, 2.48614478], [1.71851635, -0.156573012, -0.0432153344]]),
    (None, {"nuslerp_flatten": False}, [1, 3],
     [[0.221931189, -0.977737963, 2.41191173], [1.84101593, -0.156756073, -0.0676347166]]),
    (None, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [1, 3],
     [[0.230142117, -1.03235734, 2.47767806], [1.70579243, -0.156685933, -0.04214276]]),
    (B, {}, [1, 3], [[0.11383155, -1.01485908, 2.8540616], [1.73764467, -0.133664697, 0.108954072]]),
    (B, {"nuslerp_flatten": False}, [1, 3],
     [[0.178606004, -0.9813416, 2.54016662], [2.05882263, 0.138867259, 0.478777826]]),
    (None, {}, [1, -1], [[0.460351408, -1.11799622, 2.59769702], [1.64411199, 0.0657644868, -0.460351408]]),
]


@pytest.mark.parametrize("base, params, weights, expect", NUSLERP_GOLDEN)
def test_nuslerp_golden_numbers_from_mergekit(base, params, weights, expect):
    out = run("nuslerp", base, [M1, M2], params, weights)
    assert out.dtype == torch.float32
    assert close(out, expect), out


def _slerp_ref(a, b, t):
    """One vector pair by the spec's steps, in float64."""
    a, b = a.double(), b.double()
    c = float((a / max(float(a.norm()), 1e-7)) @ (b / max(float(b.norm()), 1e-7)))
    c = min(1.0, max(-1.0, c))
    if 1 - c * c <= 1e-16:
        return (1 - t) * a + t * b
    th = math.acos(c)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_nuslerp_vector_modes_on_a_3d_tensor():
    a, b = rand(3, 4, 5, seed=1), rand(3, 4, 5, seed=2)
    t = 0.3
    rows = torch.stack([torch.stack([_slerp_ref(a[i, j], b[i, j], t) for j in range(4)]) for i in range(3)])
    assert torch.allclose(nuslerp_pairs(a, b, t, flatten=False), rows.float(), atol=1e-6)
    cols = torch.empty(3, 4, 5, dtype=torch.float64)  # row_wise: the dim-0 vectors a[:, j, k] (A13)
    for j in range(4):
        for k in range(5):
            cols[:, j, k] = _slerp_ref(a[:, j, k], b[:, j, k], t)
    assert torch.allclose(nuslerp_pairs(a, b, t, flatten=False, row_wise=True), cols.float(), atol=1e-6)
    flat = _slerp_ref(a.reshape(-1), b.reshape(-1), t).reshape(3, 4, 5)
    assert torch.allclose(nuslerp_pairs(a, b, t), flat.float(), atol=1e-6)


def test_nuslerp_row_wise_is_the_rows_mode_on_the_transpose():
    a, b = rand(6, 4, seed=3), rand(6, 4, seed=4)
    by_cols = nuslerp_pairs(a, b, 0.4, flatten=False, row_wise=True)
    assert torch.allclose(by_cols, nuslerp_pairs(a.T, b.T, 0.4, flatten=False).T, atol=1e-7)
    assert not torch.allclose(by_cols, nuslerp_pairs(a, b, 0.4, flatten=False), atol=1e-4)


@pytest.mark.parametrize("base", [None, B])
@pytest.mark.parametrize("params", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_nuslerp_ends_are_the_models(base, params):
    assert torch.allclose(run("nuslerp", base, [M1, M2], params, [1, 0]), M1, atol=1e-6)
    assert torch.allclose(run("nuslerp", base, [M1, M2], params, [0, 1]), M2, atol=1e-6)
    assert torch.allclose(run("nuslerp", base, [M1, M2], params, [2, 6]),
                          run("nuslerp", base, [M1, M2], params, [1, 3]), atol=1e-7)  # t = w_b/(w_a+w_b)


def test_nuslerp_one_dimensional_tensors_are_one_vector_in_every_mode():
    a, b = rand(7, seed=5), rand(7, seed=6)
    want = run("nuslerp", None, [a, b], {}, [1, 2])
    for params in ({"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}):
        assert torch.equal(run("nuslerp", None, [a, b], params, [1, 2]), want)
    assert torch.allclose(want, _slerp_ref(a, b, 2 / 3).float(), atol=1e-6)


def test_nuslerp_colinear_and_antipodal_pairs_are_lerped():
    assert close(run("nuslerp", None, [B, 2 * B], {}, [1, 3]), 1.75 * B)
    # antipodal: lerp (the spec's 1 - c^2 test; mergekit's float32 sin(acos(-1)) test does not fire)
    assert close(run("nuslerp", None, [B, -B], {}, [3, 1]), 0.5 * B)
    # nearly colinear is NOT lerped (unlike slerp's 0.9995): the exact arc
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([math.cos(0.02), math.sin(0.02)])
    assert close(run("nuslerp", None, [a, b], {}, [1, 1]), [math.cos(0.01), math.sin(0.01)])


def test_nuslerp_unit_vectors_stay_on_the_sphere_with_the_angle_split():
    a, b = rand(64, seed=7, dtype=torch.float64), rand(64, seed=8, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    th = math.acos(float(a @ b))
    for t in (0.1, 0.5, 0.8):
        out = nuslerp_pairs(a, b, t)
        assert out.dtype == torch.float64 and abs(float(out.norm()) - 1) < 1e-12
        assert abs(math.acos(min(1.0, float(out @ a))) - t * th) < 1e-9


def test_nuslerp_with_base_slerps_the_task_vectors_and_leaves_the_base_alone():
    base = B.clone()
    out = run("nuslerp", base, [M1, M2], {}, [1, 3])
    assert torch.equal(base, B)
    assert torch.allclose(out, B + nuslerp_pairs(M1 - B, M2 - B, 0.75), atol=1e-7)


def test_nuslerp_contract_and_required_weight():
    op = registry.get("nuslerp")
    assert (op.reads, op.needs_base, op.optional_base, op.model_count) == ("weights", False, True, 2)
    assert op.resolve_params({}) == {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    with pytest.raises(ValueError, match="missing required parameter 'weight'"):
        op.resolve_model_params({}, "m")
    for word in ("t = 0 end", "dim-0", "W[i, :]", "base"):
        assert word in op.details, word


# ---------------------------------------------------------------------------------- multislerp (M19)

MULTISLERP_GOLDEN = [
    (None, [M1, M2, M3], {}, [1, 1, 2],
     [[0.572983563, -1.40180314, 2.27888298], [1.66812444, 0.182469293, -0.221958056]]),
    (B, [M1, M2, M3], {}, [1, 1, 2],
     [[0.643033862, -1.69979191, 2.29115033], [1.68100989, 0.369508207, 0.0159736276]]),
    (None, [M1, M2], {}, [1, 3], [[0.202532798, -0.99956733, 2.48464751], [1.73873556, -0.188653335, 0.0150537724]]),
    (None, [M1, M2], {"normalize_weights": False}, [1, 3],
     [[0.81013149, -3.99827075, 9.93859291], [6.95494604, -0.754613757, 0.0602150895]]),
]


@pytest.mark.parametrize("base, inputs, params, weights, expect", MULTISLERP_GOLDEN)
def test_multislerp_golden_numbers_from_mergekit(base, inputs, params, weights, expect):
    out = run("multislerp", base, inputs, params, weights)
    assert out.dtype == torch.float32
    assert close(out, expect), out


@pytest.mark.parametrize("base", [None, B])
def test_multislerp_one_model_and_identical_models_give_that_model(base):
    assert torch.equal(run("multislerp", base, [M1], {}, [0.3]), M1)
    assert close(run("multislerp", base, [M2, M2, M2], {}, [1, 2, 5]), M2)


def test_multislerp_is_the_weighted_mean_direction_at_the_weighted_mean_norm():
    xs = [rand(5, 8, seed=s) for s in range(4)]
    w = torch.tensor([0.5, 1.0, 2.0, 0.25])
    wn = w / w.sum()
    m = sum(wi * x / x.norm() for wi, x in zip(wn, xs))
    want = m / m.norm() * sum(wi * x.norm() for wi, x in zip(wn, xs))
    assert close(run("multislerp", None, xs, {}, w.tolist()), want, rtol=1e-5, atol=1e-6)
    perm = [2, 0, 3, 1]
    assert close(run("multislerp", None, [xs[i] for i in perm], {}, [float(w[i]) for i in perm]), want,
                 rtol=1e-5, atol=1e-6)
    assert close(run("multislerp", None, xs, {}, (3 * w).tolist()), want, rtol=1e-5, atol=1e-6)


def test_multislerp_zero_mean_direction_with_two_models_is_the_weighted_sum():
    x = rand(2, 3, seed=9)
    assert close(run("multislerp", None, [x, -2 * x], {}, [1, 1]), -0.5 * x)
    d = torch.tensor([[0.25, -0.5, 0.125], [0.375, 0.0625, -0.25]])  # B +- d - B is exactly +-d
    assert torch.equal(run("multislerp", B, [B + d, B - d], {}, [1, 1]), B)  # about the base: the base


def test_multislerp_zero_mean_direction_with_more_models_is_an_error_naming_the_tensor():
    x = rand(2, 3, seed=10)
    with pytest.raises(UserError, match=r"multislerp: tensor 'w'.*weighted sum .* is zero"):
        run("multislerp", None, [x, -x, -x], {}, [2, 1, 1])


def test_multislerp_of_a_tensor_no_model_changed_is_the_base():
    # three fine-tunes that all left a layer frozen: every task vector is 0 (mergekit raises)
    assert torch.equal(run("multislerp", B, [B.clone(), B.clone(), B.clone()], {}, [1, 1, 2]), B)
    z = torch.zeros(2, 3)
    assert torch.equal(run("multislerp", None, [z, z, z], {}, [1, 1, 1]), z)
    x = rand(2, 3, seed=11)  # one model moved it: no longer the frozen case
    assert not torch.equal(run("multislerp", B, [B.clone(), B.clone(), B + x], {}, [1, 1, 1]), B)


def test_multislerp_weights_summing_to_zero_are_an_error_unless_not_normalised():
    with pytest.raises(UserError, match="tensor 'w'.*sum to 0.*normalize_weights"):
        run("multislerp", None, [M1, M2, M3], {}, [1, -2, 1])
    out = run("multislerp", None, [M1, M2, M3], {"normalize_weights": False}, [1, -2, 1])
    assert bool(torch.isfinite(out).all())


def test_multislerp_contract_and_defaults():
    op = registry.get("multislerp")
    assert (op.reads, op.needs_base, op.optional_base, op.min_models, op.model_count) == ("weights", False, True, 1, None)
    assert op.resolve_params({}) == {"normalize_weights": True, "eps": 1e-8}
    with pytest.raises(ValueError, match="missing required parameter 'weight'"):
        op.resolve_model_params({}, "m")


# ------------------------------------------------------------------------------------- karcher (M20)

@pytest.mark.parametrize("inputs, params, expect", [
    ([M1, M2, M3], {}, [[0.526512504, -1.30968952, 2.3909893], [1.67346096, 0.132754609, -0.279430419]]),
    ([M1, M2, M3], {"max_iter": 1}, [[0.526531041, -1.30972803, 2.39096117], [1.6734674, 0.132772326, -0.279411018]]),
    ([M1, M2], {}, [[0.427088559, -1.1093595, 2.60066724], [1.66960514, 0.0300935972, -0.396169484]]),
])
def test_karcher_golden_numbers_from_mergekit(inputs, params, expect):
    out = run("karcher", None, inputs, params)
    assert out.dtype == torch.float32
    assert close(out, expect), out


def test_karcher_of_one_input_and_of_identical_inputs_is_the_input():
    assert torch.equal(run("karcher", None, [M1]), M1)
    assert close(run("karcher", None, [M3, M3, M3, M3]), M3)


def test_karcher_is_permutation_invariant_and_positively_homogeneous():
    xs = [rand(4, 6, seed=s) for s in range(5)]
    want = run("karcher", None, xs, {"max_iter": 50, "tol": 1e-7})
    for perm in ([4, 3, 2, 1, 0], [1, 3, 0, 4, 2]):
        assert close(run("karcher", None, [xs[i] for i in perm], {"max_iter": 50, "tol": 1e-7}), want, rtol=1e-5)
    assert close(run("karcher", None, [2.5 * x for x in xs], {"max_iter": 50, "tol": 1e-7}), 2.5 * want, rtol=1e-5)


def test_karcher_converges_to_the_riemannian_mean():
    us = [rand(16, seed=20 + s, dtype=torch.float64) for s in range(4)]
    us = [u / u.norm() for u in us]
    m = karcher_mean([u.clone() for u in us], max_iter=100, tol=1e-12)
    m = m / m.norm()
    grad = sum((math.acos(float(u @ m)) / math.sin(math.acos(float(u @ m)))) * (u - float(u @ m) * m) for u in us)
    assert float(grad.norm()) < 1e-9  # the mean of the logarithms at m vanishes
    assert m.dtype == torch.float64


def test_karcher_of_two_inputs_is_the_arc_midpoint_at_the_mean_norm():
    a, b = rand(10, seed=30), 3 * rand(10, seed=31)
    mid = a / a.norm() + b / b.norm()
    assert close(run("karcher", None, [a, b]), mid / mid.norm() * (a.norm() + b.norm()) / 2)


def test_karcher_zero_norm_inputs_count_in_the_norm_only():
    x = rand(2, 3, seed=32)
    assert close(run("karcher", None, [x, torch.zeros(2, 3)]), x / 2)
    assert torch.equal(run("karcher", None, [torch.zeros(2, 3), torch.full((2, 3), 1e-7)]), torch.zeros(2, 3))


def test_karcher_max_iter_zero_is_the_normalised_mean_direction():
    xs = [M1, M2, M3]
    m = sum(x / x.norm() for x in xs)
    want = m / m.norm() * sum(x.norm() for x in xs) / 3
    assert close(run("karcher", None, xs, {"max_iter": 0}), want)
    assert not close(run("karcher", None, xs, {"max_iter": 0}), run("karcher", None, xs), atol=1e-8, rtol=1e-8)


def test_karcher_contract_and_defaults():
    op = registry.get("karcher")
    assert (op.reads, op.needs_base, op.base_input, op.min_models, op.model_params) == ("weights", False, True, 1, ())
    assert op.resolve_params({}) == {"max_iter": 10, "tol": 1e-5}
    with pytest.raises(ValueError, match="must be an integer"):
        op.resolve_params({"max_iter": 2.5})


@pytest.mark.parametrize("name, inputs", [("nuslerp", [M1, M2[:1]]), ("multislerp", [M1, M2[:1]]),
                                          ("karcher", [M1, M2[:1]])])
def test_shape_mismatch_is_a_user_error(name, inputs):
    with pytest.raises(UserError, match="tensor 'w' has different shapes"):
        run(name, None, inputs, {}, None if name == "karcher" else [1, 1])


# ------------------------------------------------------------------------------------ recipes

def test_recipes_run_end_to_end(tiny_models, tmp_path, cli):
    base = tiny_models["base"]
    weights = [1.0, 3.0, 2.0]
    cases = [  # method, models, with base?, method params (YAML flow text), the same as a dict
        ("nuslerp", "ab", False, "", {}),
        ("nuslerp", "ab", True, "{nuslerp_flatten: false}", {"nuslerp_flatten": False}),
        ("multislerp", "abc", True, "", {}),
        ("karcher", "abc", False, "{max_iter: 5}", {"max_iter": 5}),
    ]
    loaded = {k: load_dir(tiny_models[k]) for k in ("base", "a", "b", "c")}
    q = "model.layers.0.self_attn.q_proj.weight"
    for i, (method, names, with_base, text, params) in enumerate(cases):
        mps = None if method == "karcher" else [f"{{weight: {w}}}" for w in weights[: len(names)]]
        r = write_recipe(tmp_path / f"r{i}.yaml", recipe_text([tiny_models[k] for k in names], method,
                                                              base if with_base else None, text, mps))
        code, _, err = cli("run", r, "--out", tmp_path / f"o{i}")
        assert code == 0, (method, err)
        out = load_dir(tmp_path / f"o{i}")
        want = run(method, loaded["base"][q] if with_base else None, [loaded[k][q] for k in names], params,
                   None if mps is None else weights[: len(names)])
        assert torch.allclose(out[q], want, atol=1e-6), method
        assert not torch.allclose(out[q], loaded["a"][q], atol=1e-4), method
