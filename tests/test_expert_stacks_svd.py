"""Matrix methods on fused MoE expert stacks (issue 15): tsv and opcm treat a transformers 5
stack (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) as the E *
parts linear maps it holds, one SVD each, so the fused layout gives the per-expert 2-D layout's
result (``experts.{e}.gate_proj.weight`` ... as published): bit for bit per tensor, and to float
round-off (1e-6 relative) where a global norm sums the tensors in another order (opcm's lambda)."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.expert_stacks import blocks
from mergekit_ortho.ops.opcm import FOLD, is_projectable, opcm_merge
from mergekit_ortho.ops.registry import TensorTask

E, I, H = 3, 6, 5
P = "model.layers.0.mlp"


def _per_expert(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-expert 2-D layout of a fused state dict (gate then up along dim 1)."""
    out = {}
    for k, v in fused.items():
        if k.endswith("gate_up_proj"):
            for e in range(E):
                out[f"{P}.experts.{e}.gate_proj.weight"] = v[e, :I].clone()
                out[f"{P}.experts.{e}.up_proj.weight"] = v[e, I:].clone()
        elif k.endswith("down_proj"):
            for e in range(E):
                out[f"{P}.experts.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def _fuse(per: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gu = torch.stack([torch.cat([per[f"{P}.experts.{e}.gate_proj.weight"], per[f"{P}.experts.{e}.up_proj.weight"]])
                      for e in range(E)])
    down = torch.stack([per[f"{P}.experts.{e}.down_proj.weight"] for e in range(E)])
    return {f"{P}.experts.gate_up_proj": gu, f"{P}.experts.down_proj": down}


def _model(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{P}.experts.gate_up_proj": torch.randn(E, 2 * I, H, generator=g, dtype=dtype),
            f"{P}.experts.down_proj": torch.randn(E, H, I, generator=g, dtype=dtype),
            f"{P}.gate.weight": torch.randn(E, H, generator=g, dtype=dtype)}


def test_blocks_name_each_expert_and_part():
    assert blocks(f"{P}.experts.gate_up_proj", (E, 2 * I, H)) == [(e, slice(p * I, (p + 1) * I))
                                                                 for e in range(E) for p in range(2)]
    assert blocks(f"{P}.experts.down_proj", (E, H, I)) == [(e, slice(0, H)) for e in range(E)]
    assert blocks("model.layers.0.conv.weight", (4, 3, 3)) is None  # a conv kernel is no stack
    assert blocks(f"{P}.experts.gate_up_proj", (E, 2 * I)) is None


@pytest.mark.parametrize("T", [2, 3])
def test_tsv_fused_equals_per_expert_bit_for_bit(T):
    op = registry.get("tsv")
    base = _model(0)
    models = [_model(10 + t) for t in range(T)]
    params = op.resolve_params({"lambda": 0.7})
    mps = [op.resolve_model_params({"weight": 1.0 + 0.25 * t}) for t in range(T)]

    def merge(name, b, xs):
        return op.fn(TensorTask(name, b, [x - b for x in xs], params, mps))

    fused = {k: merge(k, base[k], [m[k] for m in models]) for k in base if "experts" in k}
    pb, pms = _per_expert(base), [_per_expert(m) for m in models]
    per = {k: merge(k, pb[k], [m[k] for m in pms]) for k in pb if "experts" in k}
    for k, v in _fuse(per).items():
        assert torch.equal(fused[k], v), k
    # the old rule (one SVD of the flattened stack) differs: the test can fail
    flat = op.fn(TensorTask("model.layers.0.mlp.stacked", base[f"{P}.experts.down_proj"],
                            [m[f"{P}.experts.down_proj"] - base[f"{P}.experts.down_proj"] for m in models], params, mps))
    assert not torch.allclose(flat, fused[f"{P}.experts.down_proj"], atol=1e-3)


def test_opcm_projects_a_stack_per_expert_and_counts_the_matrices():
    op = registry.get("opcm")
    params = op.resolve_params({})
    g = torch.Generator().manual_seed(3)
    prev = torch.randn(E, 2 * I, H, generator=g)
    tau = torch.randn(E, 2 * I, H, generator=g)
    name = f"{P}.experts.gate_up_proj"
    assert is_projectable(name, tau, params)
    new, stats = FOLD.step(prev, tau, 1, TensorTask(name, None, [], params, []))
    assert stats["projected"] == 2 * E
    for e, rows in blocks(name, tuple(tau.shape)):
        one, s1 = FOLD.step(prev[e, rows].contiguous(), tau[e, rows].contiguous(), 1,
                            TensorTask(f"{P}.experts.{e}.gate_proj.weight", None, [], params, []))
        assert s1["projected"] == 1.0
        assert torch.equal(new[e, rows], one)
    assert not torch.allclose(new, prev + tau)  # projected, not summed


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_opcm_fused_equals_per_expert_end_to_end(dtype, tol):
    base = _model(0, dtype)
    models = [_model(20 + t, dtype) for t in range(3)]
    fused = opcm_merge(base, models)
    per = opcm_merge(_per_expert(base), [_per_expert(m) for m in models])
    for k, v in _fuse(per).items():
        torch.testing.assert_close(fused[k], v, rtol=tol, atol=tol)
    torch.testing.assert_close(fused[f"{P}.gate.weight"], per[f"{P}.gate.weight"], rtol=tol, atol=tol)
    summed = base[f"{P}.experts.down_proj"] + sum(m[f"{P}.experts.down_proj"] - base[f"{P}.experts.down_proj"]
                                                   for m in models)
    assert not torch.allclose(fused[f"{P}.experts.down_proj"], summed, atol=1e-3)
