"""arcee_fusion: mergekit's golden example (../shared/specs/mergekit_compat.md M23), exact
quantiles (M27, A10), invariants, errors and a recipe run."""
from __future__ import annotations

import pytest
import torch

from conftest import write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import arcee_fusion as af
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask

OP = registry.get("arcee_fusion")
B4 = torch.arange(16.0).reshape(4, 4) / 8
M4 = B4 + torch.tensor([[0.5, -0.25, 0.125, 0], [0, 1, -0.5, 0.25], [0.0625, 0, 0, -2], [0.375, 0, 0, 0]])


def run(base, model):
    return OP.fn(TensorTask("w", base, [model.clone()], OP.resolve_params({}), [OP.resolve_model_params({})]))


def test_golden_example_from_mergekit():
    p, q = torch.softmax(M4, -1) + 1e-8, torch.softmax(B4, -1) + 1e-8
    kl = (p * (p / q).log()).sum(-1)
    assert torch.allclose(kl, torch.tensor([0.0339205, 0.146785, 0.192039, 0.0131436]), rtol=2e-5)
    tau = float(af.threshold(af.importance(M4, B4)))
    assert abs(tau - 0.0296804477) < 1e-6 * 0.0296804477
    out = run(B4, M4)
    taken = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in ((1, 1), (1, 2), (1, 3), (2, 3)):
        taken[i, j] = True
    assert torch.equal(out, torch.where(taken, M4, B4))
    changed = M4 != B4
    assert bool((changed & ~taken).any())  # some changed entries really are left at the base


def test_importance_is_the_row_kl_times_the_change():
    imp = af.importance(M4, B4)
    p, q = torch.softmax(M4, -1) + 1e-8, torch.softmax(B4, -1) + 1e-8
    assert torch.allclose(imp, (M4 - B4).abs() * (p * (p / q).log()).sum(-1, keepdim=True))
    # a 1-D tensor is one row: one KL for the whole vector
    b, m = B4[0], M4[0]
    p, q = torch.softmax(m, 0) + 1e-8, torch.softmax(b, 0) + 1e-8
    assert torch.allclose(af.importance(m, b), (m - b).abs() * (p * (p / q).log()).sum())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 1001, 1_000_003])
def test_quantiles_are_exact_order_statistics(n):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g)
    s = torch.sort(x).values
    for num, den in ((1, 2), (1, 4), (3, 4)):
        assert float(af.order_statistic(x, num, den)) == float(s[int(num / den * (n - 1))])
    want = s[(n - 1) // 2] + 1.5 * (s[3 * (n - 1) // 4] - s[(n - 1) // 4])
    assert float(af.threshold(x.reshape(-1, 1) if n % 2 else x)) == float(want)


def test_large_tensors_are_deterministic():
    # above 10^6 entries mergekit samples; ours is the exact answer, the same on every call
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1001, 1000, generator=g)
    model = base + 0.01 * torch.randn(1001, 1000, generator=g)
    a, b = run(base, model), run(base, model)
    assert torch.equal(a, b)
    keep = af.importance(model, base) >= af.threshold(af.importance(model, base))
    assert torch.equal(a, torch.where(keep, base + (model - base), base))


def test_identical_model_gives_the_base_and_every_entry_is_base_or_model():
    assert torch.equal(run(B4, B4.clone()), B4)
    g = torch.Generator().manual_seed(1)
    base, model = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    out = run(base, model)
    assert bool(((out == base) | (out == base + (model - base))).all())
    assert 0 < int((out != base).sum()) < out.numel()


def test_entries_at_the_threshold_are_taken():
    # one row, the same |m - b| everywhere: every importance equals tau, and I >= tau takes them all
    b = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, 0.0])
    m = b + 0.25 * torch.tensor([1.0, -1, 1, -1, -1, 1])
    imp = af.importance(m, b)
    assert bool((imp == af.threshold(imp)).all()) and float(imp[0]) > 0
    assert torch.equal(run(b, m), b + (m - b))


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="arcee_fusion: tensor 'w' has shape"):
        run(B4, M4[:3])


def test_contract_and_parameters():
    assert (OP.reads, OP.needs_base, OP.model_count, OP.base_input, OP.params, OP.fold) == \
        ("weights", True, 1, False, (), None)


def test_recipe_runs(tiny_models, tmp_path, cli):
    base, a = tiny_models["base"], tiny_models["a"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text([a], "arcee_fusion", base))
    code, _, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, err
    out, bw, aw = load_dir(tmp_path / "o"), load_dir(base), load_dir(a)
    for k, v in out.items():
        assert torch.equal(v, run(bw[k], aw[k])), k
