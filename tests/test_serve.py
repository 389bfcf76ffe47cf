"""`merge serve`: every endpoint, auth, 422 messages, idempotency, the persistent queue across
restarts and kill -9, versions over HTTP, the gate, watch posting into the queue. Loopback only
(in-process TestClient, or uvicorn on an ephemeral port)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import slow_env  # noqa: E402
from test_continual import init_state, state_tensors  # noqa: E402
from test_run import load_dir  # noqa: E402

from mergekit_ortho import continual  # noqa: E402
from mergekit_ortho.continual import server  # noqa: E402
from mergekit_ortho.continual.queue import Queue  # noqa: E402
from mergekit_ortho.errors import UserError  # noqa: E402

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]
TOKEN = "s3cret-token-0123456789"


def quiet():
    import io

    return server.Log("json", io.StringIO())


def wait_jobs(client, ids, timeout=60, headers=None):
    end = time.time() + timeout
    while time.time() < end:
        jobs = [client.get(f"/jobs/{i}", headers=headers).json() for i in ids]
        if all(j["status"] not in ("queued", "running") for j in jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError(f"jobs not finished: {jobs}")


def bad_shape_model(tiny_models, path):
    from safetensors.torch import save_file

    t = load_dir(tiny_models["a"])
    name = "model.layers.0.mlp.up_proj.weight"
    t[name] = t[name][:-1].contiguous()
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    return path, name


def test_every_endpoint(tiny_models, tmp_path, cli):
    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}")
    bad, name = bad_shape_model(tiny_models, tmp_path / "bad")
    with TestClient(server.create_app(state, log=quiet())) as c:
        r = c.post("/models", json={"source": str(tiny_models["a"]), "name": "a", "idempotency_key": "k-a"})
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running") and not r.json()["duplicate"]
        ja = r.json()["id"]
        # the same content under another key, and the same key with another source: the first job
        for body in ({"source": str(tiny_models["a"]), "name": "a-again"},
                     {"source": str(tiny_models["b"]), "idempotency_key": "k-a"}):
            r = c.post("/models", json=body)
            assert r.status_code == 200 and r.json()["id"] == ja and r.json()["duplicate"]
        # bad input: one line, the CLI's message, nothing queued
        r = c.post("/models", json={"source": str(bad)})
        code, _, err = cli("continual", "add", state, bad)
        assert r.status_code == 422 and code == 2
        assert r.json()["detail"] == f"tensor '{name}' has shape [23, 16] in {bad}, the state has [24, 16]"
        assert r.json()["detail"] in " ".join(err.split())
        assert c.post("/models", json={"name": "x"}).json() == {"detail": "source: Field required"}
        assert c.post("/models", json={"source": str(tiny_models["b"]), "parameters": {"bogus": 1}}).status_code == 422
        jb = c.post("/models", json={"source": str(tiny_models["b"]), "name": "b",
                                     "parameters": {"weight": 0.5}}).json()["id"]
        done = wait_jobs(c, [ja, jb])
        assert [j["status"] for j in done] == ["done", "done"] and [j["t"] for j in done] == [1, 2]
        assert done[1]["version"] == "v000002" and len(done[1]["sha256"]) == 64
        assert c.get("/jobs/nope").status_code == 404
        assert [j["id"] for j in c.get("/jobs").json()] == [ja, jb]
        assert c.get("/jobs", params={"status": "failed"}).json() == []
        s = c.get("/state").json()
        assert s["method"] == "task_arithmetic" and s["current"] == "v000002" and s["models_merged"] == 2
        assert [(h["name"], h["job"]) for h in s["history"]] == [("a", ja), ("b", jb)]
        vs = c.get("/versions").json()
        assert [v["version"] for v in vs] == ["v000001", "v000002"] and all(v["disk_bytes"] > 0 for v in vs)
        assert c.post("/versions/v000001/tag", json={"name": "good"}).json() == {"version": "v000001", "tag": "good"}
        assert c.post("/versions/v000009/tag", json={"name": "x"}).status_code == 404
        r = c.post("/export", json={"path": str(tmp_path / "out_v2")})
        assert r.status_code == 200 and (tmp_path / "out_v2" / "model.safetensors").is_file()
        assert c.post("/export", json={"path": str(tmp_path / "out_v2")}).status_code == 422  # exists
        assert c.post("/versions/good/promote").json() == {"version": "v000001", "t": 1}
        assert c.post("/versions/v000042/promote").status_code == 404
        assert c.get("/state").json()["models_merged"] == 1
        c.post("/export", json={"path": str(tmp_path / "out_v1")})
        c.post("/export", json={"path": str(tmp_path / "out_v2b"), "version": "v000002"})
        assert c.get("/healthz").json() == {"status": "ok"} and c.get("/readyz").json() == {"status": "ready"}
        m = c.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        for line in ('mergekit_jobs{status="done"} 2.0', "mergekit_queue_depth 0.0", "mergekit_current_version 1.0",
                     "mergekit_add_duration_seconds_count 2.0", "mergekit_last_success_timestamp_seconds",
                     "mergekit_bytes_read_total"):
            assert line in m.text, line
        paths = c.get("/openapi.json").json()["paths"]
        for p in ("/models", "/jobs/{job_id}", "/jobs", "/state", "/versions", "/versions/{version}/promote",
                  "/versions/{version}/tag", "/export", "/healthz", "/readyz", "/metrics"):
            assert p in paths, p
        assert "delete" in paths["/jobs/{job_id}"]
    a, b = load_dir(tmp_path / "out_v2"), load_dir(tmp_path / "out_v2b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = init_state(tmp_path / "ref", tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    continual.export(ref, tmp_path / "ref_out")
    x, y = load_dir(tmp_path / "out_v1"), load_dir(tmp_path / "ref_out")
    assert all(torch.equal(x[k], y[k]) for k in y)


def test_cancel_and_restart_with_queued_jobs(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "magmax")
    with TestClient(server.create_app(state, log=quiet(), start_worker=False)) as c:  # a server that stops early
        ids = [c.post("/models", json={"source": str(tiny_models[m])}).json()["id"] for m in "abc"]
        r = c.delete(f"/jobs/{ids[1]}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert c.delete(f"/jobs/{ids[1]}").status_code == 409 and c.delete("/jobs/zzz").status_code == 404
        assert c.get("/readyz").status_code == 200
    assert [j["status"] for j in Queue(state).jobs()] == ["queued", "cancelled", "queued"]
    with TestClient(server.create_app(state, log=quiet())) as c:  # restarted: the queue is still there
        jobs = wait_jobs(c, ids)
    assert [j["status"] for j in jobs] == ["done", "cancelled", "done"]
    assert [h["name"] for h in continual.status(state)["history"]] == ["a", "c"]


def test_recovery_marks_a_committed_job_done_and_requeues_the_other(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "task_arithmetic")
    q = Queue(state)
    ja, _ = q.submit(str(tiny_models["a"]), "a", {}, None, None)
    jb, _ = q.submit(str(tiny_models["b"]), "b", {}, None, None)
    # killed after a's commit point but before its job was marked done; b killed before its commit
    assert q.claim()["id"] == ja["id"]
    continual.add(state, str(tiny_models["a"]), name="a", job=ja["id"])
    assert q.claim()["id"] == jb["id"]
    changed = {j["id"]: j for j in q.recover()}
    assert changed[ja["id"]]["status"] == "done" and changed[ja["id"]]["version"] == "v000001"
    assert changed[jb["id"]]["status"] == "queued"
    with TestClient(server.create_app(state, log=quiet())) as c:
        wait_jobs(c, [jb["id"]])
    assert [h["name"] for h in continual.status(state)["history"]] == ["a", "b"]


def test_auth_and_binding_rules(tiny_models, tmp_path, cli, monkeypatch):
    state = init_state(tmp_path, tiny_models, "magmax")
    with TestClient(server.create_app(state, token=TOKEN, log=quiet())) as c:
        assert c.get("/state").status_code == 401
        assert c.get("/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/models", json={"source": "x"}).status_code == 401  # before validation
        assert c.get("/state", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    code, _, err = cli("serve", state, "--host", "0.0.0.0")
    assert code == 2 and "not a loopback address" in err and "--token-file" in err
    short = tmp_path / "short"
    short.write_text("abc")
    code, _, err = cli("serve", state, "--host", "0.0.0.0", "--token-file", short)
    assert code == 2 and "at least 16 characters" in err
    # without the extra: one line saying how to install it
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code, _, err = cli("serve", state)
    assert code == 2 and "pip install 'mergekit-ortho[serve]'" in err


class ThreadServer:
    """uvicorn in a thread on an ephemeral loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.time() + 30
        while not self.server.started and time.time() < end:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_watch_posts_into_the_servers_queue_with_a_token(tiny_models, tmp_path):
    import shutil

    import httpx

    state = init_state(tmp_path, tiny_models, "magmax")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for m in "ab":
        shutil.copytree(tiny_models[m], inbox / m)
    with ThreadServer(server.create_app(state, token=TOKEN, log=quiet())) as srv:
        logs = []
        n = continual.watch(state, inbox, interval=0.05, log=logs.append, max_polls=3,
                            submit=continual.poster(srv.url, TOKEN))
        assert n == 2 and all(m.startswith("posted ") for m in logs), logs
        # a restarted watcher posts the same idempotency keys: the same jobs, nothing new
        continual.watch(state, inbox, interval=0.05, log=logs.append, max_polls=3,
                        submit=continual.poster(srv.url, TOKEN))
        h = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=srv.url) as c:
            jobs = c.get("/jobs", headers=h).json()
            assert len(jobs) == 2
            wait_jobs(c, [j["id"] for j in jobs], headers=h)
        bad = continual.poster(srv.url, "wrong-token-0000000000")
        with pytest.raises(UserError, match="HTTP 401"):
            bad(str(tiny_models["c"]), "c")
    assert sorted(h["name"] for h in continual.status(state)["history"]) == ["a", "b"]


