"""Continual merging: resume equivalence, crash safety, disk full, concurrency, watch."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import slow_env, write_recipe
from test_run import load_dir, recipe_text

from mergekit_ortho import continual

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]


def init_state(tmp_path, tiny_models, method, params="", models=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    r = write_recipe(tmp_path / f"init_{method}.yaml",
                     recipe_text([tiny_models[m] for m in models], method, tiny_models["base"], params)
                     if models else f"merge_method: {method}\nbase_model: {tiny_models['base']}\n"
                     + (f"parameters: {params}\n" if params else ""))
    state = tmp_path / f"state_{method}"
    continual.init(state, r)
    return state


def state_tensors(state: Path) -> dict[str, torch.Tensor]:
    st = continual.State.load(state)
    return load_dir(st.tensor_dir) if st.tensor_dir else {}


@pytest.mark.parametrize("method,params", [("magmax", ""), ("task_arithmetic", "{lambda: 0.3}"), ("linear", ""),
                                           ("opcm", ""), ("opcm", "{alpha: 0.9, zero_diagonal: false}"),
                                           # states of several parts (StateParts), stored part by part
                                           ("model_stock", ""), ("model_stock", "{filter_wise: true}"),
                                           ("ram", ""), ("ram", "{epsilon: 0.05}")])
def test_resume_equivalence_bit_for_bit(tiny_models, tmp_path, cli, method, params):
    state = init_state(tmp_path, tiny_models, method, params)
    for m in "abc":  # separate adds, as separate server events
        continual.add(state, str(tiny_models[m]), name=m)
    continual.export(state, tmp_path / "exported")
    # in a continual state the base is where the state starts, not one of linear's inputs; in a
    # recipe mergekit's rule makes a base_model one of them, so the batch recipe names none
    base = None if method == "linear" else tiny_models["base"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[m] for m in "abc"], method, base, params))
    assert cli("run", r, "--out", tmp_path / "batch")[0] == 0
    a, b = load_dir(tmp_path / "exported"), load_dir(tmp_path / "batch")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_state_layout_one_tensor_as_before_and_parts_by_name(tiny_models, tmp_path):
    # a one-tensor state keeps the layout states had before parts existed (version 1: the tensor's
    # own name, float32), so older states load and older versions read new magmax/linear states
    legacy = init_state(tmp_path, tiny_models, "magmax", models="a")
    merged = {n for n, i in json.loads((legacy / "state.json").read_text())["tensors"].items() if i["action"] == "merge"}
    old = state_tensors(legacy)
    assert json.loads((legacy / "state.json").read_text())["format_version"] == 1
    assert set(old) == merged and all(t.dtype == torch.float32 for t in old.values())
    # a state of parts: NAME#part in the fold's dtypes (version 2: older versions refuse it cleanly)
    parts = init_state(tmp_path, tiny_models, "model_stock", "{filter_wise: true}", models="ab")
    assert json.loads((parts / "state.json").read_text())["format_version"] == 2
    got = state_tensors(parts)
    names = ("pair_sum", "count", "split", "total", "units", "lo", "hi")
    assert set(got) == {f"{n}#{p}" for n in merged for p in names}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got[f"{q}#pair_sum"].dtype == torch.float64 and got[f"{q}#pair_sum"].shape == old[q].shape[:1]
    w = {k: load_dir(tiny_models[k])[q] for k in ("base", "a", "b")}
    assert int(got[f"{q}#count"]) == 2 and got[f"{q}#count"].dtype == torch.int64
    assert torch.equal(got[f"{q}#total"], (w["a"] - w["base"]) + (w["b"] - w["base"]))  # the sum of tau


@pytest.mark.parametrize("method,params", [("model_stock", {"filter_wise": True}), ("model_stock", {}), ("ram", {})])
def test_state_parts_stay_aligned_for_any_shape(method, params):
    from mergekit_ortho.dtypes import itemsize
    from mergekit_ortho.ops import registry

    op = registry.get(method)
    shapes = [[], [3], [5, 3], [1], [7, 1, 3], [2, 2]]
    tensors = {f"t{i}": {"shape": s, "action": "merge"} for i, s in enumerate(shapes)}
    shards = continual._StateLayout(op.fold, op.resolve_params(params), tensors).shards(limit=100)
    assert len(shards) > 1  # the tensors' parts stay together across shard boundaries
    for shard in shards:
        offset = 0
        for t in shard:
            assert offset % itemsize(t.dtype) == 0, t.name
            offset += t.nbytes
        assert len({t.name.split("#")[0] for t in shard}) * len(op.fold.parts.layout((), op.resolve_params(params))) \
            == len(shard)


def test_init_with_models_status_and_duplicates(tiny_models, tmp_path, cli):
    state = init_state(tmp_path, tiny_models, "magmax", models="ab")
    s = continual.status(state)
    assert s["models_merged"] == 2 and [h["name"] for h in s["history"]] == ["a", "b"]
    assert all(len(h["sha256"]) == 64 for h in s["history"]) and s["disk_bytes"] > 0
    code, _, err = cli("continual", "add", state, tiny_models["a"], "--name", "again")
    assert code == 2 and "same tensors" in err and "--force" in err
    assert continual.status(state)["models_merged"] == 2
    code, out, err = cli("continual", "add", state, tiny_models["a"], "--name", "again", "--force")
    assert code == 0, err
    code, out, _ = cli("continual", "status", state, "--json")
    assert code == 0 and json.loads(out)["models_merged"] == 3


def test_bad_states(tmp_path, tiny_models, cli):
    code, _, err = cli("continual", "add", tmp_path / "nostate", tiny_models["a"])
    assert code == 2 and "not a continual state" in err
    state = init_state(tmp_path, tiny_models, "magmax")
    data = json.loads((state / "state.json").read_text())
    data["format_version"] = 99
    (state / "state.json").write_text(json.dumps(data))
    code, _, err = cli("continual", "status", state)
    assert code == 2 and "newer" in err
    r = write_recipe(tmp_path / "ties.yaml", f"merge_method: ties\nbase_model: {tiny_models['base']}\n")
    code, _, err = cli("continual", "init", tmp_path / "s2", "--recipe", r)
    assert code == 2 and "continual merging supports" in err
    code, _, err = cli("continual", "export", init_state(tmp_path / "x", tiny_models, "linear"), "--out", tmp_path / "o")
    assert code == 2 and "no model merged yet" in err


def _spawn_add(state, model, delay="0.05", preexec=None):
    env = slow_env(float(delay))
    return subprocess.Popen(CLI + ["continual", "add", str(state), str(model)], env=env, preexec_fn=preexec,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("method,params,kill_after", [
    *(("task_arithmetic", "{lambda: 0.5}", k) for k in (0.0, 0.3, 0.9)),
    ("model_stock", "{filter_wise: true}", 0.3), ("ram", "{epsilon: 0.05}", 0.0)])  # states of parts
def test_kill9_during_add_leaves_old_or_new_state(tiny_models, tmp_path, method, params, kill_after):
    state = init_state(tmp_path, tiny_models, method, params, models="a")
    before = state_tensors(state)
    proc = _spawn_add(state, tiny_models["b"])
    end = time.time() + 60
    while not list(state.glob(".v000002.partial-*/*.safetensors")) and proc.poll() is None and time.time() < end:
        time.sleep(0.01)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = continual.State.load(state)  # loads: never a mix
    assert st.t in (1, 2)
    now = state_tensors(state)
    if st.t == 1:
        assert all(torch.equal(now[k], before[k]) for k in before)
    # the next add works and the result equals an uninterrupted sequence
    if st.t == 1:
        continual.add(state, str(tiny_models["b"]), name="b")
    continual.add(state, str(tiny_models["c"]), name="c")
    ref = init_state(tmp_path / "ref", tiny_models, method, params, models="abc")
    a, b = state_tensors(state), state_tensors(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert not list(state.glob(".v*"))  # the killed run's leftovers were swept


def test_disk_full_during_add_is_clean_error(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "magmax", models="a")
    before = state_tensors(state)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = _spawn_add(state, tiny_models["b"], delay="0", preexec=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "too large" in err.lower()
    st = continual.State.load(state)
    assert st.t == 1 and all(torch.equal(state_tensors(state)[k], before[k]) for k in before)
    continual.add(state, str(tiny_models["b"]), name="b")
    assert continual.State.load(state).t == 2


def test_two_concurrent_adds_both_merged(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    p1 = _spawn_add(state, tiny_models["b"], delay="0.02")
    p2 = _spawn_add(state, tiny_models["c"], delay="0.02")
    for p in (p1, p2):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    hist = continual.status(state)["history"]
    assert [h["t"] for h in hist] == [1, 2, 3] and {h["name"] for h in hist} == {"a", "b", "c"}
    order = [h["name"] for h in hist]
    ref = init_state(tmp_path / "ref", tiny_models,
                     "task_arithmetic", "{lambda: 0.5}", models="".join(order))
    a, b = state_tensors(state), state_tensors(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_watch_merges_complete_arrivals_once(tiny_models, tmp_path):
    import shutil

    state = init_state(tmp_path, tiny_models, "magmax")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copytree(tiny_models["a"], inbox / "a")
    (inbox / "notes.txt").write_text("not a model")
    (inbox / "partial").mkdir()  # a directory with no weights yet is ignored
    logs: list[str] = []
    n = continual.watch(state, inbox, interval=0.05, log=logs.append, max_polls=3)
    assert n == 1 and continual.State.load(state).t == 1 and "merged a" in logs[0]
    shutil.copytree(tiny_models["b"], inbox / "b")
    shutil.copytree(tiny_models["a"], inbox / "a_copy")  # same tensors: refused and logged
    n = continual.watch(state, inbox, interval=0.05, log=logs.append, max_polls=3)  # a restarted watcher
    assert n == 1 and continual.State.load(state).t == 2
    assert [h["name"] for h in continual.status(state)["history"]] == ["a", "b"]
    assert any("skipped a_copy" in m for m in logs)


def test_watch_waits_for_late_shards_and_merges_them(tiny_models, tmp_path):
    from conftest import sharded_copy

    state = init_state(tmp_path, tiny_models, "magmax")
    inbox, held = tmp_path / "inbox", tmp_path / "held"
    inbox.mkdir()
    held.mkdir()
    model = sharded_copy(tiny_models["a"], inbox / "a")
    for f in ("model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        shutil.move(model / f, held / f)  # the copy is still on its way
    logs = []

    def log(msg):
        logs.append(msg)
        if msg.startswith("waiting for a"):
            for f in held.iterdir():
                shutil.move(f, model / f.name)

    n = continual.watch(state, inbox, interval=0.05, log=log, max_polls=10)
    assert any("waiting for a: shard 2 of 2 has not arrived" in m for m in logs), logs
    assert n == 1 and continual.State.load(state).t == 1


def test_watch_retries_a_failed_checkpoint_when_it_changes(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "magmax")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = inbox / "x"
    bad.mkdir()
    with safe_open(str(tiny_models["a"] / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].reshape(-1)[:-1].clone()  # a readable file of another shape: refused
    save_file(tensors, str(bad / "model.safetensors"))
    raw = (tiny_models["a"] / "model.safetensors").read_bytes()
    logs = []

    def log(msg):
        logs.append(msg)
        if msg.startswith("skipped x"):
            (bad / "model.safetensors").write_bytes(raw)  # the user re-copies it

    n = continual.watch(state, inbox, interval=0.05, log=log, max_polls=10)
    assert any(m.startswith("skipped x") for m in logs) and n == 1, logs


def test_watch_gives_up_on_a_checkpoint_that_stays_incomplete(tiny_models, tmp_path):
    from conftest import sharded_copy

    state = init_state(tmp_path, tiny_models, "magmax")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    model = sharded_copy(tiny_models["a"], inbox / "a")
    (model / "model-00002-of-00002.safetensors").unlink()
    (model / "model.safetensors.index.json").unlink()
    logs = []
    n = continual.watch(state, inbox, interval=0.05, log=logs.append, max_polls=8, incomplete_timeout=0.1)
    assert n == 0 and any(m.startswith("gave up on a") and "shard 2 of 2" in m for m in logs), logs


def test_watch_exits_cleanly_on_sigterm(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "magmax")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc = subprocess.Popen(CLI + ["continual", "watch", str(state), "--inbox", str(inbox), "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    # the handler is installed before this line is printed: a fixed sleep raced slow start-ups
    first = proc.stdout.readline()
    assert first.startswith("watching"), first
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)
    out = first + rest
    assert proc.returncode == 0, err
    assert "stopped; 0 model(s) merged" in out


def test_opcm_run_matches_the_in_memory_reference(tiny_models, tmp_path, cli):
    """`merge run` (streaming, state on disk) against ops.opcm.opcm_merge (all tensors in memory)."""
    from mergekit_ortho.ops.opcm import opcm_merge

    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[m] for m in "cab"], "opcm", tiny_models["base"]))
    code, out, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, out + err
    got = load_dir(tmp_path / "o")
    base = load_dir(tiny_models["base"])
    ref = opcm_merge(base, [load_dir(tiny_models[m]) for m in "cab"])
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=1e-5, atol=1e-6)
    # the order matters (unlike averaging): another order gives another model
    r2 = write_recipe(tmp_path / "r2.yaml", recipe_text([tiny_models[m] for m in "abc"], "opcm", tiny_models["base"]))
    assert cli("run", r2, "--out", tmp_path / "o2")[0] == 0
    other = load_dir(tmp_path / "o2")
    assert any(not torch.allclose(other[k], got[k]) for k in got)


def test_opcm_run_is_one_pass_over_the_models_and_leaves_nothing_behind(tiny_models, tmp_path, cli, monkeypatch):
    """`merge run` with opcm folds every model per tensor in one pass: each merged tensor of each
    model is read once (a temporary continual state read them once per add and wrote a full
    float32 state per model), the output is sharded as planned, and its running sums are gone."""
    from mergekit_ortho.sources.checkpoint import CheckpointSource

    reads: dict[tuple[str, str], int] = {}
    real_get = CheckpointSource.get

    def counting_get(self, name):
        reads[(self.label, name)] = reads.get((self.label, name), 0) + 1
        return real_get(self, name)

    monkeypatch.setattr(CheckpointSource, "get", counting_get)
    models = [tiny_models[m] for m in "abc"]
    r = write_recipe(tmp_path / "r.yaml", recipe_text(models, "opcm", tiny_models["base"])
                     + "output:\n  shard_size: 2000\n")
    code, out, err = cli("run", r, "--out", tmp_path / "o")
    assert code == 0, out + err
    model_reads = [n for (label, _), n in reads.items() if label != "base"]
    assert model_reads and max(model_reads) == 1
    # the base: once while folding, once for the result (a state per model read it once per model)
    assert max(n for (label, _), n in reads.items() if label == "base") == 2
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "model.safetensors.index.json" in names and not any("sum" in n or "state" in n for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    state = init_state(tmp_path / "s", tiny_models, "opcm", models="abc")
    continual.export(state, tmp_path / "exported")
    a, b = load_dir(tmp_path / "exported"), load_dir(tmp_path / "o")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_shell_add_probing_beside_another_shells_probe_merges_it_itself(tiny_models, tmp_path):
    """Another `continual add`'s probe holds queue/serve.lock for a moment: that is not a server,
    so this add must merge the model itself, not wait forever for a server's worker."""
    import threading

    from filelock import FileLock

    from mergekit_ortho.continual.local import queued_add

    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    (state / "queue").mkdir(exist_ok=True)
    probe = FileLock(str(state / "queue" / "serve.lock"), thread_local=False)  # released by the timer thread
    probe.acquire()
    threading.Timer(0.5, probe.release).start()
    result = {}
    worker = threading.Thread(target=lambda: result.update(queued_add(state, str(tiny_models["b"]))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and result["t"] == 2
