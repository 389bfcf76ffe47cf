"""Hostile or unusual input never crashes the CLI: one line, exit 2 (or success), no traceback,
no hang, no output on failure."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]


def one_line_error(cli, args, *needles):
    code, out, err = cli(*args)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# --- rich markup and control characters in user text --------------------------------------------

def test_tensor_named_like_markup_is_printed_verbatim(tmp_path, cli):
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"[/x]": torch.randn(4, 4, generator=g), "[bold]w": torch.randn(4, generator=g)},
                  str(tmp_path / name / "model.safetensors"))
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n"
                     f"  - model: {tmp_path / 'b'}\n")
    code, out, err = cli("run", r, "--out", tmp_path / "out", "--dry-run")
    assert code == 0, err
    assert "[/x]" in out and "[bold]w" in out
    code, out, err = cli("inspect", tmp_path / "a")
    assert code == 0 and "[/x]" in out, err


def test_path_with_brackets_and_newline_in_errors(tmp_path, cli):
    weird = tmp_path / "v[2]\nerror: forged"
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {json.dumps(str(weird))}\n")
    err = one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "v[2]")
    assert "\\n" in err  # the newline is shown escaped, never a second line


def test_continual_add_with_a_markup_name_commits_and_status_works(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     "models: []\n")
    state = tmp_path / "s"
    assert cli("continual", "init", state, "--recipe", r)[0] == 0
    code, out, err = cli("continual", "add", state, tiny_models["a"], "--name", "[/x]")
    assert code == 0 and "[/x]" in out, err
    code, out, err = cli("continual", "status", state)
    assert code == 0 and "[/x]" in out, err


# --- YAML -------------------------------------------------------------------------------------------

def test_billion_laughs_recipe_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("merge_method: linear\nmodels: *a9\n")
    r = write_recipe(tmp_path / "r.yaml", "\n".join(lines))
    t = time.time()
    p = subprocess.run(CLI + ["validate", str(r)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "aliases" in p.stderr and len(p.stderr) < 400, p.stderr[:500]
    assert time.time() - t < 30


def test_deeply_nested_yaml_is_refused(tmp_path, cli):
    r = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nparameters: " + "[" * 20000 + "]" * 20000 + "\n")
    one_line_error(cli, ["validate", r], "r.yaml")


def test_long_values_are_truncated_in_messages(tmp_path, cli, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nbase_model: {tiny_models['base']}\nmodels:\n"
                     f"  - model: {tiny_models['a']}\nparameters: {{lambda: '{'x' * 100000}'}}\n")
    err = one_line_error(cli, ["validate", r], "lambda")
    assert len(err) < 400


def test_exponent_without_a_dot_is_a_number(tmp_path, cli, tiny_models):
    """YAML 1.1 reads 1e-3 as a string; recipes are read with YAML 1.2's float rule."""
    from mergekit_ortho import recipe

    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n    parameters: {{weight: 1e-3}}\n"
                     "parameters: {lambda: 2E+0}\n")
    rec = recipe.load(r)
    assert rec.models[0].parameters["weight"] == pytest.approx(1e-3) and rec.parameters["lambda"] == 2.0
    assert cli("validate", r)[0] == 0


@pytest.mark.parametrize("method,params", [("ties", "{density: .nan}"), ("dare_ties", "{density: .nan}"),
                                           ("widen", "{temperature: .nan}"), ("task_arithmetic", "{weight: .nan}")])
def test_nan_hyperparameters_are_refused(tmp_path, cli, tiny_models, method, params):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: {method}\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n    parameters: {params}\n"
                     f"  - model: {tiny_models['b']}\n")
    if method == "widen":
        r.write_text(r.read_text().replace(f"    parameters: {params}\n", "") + f"parameters: {params}\n")
    one_line_error(cli, ["validate", r], "NaN")


# --- sources ----------------------------------------------------------------------------------------