def test_gate_refusal_is_quarantined(tiny_models, tmp_path):
    from test_continual_versions import _diverged

    r = tmp_path / "i.yaml"
    r.write_text(f"merge_method: task_arithmetic\nbase_model: {tiny_models['base']}\n")
    state = tmp_path / "s"
    continual.init(state, r, gate={"max_norm_ratio": 5})
    big = _diverged(tiny_models, tmp_path / "big", 40.0)
    with TestClient(server.create_app(state, log=quiet())) as c:
        ids = [c.post("/models", json={"source": str(p)}).json()["id"] for p in (tiny_models["a"], big)]
        jobs = wait_jobs(c, ids)
        assert [j["status"] for j in jobs] == ["done", "refused"] and "gate:" in jobs[1]["message"]
        s = c.get("/state").json()
        assert s["models_merged"] == 1 and [q["name"] for q in s["quarantine"]] == ["big"]
        assert 'mergekit_jobs{status="refused"} 1.0' in c.get("/metrics").text


def _spawn_server(state, delay):
    env = dict(slow_env(delay), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(CLI + ["serve", str(state), "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    rec = json.loads(line)
    assert rec["event"] == "listening", line
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, f"http://127.0.0.1:{rec['port']}"


@pytest.mark.parametrize("kill_after", [0.0, 0.4, 1.2])
def test_kill9_of_the_server_mid_add(tiny_models, tmp_path, kill_after):
    """Killed while merging the second of three jobs (a few points, not the issue's 10, to keep
    the suite fast): the state loads at the version before or after, and after a restart every
    job is done once, in order, equal to serial adds."""
    import httpx

    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    before = state_tensors(state)
    proc, url = _spawn_server(state, 0.05)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            ids = [c.post("/models", json={"source": str(tiny_models[m]), "name": m}).json()["id"] for m in "bc"]
        end = time.time() + 60
        while not list(state.glob(".v*.partial-*/*.safetensors")) and time.time() < end:
            time.sleep(0.01)
        time.sleep(kill_after)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    st = continual.State.load(state)
    assert st.t in (1, 2, 3) and len(st.data["history"]) == st.t
    if st.t == 1:
        now = state_tensors(state)
        assert all(torch.equal(now[k], before[k]) for k in before)
    proc, url = _spawn_server(state, 0.0)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            jobs = wait_jobs(c, ids)
            assert len(c.get("/jobs").json()) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [j["status"] for j in jobs] == ["done", "done"] and [j["t"] for j in jobs] == [2, 3]
    assert [h["name"] for h in continual.status(state)["history"]] == ["a", "b", "c"]
    ref = init_state(tmp_path / "ref", tiny_models, "task_arithmetic", "{lambda: 0.5}", models="abc")
    a, b = state_tensors(state), state_tensors(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert not list(state.glob(".v*"))


def test_one_server_per_state(tiny_models, tmp_path):
    state = init_state(tmp_path, tiny_models, "magmax")
    proc, _ = _spawn_server(state, 0.0)
    try:
        r = subprocess.run(CLI + ["serve", str(state), "--port", "0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "already served" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert os.path.exists(state / "queue" / "serve.lock")
