"""mergekit's modular recipes (``modules:`` with named modules, spec M8; recipe_modules.py): each
module's parameters and per-model parameters apply to its tensors only, unlisted modules are kept
from the reference model with a note, and the unsupported parts are refused with one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe
from test_run import load_dir

from mergekit_ortho.recipe_modules import module_of

TEXT = ["model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.1.self_attn.q_proj.weight",
        "model.language_model.norm.weight", "lm_head.weight"]
VISION = ["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
          "model.vision_tower.vision_model.post_layernorm.weight"]
PROJ = ["model.multi_modal_projector.linear_1.weight"]


def _vlm(path, value):
    path.mkdir(parents=True)
    save_file({n: torch.full((4, 3), float(value)) for n in TEXT + VISION + PROJ}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"num_hidden_layers": 2, "vocab_size": 4}, "vision_config": {"num_hidden_layers": 1}}))
    return path


@pytest.fixture
def vlms(tmp_path):
    return _vlm(tmp_path / "base", 1.0), _vlm(tmp_path / "a", 3.0), _vlm(tmp_path / "b", 5.0)


def test_module_of_takes_the_longest_prefix():
    assert module_of("model.language_model.layers.0.mlp.up_proj.weight") == "text_decoder"
    assert module_of("lm_head.weight") == "text_decoder"
    assert module_of("language_model.model.layers.0.mlp.up_proj.weight") == "text_decoder"  # LLaVA layout
    assert module_of("model.vision_tower.vision_model.post_layernorm.weight") == "vision_tower"
    assert module_of("vision_tower.vision_model.post_layernorm.weight") == "vision_tower"
    assert module_of("model.visual.blocks.0.attn.qkv.weight") == "vision_tower"  # Qwen-VL
    assert module_of("model.visual.merger.mlp.0.weight") == "multi_modal_projector"
    assert module_of("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector"
    assert module_of("vision_model.model.layers.0.mlp.fc1.weight") == "vision_model"  # Llama4
    assert module_of("model.layers.0.mlp.up_proj.weight") == "text_decoder"  # Qwen2-VL's older layout
    assert module_of("image_newline") is None


def test_each_module_gets_its_own_parameters(cli, tmp_path, vlms):
    base, a, b = vlms
    r = write_recipe(tmp_path / "r.yaml", f"""merge_method: task_arithmetic
base_model: {base}
modules:
  text_decoder:
    models:
      - model: {a}
        parameters: {{weight: 1.0}}
      - model: {b}
        parameters: {{weight: [{{filter: q_proj, value: 0.5}}, {{value: 1.0}}]}}
    parameters: {{lambda: 0.5}}
  vision_tower:
    models:
      - model: {a}
        parameters: {{weight: 0.0}}
      - model: {b}
        parameters: {{weight: 0.25}}
""")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    assert "module 'multi_modal_projector'" in err + out and "copied" in err + out, err + out
    got = load_dir(tmp_path / "out")
    # tau_a = 2, tau_b = 4 everywhere
    for n in TEXT:
        want = 1 + 0.5 * (2 * 1.0 + 4 * (0.5 if "q_proj" in n else 1.0))
        assert torch.equal(got[n], torch.full((4, 3), want)), (n, got[n])
    for n in VISION:  # the module sets no lambda: the top-level default 1
        assert torch.equal(got[n], torch.full((4, 3), 1 + 4 * 0.25)), n
    for n in PROJ:  # not listed: copied from the base
        assert torch.equal(got[n], torch.full((4, 3), 1.0)), n


def test_top_level_parameters_reach_every_module(cli, tmp_path, vlms):
    base, a, b = vlms
    r = write_recipe(tmp_path / "r.yaml", f"""merge_method: linear
parameters: {{weight: 1.0}}
modules:
  text_decoder:
    models: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 3.0}}}}]
  vision_tower:
    models: [{{model: {a}}}, {{model: {b}}}]
  multi_modal_projector:
    models: [{{model: {a}}}, {{model: {b}}}]
    parameters: {{normalize: false}}
""")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    got = load_dir(tmp_path / "out")
    assert torch.equal(got[TEXT[0]], torch.full((4, 3), (3 + 15) / 4))
    assert torch.equal(got[VISION[0]], torch.full((4, 3), 4.0))
    assert torch.equal(got[PROJ[0]], torch.full((4, 3), 8.0))  # weights 1 + 1, not divided


@pytest.mark.parametrize("body, message", [
    ("  text:\n    models: [{model: A}]\n", "unknown module 'text'"),
    ("  text_decoder:\n    slices: [{sources: [{model: A, layer_range: [0, 1]}]}]\n",
     "slices inside a named module are not supported"),
    ("  text_decoder:\n    models: [{model: A}, {model: B}]\n  vision_tower:\n    models: [{model: B}]\n",
     "every module must list the same models"),
    ("  default:\n    models: [{model: A}]\n  vision_tower:\n    models: [{model: A}]\n",
     "cannot be listed beside named modules"),
    ("  text_decoder:\n    models: [{model: A, parameters: {wieght: 1}}]\n", "unknown parameter 'wieght'"),
])
def test_refused_with_one_line(cli, tmp_path, vlms, body, message):
    base, a, b = vlms
    text = f"merge_method: linear\nmodules:\n{body}".replace("model: A", f"model: {a}").replace("model: B", f"model: {b}")
    r = write_recipe(tmp_path / "r.yaml", text)
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2, (code, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_module_the_checkpoint_lacks_is_refused(cli, tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2)}, str(a / "model.safetensors"))
    (a / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodules:\n  vision_tower:\n"
                                          f"    models: [{{model: {a}}}, {{model: {a}}}]\n")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "modules.vision_tower: no tensor of the reference model" in err, err
    assert not (tmp_path / "out").exists()
