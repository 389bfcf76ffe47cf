"""Dense TSV-M operator (`tsv`): equality with core_space's full-space TSV, invariants, tensor
rules, and `merge run` end to end on full checkpoints and on PEFT LoRAs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from test_run import load_dir, recipe_text
from mergekit_ortho.ops import core_space as C
from mergekit_ortho.ops import registry
from mergekit_ortho.ops import tsv as tsv_mod
from mergekit_ortho.ops.registry import TensorTask

F64 = torch.float64
NAME = "model.layers.0.mlp.up_proj.weight"


def _op():
    return registry.get("tsv")


def _merge(inputs, weights=None, name=NAME, **params):
    op = _op()
    mps = [op.resolve_model_params({} if weights is None else {"weight": w}, f"m{i}")
           for i, w in enumerate(weights or [None] * len(inputs))]
    task = TensorTask(name, torch.zeros_like(inputs[0]), [x.clone() for x in inputs], op.resolve_params(params), mps)
    return op.fn(task)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lora_factors(T, m, n, r, seed=0, dtype=F64):
    g = _gen(seed)
    return [(torch.randn(r, n, generator=g, dtype=dtype), torch.randn(m, r, generator=g, dtype=dtype))
            for _ in range(T)]


# -- registration and contract ---------------------------------------------------------------------


def test_registered_as_dense_deltas_method_without_stream():
    op = _op()
    assert op.input_kind == "dense" and op.reads == "deltas" and op.needs_base and op.fold is None
    assert op.resolve_params({}) == {"lambda": 1.0, "embedding_pattern": tsv_mod.DEFAULT_EMBEDDING_PATTERN}
    assert op.resolve_model_params({}, "m") == {"weight": 1.0}
    assert registry._MODULES.index("tsv") == registry._MODULES.index("widen") + 1
    for word in ("1-D", "0-D", "embedding_pattern", "mean", "3-D+", "float64"):
        assert word in op.details, word


# -- (a) equality with core_space.full_space_merge on LoRA-like task vectors ---------------------------


@pytest.mark.parametrize("T,m,n,r", [(3, 24, 18, 2), (2, 16, 20, 8), (4, 12, 12, 3)])
def test_equals_full_space_merge_on_low_rank_task_vectors(T, m, n, r):
    factors = _lora_factors(T, m, n, r, seed=T + m)
    deltas = [B @ A for A, B in factors]
    got = _merge(deltas)
    want = C.full_space_merge(factors, "tsv")  # tsv_keep uniform: floor(min(m, n)/T) per task
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # weights and lambda go through the same rule
    w = [0.5, 1.5, -1.0, 2.0][:T]
    got = _merge(deltas, weights=w, **{"lambda": 0.7})
    want = C.full_space_merge(factors, "tsv", lam=0.7, weights=w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_equals_core_space_tsv_when_rank_is_the_uniform_keep():
    # r == floor(min(m, n)/T): full-space uniform keep and core space (keeps r) are the same rule (B10.4b)
    T, m, n, r = 3, 18, 15, 5
    factors = _lora_factors(T, m, n, r, seed=7)
    got = _merge([B @ A for A, B in factors])
    A, B, _ = C.core_space_merge(factors, "tsv")
    torch.testing.assert_close(got, B @ A, rtol=0, atol=1e-10)
    # with r < floor(min/T) the uniform keep pads every task with zero-sigma triplets whose
    # vectors are arbitrary; they perturb the polar factors (B8.5): a different result
    small = _lora_factors(T, m, n, 2, seed=8)
    dense = _merge([B @ A for A, B in small])
    torch.testing.assert_close(dense, C.full_space_merge(small, "tsv"), rtol=0, atol=1e-12)
    A, B, _ = C.core_space_merge(small, "tsv")
    assert (dense - B @ A).norm() > 1e-3 * (B @ A).norm()


# -- (b) one model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 7), (6, 10), (5, 5)])
def test_single_model_returns_lambda_weight_tau(shape):
    tau = torch.randn(*shape, generator=_gen(1))
    got = _merge([tau], weights=[0.8], **{"lambda": 1.3})
    assert got.dtype == torch.float32 and got.shape == tau.shape
    torch.testing.assert_close(got, 1.3 * 0.8 * tau, rtol=0, atol=1e-6)
    tau64 = tau.to(F64)
    torch.testing.assert_close(_merge([tau64], weights=[0.8], **{"lambda": 1.3}), 1.3 * 0.8 * tau64,
                               rtol=0, atol=1e-12)


# -- (c) orthogonal supports -------------------------------------------------------------------------


def _orthogonal_pair(m, n, r1, r2, seed):
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r1 + r2, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, r1 + r2, generator=g, dtype=F64))
    s1 = torch.rand(r1, generator=g, dtype=F64) + 0.5
    s2 = torch.rand(r2, generator=g, dtype=F64) + 0.5
    t1 = (U[:, :r1] * s1) @ V[:, :r1].T
    t2 = (U[:, r1:] * s2) @ V[:, r1:].T
    return t1, t2


@pytest.mark.parametrize("m,n", [(12, 10), (10, 14), (8, 8)])
def test_mutually_orthogonal_task_vectors_merge_to_their_sum(m, n):
    c = min(m, n) // 2
    t1, t2 = _orthogonal_pair(m, n, c, c, seed=m * n)
    assert torch.allclose(t1.T @ t2, torch.zeros(n, n, dtype=F64), atol=1e-12)
    assert torch.allclose(t1 @ t2.T, torch.zeros(m, m, dtype=F64), atol=1e-12)
    torch.testing.assert_close(_merge([t1, t2]), t1 + t2, rtol=0, atol=1e-12)
    # float32 inputs: SVDs in float64, result cast back
    got32 = _merge([t1.float(), t2.float()])
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, (t1 + t2).float(), rtol=0, atol=1e-5)


def test_orthogonal_supports_of_rank_below_the_keep_count_do_not_sum():
    # rank 3 < floor(12/2) = 6: each task also keeps 3 zero-sigma triplets whose vectors span an
    # arbitrary part of the other task's space, so the polar factors move the kept directions
    # (B8.5). Only rank == floor(min/T) is the exact identity above; this pins the reference rule.
    t1, t2 = _orthogonal_pair(12, 12, 3, 3, seed=3)
    got = _merge([t1, t2])
    assert torch.isfinite(got).all()
    assert (got - (t1 + t2)).norm() > 0.05 * (t1 + t2).norm()


# -- (d) tensors that are not SVD-merged -------------------------------------------------------------


def test_one_dimensional_and_scalar_tensors_get_the_weighted_mean():
    g = _gen(4)
    xs = [torch.randn(11, generator=g) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    want = sum(wi * x for wi, x in zip(w, xs)) / 3
    torch.testing.assert_close(_merge(xs, weights=w, name="model.norm.weight"), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(_merge(xs, weights=w, name="x.bias", **{"lambda": 0.5}), 0.5 * want,
                               rtol=0, atol=1e-6)
    scalars = [torch.tensor(1.0), torch.tensor(-2.0), torch.tensor(4.0)]
    got = _merge(scalars, weights=w)
    assert got.shape == () and abs(float(got) - (1.0 - 1.0 + 8.0) / 3) < 1e-6


def test_embeddings_get_the_mean_and_an_empty_pattern_sends_them_through_svd():
    g = _gen(5)
    xs = [torch.randn(32, 16, generator=g, dtype=F64) for _ in range(2)]
    mean = (xs[0] + xs[1]) / 2
    for name in ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight"):
        torch.testing.assert_close(_merge(xs, name=name), mean, rtol=0, atol=1e-12)
    svd = _merge(xs, name="model.embed_tokens.weight", embedding_pattern="")
    torch.testing.assert_close(svd, C.merge_matrices(xs, "tsv"), rtol=0, atol=1e-12)
    assert not torch.allclose(svd, mean)
    # lm_head is a linear map: SVD rule
    torch.testing.assert_close(_merge(xs, name="lm_head.weight"), C.merge_matrices(xs, "tsv"), rtol=0, atol=1e-12)


def test_too_many_tasks_for_the_matrix_falls_back_to_the_mean():
    g = _gen(6)
    xs = [torch.randn(2, 9, generator=g, dtype=F64) for _ in range(3)]  # floor(2/3) = 0 triplets
    torch.testing.assert_close(_merge(xs), sum(xs) / 3, rtol=0, atol=1e-12)


def test_conv_kernels_are_flattened_to_out_by_rest():
    g = _gen(7)
    xs = [torch.randn(6, 3, 3, 3, generator=g, dtype=F64) for _ in range(2)]
    got = _merge(xs, name="conv.weight")
    want = C.merge_matrices([x.reshape(6, -1) for x in xs], "tsv").reshape(6, 3, 3, 3)
    assert got.shape == (6, 3, 3, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_inputs_are_not_modified():
    g = _gen(8)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    copies = [x.clone() for x in xs]
    op = _op()
    op.fn(TensorTask(NAME, torch.zeros(7, 5), xs, op.resolve_params({"lambda": 0.3}), [op.resolve_model_params({"weight": 2.0})] * 3))
    assert all(torch.equal(a, b) for a, b in zip(xs, copies))


# -- (e) order invariance --------------------------------------------------------------------------


def test_model_order_does_not_change_the_result():
    g = _gen(9)
    xs = [torch.randn(20, 15, generator=g, dtype=F64) for _ in range(4)]
    w = [1.0, 0.3, 2.0, 0.7]
    ref = _merge(xs, weights=w, **{"lambda": 0.9})
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        got = _merge([xs[i] for i in perm], weights=[w[i] for i in perm], **{"lambda": 0.9})
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    lora = [B @ A for A, B in _lora_factors(3, 16, 12, 2, seed=10)]
    ref = _merge(lora)
    torch.testing.assert_close(_merge(lora[::-1]), ref, rtol=0, atol=1e-10)


# -- (f) end to end --------------------------------------------------------------------------------


def test_merge_run_equals_the_operator_applied_directly(tiny_models, tmp_path, cli):
    models = [tiny_models[k] for k in "abc"]
    mp = ["{weight: 1.0}", "{weight: 0.5}", "{weight: 1.5}"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text(models, "tsv", tiny_models["base"], "{lambda: 0.8}", mp))
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    merged = load_dir(tmp_path / "out")
    base = load_dir(tiny_models["base"])
    ins = [load_dir(m) for m in models]
    op = _op()
    params = op.resolve_params({"lambda": 0.8})
    mps = [op.resolve_model_params({"weight": w}) for w in (1.0, 0.5, 1.5)]
    assert set(merged) == set(base)
    svd_done = 0
    for k, b in base.items():
        want = b + op.fn(TensorTask(k, b, [x[k] - b for x in ins], params, mps))
        torch.testing.assert_close(merged[k], want, rtol=0, atol=1e-6)
        svd_done += tsv_mod.uses_svd(k, tuple(b.shape), 3)
        if b.dim() == 1 or "embed_tokens" in k:
            mean = sum(w["weight"] * (x[k] - b) for w, x in zip(mps, ins)) / 3
            torch.testing.assert_close(merged[k], b + 0.8 * mean, rtol=0, atol=1e-6)
    assert svd_done == 15  # 7 projections x 2 layers + lm_head
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base[q], atol=1e-4)


def test_bundled_style_recipe_validates_and_dry_runs(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[k] for k in "ab"], "tsv", tiny_models["base"]))
    assert cli("validate", r)[0] == 0
    code, out, err = cli("run", r, "--out", tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tsv_peft(tmp_path_factory):
    """A tiny Llama (q 32x32, v 16x32, down 32x48) and two PEFT LoRAs each of rank floor(min/2)
    per module (q 16, v 8, down 16), plus a third LoRA of rank 4 everywhere."""
    from mergekit_ortho.testing.hf_models import load_causal_lm, tiny_llama
    from mergekit_ortho.testing.loras import make_peft_adapter, peft_merged_deltas

    root = tmp_path_factory.mktemp("tsv_peft")
    base = tiny_llama(root / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    full = [make_peft_adapter(load_causal_lm(base), root / f"l{i}", seed=i + 1, r=16, lora_alpha=32,
                              target_modules=targets, rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 8})
            for i in range(2)]
    low = make_peft_adapter(load_causal_lm(base), root / "low", seed=5, r=4, lora_alpha=8, target_modules=targets)
    deltas = {str(a): peft_merged_deltas(load_causal_lm(base), a) for a in full + [low]}
    return {"base": base, "full": full, "low": low, "deltas": deltas, "targets": targets}


def _run_yaml(tmp_path, cli, doc, out):
    import yaml

    r = tmp_path / f"{out}.yaml"
    r.write_text(yaml.safe_dump(doc))
    code, stdout, err = cli("run", r, "--out", tmp_path / out)
    assert code == 0, stdout + err
    return load_file(str(tmp_path / out / "model.safetensors"))


def test_merge_run_on_peft_loras_full_output_equals_core_space_tsv_when_rank_is_the_keep(tsv_peft, tmp_path, cli):
    # two LoRAs of rank floor(min(m, n)/2) on every module: the full-space rule keeps exactly each
    # LoRA's rank, so dense tsv on the deltas is well defined and equals core-space TSV (B10.4b)
    s = tsv_peft
    models = [{"model": str(a)} for a in s["full"]]
    common = {"base_model": str(s["base"]), "models": models, "output": {"format": "full"}}
    got = _run_yaml(tmp_path, cli, {"merge_method": "tsv", "parameters": {"lambda": 0.6}, **common}, "dense")
    core = _run_yaml(tmp_path, cli, {"merge_method": "core_space", "parameters": {"inner_method": "tsv",
                                                                                  "lambda": 0.6}, **common}, "core")
    b = load_file(str(s["base"] / "model.safetensors"))
    deltas = [s["deltas"][str(a)] for a in s["full"]]
    touched = set().union(*deltas)
    assert len(touched) == 6 and all(any(t in k for t in s["targets"]) for k in touched)
    for k, v in b.items():
        if k not in touched:
            assert torch.equal(got[k], v), k  # no LoRA adapts it: copied from the base
            continue
        torch.testing.assert_close(got[k], core[k], rtol=1e-5, atol=1e-6)
        ref = 0.6 * C.merge_matrices([d[k].to(F64) for d in deltas], "tsv")  # on PEFT's own deltas
        torch.testing.assert_close((got[k] - v).to(F64), ref, rtol=1e-4, atol=1e-5)


def test_merge_run_on_peft_loras_equals_the_operator_on_the_materialised_deltas(tsv_peft, tmp_path, cli):
    # with a rank-4 LoRA in the mix, floor(min/3) > 4 keeps zero-sigma triplets whose vectors are
    # set by round-off (B8.5): compare with the operator on the deltas exactly as the engine
    # materialises them (scale * B @ A in float32), not with PEFT's differently rounded deltas
    from mergekit_ortho.adapters.keymap import match_to_base
    from mergekit_ortho.adapters.lora import LoraSource
    from mergekit_ortho.adapters.matched import MatchedLora

    s = tsv_peft
    paths = s["full"] + [s["low"]]
    doc = {"merge_method": "tsv", "base_model": str(s["base"]), "models": [{"model": str(a)} for a in paths],
           "parameters": {"lambda": 0.6}, "output": {"format": "full"}}
    got = _run_yaml(tmp_path, cli, doc, "mixed")
    b = load_file(str(s["base"] / "model.safetensors"))
    srcs = []
    for a in paths:
        src = LoraSource(a)
        srcs.append(MatchedLora(src, match_to_base(src, list(b), {k: v.shape for k, v in b.items()})))
    op = _op()
    params = op.resolve_params({"lambda": 0.6})
    touched = set().union(*(s["deltas"][str(a)] for a in paths))
    for k, v in b.items():
        if k not in touched:
            assert torch.equal(got[k], v), k
            continue
        ins = [src.delta_for(k, v.shape).to(torch.float32) for src in srcs]
        want = v + op.fn(TensorTask(k, v.clone(), ins, params, [op.resolve_model_params({})] * 3))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


# -- (g) bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params,needle", [("{lambda: big}", "'lambda' must be a number"),
                                           ("{lambda: [1, big]}", "'lambda' must be a number"),
                                           ("{lamda: 1.0}", "did you mean 'lambda'")])
def test_bad_parameters_exit_2_with_one_line(tiny_models, tmp_path, cli, params, needle):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[k] for k in "ab"], "tsv", tiny_models["base"],
                                                      params))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_bad_embedding_pattern_and_missing_base_exit_2(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[k] for k in "ab"], "tsv", tiny_models["base"],
                                                      "{embedding_pattern: '(unclosed'}"))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2, (code, out, err)
    assert "embedding_pattern" in err and "Traceback" not in err
    r = write_recipe(tmp_path / "r2.yaml", recipe_text([tiny_models[k] for k in "ab"], "tsv"))
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2, (code, out, err)
    assert not (tmp_path / "out").exists()
