#!/usr/bin/env python
"""End-to-end speed and memory benchmark of ``merge run``.

Builds a random bf16 Llama-shaped base (~270M parameters, 3 shards) and three task models
(base + small seeded noise) under ``benchmarks/_work/`` with the project's own builder
(``mergekit_ortho.testing.checkpoints``), writes one recipe per merge method, and times
``merge -q run RECIPE --out OUT`` as a child process (round-robin over the methods, the output
removed untimed before each run): wall time and the child's own
peak RSS (``os.wait4`` rusage of that one child, so earlier children do not leak into the max).
It also times the bare interpreter start-up ``python -c 'import torch'`` as the floor that any
CLI invocation pays.

    python benchmarks/bench_merge.py                 # full size (~270M params, ~518 MiB per model)
    python benchmarks/bench_merge.py --small         # tiny checkpoints, for debugging the script
    python benchmarks/bench_merge.py --methods linear ties --repeat 5
    python benchmarks/bench_merge.py --against ../old-checkout   # before/after, same rounds

Results go to ``benchmarks/results_merge.md`` (or ``--results``) and are printed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "magmax", "widen"]
OPTIONAL_METHODS = {"magmax", "widen"}  # run only if `merge methods` lists them

FULL = dict(hidden=1024, layers=16, vocab=32000, intermediate=2816)
SMALL = dict(hidden=256, layers=2, vocab=4096, intermediate=704)

# Targets from the brief; reported, never enforced.
TARGET_LINEAR_OVER_IMPORT_S = 2.0
TARGET_LINEAR_RSS_GIB = 0.6
TARGET_TIES_WALL_RATIO = 2.0
TARGET_NEW_WALL_RATIO = 2.0
TARGET_NEW_RSS_RATIO = 1.2


# --------------------------------------------------------------------------- checkpoints

def n_params(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def build_checkpoints(root: Path, dims: dict, rebuild: bool) -> dict[str, Path]:
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    shapes = llama_shapes(dims["hidden"], dims["layers"], dims["vocab"], dims["intermediate"])
    count = n_params(shapes)
    print(f"checkpoint shape: hidden={dims['hidden']} layers={dims['layers']} vocab={dims['vocab']} "
          f"intermediate={dims['intermediate']} -> {count:,} parameters "
          f"({count * 2 / 2**20:.1f} MiB in bf16 per model)", flush=True)
    cfg = {"hidden_size": dims["hidden"], "num_hidden_layers": dims["layers"],
           "vocab_size": dims["vocab"], "intermediate_size": dims["intermediate"],
           "num_attention_heads": max(1, dims["hidden"] // 64)}
    stamp = {"dims": dims, "params": count, "dtype": "bfloat16", "shards": 3, "noise": 0.01}
    marker = root / "built.json"
    paths = {"base": root / "base", **{n: root / n for n in ("task_a", "task_b", "task_c")}}
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == stamp \
            and all((p / "config.json").is_file() for p in paths.values()):
        print(f"reusing checkpoints in {root} (--rebuild to rebuild)", flush=True)
        return paths
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    write_checkpoint(paths["base"], shapes, seed=0, dtype="bfloat16", shards=3, config=cfg)
    for i, name in enumerate(("task_a", "task_b", "task_c")):
        write_checkpoint(paths[name], shapes, seed=i + 1, base=paths["base"], noise=0.01,
                         dtype="bfloat16", shards=3, config=cfg)
    marker.write_text(json.dumps(stamp))
    print(f"built 4 checkpoints in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# --------------------------------------------------------------------------- recipes

def recipe_text(method: str, paths: dict[str, Path], out: Path) -> str:
    models = [paths[n] for n in ("task_a", "task_b", "task_c")]
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {json.dumps(str(paths['base']))}")
    lines.append("models:")
    for m in models:
        lines.append(f"  - model: {json.dumps(str(m))}")
        if method in ("ties", "dare_ties"):
            lines.append("    parameters: {weight: 1.0, density: 0.5}")
        elif method in ("linear", "task_arithmetic"):
            lines.append("    parameters: {weight: 1.0}")
    if method in ("task_arithmetic", "ties", "dare_ties"):
        lines.append("parameters: {lambda: 1.0}")
    lines.append("dtype: float32")
    lines.append("output:")
    lines.append(f"  path: {json.dumps(str(out))}")
    return "\n".join(lines) + "\n"


def available_methods(merge_cmd: list[str]) -> set[str] | None:
    """Method names that `merge methods` lists (None if it cannot be run)."""
    env = dict(os.environ, COLUMNS="250")
    try:
        r = subprocess.run(merge_cmd + ["methods"], capture_output=True, text=True, env=env, timeout=120)
    except Exception:
        return None
    if r.returncode != 0:
        return None
    names = set()
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if len(cells) > 2 and cells[1] and cells[1] != "method":
            names.add(cells[1].split()[0].rstrip("…"))
    return names


# --------------------------------------------------------------------------- timing

# Runs in a fresh, lean interpreter (``python -I -S``): on Linux a child's ru_maxrss starts from the
# high-water RSS of the process it was forked from (it survives fork/vfork + exec), so forking the
# merge from this script -- which imported torch and built GiB-sized checkpoints -- would report
# this script's peak instead of the merge's. The wrapper's own peak is ~10 MiB.
_WRAPPER = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
tail = err.decode(errors="replace").strip().splitlines()
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": wall,
                  "maxrss_kib": ru.ru_maxrss, "tail": tail[-1] if tail else ""}))
"""


