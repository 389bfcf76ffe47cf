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


# --- end to end: full fine-tunes of a tiny Mixtral in both layouts, merged through the CLI -----------


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    import json

    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mixtral_stacks")
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=32, num_local_experts=3, num_experts_per_tok=2,
                                     max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, seed in (("base", None), ("ft1", 1), ("ft2", 2)):
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()})
        model.save_pretrained(root / "per" / name)  # on disk per expert (transformers converts on save)
        (root / "fused" / name).mkdir(parents=True)  # the in-memory layout: experts.gate_up_proj [E, 2I, H]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(root / "fused" / name / "model.safetensors"))
        (root / "fused" / name / "config.json").write_text(json.dumps(model.config.to_dict()))
    return root, transformers.MixtralForCausalLM


@pytest.mark.parametrize("method,exact", [("tsv", True), ("opcm", False)])
def test_cli_merges_of_either_layout_agree(cli, tmp_path, mixtral, method, exact):
    root, cls = mixtral
    got = {}
    for layout in ("per", "fused"):
        d = root / layout
        (tmp_path / "r.yaml").write_text(f"merge_method: {method}\nbase_model: {d / 'base'}\nmodels:\n"
                                         f"  - model: {d / 'ft1'}\n  - model: {d / 'ft2'}\n")
        code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / layout)
        assert code == 0, out + err
        got[layout] = cls.from_pretrained(tmp_path / layout).state_dict()  # both seen fused in memory
    stacks = [k for k in got["fused"] if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacks) == 2
    for k in got["fused"]:
        if exact:
            assert torch.equal(got["fused"][k], got["per"][k]), k
        else:
            torch.testing.assert_close(got["fused"][k], got["per"][k], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def expert_loras(mixtral, tmp_path_factory):
    """Two peft LoRAs on the expert parameters (target_parameters) of the tiny Mixtral."""
    from peft import LoraConfig, get_peft_model

    root, cls = mixtral
    out = tmp_path_factory.mktemp("expert_loras")
    for i, seed in enumerate((1, 2)):
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        torch.manual_seed(seed)
        model = get_peft_model(cls.from_pretrained(root / "per" / "base"), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn_like(p))
        model.save_pretrained(out / f"l{i}")
    return out


@pytest.mark.parametrize("inner", ["task_arithmetic", "tsv", "tsv_iso"])
def test_core_space_on_a_fused_base_equals_the_per_expert_base(cli, tmp_path, mixtral, expert_loras, inner):
    root, cls = mixtral
    params = {"tsv_iso": "{inner_method: tsv, isotropize: true}", "tsv": "{inner_method: tsv}",
              "iso": "{isotropize: true}"}.get(inner, "{}")
    got = {}
    for layout in ("per", "fused"):
        (tmp_path / "r.yaml").write_text(f"merge_method: core_space\nbase_model: {root / layout / 'base'}\n"
                                         f"parameters: {params}\nmodels:\n  - model: {expert_loras / 'l0'}\n"
                                         f"  - model: {expert_loras / 'l1'}\noutput: {{format: full}}\n")
        code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / layout)
        assert code == 0, out + err
        got[layout] = cls.from_pretrained(tmp_path / layout).state_dict()
    base = cls.from_pretrained(root / "per" / "base").state_dict()
    stacks = [k for k in base if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert stacks and all((got["per"][k] - base[k]).abs().max() > 1e-2 for k in stacks)  # the LoRAs act
    for k in got["fused"]:
        torch.testing.assert_close(got["fused"][k], got["per"][k], rtol=1e-5, atol=1e-5)
