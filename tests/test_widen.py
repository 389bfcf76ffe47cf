"""WIDEN operator: golden numbers of widen_corespace.md A10 and the invariants of A8/A10."""
from __future__ import annotations

import math

import pytest
import torch

import mergekit_ortho.ops.widen as W
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask

F64 = torch.float64
LINEAR = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def _op():
    return registry.get("widen")


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def _sig(x):  # softmax over two models of (x, 0) -> first entry
    return 1.0 / (1.0 + math.exp(-x))


def _merge(base, models, name=LINEAR, **params):
    """Merged WEIGHTS for full models (the engine's job: deltas in, base added back)."""
    deltas = [m - base for m in models]
    return base + _delta(base, deltas, name, **params)


def _delta(base, deltas, name=LINEAR, **params):
    p = _op().resolve_params(params)
    task = TensorTask(name=name, base=base, inputs=list(deltas), params=p, model_params=[{} for _ in deltas])
    return _op().fn(task)


# -- A10 golden examples ------------------------------------------------------------------------


def test_rank_and_score_unit_example():
    signal = _t([[0.3, 0.1, 0.2, 0.0], [5, 7, 6, 8]])
    ranks = W.rank01(signal)
    assert torch.equal(ranks, _t([[0.75, 0.25, 0.50, 0.0], [0.0, 0.50, 0.25, 0.75]]))
    scores = W.importance_scores(ranks, 1.0, 1.0, 1.0)
    golden = _t([[1, 0.4378, 1, 0.3208], [0.3208, 1, 0.4378, 1]])
    assert torch.allclose(scores, golden, atol=5e-5, rtol=0)
    exact = _t([[1, _sig(-0.25), 1, _sig(-0.75)], [_sig(-0.75), 1, _sig(-0.25), 1]])
    assert torch.allclose(scores, exact, atol=1e-15, rtol=0)


def test_rank_is_stable_ascending_and_divides_by_d():
    ranks = W.rank01(_t([[2.0, 1.0, 1.0, 1.0, 0.0]]))
    assert torch.equal(ranks, _t([[0.8, 0.2, 0.4, 0.6, 0.0]]))  # equal values ordered by index


def test_scores_temperature_threshold_and_calibration_value():
    ranks = _t([[0.75, 0.25, 0.50, 0.0], [0.0, 0.50, 0.25, 0.75]])
    hot = W.importance_scores(ranks, 0.5, 1.0, 1.0)
    assert abs(float(hot[1, 0]) - _sig(-1.5)) < 1e-15  # softmax(0/0.5, 0.75/0.5)
    no_cal = W.importance_scores(ranks, 1.0, 1e9, 1.0)
    assert torch.allclose(no_cal.sum(0), torch.ones(4, dtype=F64), atol=1e-15)
    assert abs(float(no_cal[0, 0]) - _sig(0.75)) < 1e-15
    quarter = W.importance_scores(ranks, 1.0, 1.0, 0.25)
    # calibrated entries (rank > mean rank 0.375) are set to s, not renormalised
    assert torch.equal(quarter[ranks > 0.375], torch.full((4,), 0.25, dtype=F64))
    assert abs(float(quarter[0, 1]) - _sig(-0.25)) < 1e-15
    # threshold 2: rank must exceed 0.75 -> nothing is calibrated here
    assert torch.equal(W.importance_scores(ranks, 1.0, 2.0, 1.0), no_cal)


W0 = [[1, 0, 1, 2], [0, 1, 1, 0]]
WA = [[3, 0.5, 1, 2], [0, 1, 1.5, 0.5]]
WB = [[1, 0, 0.5, 2], [0.5, 2, 1, 0.8]]


def test_worked_2x4_divergences_and_ranks():
    base = _t(W0)
    d_mag, d_dir = W.column_divergences(base, [_t(WA) - base, _t(WB) - base])
    assert torch.allclose(d_mag, _t([[2, 0.1180, 0.3886, 0.0616], [0.1180, 1, 0.2962, 0.1541]]), atol=5e-5, rtol=0)
    assert torch.allclose(d_dir, _t([[0, 0.1056, 0.0194, 0.0299], [0.1056, 0, 0.0513, 0.0715]]), atol=5e-5, rtol=0)
    assert abs(float(d_mag[0, 1]) - (math.sqrt(1.25) - 1)) < 1e-15
    assert abs(float(d_dir[1, 3]) - (1 - 4.0 / (math.sqrt(4.64) * 2.0))) < 1e-15
    assert torch.equal(W.rank01(d_mag), _t([[0.75, 0.25, 0.5, 0], [0, 0.75, 0.5, 0.25]]))
    assert torch.equal(W.rank01(d_dir), _t([[0, 0.75, 0.25, 0.5], [0.75, 0, 0.25, 0.5]]))


