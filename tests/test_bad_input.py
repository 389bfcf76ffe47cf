"""Every bad input: one clear line on stderr, exit code 2, no traceback, no output written."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe


def expect_error(cli, tmp_path, args, *needles, code=2):
    rc, out, err = cli(*args)
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    for n in needles:
        assert n in text, (n, err)
    assert not (tmp_path / "out").exists()
    return err


def base_recipe(tiny_models, **over):
    r = {"merge_method": "ties", "base_model": str(tiny_models["base"]),
         "models": f"\n  - model: {tiny_models['a']}\n  - model: {tiny_models['b']}"}
    r.update(over)
    return "\n".join(f"{k}: {v}" for k, v in r.items()) + "\n"


def test_recipe_file_missing(cli, tmp_path):
    expect_error(cli, tmp_path, ["run", tmp_path / "nope.yaml", "--out", tmp_path / "out"], "recipe not found")


def test_invalid_yaml(cli, tmp_path):
    r = write_recipe(tmp_path / "r.yaml", "merge_method: [unclosed\n")
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "not valid YAML")


def test_unknown_method_suggests(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, merge_method="tie"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "unknown merge_method 'tie'", "did you mean 'ties'")


def test_unknown_recipe_key_named(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models) + "paramters: {lambda: 1}\n")
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "unknown recipe key 'paramters'", "parameters")


def test_unknown_model_key_named(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {tiny_models['a']}\n    weight: 1"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "unknown recipe key 'weight' in models[0]")


def test_wrong_types(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, parameters="{lambda: big}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "'lambda' must be a number")
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, include="7"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "include")
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, output="{shard_size: lots}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "size must be like 5GB")
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, out_dtype="int8"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "out_dtype 'int8'")


def test_missing_base_for_task_vector_method(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: ties\nmodels:\n  - model: {tiny_models['a']}\n")
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "needs 'base_model'")


def test_missing_model_path(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {tmp_path}/absent_dir"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "path not found", "absent_dir")


def _copy_model(src, dst, mutate):
    from safetensors import safe_open

    dst.mkdir()
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
    mutate(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_corrupt_and_truncated_safetensors(cli, tmp_path, tiny_models):
    bad = tmp_path / "trunc"
    bad.mkdir()
    data = (tiny_models["a"] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {bad}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "not a readable safetensors file", "trunc")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {junk}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "junk.safetensors")


def test_shape_mismatch_names_tensor_and_files(cli, tmp_path, tiny_models):
    k = "model.layers.0.mlp.up_proj.weight"
    bad = _copy_model(tiny_models["a"], tmp_path / "wide", lambda t: t.__setitem__(k, torch.zeros(25, 16)))
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {bad}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], k, "[24, 16]", "[25, 16]", "wide")


def test_missing_and_extra_tensor(cli, tmp_path, tiny_models):
    k = "model.norm.weight"  # (a missing lm_head is a tied head: tests/test_mergekit_recipes.py)
    bad = _copy_model(tiny_models["a"], tmp_path / "nonorm", lambda t: t.pop(k))
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {bad}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], f"'{k}'", "missing from", "nonorm")
    extra = _copy_model(tiny_models["a"], tmp_path / "extra", lambda t: t.__setitem__("new.weight", torch.ones(2)))
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {extra}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "'new.weight'", "not in")


def test_nan_in_result_fails_without_output(cli, tmp_path, tiny_models):
    k = "model.norm.weight"
    bad = _copy_model(tiny_models["a"], tmp_path / "nan", lambda t: t[k].__setitem__(0, float("nan")))
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, merge_method="task_arithmetic",
                                                      models=f"\n  - model: {bad}"))
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], f"'{k}'", "NaN or Inf")
    assert not list(tmp_path.glob(".out.partial-*"))


def test_malicious_pickle_refused(cli, tmp_path, tiny_models):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "evil"
    d.mkdir()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, models=f"\n  - model: {d}"))
    err = expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], "evil")
    assert "pwned" not in err


def test_output_exists(cli, tmp_path, tiny_models):
    (tmp_path / "out").mkdir()
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models))
    rc, _, err = cli("run", r, "--out", tmp_path / "out")
    assert rc == 2 and "already exists" in err and "--overwrite" in err


def test_verbose_shows_traceback(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, merge_method="tie"))
    from typer.testing import CliRunner

    from mergekit_ortho.cli import app

    res = CliRunner().invoke(app, ["--verbose", "run", str(r), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_no_output_path(cli, tmp_path, tiny_models):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models))
    expect_error(cli, tmp_path, ["run", r], "no output path")


@pytest.mark.parametrize("method,param", [("widen", "embedding_pattern"), ("widen", "transpose_pattern"),
                                          ("tsv", "embedding_pattern"), ("opcm", "projectable")])
def test_invalid_name_pattern_is_refused_before_any_tensor(cli, tmp_path, tiny_models, method, param):
    r = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_models, merge_method=method,
                                                      parameters=f"{{{param}: '(unclosed'}}"))
    expect_error(cli, tmp_path, ["validate", r], f"'{param}' is not a valid regular expression")
    expect_error(cli, tmp_path, ["run", r, "--out", tmp_path / "out"], f"'{param}' is not a valid regular expression")
