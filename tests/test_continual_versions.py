"""Continual states: the recipe's dtype rounding, versions (retention, tags, promote), the gate."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_recipe
from test_continual import init_state, state_tensors
from test_run import load_dir, recipe_text

from mergekit_ortho import continual
from mergekit_ortho.continual.queue import Queue

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]


@pytest.mark.parametrize("method", ["task_arithmetic", "magmax"])
def test_add_rounds_inputs_to_the_recipes_dtype_as_merge_run_does(tiny_models, tmp_path, cli, method):
    r = write_recipe(tmp_path / "init.yaml", f"merge_method: {method}\nbase_model: {tiny_models['base']}\n"
                     "dtype: bfloat16\n")
    state = tmp_path / "state"
    continual.init(state, r)
    for m in "abc":
        continual.add(state, str(tiny_models[m]), name=m)
    continual.export(state, tmp_path / "exported")
    batch = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[m] for m in "abc"], method, tiny_models["base"],
                                                          extra="dtype: bfloat16\n"))
    assert cli("run", batch, "--out", tmp_path / "batch")[0] == 0
    a, b = load_dir(tmp_path / "exported"), load_dir(tmp_path / "batch")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # without the rounding the inputs (float32 here) give another result: the test can fail
    plain = init_state(tmp_path / "plain", tiny_models, method, models="abc")
    continual.export(plain, tmp_path / "plain_out")
    c = load_dir(tmp_path / "plain_out")
    assert any(not torch.equal(a[k].float(), c[k].float()) for k in a)


def test_retention_keeps_the_last_k_and_tagged_versions(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "i.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n")
    state = tmp_path / "s"
    assert cli("continual", "init", state, "--recipe", r, "--retain", "2")[0] == 0
    continual.add(state, str(tiny_models["a"]), name="a")
    assert cli("continual", "tag", state, "1", "first")[0] == 0
    for m in "bc":
        continual.add(state, str(tiny_models[m]), name=m)
    continual.add(state, str(tiny_models["a"]), name="a2", force=True)
    vs = continual.list_versions(state)
    assert [v["version"] for v in vs] == ["v000001", "v000003", "v000004"]
    assert vs[0]["tags"] == ["first"] and vs[-1]["current"] and not vs[0]["current"]
    assert all(v["disk_bytes"] > 0 for v in vs) and vs[-1]["models"] == ["a", "b", "c", "a2"]
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("v")) == ["v000001", "v000003", "v000004"]
    code, out, _ = cli("continual", "versions", state, "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)] == ["v000001", "v000003", "v000004"]
    code, out, _ = cli("continual", "versions", state)
    assert code == 0 and "* v000004" in out and "first" in out
    code, _, err = cli("continual", "promote", state, "v000002")
    assert code == 2 and "no version 'v000002' is kept" in err
    code, _, err = cli("continual", "tag", state, "3", "bad tag!")
    assert code == 2 and "tag" in err


def test_promote_rolls_back_and_later_adds_continue_from_it(tiny_models, tmp_path, cli):
    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}", models="ab")
    continual.add(state, str(tiny_models["c"]), name="c")
    assert cli("continual", "promote", state, "1")[0] == 0  # a tag, a number or a name
    st = continual.State.load(state)
    assert st.t == 1 and [h["name"] for h in st.data["history"]] == ["a"] and st.data["current"] == "v000001"
    continual.add(state, str(tiny_models["c"]), name="c")  # folds into v1's tensors: a then c
    ref = init_state(tmp_path / "ref", tiny_models, "task_arithmetic", "{lambda: 0.5}", models="ac")
    a, b = state_tensors(state), state_tensors(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert continual.State.load(state).data["current"] == "v000004"  # numbered on, not by t
    # roll forward to the version with three models, and export an older one by name
    continual.promote(state, "v000003")
    assert continual.State.load(state).t == 3
    continual.export(state, tmp_path / "v1", version="v000004")
    continual.export(ref, tmp_path / "ref_out")
    x, y = load_dir(tmp_path / "v1"), load_dir(tmp_path / "ref_out")
    assert all(torch.equal(x[k], y[k]) for k in y)


@pytest.mark.parametrize("kill_after", [0.3, 1.0, 2.0])
def test_kill9_during_promote_leaves_old_or_new(tiny_models, tmp_path, kill_after):
    state = init_state(tmp_path, tiny_models, "task_arithmetic", models="ab")
    old, new = state_tensors(state), None
    proc = subprocess.Popen(CLI + ["continual", "promote", str(state), "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = continual.State.load(state)
    assert st.t in (1, 2) and len(st.data["history"]) == st.t
    new = state_tensors(state)
    if st.t == 2:
        assert all(torch.equal(new[k], old[k]) for k in old)
    continual.add(state, str(tiny_models["c"]), name="c")
    assert continual.State.load(state).t == st.t + 1


def _diverged(tiny_models, path, factor):
    base = load_dir(tiny_models["base"])
    a = load_dir(tiny_models["a"])
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: (base[k] + factor * (a[k] - base[k])).contiguous() for k in a}, str(path / "model.safetensors"))
    return path


def test_gate_refuses_a_diverged_model_and_leaves_the_state_untouched(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "i.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n")
    state = tmp_path / "s"
    assert cli("continual", "init", state, "--recipe", r, "--gate-max-norm-ratio", "5")[0] == 0
    for m in "ab":
        continual.add(state, str(tiny_models[m]), name=m)
    before = (state / "state.json").read_bytes()
    tensors = state_tensors(state)
    code, _, err = cli("continual", "add", state, _diverged(tiny_models, tmp_path / "big", 50.0), "--name", "big")
    assert code == 2 and "gate: big's task-vector norm" in err and "max_norm_ratio 5" in err, err
    assert (state / "state.json").read_bytes() == before
    assert all(torch.equal(state_tensors(state)[k], tensors[k]) for k in tensors)
    assert not [p for p in state.iterdir() if p.name.startswith(".v")]
    # a model within the ratio (3x) passes; its norms are recorded for the next median
    entry = continual.add(state, str(_diverged(tiny_models, tmp_path / "mid", 3.0)), name="mid")
    assert entry["t"] == 3 and set(entry["norms"]) and all(v > 0 for v in entry["norms"].values())
    assert any("layers.*." in g for g in entry["norms"])
    code, _, err = cli("continual", "init", tmp_path / "s2", "--recipe", r, "--gate-max-norm-ratio", "0.5")
    assert code == 2 and "above 1" in err


def test_gate_command_vetoes_the_candidate(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "i.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n")
    state = tmp_path / "s"
    flag = tmp_path / "allow"
    seen = tmp_path / "seen"
    cmd = f"ls {{path}} > {seen} && test -f {flag}"
    assert cli("continual", "init", state, "--recipe", r, "--gate-command", cmd)[0] == 0
    code, _, err = cli("continual", "add", state, tiny_models["a"])
    assert code == 2 and "evaluation command exited 1" in err, err
    assert continual.State.load(state).t == 0 and "model.safetensors" in seen.read_text()
    # nothing of the candidate is left; the shell's add went through the queue, which records it
    assert sorted(p.name for p in state.iterdir()) == [".mergekit-ortho", "lock", "queue", "state.json"]
    assert [j["status"] for j in Queue(state).jobs()] == ["refused"]
    flag.touch()
    assert cli("continual", "add", state, tiny_models["a"])[0] == 0
    assert continual.State.load(state).t == 1


@pytest.mark.parametrize("method,params", [("task_arithmetic", "{lambda: 0.7}"), ("linear", "")])
def test_add_then_remove_returns_the_previous_state(tiny_models, tmp_path, cli, method, params):
    r = write_recipe(tmp_path / "i.yaml", f"merge_method: {method}\nbase_model: {tiny_models['base']}\n"
                     + (f"parameters: {params}\n" if params else ""))
    state = tmp_path / "s"
    assert cli("continual", "init", state, "--recipe", r, "--removable")[0] == 0
    continual.add(state, str(tiny_models["a"]), name="a", params={"weight": 0.3})
    continual.add(state, str(tiny_models["c"]), name="c", params={"weight": 2.0})
    before = state_tensors(state)
    assert all(t.dtype == torch.float64 for t in before.values())
    continual.add(state, str(tiny_models["b"]), name="b", params={"weight": 1.7})
    code, out, err = cli("continual", "remove", state, "b")
    assert code == 0, err
    after = state_tensors(state)
    rel = max(float((after[k] - before[k]).norm() / before[k].norm()) for k in before)
    assert rel < 1e-7, rel
    st = continual.State.load(state)
    assert [h["name"] for h in st.data["history"]] == ["a", "c"] and st.t == 2
    # removing a middle model equals never having added it; the export too (up to float64 rounding)
    continual.remove(state, "a")
    ref = tmp_path / "ref"
    continual.init(ref, r, removable=True)
    continual.add(ref, str(tiny_models["c"]), name="c", params={"weight": 2.0})
    x, y = state_tensors(state), state_tensors(ref)
    assert max(float((x[k] - y[k]).norm() / y[k].norm()) for k in y) < 1e-7
    continual.export(state, tmp_path / "o1")
    continual.export(ref, tmp_path / "o2")
    a, b = load_dir(tmp_path / "o1"), load_dir(tmp_path / "o2")
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in b)
    code, _, err = cli("continual", "remove", state, "zzz")
    assert code == 2 and "no model named 'zzz'" in err


def test_window_keeps_the_last_n_models(tiny_models, tmp_path):
    r = write_recipe(tmp_path / "i.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n")
    state = tmp_path / "s"
    continual.init(state, r, window=2)
    for m in "abc":
        continual.add(state, str(tiny_models[m]), name=m)
    st = continual.State.load(state)
    assert [h["name"] for h in st.data["history"]] == ["b", "c"] and [h["t"] for h in st.data["history"]] == [1, 2]
    ref = tmp_path / "ref"
    continual.init(ref, r, removable=True)
    for m in "bc":
        continual.add(ref, str(tiny_models[m]), name=m)
    x, y = state_tensors(state), state_tensors(ref)
    assert max(float((x[k] - y[k]).norm() / y[k].norm()) for k in y) < 1e-7


def test_methods_that_cannot_remove_say_so(tiny_models, tmp_path, cli):
    state = init_state(tmp_path, tiny_models, "magmax", models="a")
    code, _, err = cli("continual", "remove", state, "a")
    assert code == 2 and "cannot subtract" in err and "promote" in err
    plain = init_state(tmp_path / "p", tiny_models, "task_arithmetic", models="a")
    code, _, err = cli("continual", "remove", plain, "a")
    assert code == 2 and "float32" in err and "--removable" in err
    r = write_recipe(tmp_path / "o.yaml", f"merge_method: opcm\nbase_model: {tiny_models['base']}\n")
    code, _, err = cli("continual", "init", tmp_path / "s3", "--recipe", r, "--window", "3")
    assert code == 2 and "cannot subtract" in err


def test_window_gate_and_retain_given_in_the_recipe(tiny_models, tmp_path, cli):
    r = write_recipe(tmp_path / "i.yaml", f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n"
                                          "window: 2\nretain: 2\ngate: {max_norm_ratio: 5}\n")
    state = tmp_path / "s"
    assert cli("continual", "init", state, "--recipe", r)[0] == 0
    for m in "abc":
        continual.add(state, str(tiny_models[m]), name=m)
    st = continual.State.load(state)
    assert [h["name"] for h in st.data["history"]] == ["b", "c"]
    code, _, err = cli("continual", "add", state, _diverged(tiny_models, tmp_path / "big", 50.0), "--name", "big")
    assert code == 2 and "max_norm_ratio 5" in err, err
    # a merge run of the same recipe names the keys it does not act on
    r2 = write_recipe(tmp_path / "r.yaml", (tmp_path / "i.yaml").read_text()
                      + f"models:\n  - model: {tiny_models['a']}\n")
    code, _, err = cli("run", r2, "--out", tmp_path / "out")
    assert code == 0 and "ignored: 'window' applies to continual states" in err, err
