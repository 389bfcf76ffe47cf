"""Load benchmark of `merge serve` (issue 16): 50 submissions from 10 concurrent clients against one
server on loopback, some duplicates and some bad.

    python benchmarks/bench_serve.py [--hidden 512] [--layers 4] [--distinct 30] [--timeout 600]

Builds ``--distinct`` fine-tunes of a small bf16 Llama-shaped base (``benchmarks/_work/serve/``),
starts `merge serve` on an ephemeral port (task_arithmetic state), and fires 50 POST /models from
10 threads: the distinct models, duplicates (the same idempotency key, or the same files under a
new key) and bad ones (a tensor of the wrong shape; a path that does not exist). Reports accepted /
duplicate / refused (422) counts, median and p95 POST latency, merges per minute (first accepted
POST to the last job done), the server's RSS sampled every 50 ms (peak, and after the first and
the last quarter of the jobs: it must stay flat), and checks that the final state equals serial
`continual add`s of the accepted models in the order the server merged them.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "serve"
sys.path.insert(0, str(ROOT.parent))


def post(url: str, body: dict) -> tuple[int, dict, float]:
    req = urllib.request.Request(url + "/models", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t0


def get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--distinct", type=int, default=30)
    ap.add_argument("--submissions", type=int, default=50)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()

    import torch

    from mergekit_ortho import continual
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    shapes = llama_shapes(hidden=a.hidden, layers=a.layers, vocab=1024, intermediate=a.hidden * 2)
    write_checkpoint(WORK / "base", shapes, seed=0)
    models = []
    for i in range(a.distinct):
        write_checkpoint(WORK / f"m{i:02d}", shapes, seed=i + 1, base=WORK / "base", noise=0.02)
        models.append(WORK / f"m{i:02d}")
    bad = WORK / "bad"
    bad_shapes = dict(shapes, **{"model.layers.0.mlp.up_proj.weight": (a.hidden * 2 - 1, a.hidden)})
    write_checkpoint(bad, bad_shapes, seed=99)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    recipe = WORK / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {WORK / 'base'}\nparameters: {{lambda: 0.5}}\n")
    state = WORK / "state"
    continual.init(state, recipe, retain=2)

    rng = random.Random(0)
    bodies = [{"source": str(m), "name": m.name, "idempotency_key": f"k-{m.name}"} for m in models]
    extra = a.submissions - len(bodies)
    for i in range(extra):
        kind = i % 3
        if kind == 0:  # the same key again
            bodies.append(dict(rng.choice(bodies[: len(models)])))
        elif kind == 1:  # the same files under a new key: the content hash finds the job
            m = rng.choice(models)
            bodies.append({"source": str(m), "name": m.name + "-again", "idempotency_key": f"new-{i}"})
        else:
            bodies.append({"source": str(bad) if i % 2 else str(WORK / "missing"), "name": f"bad{i}"})
    rng.shuffle(bodies)

    proc = subprocess.Popen([sys.executable, "-m", "mergekit_ortho.cli", "serve", str(state), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    rec = json.loads(proc.stderr.readline())
    url = f"http://127.0.0.1:{rec['port']}"
    logs: list[dict] = []
    threading.Thread(target=lambda: [logs.append(json.loads(x)) for x in proc.stderr], daemon=True).start()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.time(), rss_kib(proc.pid)))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    try:
        t0 = time.time()
        with ThreadPoolExecutor(a.clients) as pool:
            results = list(pool.map(lambda b: post(url, b), bodies))
        accepted = {r[1]["id"] for r in results if r[0] == 202}
        dups = sum(1 for r in results if r[0] == 200)
        refused = sum(1 for r in results if r[0] == 422)
        end = t0 + a.timeout
        while time.time() < end:
            jobs = get(url, "/jobs")
            if all(j["status"] not in ("queued", "running") for j in jobs):
                break
            time.sleep(0.2)
        t_done = time.time()
        jobs = get(url, "/jobs")
        ended = {j["id"]: j for j in jobs}
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
    lat = sorted(r[2] for r in results)
    done_logs = [x for x in logs if x.get("event") == "job_done"]
    done_times = [time.mktime(time.strptime(x["time"], "%Y-%m-%dT%H:%M:%S%z")) for x in done_logs]
    q = max(1, len(done_logs) // 4)
    rss_at = lambda t: max((r for ts, r in samples if ts <= t), default=0)  # noqa: E731
    statuses = [ended[i]["status"] for i in accepted]

    hist = continual.status(state)["history"]
    serial = WORK / "serial"
    continual.init(serial, recipe)
    for h in hist:
        continual.add(serial, h["source"], name=h["name"])
    x = continual.State.load(state)
    y = continual.State.load(serial)
    from safetensors.torch import load_file

    def tensors(st):
        return {k: v for f in sorted(st.tensor_dir.glob("*.safetensors")) for k, v in load_file(f).items()}

    tx, ty = tensors(x), tensors(y)
    equal = set(tx) == set(ty) and all(torch.equal(tx[k], ty[k]) for k in tx)
    print(f"models: {params / 1e6:.1f}M params each (bf16, hidden {a.hidden}, {a.layers} layers), "
          f"{a.distinct} distinct; {a.submissions} POSTs from {a.clients} clients")
    print(f"accepted {len(accepted)}  duplicate {dups}  refused (422) {refused}  "
          f"jobs done {statuses.count('done')}  failed {statuses.count('failed')}")
    print(f"POST /models latency: median {statistics.median(lat) * 1000:.1f} ms, "
          f"p95 {lat[int(0.95 * (len(lat) - 1))] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
    wall = t_done - t0
    print(f"all jobs finished in {wall:.1f} s: {len(done_logs) / wall * 60:.1f} merges/min")
    if done_times:
        print(f"server RSS: peak {max(r for _, r in samples) / 1024:.0f} MiB; after job {q}: "
              f"{rss_at(done_times[q - 1] + 1) / 1024:.0f} MiB, after job {len(done_logs)}: "
              f"{rss_at(done_times[-1] + 1) / 1024:.0f} MiB")
    print(f"merged {len(hist)} models; final state equals serial adds in the server's order: {equal}")
    if not equal or statuses.count("done") != len(accepted) or len(hist) != len(accepted):
        sys.exit(1)


if __name__ == "__main__":
    main()
