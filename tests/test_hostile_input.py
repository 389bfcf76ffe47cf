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


def test_tokenizer_source_union_is_said_not_acted_on(tmp_path, cli, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
                     f"  - model: {tiny_models['b']}\ntokenizer_source: union\n")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0 and "union" in err and "not supported yet" in err


def test_tokenizer_source_directory_donates_its_files(tmp_path, cli, tiny_models):
    donor = tmp_path / "donor"
    shutil.copytree(tiny_models["b"], donor)
    (donor / "tokenizer.json").write_text('{"donor": true}')
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
                     f"  - model: {tiny_models['b']}\ntokenizer_source: {donor}\n")
    assert cli("run", r, "--out", tmp_path / "out")[0] == 0
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"donor": True}


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

    entries = "".join(f"  - model: ./same\n" for _ in range(2500))
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n{entries}")
    t = time.time()
    labels = recipe.load(r).model_labels()
    assert time.time() - t < 5
    assert len(set(labels)) == 2500 and labels[:3] == ["same", "same_2", "same_3"]