def _worked_expected():
    a, b = _sig(-0.75), _sig(-0.25)  # softmax(0, .75), softmax(.25, .5)
    s_m = [[1, _sig(-0.5), 1, b], [a, 1, 1, _sig(0.25)]]
    s_d = [[a, 1, 0.5, 1], [1, a, 0.5, 1]]
    w = [[(s_m[n][j] + s_d[n][j]) / 2 for j in range(4)] for n in range(2)]
    base, da, db = _t(W0), _t(WA) - _t(W0), _t(WB) - _t(W0)
    merged = base + da * _t(w[0]) + db * _t(w[1])
    return _t(s_m), _t(s_d), _t(w), merged


def test_worked_2x4_merge_golden():
    golden = _t([[2.3208, 0.3444, 0.6250, 2.0000], [0.3302, 1.6604, 1.3750, 0.9843]])
    s_m, s_d, w, exact = _worked_expected()
    assert torch.allclose(s_m, _t([[1, 0.3775, 1, 0.4378], [0.3208, 1, 1, 0.5622]]), atol=5e-5, rtol=0)
    assert torch.allclose(s_d, _t([[0.3208, 1, 0.5, 1], [1, 0.3208, 0.5, 1]]), atol=5e-5, rtol=0)
    assert torch.allclose(w, _t([[0.6604, 0.6888, 0.75, 0.7189], [0.6604, 0.6604, 0.75, 0.7811]]), atol=5e-5, rtol=0)
    assert torch.allclose(exact, golden, atol=5e-5, rtol=0)
    got = _merge(_t(W0), [_t(WA), _t(WB)])
    assert torch.allclose(got, exact, atol=1e-14, rtol=0)
    assert torch.allclose(got, golden, atol=5e-5, rtol=0)


def test_worked_2x4_float32():
    f32 = torch.float32
    base = _t(W0, f32)
    got = _merge(base, [_t(WA, f32), _t(WB, f32)])
    assert got.dtype == f32
    assert torch.allclose(got.double(), _worked_expected()[3], atol=1e-6, rtol=0)


def test_one_dimensional_example():
    base = _t([1, 1, 1])
    da, db = _t([0.01, 0, 0.05]), _t([0, 0.02, 0.05])
    got = base + _delta(base, [da, db], name="model.layers.0.self_attn.q_proj.bias")
    assert torch.allclose(got, _t([1.0050, 1.0101, 1.1000]), atol=5e-5, rtol=0)
    s = [_sig(0.01), _sig(-0.02)]  # softmax(.01, 0) and softmax(0, .02); last element calibrated in both
    exact = _t([1 + s[0] * 0.01, 1 + (1 - s[1]) * 0.02, 1.1])
    assert torch.allclose(got, exact, atol=1e-15, rtol=0)
    scores = W.importance_scores(torch.stack([da, db]).abs())
    assert torch.allclose(scores, _t([[0.5025, 0.4950, 1], [0.4975, 0.5050, 1]]), atol=5e-5, rtol=0)


# -- invariants ------------------------------------------------------------------------------------


def _rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale


SHAPES = [(LINEAR, (6, 5)), (EMBED, (9, 4)), ("model.norm.weight", (7,)), ("conv.weight", (4, 3, 2, 2)), ("logit_scale", ())]


@pytest.mark.parametrize("name,shape", SHAPES)
def test_single_model_returns_the_model(name, shape):
    base, delta = _rand(shape, 0), _rand(shape, 1, 0.1)
    out = _delta(base, [delta], name=name)
    assert torch.equal(out, delta)