def test_tokenizer_source_naming_a_missing_path_is_an_error(tmp_path, cli, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
                     f"  - model: {tiny_models['b']}\ntokenizer_source: ./no-such-model\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "tokenizer_source", "not found")
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_union_without_tokenizer_files_is_one_line(tmp_path, cli, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
                     f"  - model: {tiny_models['b']}\ntokenizer_source: union\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "tokenizer", "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_directory_that_is_not_a_tokenizer_is_one_line(tmp_path, cli, tiny_models):
    donor = tmp_path / "donor"
    shutil.copytree(tiny_models["b"], donor)
    (donor / "tokenizer.json").write_text('{"donor": true}')
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
                     f"  - model: {tiny_models['b']}\ntokenizer_source: {donor}\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_legacy_non_zip_pickle_checkpoint_is_read(tmp_path, cli, tiny_models):
    from safetensors import safe_open

    with safe_open(str(tiny_models["a"] / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(tensors, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {legacy}\n"
                     f"  - model: {tiny_models['a']}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as h:
        for k in tensors:
            assert torch.equal(h.get_tensor(k), tensors[k])


def test_many_models_are_named_in_linear_time(tmp_path):
    from mergekit_ortho import recipe

    entries = "".join("  - model: ./same\n" for _ in range(2500))
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n{entries}")
    t = time.time()
    labels = recipe.load(r).model_labels()
    assert time.time() - t < 5
    assert len(set(labels)) == 2500 and labels[:3] == ["same", "same_2", "same_3"]


# --- JSON files we read -----------------------------------------------------------------------------

def _state(tiny_models, tmp_path, cli) -> Path:
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n")
    state = tmp_path / "s"
    assert cli("continual", "init", state, "--recipe", r)[0] == 0
    return state


@pytest.mark.parametrize("edit,needle", [
    (lambda d: [1], "expected a JSON object"),
    (lambda d: {**d, "t": "abc"}, "field 't' must be an integer"),
    (lambda d: {**d, "method": "nope"}, "unknown merge_method 'nope'"),
    (lambda d: {**d, "history": None}, "field 'history' must be a list"),
    (lambda d: {**d, "history": [1]}, "history[0] must be an object"),
    (lambda d: {**d, "t": 5}, "the history lists 1"),
    (lambda d: {**d, "current": "../../etc"}, "field 'current'"),
    (lambda d: {k: v for k, v in d.items() if k != "tensors"}, "field 'tensors' is missing"),
])
def test_hand_edited_state_json_is_one_line(tiny_models, tmp_path, cli, edit, needle):
    state = _state(tiny_models, tmp_path, cli)
    f = state / "state.json"
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))
    for args in (["continual", "status", state], ["continual", "add", state, tiny_models["b"]],
                 ["continual", "export", state, "--out", tmp_path / "out"]):
        one_line_error(cli, args, "state.json", needle)


def test_deep_json_state_is_one_line(tiny_models, tmp_path, cli):
    state = _state(tiny_models, tmp_path, cli)
    (state / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(cli, ["continual", "status", state], "nested too deeply")


def test_config_json_that_is_an_array_is_one_line(tiny_models, tmp_path, cli):
    model = tmp_path / "a"
    shutil.copytree(tiny_models["a"], model)
    (model / "config.json").write_text("[1]")
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {model}\n"
                     f"  - model: {tiny_models['b']}\nout_dtype: bfloat16\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "config.json", "expected a JSON object")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("lora_alpha", "abc"), ("r", 2.5), ("use_rslora", "yes"),
                                         ("rank_pattern", {"l": "x"}), ("target_modules", 3)])
def test_adapter_config_with_wrong_types_is_one_line(tmp_path, cli, field, value):
    from mergekit_ortho.testing.loras import write_peft_dir

    tensors = {"base_model.model.l.lora_A.weight": torch.ones(2, 4),
               "base_model.model.l.lora_B.weight": torch.ones(4, 2)}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["l"], field: value}
    a = write_peft_dir(tmp_path / "a", tensors, cfg)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nmodels:\n  - model: {a}\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "adapter_config.json", field)


def test_fuzzed_json_files_and_headers_exit_0_or_2(tiny_models, tmp_path):
    """Byte flips and truncations of the shard index, config.json, adapter_config.json and a shard's
    header, through `merge run`: never exit 1, never a traceback, no output on failure. A bounded
    budget here; benchmarks/fuzz_inputs.py runs longer."""
    from mergekit_ortho.testing.fuzz import fuzz_cli

    assert fuzz_cli(tmp_path, tiny_models["a"], tiny_models["b"], seconds=4) > 5


def test_tensor_stored_in_two_shards_is_refused(tiny_models, tmp_path, cli):
    from safetensors import safe_open

    from conftest import sharded_copy

    model = sharded_copy(tiny_models["a"], tmp_path / "m")
    first, second = sorted(model.glob("model-*.safetensors"))
    with safe_open(str(first), "pt") as h:
        one = {k: h.get_tensor(k) for k in h.keys()}
    with safe_open(str(second), "pt") as h:
        two = {k: h.get_tensor(k) for k in h.keys()}
    dup = sorted(one)[0]
    two[dup] = one[dup] + 1  # a second, different copy that the index does not name
    save_file(two, str(second))
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {model}\n"
                     f"  - model: {tiny_models['b']}\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], dup, "both")


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                                              "DefaultCPUAllocator: can't allocate memory: you tried "
                                                              "to allocate 123 bytes.")])
def test_out_of_memory_names_the_tensor_and_the_estimate(tmp_path, cli, tiny_models, monkeypatch, exc):
    from mergekit_ortho import execute

    real = execute.merge_tensor

    def failing(plan, name):
        if name == "model.embed_tokens.weight":
            raise exc
        return real(plan, name)

    monkeypatch.setattr(execute, "merge_tensor", failing)
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                     f"models:\n  - model: {tiny_models['a']}\n")
    one_line_error(cli, ["run", r, "--out", tmp_path / "out"], "out of memory", "model.embed_tokens.weight",
                   "estimated a peak")
    assert not (tmp_path / "out").exists()


def test_state_whose_tensor_directory_is_gone_is_damaged(tiny_models, tmp_path, cli):
    state = _state(tiny_models, tmp_path, cli)
    current = json.loads((state / "state.json").read_text())["current"]
    shutil.rmtree(state / current)
    one_line_error(cli, ["continual", "status", state], "is missing; the state is damaged")
