"""The shell and `merge serve` side by side (issue 16): `merge continual add` and `watch` share
the server's lock and queue, so that nothing is merged twice or lost whichever starts first."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from conftest import slow_env  # noqa: E402
from test_continual import init_state, state_tensors  # noqa: E402
from test_serve import CLI, _spawn_server, wait_jobs  # noqa: E402

from mergekit_ortho import continual  # noqa: E402
from mergekit_ortho.continual.queue import Queue  # noqa: E402


def _serial(tmp_path, tiny_models, names, initial="a"):
    ref = init_state(tmp_path / "ref", tiny_models, "task_arithmetic", "{lambda: 0.5}", models=initial)
    for m in names:
        continual.add(ref, str(tiny_models[m]), name=m)
    return state_tensors(ref)


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_cli_add_waits_for_the_servers_worker(tiny_models, tmp_path):
    """With a server running, `continual add` queues its model behind the server's jobs and waits
    for its worker; the files of a job the server has queued, added from the shell, are that job."""
    import httpx

    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}")
    proc, url = _spawn_server(state, 0.03)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            ja, jb = (c.post("/models", json={"source": str(tiny_models[m]), "name": m}).json() for m in "ab")
            shell = subprocess.Popen(CLI + ["continual", "add", str(state), str(tiny_models["c"]), "--name", "c"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            waited = []
            entry = continual.queued_add(state, str(tiny_models["b"]), name="b-again", on_wait=waited.append)
            out, err = shell.communicate(timeout=120)
            jobs = c.get("/jobs").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [w["id"] for w in waited] == [jb["id"]] and (entry["name"], entry["t"], entry["job"]) == ("b", 2, jb["id"])
    assert shell.returncode == 0 and "merged c as model 3" in out and "waiting for the server's worker" in err, \
        (out, err)
    assert [(j["name"], j["status"], j["runner"], j["t"]) for j in jobs] == [
        ("a", "done", "server", 1), ("b", "done", "server", 2), ("c", "done", "server", 3)]
    hist = continual.status(state)["history"]
    assert [h["name"] for h in hist] == ["a", "b", "c"] and [h["job"] for h in hist] == [j["id"] for j in jobs]
    assert _equal(state_tensors(state), _serial(tmp_path, tiny_models, "abc", initial=()))


def test_server_started_during_a_shell_add_does_not_merge_it_again(tiny_models, tmp_path):
    """A shell add merging (slowed) when a server starts: the server's recovery waits for the state
    lock, sees the job done, and its worker merges only what is posted to it; a POST of the files
    the shell merged is a duplicate of the shell's job."""
    import httpx

    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    shell = subprocess.Popen(CLI + ["continual", "add", str(state), str(tiny_models["b"]), "--name", "b"],
                             env=slow_env(0.05), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 60
    while not list(state.glob(".v*.partial-*/*.safetensors")) and time.time() < end:
        time.sleep(0.01)
    assert [j["status"] for j in Queue(state).jobs()] == ["running"]
    proc, url = _spawn_server(state, 0.0)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            jc = c.post("/models", json={"source": str(tiny_models["c"]), "name": "c"}).json()
            out, err = shell.communicate(timeout=120)
            assert shell.returncode == 0 and "merged b as model 2" in out, (out, err)
            wait_jobs(c, [jc["id"]])
            dup = c.post("/models", json={"source": str(tiny_models["b"])})
            jobs = c.get("/jobs").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert dup.status_code == 200 and dup.json()["duplicate"] and dup.json()["id"] == jobs[0]["id"]
    assert [(j["name"], j["status"], j["runner"], j["t"]) for j in jobs] == [("b", "done", "shell", 2),
                                                                             ("c", "done", "server", 3)]
    assert [h["name"] for h in continual.status(state)["history"]] == ["a", "b", "c"]
    assert _equal(state_tensors(state), _serial(tmp_path, tiny_models, "bc"))
