"""Bad checkpoint inputs from issue 15 each stop with one line (exit 2, no output written): a
model of another family, an input whose names no known prefix maps, an expert count mismatch
between fused and per-expert layouts. (FP8 without scales: tests/test_fp8.py.)"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from conftest import write_recipe


def _save(d, tensors, config):
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    return d


def _tiny(cls_name, cfg_name, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                          max_position_embeddings=32, tie_word_embeddings=False, **kw)
    model = getattr(transformers, cls_name)(cfg)
    return model.state_dict(), cfg.to_dict()


def _run(cli, tmp_path, base, model):
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}\n"
                                               f"models:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    code, out, err = cli("run", recipe, "--out", tmp_path / "out")
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_a_qwen2_into_a_llama_is_one_line(cli, tmp_path):
    base = _save(tmp_path / "llama", *_tiny("LlamaForCausalLM", "LlamaConfig"))
    other = _save(tmp_path / "qwen2", *_tiny("Qwen2ForCausalLM", "Qwen2Config"))
    err = _run(cli, tmp_path, base, other)
    assert "same architecture" in err, err


def test_an_unmappable_prefix_is_one_line(cli, tmp_path):
    sd, cfg = _tiny("LlamaForCausalLM", "LlamaConfig")
    base = _save(tmp_path / "base", sd, cfg)
    odd = {"backbone.decoder." + k: v for k, v in sd.items()}  # no known VLM layout maps this prefix
    other = _save(tmp_path / "odd", odd, cfg)
    err = _run(cli, tmp_path, base, other)
    assert "lm_head.weight" in err and "missing from" in err, err


def test_an_expert_count_mismatch_is_one_line(cli, tmp_path):
    kw = dict(num_experts_per_tok=2)
    sd, cfg = _tiny("MixtralForCausalLM", "MixtralConfig", num_local_experts=3, **kw)
    base = _save(tmp_path / "base", sd, cfg)  # fused experts (transformers 5 in-memory layout)
    sd4, cfg4 = _tiny("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, **kw)
    per_expert = {}
    for k, v in sd4.items():
        if k.endswith("experts.gate_up_proj"):
            stem = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                w1, w3 = v[e].chunk(2, dim=0)
                per_expert[f"{stem.replace('mlp.experts.', 'block_sparse_moe.experts.')}{e}.w1.weight"] = w1
                per_expert[f"{stem.replace('mlp.experts.', 'block_sparse_moe.experts.')}{e}.w3.weight"] = w3
        elif k.endswith("experts.down_proj"):
            stem = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                per_expert[f"{stem.replace('mlp.experts.', 'block_sparse_moe.experts.')}{e}.w2.weight"] = v[e]
        else:
            per_expert[k] = v
    other = _save(tmp_path / "four", per_expert, cfg4)
    err = _run(cli, tmp_path, base, other)
    assert "expert" in err and "3" in err and "4" in err, err
