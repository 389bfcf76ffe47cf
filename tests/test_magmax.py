"""MagMax and random-mix operator: golden numbers of magmax_opcm_baselines.md D1 and invariants."""
from __future__ import annotations

import pytest
import torch

import mergekit_ortho.ops.magmax as magmax_mod  # noqa: F401  (registers the operator)
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.kernels import convert, select
from mergekit_ortho.ops.registry import TensorTask

F64 = torch.float64


def _op():
    return registry.get("magmax")


def _task(inputs, name="model.layers.0.mlp.up_proj.weight", **params):
    op = _op()
    p = op.resolve_params(params)
    base = torch.zeros_like(inputs[0])
    return TensorTask(name=name, base=base, inputs=list(inputs), params=p, model_params=[{} for _ in inputs])


def _run(inputs, **params):
    return _op().fn(_task(inputs, **params))


def _stream(inputs, **params):
    op = _op()
    task = _task(inputs, **params)
    stask = TensorTask(name=task.name, base=task.base, inputs=[], params=task.params, model_params=task.model_params)
    state = op.fold.start(stask)
    for i, x in enumerate(inputs):
        state = op.fold.step(state, x.clone(), i, stask)  # a fold owns (may consume) its inputs
    return op.fold.finish(state, stask)


def _t(values):
    return torch.tensor(values, dtype=F64)


# -- golden examples (D1) ---------------------------------------------------------------------------


def test_two_vectors_golden_with_tie_later_wins():
    t1, t2 = _t([1, -2, 3, 0.5]), _t([-4, 0.5, -3, 0.5])
    sel = _run([t1, t2], **{"lambda": 1.0})
    assert torch.equal(sel, _t([-4, -2, -3, 0.5]))  # index 2: |3| == |-3|, the later -3 wins
    merged = _run([t1, t2])  # default lambda 0.5
    assert torch.equal(merged, _t([-2, -1, -1.5, 0.25]))
    assert torch.equal(_stream([t1, t2]), merged)


def test_tie_is_order_dependent_naive_argmax_would_differ():
    a, b = _t([3.0]), _t([-3.0])
    assert torch.equal(_run([a, b], **{"lambda": 1.0}), _t([-3.0]))
    assert torch.equal(_run([b, a], **{"lambda": 1.0}), _t([3.0]))


def test_three_vectors_golden():
    ts = [_t([1, -2, 3, 0]), _t([-4, 0.5, 2, 0]), _t([0, -2.5, -3, 0])]
    assert torch.equal(_run(ts, **{"lambda": 1.0}), _t([-4, -2.5, -3, 0]))
    assert torch.equal(_run(ts), _t([-2, -1.25, -1.5, 0]))
    assert torch.equal(_stream(ts), _t([-2, -1.25, -1.5, 0]))


def test_lambda_default_depends_on_selection():
    op = _op()
    assert op.resolve_params({})["lambda"] is None
    assert magmax_mod.resolved_lambda(op.resolve_params({})) == 0.5
    assert magmax_mod.resolved_lambda(op.resolve_params({"selection": "random"})) == 1.0
    assert magmax_mod.resolved_lambda(op.resolve_params({"selection": "random", "lambda": 0.25})) == 0.25
    x = _t([2.0, -6.0])
    assert torch.equal(_run([x]), _t([1.0, -3.0]))
    assert torch.equal(_run([x], selection="random"), x)


def test_param_validation():
    op = _op()
    with pytest.raises(ValueError, match="selection"):
        op.resolve_params({"selection": "median"})
    with pytest.raises(ValueError, match="lambda"):
        op.resolve_params({"lambda": "big"})
    with pytest.raises(ValueError, match="did you mean 'lambda'"):
        op.resolve_params({"lambd": 0.5})


# -- invariants (magnitude) ----------------------------------------------------------------------


