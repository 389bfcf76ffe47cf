"""slerp and nearswap: mergekit's golden numbers (../shared/specs/mergekit_compat.md M17, M22), their
invariants, and recipe runs end to end (base listed among the models or not)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask
from mergekit_ortho.ops.slerp import nearswap_tensors, slerp_vectors

B = torch.tensor([[0.5, -1, 2], [1.5, 0, -0.5]])
M1 = torch.tensor([[0.875, -1.25, 2.625], [1.375, 0.5, -1.25]])
M2 = torch.tensor([[0, -0.875, 2.3125], [1.75, -0.375, 0.375]])


def run(base, model, t):
    op = registry.get("slerp")
    return op.fn(TensorTask("w", base, [model], op.resolve_params({"t": t}), [{}]))


@pytest.mark.parametrize("v0, v1, t, expect", [
    (B, M1, 0.3, [[0.617890954, -1.08401775, 2.20597649], [1.47426224, 0.151764244, -0.731714129]]),
    (B, 2 * B, 0.3, [[0.649999976, -1.29999995, 2.5999999], [1.95000005, 0, -0.649999976]]),  # colinear: lerp
    (B, -B, 0.3, [[0.199999988, -0.399999976, 0.799999952], [0.599999905, 0, -0.199999988]]),  # antipodal: lerp
    (torch.zeros(2, 3), B, 0.3,  # a zero vector: theta = pi/2, sin(t pi/2) B, not a lerp
     [[0.226995274, -0.453990549, 0.907981098], [0.680985808, 0, -0.226995274]]),
    (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), 0.5, [0.707106769, 1.41421354]),
])
def test_golden_numbers_from_mergekit(v0, v1, t, expect):
    out = run(v0, v1, t)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expect), atol=2e-7, rtol=1e-6), out


def test_ends_of_the_arc_are_the_inputs():
    assert torch.allclose(run(B, M1, 0.0), B, atol=1e-7)
    assert torch.allclose(run(B, M1, 1.0), M1, atol=1e-7)


def test_coefficients_match_the_spec_intermediates():
    # c = 0.961805196, theta = 0.277274057; at t = 0.3 the coefficients are 0.704607075, 0.303528490
    out = slerp_vectors(B.double(), M1.double(), 0.3)
    assert torch.allclose(out, 0.704607075 * B.double() + 0.303528490 * M1.double(), atol=1e-8)


def test_unit_vectors_stay_on_the_sphere_and_angles_split_by_t():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    theta = math.acos(float(a @ b))
    for t in (0.1, 0.25, 0.5, 0.9):
        out = slerp_vectors(a, b, t)
        assert abs(float(out.norm()) - 1.0) < 1e-12
        assert abs(math.acos(min(1.0, float(out @ a))) - t * theta) < 1e-9


def test_shape_is_kept_and_float64_stays_float64():
    out = slerp_vectors(B.double(), M1.double(), 0.4)
    assert out.dtype == torch.float64 and out.shape == B.shape


def test_recipe_runs_and_base_among_models_is_not_counted_twice(tiny_models, tmp_path, cli):
    base, a = tiny_models["base"], tiny_models["a"]
    r1 = write_recipe(tmp_path / "r1.yaml", recipe_text([a], "slerp", base, "{t: 0.3}"))
    r2 = write_recipe(tmp_path / "r2.yaml", recipe_text([base, a], "slerp", base, "{t: 0.3}"))
    for r, out in ((r1, "o1"), (r2, "o2")):
        code, _, err = cli("run", r, "--out", tmp_path / out)
        assert code == 0, err
    m1, m2 = load_dir(tmp_path / "o1"), load_dir(tmp_path / "o2")
    bw, aw = load_dir(base), load_dir(a)
    for k, v in m1.items():
        assert torch.equal(v, m2[k]), k
        assert torch.allclose(v, slerp_vectors(bw[k], aw[k], 0.3), atol=1e-6), k
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(m1[q], bw[q]) and not torch.allclose(m1[q], aw[q])


def test_wrong_model_count_and_missing_t_are_one_line_errors(tiny_models, tmp_path, cli):
    base = tiny_models["base"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models["a"], tiny_models["b"]], "slerp", base, "{t: 0.5}"))
    code, out, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 2 and "exactly 1 model(s) besides the base" in err and "Traceback" not in err + out
    assert not (tmp_path / "o").exists()
    r = write_recipe(tmp_path / "r2.yaml", recipe_text([tiny_models["a"]], "slerp", base))
    code, _, err = cli("validate", r)
    assert code == 2 and "missing required parameter 't'" in err
    r = write_recipe(tmp_path / "r3.yaml", recipe_text([tiny_models["a"]], "slerp", None, "{t: 0.5}"))
    code, _, err = cli("run", r, "--out", tmp_path / "o3")
    assert code == 2 and "base_model" in err
    # two models and no base: the missing base is the cause named, not the model count
    r = write_recipe(tmp_path / "r4.yaml", recipe_text([tiny_models["a"], tiny_models["b"]], "slerp", None, "{t: 0.5}"))
    code, _, err = cli("run", r, "--out", tmp_path / "o4")
    assert code == 2 and "base_model" in err


# ------------------------------------------------------------------------------------ nearswap (M22)

def near(base, model, t):
    op = registry.get("nearswap")
    return op.fn(TensorTask("w", base, [model.clone()], op.resolve_params({"t": t}), [{}]))


@pytest.mark.parametrize("model, expect", [
    (M1, [[0.800000012, -1.25, 2.29999995], [1.375, 0.300000012, -0.800000072]]),
    (M2, [[0.199999988, -0.875, 2.29999995], [1.75, -0.300000012, -0.199999958]]),
])
def test_nearswap_golden_numbers_from_mergekit(model, expect):
    out = near(B, model, 0.3)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expect), atol=1e-7, rtol=1e-6), out


def test_nearswap_is_mergekits_omega_form_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, generator=g), torch.randn(500, generator=g)
    for t in (0.01, 0.3, 2.0):
        omega = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
        assert torch.equal(near(a, b, t), omega * b + (1 - omega) * a), t


def test_nearswap_t_at_or_below_zero_gives_the_base_and_a_large_t_the_model():
    for t in (0.0, -0.5):
        assert torch.equal(near(B, M1, t), B)
    assert torch.allclose(near(B, M1, 10.0), M1, atol=1e-7)


def test_nearswap_stays_within_t_of_the_base_and_takes_the_model_where_close():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4000, generator=g)
    b = a + torch.randn(4000, generator=g) * torch.logspace(-8, 1, 4000)  # gaps from 1e-8 to 10
    for t in (1e-7, 1e-3, 0.1, 1.0):
        out = near(a, b, t)
        ulp = 2 * torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs())  # float32 rounding
        assert bool(((out - a).abs() <= t * (1 + 1e-6) + ulp).all()), t
        close, far = (b - a).abs() <= t, (b - a).abs() > t
        assert torch.allclose(out[close], b[close], atol=2e-7)
        clamp = a + (b - a).clamp(-t, t)  # the spec's equivalent form, wherever |a - b| >= 1e-6
        big = (b - a).abs() >= 1e-6
        assert torch.allclose(out[big & far], clamp[big & far], atol=1e-6, rtol=1e-6)
        assert bool(((out - a) * (b - a).sign() >= -ulp).all())  # towards the model (up to rounding)


def test_nearswap_leaves_the_base_alone_and_keeps_float64():
    base = B.clone()
    near(base, M1, 0.3)
    assert torch.equal(base, B)
    assert nearswap_tensors(B.double(), M1.double(), 0.3).dtype == torch.float64


def test_nearswap_contract_and_missing_t():
    op = registry.get("nearswap")
    assert op.reads == "weights" and op.needs_base and op.model_count == 1 and op.spec.endswith("M22")
    with pytest.raises(ValueError, match="missing required parameter 't'"):
        op.resolve_params({})


def test_nearswap_recipe_runs(tiny_models, tmp_path, cli):
    base, a = tiny_models["base"], tiny_models["a"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text([base, a], "nearswap", base, "{t: 0.01}"))
    code, _, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, err
    out, bw, aw = load_dir(tmp_path / "o"), load_dir(base), load_dir(a)
    for k, v in out.items():
        assert torch.allclose(v, bw[k] + (aw[k] - bw[k]).clamp(-0.01, 0.01), atol=1e-6), k
    r = write_recipe(tmp_path / "r2.yaml", recipe_text([a, tiny_models["b"]], "nearswap", base, "{t: 0.3}"))
    code, _, err = cli("run", r, "--out", tmp_path / "o2")
    assert code == 2 and "exactly 1 model(s) besides the base" in err