def run_child(cmd: list[str], env: dict | None = None) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, this child's peak RSS in GiB, last stderr line).

    ``os.wait4`` in the lean wrapper gives the rusage of exactly that one child (ru_maxrss in KiB
    on Linux), unlike ``RUSAGE_CHILDREN``, which is a maximum over all children reaped so far.
    """
    r = subprocess.run([sys.executable, "-I", "-S", "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return r.returncode, float("nan"), float("nan"), "wrapper failed: " + r.stderr.strip()[-200:]
    res = json.loads(r.stdout)
    return res["rc"], res["wall"], res["maxrss_kib"] * 1024 / 2**30, res["tail"]


def resolve_merge() -> list[str]:
    """The ``merge`` console script, bypassing a pyenv shim (which adds a bash + pyenv start-up)."""
    cand = Path(sys.executable).parent / "merge"
    if cand.is_file():
        return [str(cand)]
    found = shutil.which("merge")
    if found:
        return [found]
    return [sys.executable, "-m", "mergekit_ortho.cli"]


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                    help="methods to time (magmax/widen are skipped if `merge methods` lacks them)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds: runs per method (median wall, max RSS)")
    ap.add_argument("--small", action="store_true", help="tiny checkpoints, for debugging")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the checkpoints even if present")
    ap.add_argument("--work", type=Path, default=HERE / "_work", help="scratch directory (git-ignored)")
    ap.add_argument("--results", type=Path, default=None,
                    help="Markdown output (default benchmarks/results_merge.md; with --small, _work/results_merge_small.md)")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout of this project (e.g. a git worktree of an earlier commit): each round "
                    "also runs every method with that code, in alternating order, and the results compare the two")
    args = ap.parse_args(argv)

    from importlib.metadata import version

    torch_version = version("torch")  # not imported here: the children import it themselves

    dims = SMALL if args.small else FULL
    size = "small" if args.small else "full"
    work = args.work / size
    results = args.results or (args.work / "results_merge_small.md" if args.small else HERE / "results_merge.md")
    load_before = load1()
    paths = build_checkpoints(work / "models", dims, args.rebuild)
    from mergekit_ortho.testing.checkpoints import llama_shapes
    params = n_params(llama_shapes(dims["hidden"], dims["layers"], dims["vocab"], dims["intermediate"]))

    merge_cmd = resolve_merge()
    envs = {"this": None}
    if args.against is not None:  # both through `python -m`, each with its own code first on the path
        merge_cmd = [sys.executable, "-m", "mergekit_ortho.cli"]
        envs = {"this": dict(os.environ, PYTHONPATH=str(REPO)),
                "against": dict(os.environ, PYTHONPATH=str(args.against.resolve()))}
    listed = available_methods(merge_cmd)
    print(f"merge command: {' '.join(merge_cmd)}; methods listed: "
          f"{', '.join(sorted(listed)) if listed else '(could not list)'}", flush=True)

    rows: dict[str, dict] = {}
    loads = [load_before]
    recipes: dict[str, tuple[Path, Path]] = {}
    for method in args.methods:
        if listed is not None and method not in listed:
            if method in OPTIONAL_METHODS:
                rows[method] = {"skip": "not listed by `merge methods` (not implemented yet)"}
                print(f"{method}: skipped (not listed by `merge methods`)", flush=True)
                continue
        rdir = work / "recipes"
        rdir.mkdir(parents=True, exist_ok=True)
        out = work / "out" / method
        recipe = rdir / f"{method}.yaml"
        recipe.write_text(recipe_text(method, paths, out))
        recipes[method] = (recipe, out)
        rows[method] = {"walls": [], "rsss": [], "error": "", "against": {"walls": [], "rsss": []}}

    # Round-robin: every round runs the bare start-up and then each method once, so a drift in
    # the machine's speed (shared cores) touches all of them alike. Outputs are removed before
    # each run, untimed: the timed command writes a fresh output, as a user's first run does.
    imp = []
    for i in range(args.repeat):
        rc, wall, rss, _ = run_child([sys.executable, "-c", "import torch"])  # the floor of any `merge`
        imp.append((wall, rss))
        for method, (recipe, out) in recipes.items():
            row = rows[method]
            if row["error"]:
                continue
            # alternate which code goes first, so neither always runs on a warmer page cache
            for which in (list(envs) if i % 2 == 0 else list(envs)[::-1]):
                shutil.rmtree(out, ignore_errors=True)
                loads.append(load1())
                rc, wall, rss, tail = run_child(merge_cmd + ["-q", "run", str(recipe), "--out", str(out)],
                                                envs[which])
                if rc != 0:
                    row["error"] = f"{which} exit {rc}: {tail}"
                    print(f"{method}: FAILED ({row['error']})", flush=True)
                    break
                dest = row if which == "this" else row["against"]
                dest["walls"].append(wall)
                dest["rsss"].append(rss)
                print(f"round {i + 1}/{args.repeat} {method} ({which}): {wall:.2f} s, peak RSS {rss:.3f} GiB",
                      flush=True)
    for _, out in recipes.values():
        shutil.rmtree(out, ignore_errors=True)
    import_wall = statistics.median(w for w, _ in imp)
    import_rss = max(r for _, r in imp)
    print(f"python -c 'import torch': median {import_wall:.2f} s, peak RSS {import_rss:.3f} GiB", flush=True)
    loads.append(load1())

    md = render(rows, dims, params, import_wall, import_rss, args.repeat, (load_before, max(loads)), merge_cmd,
                torch_version, size)
    if args.against is not None:
        md += render_against(rows, args.against)
    results.write_text(md)
    print()
    print(md)
    print(f"(written to {results})")
    return 0


def render_against(rows, against: Path) -> str:
    """Before/after: this code against another checkout, timed in the same rounds."""
    try:
        rev = subprocess.run(["git", "-C", str(against), "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True).stdout.strip()[:100]
    except OSError:
        rev = ""
    out = ["", f"## This code against `{against.name}`{f' ({rev})' if rev else ''}\n",
           "Same rounds, alternating which runs first; ratio = median over rounds of this wall / that wall.\n",
           "| method | this wall s | that wall s | wall ratio | this peak RSS GiB | that peak RSS GiB | RSS ratio |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        a = r.get("against") or {}
        if r.get("skip") or r.get("error") or not r.get("walls") or not a.get("walls"):
            continue
        ratio = statistics.median(x / y for x, y in zip(r["walls"], a["walls"]))
        out.append(f"| {m} | {statistics.median(r['walls']):.2f} | {statistics.median(a['walls']):.2f} | "
                   f"{ratio:.3f}× | {max(r['rsss']):.3f} | {max(a['rsss']):.3f} | "
                   f"{max(r['rsss']) / max(a['rsss']):.3f}× |")
    return "\n".join(out) + "\n"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def render(rows, dims, params, import_wall, import_rss, repeat, load, merge_cmd, torch_version,
           size) -> str:
    def stats(m):
        r = rows.get(m)
        if not r or not r.get("walls") or r.get("error"):
            return None
        return statistics.median(r["walls"]), max(r["rsss"])

    lin = stats("linear")
    out = []
    out.append("# `merge run` end-to-end speed and memory\n")
    out.append(f"Generated by `python benchmarks/bench_merge.py{' --small' if size == 'small' else ''}` "
               f"on {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}.\n")
    out.append("## Machine\n")
    out.append(f"- nproc: {os.cpu_count()} (affinity: {len(os.sched_getaffinity(0))})")
    out.append(f"- CPU: {cpu_model()}")
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        out.append(f"- RAM: {int(mem) / 2**20:.1f} GiB")
    except (OSError, IndexError, ValueError):
        pass
    out.append(f"- Python {platform.python_version()}, torch {torch_version}")
    load_before, max_load = load
    out.append(f"- 1-minute load average: {load_before:.2f} before the run, highest {max_load:.2f} during it "
               "(the merge child itself runs up to 2 torch threads, so part of that is the benchmark)"
               + (" — **the machine was shared with other work (load > 1.5 before starting); "
                  "timings are noisy/pessimistic**" if load_before > 1.5 else ""))
    out.append("")
    out.append("## Workload\n")
    out.append(f"- base + 3 task models, Llama-shaped, hidden {dims['hidden']}, {dims['layers']} layers, "
               f"vocab {dims['vocab']}, intermediate {dims['intermediate']}: **{params:,} parameters** "
               f"per model, bf16, 3 safetensors shards ({params * 2 / 2**20:.0f} MiB per model); "
               "task models = base + 0.01·N(0,1) noise")
    out.append("- recipes: compute dtype float32, output dtype = base's (bf16); ties/dare_ties density 0.5; "
               "linear without base_model; other methods use their defaults")
    out.append(f"- command: `{Path(merge_cmd[-1]).name} -q run RECIPE --out OUT` as a child "
               f"process (OUT removed, untimed, before each run), {repeat} rounds over all methods "
               "(round-robin, so a drift in machine speed touches every method alike) and the bare "
               "start-up; wall = median, RSS = max of the child's own ru_maxrss "
               "(`os.wait4` in a lean "
               "wrapper process, so the benchmark script's own RSS does not leak into the child's ru_maxrss)")
    out.append(f"- bare start-up `python -c 'import torch'`: median of {repeat} = **{import_wall:.2f} s**, "
               f"peak RSS {import_rss:.3f} GiB")
    out.append("")
    out.append("## Results\n")
    out.append("| method | wall s (median) | wall s (min–max of the rounds) | wall − import torch s | peak RSS GiB "
               "| wall ratio to linear | RSS ratio to linear |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        if r.get("skip"):
            out.append(f"| {m} | skipped: {r['skip']} | | | | | |")
            continue
        s = stats(m)
        if s is None:
            out.append(f"| {m} | FAILED: `{r.get('error', '').replace('|', '/')}` | | | | | |")
            continue
        w, rss = s
        wr = w / lin[0] if lin else None
        rr = rss / lin[1] if lin else None
        spread = f"{min(r['walls']):.2f}–{max(r['walls']):.2f}"
        out.append(f"| {m} | {w:.2f} | {spread} | {w - import_wall:.2f} | {rss:.3f} | {_fmt_ratio(wr)} "
                   f"| {_fmt_ratio(rr)} |")
    out.append("")
    out.append("## Against the targets\n")
    checks = []
    if lin:
        checks.append(("linear wall − import torch ≤ 2 s", lin[0] - import_wall <= TARGET_LINEAR_OVER_IMPORT_S,
                       f"{lin[0] - import_wall:.2f} s"))
        checks.append(("linear peak RSS ≤ 0.6 GiB", lin[1] <= TARGET_LINEAR_RSS_GIB, f"{lin[1]:.3f} GiB"))
        t = stats("ties")
        if t:
            checks.append(("ties wall ≤ 2× linear", t[0] / lin[0] <= TARGET_TIES_WALL_RATIO,
                           f"{t[0] / lin[0]:.2f}×"))
        for m in ("magmax", "widen"):
            s = stats(m)
            if s:
                checks.append((f"{m} wall ≤ 2× linear", s[0] / lin[0] <= TARGET_NEW_WALL_RATIO,
                               f"{s[0] / lin[0]:.2f}×"))
                checks.append((f"{m} RSS ≤ 1.2× linear", s[1] / lin[1] <= TARGET_NEW_RSS_RATIO,
                               f"{s[1] / lin[1]:.2f}×"))
            elif m in rows:
                checks.append((f"{m} targets", None, "not measured (" + (rows[m].get("skip") or "failed") + ")"))
    else:
        checks.append(("all targets", None, "linear did not run, no reference"))
    out.append("| target | measured | met |")
    out.append("|---|---:|:---:|")
    for name, ok, val in checks:
        out.append(f"| {name} | {val} | {'—' if ok is None else ('yes' if ok else '**no**')} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
