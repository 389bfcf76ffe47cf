"""Tensors outside mergekit's architecture lists (spec M5, Appendix A8; mk_tensor_set.py): mergekit
0.1.5 drops them silently; here they are kept and merged like every other tensor, mergekit's own
tensors are unchanged, and one note per group says what mergekit would have dropped."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from conftest import write_recipe
from test_run import load_dir

from mergekit_ortho.mk_tensor_set import MAX_LINES, not_written, notes

LISTED = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]
EXTRA = ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.rotary_emb.inv_freq", "model.foo.weight"]


def _llama(path, value):
    path.mkdir(parents=True)
    names = [f"model.layers.0.{s}.weight" for s in LISTED] + ["model.embed_tokens.weight", "model.norm.weight",
                                                              "lm_head.weight"] + EXTRA
    save_file({n: torch.full((2, 2), float(value)) for n in names}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "num_hidden_layers": 1, "attention_bias": True}))
    return path, names


def test_extra_tensors_are_kept_merged_and_named(cli, tmp_path):
    (a, names), (b, _) = _llama(tmp_path / "a", 100.0), _llama(tmp_path / "b", 200.0)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                                          f"  - model: {b}\n    parameters: {{weight: 1}}\n")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    got = load_dir(tmp_path / "out")
    assert set(got) == set(names)  # mergekit writes the 12 listed ones only
    for n in names:  # listed tensors as mergekit writes them; the extras merged by the same rule
        assert torch.equal(got[n], torch.full((2, 2), 150.0)), n
    text = out + err
    for g in ("model.layers.N.self_attn.q_proj.bias", "model.layers.N.self_attn.rotary_emb.inv_freq",
              "model.foo.weight"):
        assert f"kept: '{g}' (1 tensor(s)) is outside mergekit 0.1.5's LlamaForCausalLM tensor list" in text, text
    assert "'model.layers.N.self_attn.q_proj.weight'" not in text and "'lm_head.weight'" not in text


def test_family_rules():
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2}
    assert not_written(qwen2, ["model.layers.1.self_attn.q_proj.bias", "model.layers.0.mlp.up_proj.weight",
                               "lm_head.weight"]) == {}
    assert not_written({**qwen2, "architectures": ["LlamaForCausalLM"]}, ["model.layers.1.self_attn.q_proj.bias"]) \
        == {"model.layers.N.self_attn.q_proj.bias": ["model.layers.1.self_attn.q_proj.bias"]}
    gemma = {"architectures": ["GemmaForCausalLM"], "num_hidden_layers": 1}
    assert list(not_written(gemma, ["lm_head.weight", "model.norm.weight"])) == ["lm_head.weight"]
    past = not_written({"architectures": ["MistralForCausalLM"], "num_hidden_layers": 1},
                       ["model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"])
    assert past == {"model.layers.N (past num_hidden_layers)": ["model.layers.3.mlp.up_proj.weight"]}
    # an architecture without a list here: nothing is claimed
    assert not_written({"architectures": ["PhiForCausalLM"]}, ["x.weight"]) == {}
    assert not_written({}, ["x.weight"]) == {}


def test_many_groups_are_counted_not_listed():
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}
    lines = notes(cfg, [f"extra{i}.weight" for i in range(MAX_LINES + 3)])
    assert len(lines) == MAX_LINES + 1 and lines[-1].startswith("kept: 3 more group(s), 3 tensor(s)")
