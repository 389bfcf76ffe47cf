"""Golden numbers and invariants of the baseline operators (spec magmax_opcm_baselines.md C, D4)."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask
from mergekit_ortho.ops.ties_dare import magnitude_trim


def run_op(name, inputs, params=None, model_params=None, tensor="t", base=None):
    op = registry.get(name)
    mps = [op.resolve_model_params(mp, f"m{i}") for i, mp in enumerate(model_params or [{}] * len(inputs))]
    task = TensorTask(tensor, base, [x.clone() for x in inputs], op.resolve_params(params or {}), mps)
    return op.fn(task)


def run_stream(name, inputs, params=None, model_params=None, tensor="t"):
    op = registry.get(name)
    mps = [op.resolve_model_params(mp, f"m{i}") for i, mp in enumerate(model_params or [{}] * len(inputs))]
    task = TensorTask(tensor, None, [], op.resolve_params(params or {}), mps)
    state = op.stream.start(task)
    for i, x in enumerate(inputs):
        state = op.stream.step(state, x.clone(), i, task)
    return op.stream.finish(state, task)


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
    torch.manual_seed(5)
    tau = torch.ones(200_000)
    out = run_op("dare_linear", [tau], {"seed": 1}, [{"density": 0.25}])
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 4.0))
    assert abs(out.mean().item() - 1.0) < 0.02
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
