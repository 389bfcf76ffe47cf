#!/usr/bin/env python
"""Units of work on one machine: 1, 2 and 4 concurrent `merge run --shard i/N` processes (then
`merge finalize`) against `merge run --executor ray` at the same core count, and the serial run.

Builds a random bf16 Llama-shaped base and three task models (``mergekit_ortho.testing``) under
``--work`` with ``output.shard_size`` set so the output has ``--shards`` shards, then times, as child
processes, one after another (wall, start-up included):

* serial: ``merge -q run R --out O``;
* k processes (k = 1, 2, 4): ``merge -q run R --shard i/k --stage S`` for i < k at once, each with
  ``OMP_NUM_THREADS = cores / k`` (equal cores), then ``merge -q finalize R --stage S --out O``;
* Ray: a local head started with ``ray start --head --num-cpus=CORES`` (not timed), then
  ``merge -q run R --out O --executor ray --address HEAD`` (one task per output shard, 1 CPU each:
  Ray sets OMP_NUM_THREADS=1 in its workers), head stopped after.

Every output is compared with the serial one (bit-identical, or the run is reported as wrong).

    python benchmarks/bench_shards.py                        # ~33M params per model, 8 shards
    python benchmarks/bench_shards.py --hidden 2048 --layers 16 --vocab 32000 --intermediate 5632  # ~1B
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "mergekit_ortho.cli", "-q"]


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def timed(cmds: list[list[str]], envs: list[dict]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c, e in zip(cmds, envs)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args)} failed: {err.strip()[-400:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work_shards")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results_shards.md")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--method", default="linear")
    ap.add_argument("--procs", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    cores = os.cpu_count() or 1
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(hidden=args.hidden, layers=args.layers, vocab=args.vocab, intermediate=args.intermediate)
    if not (w / "base" / "config.json").is_file():
        write_checkpoint(w / "base", shapes, seed=0, dtype="bfloat16")
    for i, t in enumerate(("a", "b", "c")):
        if not (w / t / "config.json").is_file():
            write_checkpoint(w / t, shapes, seed=i + 1, base=w / "base", noise=0.02, dtype="bfloat16")
    size = (w / "base" / "model.safetensors").stat().st_size
    r = w / "r.yaml"
    base = f"base_model: {w / 'base'}\n" if args.method != "linear" else ""
    r.write_text(f"merge_method: {args.method}\n{base}models:\n" + "".join(f"  - model: {w / t}\n" for t in "abc")
                 + f"dtype: bfloat16\noutput:\n  shard_size: {size // args.shards + 1}\n")
    env = dict(os.environ)
    rows = []

    def fresh(*ds):
        for d in ds:
            shutil.rmtree(d, ignore_errors=True)

    fresh(w / "serial")
    serial = timed([CLI + ["run", str(r), "--out", str(w / "serial")]], [env])
    want = digest(w / "serial")
    rows.append(("serial (1 process, all cores)", serial, True))
    for k in args.procs:
        fresh(w / "stage", w / "out")
        envk = dict(env, OMP_NUM_THREADS=str(max(1, cores // k)))
        units = timed([CLI + ["run", str(r), "--shard", f"{i}/{k}", "--stage", str(w / "stage")] for i in range(k)],
                      [envk] * k)
        fin = timed([CLI + ["finalize", str(r), "--stage", str(w / "stage"), "--out", str(w / "out")]], [env])
        rows.append((f"{k} x --shard ({max(1, cores // k)} threads each) + finalize", units + fin,
                     digest(w / "out") == want))
    if not args.no_ray:
        fresh(w / "out", w / "ray_tmp")
        port = "6390"
        subprocess.run(["ray", "start", "--head", f"--num-cpus={cores}", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={w / 'ray_tmp'}"], check=True, capture_output=True)
        try:
            t = timed([CLI + ["run", str(r), "--out", str(w / "out"), "--executor", "ray", "--address",
                              f"127.0.0.1:{port}"]], [env])
        finally:
            subprocess.run(["ray", "stop", "--force"], capture_output=True)
        rows.append((f"--executor ray ({cores} CPUs, {args.shards} tasks)", t, digest(w / "out") == want))
    lines = [f"# Units on one machine: --shard processes vs Ray ({args.method})", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cores} CPUs (shared with other jobs: noisy); "
             f"3 models, bf16, {size / 2**20:.0f} MiB each, output in {args.shards} shards; one run each, wall "
             "including process start-up.", "",
             "| run | wall s | vs serial | bit-identical to serial |", "|---|---|---|---|"]
    for name, t, same in rows:
        lines.append(f"| {name} | {t:.2f} | {t / serial:.2f}x | {'yes' if same else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