@pytest.mark.parametrize("name,shape", SHAPES)
def test_zero_task_vectors_return_the_base(name, shape):
    base = _rand(shape, 0)
    out = _delta(base, [torch.zeros(shape, dtype=F64)] * 3, name=name)
    assert torch.equal(out, torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("name,shape", SHAPES)
def test_order_invariance(name, shape):
    base = _rand(shape, 0)
    ds = [_rand(shape, 1, 0.1), _rand(shape, 2, 0.5), _rand(shape, 3, 0.02)]
    # equal up to the rounding of the final weighted sum (a different summation order)
    assert torch.allclose(_delta(base, ds[:2], name=name), _delta(base, ds[1::-1], name=name), atol=1e-15, rtol=0)
    perm = [ds[2], ds[0], ds[1]]
    assert torch.allclose(_delta(base, ds, name=name), _delta(base, perm, name=name), atol=1e-14, rtol=0)


# Columns of one model relative to a base whose columns are all (1, 0):
# c0 (3,2): largest magnitude and 2nd direction change; c1 (2,0): magnitude 3rd, direction 0;
# c2 (1,1): magnitude 2nd, direction largest; c3 (1.01,0): smallest magnitude, direction 0 (ties c1,
# lower index first). R^M = [.75,.5,.25,0], R^D = [.5,0,.75,.25]; calibrated (> .375): M {c0,c1},
# D {c0,c2}.
ID_BASE = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
ID_MODEL = [[3.0, 2.0, 1.0, 1.01], [2.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("n,expected", [(2, [2.0, 1.5, 1.5, 1.0]), (3, [3.0, 2.0, 2.0, 1.0])])
def test_identical_models_are_not_a_fixed_point(n, expected):
    base = _t(ID_BASE)
    delta = _t(ID_MODEL) - base
    d_mag, d_dir = W.column_divergences(base, [delta])
    assert torch.equal(W.rank01(d_mag), _t([[0.75, 0.5, 0.25, 0.0]]))
    assert torch.equal(W.rank01(d_dir), _t([[0.5, 0.0, 0.75, 0.25]]))
    out = _delta(base, [delta.clone() for _ in range(n)])
    # multipliers on delta: N*s where both criteria calibrate, (1+N*s)/2 where one does, 1 where none
    mult = torch.tensor(expected, dtype=F64)
    assert torch.allclose(out, delta * mult, atol=1e-14, rtol=0)
    # s = 1/N or no calibration (t huge) gives the model back
    assert torch.allclose(_delta(base, [delta] * n, calibration=1.0 / n), delta, atol=1e-15, rtol=0)
    assert torch.allclose(_delta(base, [delta] * n, threshold=1e9), delta, atol=1e-15, rtol=0)


def test_zero_columns_give_no_nan():
    base = _t([[0.0, 1.0, 2.0], [0.0, 1.0, 0.0]])  # column 0 is zero in the base
    da = _t([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])  # column 0 born from zero; column 1 unchanged
    db = _t([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])  # column 0 stays zero
    d_mag, d_dir = W.column_divergences(base, [da, db])
    assert torch.isfinite(d_mag).all() and torch.isfinite(d_dir).all()
    assert float(d_mag[0, 0]) == pytest.approx(math.sqrt(2), abs=1e-15)
    assert float(d_dir[0, 0]) == 1.0  # cos clamps the zero norm: cos = 0
    assert float(d_mag[0, 1]) == 0.0 and float(d_dir[0, 1]) == 0.0
    assert float(d_mag[1, 0]) == 0.0 and float(d_dir[1, 0]) == 0.0
    out = _delta(base, [da, db])
    assert torch.isfinite(out).all()
    out0 = _delta(torch.zeros(3, 3, dtype=F64), [torch.zeros(3, 3, dtype=F64)] * 2)
    assert torch.equal(out0, torch.zeros(3, 3, dtype=F64))


def test_embedding_is_transposed_and_lm_head_is_not():
    base, ds = _rand((7, 5), 0), [_rand((7, 5), 1, 0.3), _rand((7, 5), 2, 0.05)]
    as_linear = _delta(base, ds, name=LINEAR)
    as_embed = _delta(base, ds, name=EMBED)
    as_head = _delta(base, ds, name="lm_head.weight")
    assert torch.equal(as_head, as_linear)
    transposed = _delta(base.t().contiguous(), [d.t().contiguous() for d in ds], name=LINEAR).t()
    assert torch.allclose(as_embed, transposed, atol=1e-14, rtol=0)
    assert float((as_embed - as_linear).abs().max()) > 1e-2  # the transposition changes the result
    # the opt-in pattern gives the same row-unit treatment to other tensors
    conv1d = _delta(base, ds, name="h.0.attn.c_attn.weight", transpose_pattern=r"c_attn\.weight$")
    assert torch.equal(conv1d, as_embed)
    assert torch.equal(_delta(base, ds, name=EMBED, embedding_pattern=""), as_linear)


@pytest.mark.parametrize(
    "name,hit",
    [
        ("model.embed_tokens.weight", True),
        ("model.decoder.embed_tokens.weight", True),
        ("transformer.wte.weight", True),
        ("wte.weight", True),
        ("bert.embeddings.word_embeddings.weight", True),
        ("gpt_neox.embed_in.weight", True),
        ("tok_embeddings.weight", True),
        ("shared.weight", True),
        ("lm_head.weight", False),
        ("transformer.wpe.weight", False),
        ("model.layers.0.mlp.up_proj.weight", False),
        ("model.layers.0.mlp.shared_expert.up_proj.weight", False),
        ("bert.embeddings.position_embeddings.weight", False),
    ],
)
def test_default_embedding_pattern(name, hit):
    assert registry.name_matches(W.DEFAULT_EMBEDDING_PATTERN, name) is hit


def test_three_dimensional_tensors_are_flattened_to_columns():
    base, ds = _rand((4, 3, 2, 2), 0), [_rand((4, 3, 2, 2), 1, 0.2), _rand((4, 3, 2, 2), 2, 0.1)]
    out = _delta(base, ds, name="conv.weight")
    flat = _delta(base.reshape(4, 12), [d.reshape(4, 12) for d in ds], name="conv.weight")
    assert out.shape == (4, 3, 2, 2)
    assert torch.equal(out.reshape(4, 12), flat)


def test_column_permutation_equivariance_and_span():
    base = _rand((6, 8), 0)
    ds = [_rand((6, 8), 1, 0.3), _rand((6, 8), 2, 0.02)]
    out = _delta(base, ds)
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    out_p = _delta(base[:, perm], [d[:, perm] for d in ds])
    assert torch.allclose(out_p, out[:, perm], atol=1e-14, rtol=0)
    for j in range(8):  # each merged column is a combination of the task-vector columns
        basis = torch.stack([d[:, j] for d in ds], dim=1)
        coef = torch.linalg.lstsq(basis, out[:, j:j + 1]).solution
        assert torch.allclose(basis @ coef, out[:, j:j + 1], atol=1e-12, rtol=0)
        assert bool((coef > 0.26).all()) and bool((coef <= 1.0 + 1e-12).all())


def test_temperature_flattens_scores():
    base = _rand((5, 6), 0)
    ds = [_rand((5, 6), 1, 0.3), _rand((5, 6), 2, 0.1)]
    out = _delta(base, ds, temperature=1e6, threshold=1e9)
    assert torch.allclose(out, (ds[0] + ds[1]) / 2, atol=1e-6, rtol=0)


def test_chunked_statistics_equal_unchunked(monkeypatch):
    base = _rand((37, 6), 0)
    ds = [_rand((37, 6), 1, 0.3), _rand((37, 6), 2, 0.1), _rand((37, 6), 3, 0.2)]
    whole = W.column_divergences(base, ds)
    monkeypatch.setattr(W, "_CHUNK_ELEMENTS", 13)  # 2-row chunks
    chunked = W.column_divergences(base, ds)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-14, rtol=0)


def test_inputs_are_not_mutated():
    base, ds = _rand((5, 4), 0), [_rand((5, 4), 1), _rand((5, 4), 2)]
    copies = [base.clone()] + [d.clone() for d in ds]
    _delta(base, ds)
    _delta(base, ds, name=EMBED)
    assert all(torch.equal(a, b) for a, b in zip([base] + ds, copies))


def test_params_and_errors():
    op = _op()
    p = op.resolve_params({})
    assert p["threshold"] == 1.0 and p["calibration"] == 1.0 and p["temperature"] == 1.0
    assert p["embedding_pattern"] == W.DEFAULT_EMBEDDING_PATTERN and p["transpose_pattern"] == ""
    assert op.needs_base and op.reads == "deltas" and op.fold.gather is not None and op.fold.raw_weights
    with pytest.raises(ValueError, match="temperature"):
        op.resolve_params({"temperature": 0})
    with pytest.raises(ValueError, match="regular expression"):
        _delta(_rand((3, 3), 0), [_rand((3, 3), 1)], embedding_pattern="(")
    with pytest.raises(ValueError, match="shape"):
        _delta(_rand((3, 3), 0), [_rand((3, 4), 1)])


@pytest.mark.parametrize("block", [None, 13])
@pytest.mark.parametrize("name,shape", [("model.layers.0.mlp.up_proj.weight", (6, 5)),
                                        ("model.embed_tokens.weight", (7, 4)),
                                        ("model.layers.0.input_layernorm.weight", (9,)),
                                        ("conv.weight", (4, 3, 2, 2))])
def test_streaming_two_pass_on_raw_bf16_weights_equals_the_batch_form(monkeypatch, block, name, shape):
    # what the engine does: each model read twice as stored (bf16), the base as stored; the
    # result must be bit-identical to the batch form on float32 task vectors
    from mergekit_ortho.execute import apply_dense

    if block:  # blocks of 2-3 rows, the last one partial
        monkeypatch.setattr(W, "_CHUNK_ELEMENTS", block)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    ws = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(3)]
    ws[1].view(-1)[:2] = base.view(-1)[:2]  # unchanged entries
    op = _op()
    p = op.resolve_params({"calibration": 0.7})
    want = op.fn(TensorTask(name, base.float(), [w.float() - base.float() for w in ws], p, [{}] * 3))
    reads = []

    def inputs():
        reads.append(1)
        return (w.clone() for w in ws)

    task = TensorTask(name, base, [], p, [{}] * 3, dtype=torch.float32, raw_inputs=True)
    got = apply_dense(op, task, inputs)
    assert len(reads) == 2 and torch.equal(got, want)