def _random_inputs(n=5, shape=(7, 11), seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # many exact ties
        return [torch.randint(-3, 4, shape, generator=g).to(torch.float32) for _ in range(n)]
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_magnitude_equals_max_abs_and_sign_comes_from_a_model():
    xs = _random_inputs()
    sel = _run(xs, **{"lambda": 1.0})
    stack = torch.stack(xs)
    assert torch.equal(sel.abs(), stack.abs().amax(0))
    assert bool((stack == sel.unsqueeze(0)).any(0).all())
    assert sel.dtype == torch.float32 and sel.shape == (7, 11)


def test_matches_last_argmax_reference_with_many_ties():
    xs = _random_inputs(n=6, shape=(40, 30), integer=True)
    stack = torch.stack(xs)
    t = stack.shape[0]
    last = t - 1 - stack.abs().flip(0).argmax(0)  # the LAST index of the max |.|
    expected = stack.gather(0, last.unsqueeze(0)).squeeze(0)
    got = _run(xs, **{"lambda": 1.0})
    assert torch.equal(got, expected)
    first = stack.gather(0, stack.abs().argmax(0).unsqueeze(0)).squeeze(0)
    assert int((first != expected).sum()) > 0  # ties with opposite signs do occur here
    assert torch.equal(_stream(xs, **{"lambda": 1.0}), expected)


def test_stream_equals_batch_bitwise():
    xs = _random_inputs(n=7)
    for lam in (0.5, 1.0, 0.37):
        assert torch.equal(_stream(xs, **{"lambda": lam}), _run(xs, **{"lambda": lam}))


def test_lambda_applied_once_after_selection():
    xs = _random_inputs()
    sel = _run(xs, **{"lambda": 1.0})
    assert torch.equal(_run(xs, **{"lambda": 0.3}), sel * 0.3)
    zero = _run(xs, **{"lambda": 0.0})
    assert torch.equal(zero.abs(), torch.zeros(7, 11))


def test_single_model_is_lambda_times_tau():
    (x,) = _random_inputs(n=1)
    assert torch.equal(_run([x]), x * 0.5)
    assert torch.equal(_run([x], **{"lambda": 1.0}), x)


def test_order_only_matters_at_ties():
    xs = _random_inputs(n=5)  # continuous values: no ties
    perm = [3, 0, 4, 1, 2]
    assert torch.equal(_run([xs[i] for i in perm]), _run(xs))


def test_batch_form_does_not_mutate_its_inputs():
    xs = _random_inputs(n=3)
    copies = [x.clone() for x in xs]
    _run(xs)
    _run(xs, selection="random")
    assert all(torch.equal(a, b) for a, b in zip(xs, copies))


@pytest.mark.parametrize("chunk", [None, 5])
def test_in_place_chunked_selection_equals_the_plain_where(monkeypatch, chunk):
    if chunk:  # many chunks, the last one partial
        monkeypatch.setattr(convert, "FOLD_CHUNK", chunk)
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float64):
        sel = torch.randn(7, 13, generator=g, dtype=dtype)
        x = torch.randn(7, 13, generator=g, dtype=dtype)
        x[0, :4] = sel[0, :4].neg()  # ties in magnitude: x (the later model) must win
        sel[1, 0], x[1, 1] = float("nan"), float("nan")
        want = torch.where(x.abs() >= sel.abs(), x, sel)
        task = TensorTask("w", None, [], {}, [{}], dtype=dtype)
        got = select.keep_larger_magnitude_(sel.clone(), x.clone(), task)
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_raw_weight_fold_equals_the_task_vector_fold(monkeypatch, chunk, selection):
    # the engine hands a raw_weights fold the stored (bf16) weights; it must give exactly what
    # the fold of the float32 task vectors gives
    if chunk:
        monkeypatch.setattr(convert, "FOLD_CHUNK", chunk)
    g = torch.Generator().manual_seed(10)
    base = torch.randn(6, 9, generator=g).to(torch.bfloat16)
    ws = [(base.float() + 0.05 * torch.randn(6, 9, generator=g)).to(torch.bfloat16) for _ in range(4)]
    ws[2][0, :3] = (2 * base.float() - ws[1].float())[0, :3].to(torch.bfloat16)  # equal |tau|: ties
    op = _op()
    p = op.resolve_params({"selection": selection})
    want = op.fn(TensorTask("w", base.float(), [w.float() - base.float() for w in ws], p, [{}] * 4))
    task = TensorTask("w", base, [], p, [{}] * 4, dtype=torch.float32, raw_inputs=True)  # base as stored
    state = op.fold.start(task)
    for i, w in enumerate(ws):
        state = op.fold.step(state, w.clone(), i, task)
    assert torch.equal(op.fold.finish(state, task), want)
