"""`merge serve`: every endpoint, auth, 422 messages, idempotency, the persistent queue across
restarts and kill -9 at 10 random points, versions over HTTP, the gate, watch posting into the queue. Loopback only
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

from conftest import llama_shapes, slow_env, write_checkpoint  # noqa: E402
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


def _fine_tunes(tiny_models, root, n):
    from conftest import TINY

    shapes = llama_shapes(**TINY)
    out = []
    for i in range(n):
        write_checkpoint(root / f"m{i}", shapes, seed=100 + i, base=tiny_models["base"], noise=0.05, dtype="float32")
        out.append(root / f"m{i}")
    return out


def _running(c):
    jobs = c.get("/jobs", params={"status": "running"}).json()
    return jobs[0] if jobs else None


def test_kill9_of_the_server_at_ten_random_points(tiny_models, tmp_path):
    """kill -9 of the server at 10 seeded random points of an add, each followed by a restart: a
    point is a fraction of the add's bytes, one drawn uniformly in each tenth of [0, 1.1] (past 1:
    once all is written, around the commit), reached by polling the running job's bytes done over the API and killing as soon as
    it is passed. After each kill the state loads at the version before or after the interrupted
    add and equals that serial prefix; at the end every job is done once, in order, equal to serial
    adds. The kill points' spread is measured (the bytes done read just before each kill)."""
    import random

    import httpx

    rng = random.Random(16)
    models = _fine_tunes(tiny_models, tmp_path / "models", 4)
    state = init_state(tmp_path, tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    ref = init_state(tmp_path / "ref", tiny_models, "task_arithmetic", "{lambda: 0.5}", models="a")
    prefixes = [state_tensors(ref)]  # prefixes[k]: the state after 'a' and the first k models
    for m in models:
        continual.add(ref, str(m), name=m.name)
        prefixes.append(state_tensors(ref))
    delay = 0.03  # per tensor written: an add of ~21 tensors takes ~0.6 s
    proc, url = _spawn_server(state, delay)
    # one point drawn in each tenth of [0, 1.1], in a random order: random, and spread by construction
    targets = [rng.uniform(k, k + 1) * 1.1 / 10 for k in range(10)]
    rng.shuffle(targets)
    fractions = []
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            ids = [c.post("/models", json={"source": str(m), "name": m.name}).json()["id"] for m in models]
        for _ in range(10):
            with httpx.Client(base_url=url, timeout=30) as c:
                end = time.time() + 60
                while (job := _running(c)) is None and time.time() < end:
                    time.sleep(0.005)
                assert job is not None, c.get("/jobs").json()
                t_before = continual.State.load(state).t
                target = targets.pop()  # of the add's bytes; past 1: at the commit (all written)
                while True:
                    now = c.get(f"/jobs/{job['id']}").json()
                    frac = now.get("bytes_done", 0) / now["bytes_total"] if now.get("bytes_total") else 0.0
                    if now["status"] != "running" or frac >= min(target, 1.0) or time.time() > end:
                        break
                    time.sleep(0.002)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            fractions.append(frac if now["status"] == "running" else 1.0)
            st = continual.State.load(state)  # loads: a valid state
            assert len(st.data["history"]) == st.t and st.t in (t_before, t_before + 1), (st.t, t_before)
            got = state_tensors(state)
            assert all(torch.equal(got[k], prefixes[st.t - 1][k]) for k in prefixes[0])
            proc, url = _spawn_server(state, delay)
        with httpx.Client(base_url=url, timeout=30) as c:
            jobs = wait_jobs(c, ids, timeout=120)
            assert len(c.get("/jobs").json()) == len(models)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [j["status"] for j in jobs] == ["done"] * len(models) and [j["t"] for j in jobs] == [2, 3, 4, 5]
    assert [h["name"] for h in continual.status(state)["history"]] == ["a"] + [m.name for m in models]
    assert [h["job"] for h in continual.status(state)["history"][1:]] == ids  # each job merged once
    got = state_tensors(state)
    assert set(got) == set(prefixes[-1]) and all(torch.equal(got[k], prefixes[-1][k]) for k in got)
    assert not list(state.glob(".v*"))
    # the kill points are spread over the add (measured): early, late and in between
    print("kill points (fraction of the add's bytes done):", [round(f, 2) for f in fractions])
    assert len(fractions) == 10 and min(fractions) < 0.2 and max(fractions) > 0.9, fractions
    assert len({round(f, 1) for f in fractions}) >= 6, fractions


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
