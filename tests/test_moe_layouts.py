"""MoE experts stored fused (a state dict saved as transformers 5 holds it in memory) merge with
per-expert checkpoints, in both directions, and the result loads in transformers (issue 15)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from test_run import load_dir


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=32, num_local_experts=3, num_experts_per_tok=2,
                        max_position_embeddings=32, tie_word_embeddings=False)
    return cfg, MixtralForCausalLM


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cfg, cls = _mixtral()
    torch.manual_seed(0)
    base = cls(cfg).eval()
    base.save_pretrained(root / "base")  # per-expert on disk: block_sparse_moe.experts.{e}.w1/w2/w3
    torch.manual_seed(1)
    ft = cls(cfg).eval()
    with torch.no_grad():
        for (_, p), (_, q) in zip(ft.named_parameters(), base.named_parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    ft.save_pretrained(root / "ft")
    (root / "ft_fused").mkdir()
    (root / "ft_fused" / "config.json").write_text((root / "ft" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(root / "ft_fused" / "model.safetensors"))
    return root, ft


def _ta(tmp_path, base, model):
    return write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}\n"
                                             f"models:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")


def test_fused_experts_into_a_per_expert_base(cli, tmp_path, moe):
    root, ft = moe
    code, out, err = cli("run", _ta(tmp_path, root / "base", root / "ft_fused"), "--out", tmp_path / "out")
    assert code == 0, err
    assert "fused experts read as 18 per-expert tensors" in err
    got, want = load_dir(tmp_path / "out"), load_file(str(root / "ft" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    _, cls = _mixtral()
    merged = cls.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 4, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ft(ids).logits, atol=1e-5)


def test_per_expert_fine_tune_into_a_fused_base(cli, tmp_path, moe):
    root, ft = moe
    code, out, err = cli("run", _ta(tmp_path, root / "ft_fused", root / "base"), "--out", tmp_path / "out")
    assert code == 0, err
    assert "per-expert tensors read as 4 fused expert tensors" in err
    got = load_dir(tmp_path / "out")
    fused = load_file(str(root / "ft_fused" / "model.safetensors"))
    _, cls = _mixtral()
    torch.manual_seed(0)
    base = {k: v for k, v in cls(_mixtral()[0]).state_dict().items()}  # the same seed as the fixture's base
    assert set(got) == set(fused)
    for k in fused:
        assert torch.allclose(got[k], base[k], atol=1e-6), k  # ft + (base - ft): the base, fused


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_the_expert_table_agrees_with_transformers_conversion_rules(model_type):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from mergekit_ortho.experts import FUSED, RENAMES

    rules = get_checkpoint_conversion_mapping(model_type)
    for r in rules:
        if type(r).__name__ == "WeightRenaming":
            assert tuple(r.source_patterns + r.target_patterns) in RENAMES
            continue
        target = r.target_patterns[0].rsplit(".", 1)[-1]
        parts = tuple(p.split("*.")[1].removesuffix(".weight") for p in r.source_patterns)
        assert parts in FUSED[target]
        ops = [repr(o) for o in r.operations]
        assert ops == (["MergeModulelist(dim=0)", "Concatenate(dim=1)"] if len(parts) > 1
                       else ["MergeModulelist(dim=0)"])
