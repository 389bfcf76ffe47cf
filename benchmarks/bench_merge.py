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
    python benchmarks/bench_merge.py --mergekit-venv DIR --methods linear slerp ties  # vs mergekit-yaml

With ``--mergekit-venv`` every round also runs mergekit's ``DIR/bin/mergekit-yaml RECIPE OUT`` (CPU,
``--lazy-unpickle --random-seed 0 --quiet``) on the same recipe file for each method mergekit
registers, alternating the order with ours, timed the same way; after the first round both outputs
are compared on a few tensors (max relative difference, and the difference relative to the merged
change from the base; kept fraction and L1 for the random methods). ``--models DIR`` reads the
checkpoints from another work tree (read-only) so outputs and recipes stay under ``--work``.

``--scaling 2 4 8`` adds, to the same rounds, linear (the N task models, no base, weight 1 each) and
magmax (base + the N task models) for each N (``--scaling-methods`` picks others), building the
extra task models it needs (task_d, task_e, ... : base + seeded noise like the first three,
reused when present), and writes a table of how wall time, CPU time and peak RSS grow with N:
a least-squares fit wall = a + b·N with its largest residual, and peak RSS against the smallest N
(the issue's verdicts: time linear in N, RSS flat within ±10 %). Results then default to
``benchmarks/results_merge_scaling.md``.

Before the rounds a probe child measures the machine's roofline: page-cache read bandwidth (an
input shard read twice, the second timed), bf16→f32 and f32→bf16 conversion throughput (torch, the
thread count a merge child gets), and durable-write bandwidth (``--probe-write-mib``, default 1024,
through ``mergekit_ortho.io.durable.DurableFile`` on the output's file system). Each method's row
then has a floor = import torch + bytes read / read bandwidth + entries converted / conversion rates
+ bytes written / write bandwidth, and its wall / floor.

Results go to ``benchmarks/results_merge.md`` (or ``--results``) and are printed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
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
TASKS = ("task_a", "task_b", "task_c")
# --scaling: task models beyond the first three are built on demand (same recipe, next seeds)
ALL_TASKS = tuple(f"task_{c}" for c in "abcdefghijklmnopqrstuvwxyz")
SCALING_METHODS = ["linear", "magmax"]
# Methods whose masks are random: their outputs are compared by statistics, not values.
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}

# Benchmark recipes: name -> (merge_method, base_model?, [(model, per-model parameters)], method
# parameters). No `dtype:`: a recipe's dtype rounds the inputs and sets the output dtype (mergekit's
# rule), and without it the output stays bf16 like the inputs. Names not listed here get the
# generic recipe (base + the three tasks, default parameters).
_W = "weight: 1.0"
_SPARSE = "weight: 1.0, density: 0.5"
RECIPES: dict[str, tuple[str, bool, list[tuple[str, str]], str]] = {
    "linear": ("linear", False, [(t, _W) for t in TASKS], ""),
    # linear over the same two models slerp interpolates between (slerp's target reference)
    "linear_2": ("linear", False, [("base", _W), ("task_a", _W)], ""),
    "task_arithmetic": ("task_arithmetic", True, [(t, _W) for t in TASKS], "lambda: 1.0"),
    "ties": ("ties", True, [(t, _SPARSE) for t in TASKS], "lambda: 1.0"),
    "dare_ties": ("dare_ties", True, [(t, _SPARSE) for t in TASKS], "lambda: 1.0"),
    "dare_linear": ("dare_linear", True, [(t, _SPARSE) for t in TASKS], "lambda: 1.0"),
    "breadcrumbs": ("breadcrumbs", True, [(t, _SPARSE + ", gamma: 0.01") for t in TASKS], "lambda: 1.0"),
    "breadcrumbs_ties": ("breadcrumbs_ties", True, [(t, _SPARSE + ", gamma: 0.01") for t in TASKS],
                         "lambda: 1.0"),
    "della": ("della", True, [(t, _SPARSE + ", epsilon: 0.1") for t in TASKS], "lambda: 1.0"),
    "della_linear": ("della_linear", True, [(t, _SPARSE + ", epsilon: 0.1") for t in TASKS], "lambda: 1.0"),
    "sce": ("sce", True, [(t, "") for t in TASKS], "select_topk: 0.5"),
    "model_stock": ("model_stock", True, [(t, "") for t in TASKS], ""),
    # two-model methods: the base and task_a (the base listed as a model too, mergekit's idiom)
    "slerp": ("slerp", True, [("base", ""), ("task_a", "")], "t: 0.5"),
    "nearswap": ("nearswap", True, [("base", ""), ("task_a", "")], "t: 0.01"),
    "nuslerp": ("nuslerp", False, [("task_a", _W), ("task_b", _W)], ""),
    "multislerp": ("multislerp", False, [(t, _W) for t in TASKS], ""),
    "karcher": ("karcher", False, [(t, "") for t in TASKS], "max_iter: 10, tol: 1.0e-5"),
    "passthrough": ("passthrough", False, [("task_a", "")], ""),
    "arcee_fusion": ("arcee_fusion", True, [("task_a", "")], ""),
    "ram": ("ram", True, [(t, "") for t in TASKS], ""),
    "ramplus_tl": ("ramplus_tl", True, [(t, "") for t in TASKS], ""),
}

# What mergekit 0.1.5 computes in when the recipe has no dtype (read from its source; inputs bf16).
# Ours always computes in float32 (`compute_dtype`, default float32) and rounds once to bf16.
MERGEKIT_COMPUTE = {
    "linear": "fp32 accumulate",
    "slerp": "fp32 (chunks upcast)",
    "karcher": "bf16 (norms fp32)",
    "ties": "bf16 (top-k ranking fp32)",
    "breadcrumbs": "bf16 (ranking fp32)",
    "breadcrumbs_ties": "bf16 (ranking fp32)",
    "della": "bf16", "della_linear": "bf16", "dare_ties": "bf16", "dare_linear": "bf16",
    "task_arithmetic": "bf16", "sce": "bf16", "model_stock": "bf16", "nuslerp": "bf16",
    "nearswap": "bf16", "multislerp": "bf16", "ram": "bf16", "ramplus_tl": "bf16",
}

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
    cfg = _config(dims)
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


def _config(dims: dict) -> dict:
    return {"hidden_size": dims["hidden"], "num_hidden_layers": dims["layers"],
            "vocab_size": dims["vocab"], "intermediate_size": dims["intermediate"],
            "num_attention_heads": max(1, dims["hidden"] // 64)}


def build_extra_tasks(root: Path, dims: dict, names: list[str]) -> dict[str, Path]:
    """Task models beyond the first three (``--scaling``), next to them in ``root``: base + 0.01
    noise seeded by the model's index (task_d seed 4, ...), each reused when its stamp in
    ``extra.json`` matches. Each is written to a temporary folder and renamed, so an interrupted
    build leaves no half model behind."""
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    marker = root / "extra.json"
    built = json.loads(marker.read_text()) if marker.is_file() else {}
    base_stamp = json.loads((root / "built.json").read_text())
    paths = {}
    for name in names:
        seed = ALL_TASKS.index(name) + 1
        stamp = {"base": base_stamp, "seed": seed}
        path = root / name
        paths[name] = path
        if built.get(name) == stamp and (path / "config.json").is_file():
            continue
        shapes = llama_shapes(dims["hidden"], dims["layers"], dims["vocab"], dims["intermediate"])
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        write_checkpoint(tmp, shapes, seed=seed, base=root / "base", noise=0.01, dtype="bfloat16", shards=3,
                         config=_config(dims))
        tmp.rename(path)
        built[name] = stamp
        marker.write_text(json.dumps(built))
        print(f"built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# --------------------------------------------------------------------------- recipes

def recipe_text(method: str, paths: dict[str, Path], out: Path, dtype: str | None = None) -> str:
    merge_method, with_base, models, params = RECIPES.get(
        method, (method, True, [(t, "") for t in TASKS], ""))
    lines = [f"merge_method: {merge_method}"]
    if with_base:
        lines.append(f"base_model: {json.dumps(str(paths['base']))}")
    lines.append("models:")
    for name, mparams in models:
        lines.append(f"  - model: {json.dumps(str(paths[name]))}")
        if mparams:
            lines.append(f"    parameters: {{{mparams}}}")
    if params:
        lines.append(f"parameters: {{{params}}}")
    if dtype:
        lines.append(f"dtype: {dtype}")
    lines.append("output:")
    lines.append(f"  path: {json.dumps(str(out))}")
    return "\n".join(lines) + "\n"


def merge_method_of(method: str) -> str:
    return RECIPES.get(method, (method,))[0]


def add_scaling_recipes(methods: list[str], ns: list[int]) -> list[str]:
    """Register ``METHOD@N`` in RECIPES for each method and N: linear over the first N task models
    (no base, weight 1 each), any other method base + the first N task models at its defaults
    (as the generic recipe does for the three). Returns the names, N-major (all methods at the
    smallest N first)."""
    names = []
    for n in ns:
        tasks = ALL_TASKS[:n]
        for m in methods:
            if m == "linear":
                spec = ("linear", False, [(t, _W) for t in tasks], "")
            else:
                spec = (m, True, [(t, "") for t in tasks], "")
            RECIPES[f"{m}@{n}"] = spec
            names.append(f"{m}@{n}")
    return names


def models_read(method: str) -> list[str]:
    """The checkpoints a method's recipe reads (the base once, even where it is listed as a model)."""
    _, with_base, models, _ = RECIPES.get(method, (method, True, [(t, "") for t in TASKS], ""))
    names = [n for n, _ in models]
    if with_base and "base" not in names:
        names.insert(0, "base")
    return list(dict.fromkeys(names))


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


def mergekit_methods(venv: Path) -> set[str] | None:
    """Merge method names mergekit's registry holds (None if it cannot be asked)."""
    code = ("from mergekit.merge_methods.registry import registered_methods as r; "
            "print('\\n'.join(m.spec.name for m in r()))")
    try:
        r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                           timeout=300, env=_mergekit_env())
    except Exception:
        return None
    if r.returncode != 0:
        return None
    return {line.strip() for line in r.stdout.splitlines() if line.strip()}


def _mergekit_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def mergekit_version(venv: Path) -> str:
    try:
        r = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "from importlib.metadata import version as v; print(v('mergekit'), v('torch'))"],
                           capture_output=True, text=True, timeout=120, env=_mergekit_env())
        mk, tv = r.stdout.split()
        return f"mergekit {mk}, torch {tv}"
    except Exception:
        return "mergekit (version unknown)"


# --------------------------------------------------------------------------- comparing outputs

def _tensor_files(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                files[k] = f
    return files


def _read(files: dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as h:
        return h.get_tensor(name)


def _ulp(x, dtype):
    """One unit in the last place of |x| in ``dtype`` (bf16: 8 significant bits, fp16 11, fp32 24)."""
    import torch

    bits = {torch.bfloat16: 8, torch.float16: 11}.get(dtype, 24)
    e = torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(dtype).tiny)))
    return torch.pow(2.0, e - (bits - 1))


def compare_outputs(mk: Path, ours: Path, base: Path, layers: int, random: bool) -> dict:
    """Both tools' outputs on a few tensors (embeddings, first/middle layer projections, a norm,
    the final norm, the head), plus tensor names over the whole output:

    - rel: max over tensors of max|ours - mk| / max|mk| (the mergekit_compat measure);
    - ulp: fraction of elements where |ours - mk| exceeds one ulp of the coarser output dtype
      (so rounding the same value differently does not count, a different choice does);
    - rel_delta: ||ours - mk|| / ||mk - base||, pooled over the tensors: the difference against
      the merged change itself;
    - random methods: the fraction of elements moved off the base, each tool, and the L1 of the
      change, ours / mk (values cannot match: the masks come from different generators).
    """
    import torch

    fa, fb, fr = _tensor_files(mk), _tensor_files(ours), _tensor_files(base)
    res = {"names_equal": set(fa) == set(fb)}
    picks = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{layers // 2}.mlp.down_proj.weight",
             f"model.layers.{layers - 1}.post_attention_layernorm.weight", "model.norm.weight",
             "lm_head.weight"]
    picks = [n for n in picks if n in fa and n in fb]
    res["tensors"] = len(picks)
    dtypes_mk, dtypes_ours = set(), set()
    rel, beyond, count, diff2, change2 = 0.0, 0, 0, 0.0, 0.0
    moved = {"mk": [0, 0, 0.0], "ours": [0, 0, 0.0]}
    for n in picks:
        a, b = _read(fa, n), _read(fb, n)
        dtypes_mk.add(str(a.dtype).replace("torch.", ""))
        dtypes_ours.add(str(b.dtype).replace("torch.", ""))
        if a.shape != b.shape:
            res["shape_mismatch"] = n
            continue
        coarse = a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype
        a, b = a.double(), b.double()
        d = (a - b).abs()
        rel = max(rel, float(d.max()) / max(float(a.abs().max()), 1e-30))
        beyond += int((d > _ulp(torch.maximum(a.abs(), b.abs()), coarse)).sum())
        count += d.numel()
        r = _read(fr, n).double() if n in fr else None
        if r is not None and r.shape == a.shape:
            diff2 += float(d.square().sum())
            change2 += float((a - r).square().sum())
            if random:
                for key, x in (("mk", a), ("ours", b)):
                    dx = x - r
                    moved[key][0] += int((dx != 0).sum())
                    moved[key][1] += dx.numel()
                    moved[key][2] += float(dx.abs().sum())
    res.update(rel=rel, ulp=beyond / max(count, 1), rel_delta=(diff2 / change2) ** 0.5 if change2 else float("nan"),
               dtype_mk="/".join(sorted(dtypes_mk)), dtype_ours="/".join(sorted(dtypes_ours)))
    if random and moved["mk"][1]:
        res["kept_mk"] = moved["mk"][0] / moved["mk"][1]
        res["kept_ours"] = moved["ours"][0] / moved["ours"][1]
        res["l1_ratio"] = moved["ours"][2] / moved["mk"][2] if moved["mk"][2] else float("inf")
    return res


def _agreement_cell(c: dict | None) -> str:
    if not c:
        return "not compared"
    if "error" in c:
        return "compare failed: " + c["error"]
    notes = []
    if not c.get("names_equal", True):
        notes.append("tensor names differ")
    if c.get("shape_mismatch"):
        notes.append(f"shape differs at {c['shape_mismatch']}")
    if "kept_mk" in c:
        main = (f"random masks: kept {c['kept_ours']:.3f} ours vs {c['kept_mk']:.3f} mk, "
                f"L1 of change ours/mk {c['l1_ratio']:.3f}")
    else:
        main = (f"max rel {c['rel']:.1e}; {100 * c['ulp']:.2g} % of elements > 1 ulp apart; "
                f"‖ours − mk‖/‖mk − base‖ {c['rel_delta']:.2g}")
    return "; ".join([main] + notes)


# --------------------------------------------------------------------------- timing

# Runs in a fresh, lean interpreter (``python -I -S``): on Linux a child's ru_maxrss starts from the
# high-water RSS of the process it was forked from (it survives fork/vfork + exec), so forking the
# merge from this script -- which imported torch and built GiB-sized checkpoints -- would report
# this script's peak instead of the merge's. The wrapper's own peak is ~10 MiB.
_WRAPPER = r"""
import json, os, subprocess, sys, threading, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
timer = threading.Timer(float(sys.argv[1]), p.kill)
timer.start()
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
timer.cancel()
tail = err.decode(errors="replace").strip().splitlines()
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                  "maxrss_kib": ru.ru_maxrss, "tail": tail[-1] if tail else ""}))
"""


LAST_CPU = [float("nan")]  # CPU seconds of the last run_child's child


def run_child(cmd: list[str], env: dict | None = None, timeout: float = 1e9) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, this child's peak RSS in GiB, last stderr line).
    The child's CPU seconds (user + system, from the same rusage) go to ``LAST_CPU[0]``: on shared
    cores they move far less with other jobs' load than the wall time does.

    ``os.wait4`` in the lean wrapper gives the rusage of exactly that one child (ru_maxrss in KiB
    on Linux), unlike ``RUSAGE_CHILDREN``, which is a maximum over all children reaped so far.
    The child is killed after ``timeout`` seconds (exit -9).
    """
    r = subprocess.run([sys.executable, "-I", "-S", "-c", _WRAPPER, str(timeout), *cmd], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        return r.returncode, float("nan"), float("nan"), "wrapper failed: " + r.stderr.strip()[-200:]
    res = json.loads(r.stdout)
    LAST_CPU[0] = res["cpu"]
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


# --------------------------------------------------------------------------- roofline

# Runs in its own interpreter with the environment a merge child gets, so the thread count and
# the library code are the merge's. Prints one JSON line.
_PROBE = r"""
import json, os, sys, time
a = json.loads(sys.argv[1])
res = {}
view = memoryview(bytearray(64 * 2**20))  # a reused buffer, as the merge's reader uses


def read_once():
    t = time.perf_counter()
    with open(a["shard"], "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t


res["read_cold_s"] = read_once()  # warms the page cache if the shard was not in it
res["read_s"] = min(read_once() for _ in range(2))
res["read_bytes"] = os.path.getsize(a["shard"])

t = time.perf_counter()
import torch
res["import_torch_s"] = time.perf_counter() - t


def best(fn, reps=20, at_least=0.3):
    # best of >= reps calls and >= at_least seconds: on shared cores a call that waits for a
    # descheduled pool thread takes a scheduler slice (~4 ms), so a short window can miss every fast call
    fn()
    out, t_end, i = float("inf"), time.perf_counter() + at_least, 0
    while i < reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
        i += 1
    return out


res["threads"] = torch.get_num_threads()
res["convert"] = {}
for label, n in a["convert_entries"].items():
    src = torch.randn(n).to(torch.bfloat16)
    f32, b16 = torch.empty(n), torch.empty(n, dtype=torch.bfloat16)
    res["convert"][label] = {"entries": n, "up_s": best(lambda: f32.copy_(src)), "down_s": best(lambda: b16.copy_(f32))}
    del src, f32, b16

block = os.urandom(16 * 2**20)
total = a["write_bytes"]
try:
    from mergekit_ortho.io.durable import DurableFile
except ImportError:  # an older checkout: plain writes and one fsync
    DurableFile = None
t = time.perf_counter()
if DurableFile is not None:
    f = DurableFile(a["write_path"])
    res["write_via"] = "DurableFile (O_DIRECT)" if f.direct else "DurableFile (buffered: no O_DIRECT here)"
    for _ in range(total // len(block)):
        f.write(block)
    f.close()
else:
    res["write_via"] = "buffered writes + fsync (no mergekit_ortho.io.durable)"
    with open(a["write_path"], "wb") as fh:
        for _ in range(total // len(block)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
res["write_s"] = time.perf_counter() - t
res["write_bytes"] = total // len(block) * len(block)
os.unlink(a["write_path"])
print(json.dumps(res))
"""

# Tensor sizes the conversion is timed at: one MLP matrix of the 271M shape (its bf16 source and f32
# result fit a large L3, like the blockwise path's blocks) and the embedding (DRAM-sized, like the
# per-tensor path's largest inputs). The floor takes the faster rate.
CONVERT_ENTRIES = {"MLP matrix 2816×1024": 2816 * 1024, "embedding 32000×1024": 32000 * 1024}


def measure_roofline(shard: Path, write_path: Path, write_bytes: int, env: dict | None) -> dict:
    """The probe's numbers plus the derived rates (bytes/s, entries/s); {"error": ...} if it failed."""
    arg = json.dumps({"shard": str(shard), "write_path": str(write_path), "write_bytes": write_bytes,
                      "convert_entries": CONVERT_ENTRIES})
    write_path.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        write_path.unlink(missing_ok=True)
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["read_bw"] = res["read_bytes"] / res["read_s"]
    for c in res["convert"].values():
        c["up_rate"], c["down_rate"] = c["entries"] / c["up_s"], c["entries"] / c["down_s"]
    res["up_rate"] = max(c["up_rate"] for c in res["convert"].values())
    res["down_rate"] = max(c["down_rate"] for c in res["convert"].values())
    res["write_bw"] = res["write_bytes"] / res["write_s"]
    return res


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def floor_of(method: str, sizes: dict[str, int], params: int, out_bytes: int | None, roof: dict,
             import_s: float, bf16_out: bool) -> dict | None:
    """The I/O-and-conversion floor of one method's run, its terms summed (no overlap assumed):
    import torch + bytes read / read bw + entries read / bf16→f32 rate (+ entries written /
    f32→bf16 rate for a bf16 output) + bytes written / write bw."""
    if not roof or "error" in roof or out_bytes is None:
        return None
    read = sum(sizes[n] for n in models_read(method))
    n_in = len(models_read(method))
    t = {"models": n_in, "read_bytes": read, "write_bytes": out_bytes, "import": import_s,
         "read": read / roof["read_bw"], "convert": n_in * params / roof["up_rate"]
         + (params / roof["down_rate"] if bf16_out else 0.0), "write": out_bytes / roof["write_bw"]}
    t["floor"] = t["import"] + t["read"] + t["convert"] + t["write"]
    return t


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, list[float]]:
    """Least squares y = a + b·x: (a, b, residuals y − fit)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    a = my - b * mx
    return a, b, [y - (a + b * x) for x, y in zip(xs, ys)]


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
    ap.add_argument("--mergekit-venv", type=Path, default=None,
                    help="a venv with mergekit installed: each round also runs its bin/mergekit-yaml on the same "
                    "recipe for every method mergekit has, in alternating order; outputs compared once")
    ap.add_argument("--mergekit-methods", nargs="+", default=None,
                    help="with --mergekit-venv: run mergekit-yaml for these methods only (default: all)")
    ap.add_argument("--models", type=Path, default=None,
                    help="read the checkpoints from this directory (a models/ folder built by this script; never "
                    "written) instead of <work>/<size>/models")
    ap.add_argument("--recipe-dtype", default=None,
                    help="add `dtype: X` to every recipe (e.g. float32: both tools then compute and write float32; "
                    "for an agreement check that bf16 arithmetic does not blur)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no further round when the last round's time would take the run past this "
                    "(the results say how many rounds ran)")
    ap.add_argument("--keep", action="store_true", help="keep the last round's outputs (<work>/<size>/out/)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed (default 900)")
    ap.add_argument("--scaling", type=int, nargs="+", default=None, metavar="N",
                    help="also run each --scaling-methods method over N task models for each N (e.g. 2 4 8), "
                    "in the same rounds, building the extra task models; adds a table of wall, CPU and peak RSS "
                    "against N with a linear fit (results default to benchmarks/results_merge_scaling.md)")
    ap.add_argument("--scaling-methods", nargs="+", default=SCALING_METHODS,
                    help="methods for --scaling (default: linear magmax); linear takes no base, the others the "
                    "base + the N task models")
    ap.add_argument("--probe-write-mib", type=int, default=None,
                    help="MiB the roofline probe writes durably (default 1024; 128 with --small)")
    ap.add_argument("--no-roofline", action="store_true",
                    help="skip the roofline probe (read, conversion and durable-write bandwidths) and the floor "
                    "columns")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    argv = argv if argv is not None else sys.argv[1:]
    if args.scaling is not None:
        bad = [n for n in args.scaling if not 1 <= n <= len(ALL_TASKS)]
        if bad:
            ap.error(f"--scaling: N must be 1..{len(ALL_TASKS)}, got {', '.join(map(str, bad))}")
        args.scaling = sorted(set(args.scaling))

    from importlib.metadata import version

    torch_version = version("torch")  # not imported here: the children import it themselves

    dims = SMALL if args.small else FULL
    size = "small" if args.small else "full"
    work = args.work / size
    stem = "results_merge_scaling" if args.scaling else "results_merge"
    results = args.results or (args.work / f"{stem}_small.md" if args.small else HERE / f"{stem}.md")
    load_before = load1()
    if args.models is not None:
        models_dir = args.models.resolve()
        paths = {"base": models_dir / "base", **{n: models_dir / n for n in TASKS}}
        missing = [str(p) for p in paths.values() if not (p / "config.json").is_file()]
        if missing:
            ap.error(f"--models {models_dir}: no checkpoint at {', '.join(missing)}")
        print(f"reading checkpoints from {models_dir} (--models)", flush=True)
    else:
        paths = build_checkpoints(work / "models", dims, args.rebuild)
    extra = list(ALL_TASKS[len(TASKS):max(args.scaling)]) if args.scaling else []
    if extra and args.models is not None:
        paths.update({n: models_dir / n for n in extra})
        missing = [n for n in extra if not (paths[n] / "config.json").is_file()]
        if missing:
            ap.error(f"--models {models_dir} is read-only here and has no {', '.join(missing)} for --scaling "
                     f"{max(args.scaling)}; run without --models to build them under --work")
    elif extra:
        paths.update(build_extra_tasks(work / "models", dims, extra))
    from mergekit_ortho.testing.checkpoints import llama_shapes
    params = n_params(llama_shapes(dims["hidden"], dims["layers"], dims["vocab"], dims["intermediate"]))
    stamp_file = None if args.models is None else models_dir / "built.json"
    if stamp_file is not None and stamp_file.is_file():  # e.g. made by make_big_models.py
        stamp = json.loads(stamp_file.read_text())
        dims = {**dims, **stamp.get("dims", {}), "shards": stamp.get("shards", 3)}
        params = stamp.get("params", params)

    merge_cmd = resolve_merge()
    envs = {"this": None}
    if args.against is not None:  # both through `python -m`, each with its own code first on the path
        merge_cmd = [sys.executable, "-m", "mergekit_ortho.cli"]
        # PYTHONSAFEPATH: `python -m` would put the working directory first on sys.path, ahead of
        # PYTHONPATH, so run from a checkout both sides would import that checkout's code
        envs = {"this": dict(os.environ, PYTHONPATH=str(REPO), PYTHONSAFEPATH="1"),
                "against": dict(os.environ, PYTHONPATH=str(args.against.resolve()), PYTHONSAFEPATH="1")}
    listed = available_methods(merge_cmd)
    print(f"merge command: {' '.join(merge_cmd)}; methods listed: "
          f"{', '.join(sorted(listed)) if listed else '(could not list)'}", flush=True)
    mk_exe, mk_listed, mk_info = None, None, ""
    if args.mergekit_venv is not None:
        venv = args.mergekit_venv.resolve()
        mk_exe = venv / "bin" / "mergekit-yaml"
        if not mk_exe.is_file():
            ap.error(f"--mergekit-venv {venv}: no bin/mergekit-yaml")
        mk_listed = mergekit_methods(venv)
        mk_info = mergekit_version(venv)
        print(f"{mk_info} at {mk_exe}; methods: {', '.join(sorted(mk_listed)) if mk_listed else '(could not list)'}",
              flush=True)
    mk_flags = ["--lazy-unpickle", "--random-seed", "0", "--quiet"]

    rows: dict[str, dict] = {}
    loads = [load_before]
    recipes: dict[str, tuple[Path, Path]] = {}
    tools_of: dict[str, list[str]] = {}
    scaling_names = add_scaling_recipes(args.scaling_methods, args.scaling) if args.scaling else []
    for method in list(dict.fromkeys(args.methods + scaling_names)):
        mm = merge_method_of(method)
        if listed is not None and mm not in listed:
            if mm in OPTIONAL_METHODS:
                rows[method] = {"skip": "not listed by `merge methods` (not implemented yet)"}
                print(f"{method}: skipped (not listed by `merge methods`)", flush=True)
                continue
        rdir = work / "recipes"
        rdir.mkdir(parents=True, exist_ok=True)
        out = work / "out" / method
        recipe = rdir / f"{method}.yaml"
        recipe.write_text(recipe_text(method, paths, out / "this", args.recipe_dtype))
        recipes[method] = (recipe, out)
        rows[method] = {"walls": [], "rsss": [], "cpus": [], "error": "", "against": {"walls": [], "rsss": [], "cpus": []},
                        "mergekit": {"walls": [], "rsss": [], "error": "", "compare": None}}
        tools_of[method] = list(envs)
        if mk_exe is not None and method not in scaling_names and (
                args.mergekit_methods is None or method in args.mergekit_methods):
            if mk_listed is None or mm in mk_listed:
                tools_of[method].append("mergekit")
            else:
                rows[method]["mergekit"]["error"] = "mergekit has no such method"

    roof: dict = {}
    if not args.no_roofline:
        base_shards = sorted(paths["base"].glob("*.safetensors"), key=lambda f: f.stat().st_size)
        mib = args.probe_write_mib or (128 if args.small else 1024)
        print(f"roofline probe: reading {base_shards[-1].name} of the base, converting, writing {mib} MiB durably "
              f"under {work / 'out'} ...", flush=True)
        roof = measure_roofline(base_shards[-1], work / "out" / "_probe_write.bin", mib * 2**20, envs["this"])
        if "error" in roof:
            print(f"roofline probe failed: {roof['error']}", flush=True)
        else:
            print(f"read {roof['read_bw'] / 2**30:.2f} GiB/s (page cache), bf16→f32 {roof['up_rate'] / 1e9:.2f} G "
                  f"entries/s, f32→bf16 {roof['down_rate'] / 1e9:.2f} G entries/s ({roof['threads']} threads), "
                  f"durable write {roof['write_bw'] / 2**20:.0f} MiB/s ({roof['write_via']})", flush=True)

    # Round-robin: every round runs the bare start-up and then each method once, so a drift in
    # the machine's speed (shared cores) touches all of them alike. Outputs are removed before
    # each run, untimed: the timed command writes a fresh output, as a user's first run does.
    imp = []
    round_loads = []
    t_start = time.perf_counter()
    rounds_done = 0
    for i in range(args.repeat):
        t_round = time.perf_counter()
        round_load = [os.getloadavg()]
        rc, wall, rss, _ = run_child([sys.executable, "-c", "import torch"])  # the floor of any `merge`
        imp.append((wall, rss))
        for method, (recipe, out) in recipes.items():
            row = rows[method]
            if row["error"]:
                continue
            tools = tools_of[method]
            # alternate which tool goes first, so neither always runs on a warmer page cache
            for which in (tools if i % 2 == 0 else tools[::-1]):
                mk = row["mergekit"]
                if which == "mergekit" and mk["error"]:
                    continue
                dest_dir = out / which
                shutil.rmtree(dest_dir, ignore_errors=True)
                loads.append(load1())
                if which == "mergekit":
                    cmd, env = [str(mk_exe), str(recipe), str(dest_dir), *mk_flags], _mergekit_env()
                else:
                    cmd, env = merge_cmd + ["-q", "run", str(recipe), "--out", str(dest_dir)], envs[which]
                rc, wall, rss, tail = run_child(cmd, env, args.timeout)
                if rc != 0:
                    err = f"exit {rc}{' (timed out)' if rc == -9 else ''}: {tail}"
                    if which == "mergekit":
                        mk["error"] = err
                    else:
                        row["error"] = f"{which} {err}"
                    print(f"{method} ({which}): FAILED ({err})", flush=True)
                    if which != "mergekit":
                        break
                    continue
                dest = row if which == "this" else row[which]
                if which == "this" and "out_bytes" not in row:
                    row["out_bytes"] = dir_bytes(dest_dir)  # for the floor: what the run wrote
                dest["walls"].append(wall)
                dest["rsss"].append(rss)
                dest.setdefault("cpus", []).append(LAST_CPU[0])
                print(f"round {i + 1}/{args.repeat} {method} ({which}): {wall:.2f} s, CPU {LAST_CPU[0]:.2f} s, "
                      f"peak RSS {rss:.3f} GiB", flush=True)
            mk = row["mergekit"]
            if "mergekit" in tools and mk["compare"] is None and not mk["error"] and not row["error"]:
                try:  # once, on the first round both tools finished
                    mk["compare"] = compare_outputs(out / "mergekit", out / "this", paths["base"], dims["layers"],
                                                    merge_method_of(method) in RANDOM_METHODS)
                except Exception as e:  # a measurement: record and go on
                    mk["compare"] = {"error": f"{type(e).__name__}: {e}"[:200]}
                print(f"{method}: agreement {_agreement_cell(mk['compare'])}", flush=True)
        round_load.append(os.getloadavg())
        round_load.append(time.perf_counter() - t_round)
        round_loads.append(round_load)
        rounds_done = i + 1
        print(f"round {i + 1}: {round_load[2]:.0f} s; load average (1, 5, 15 min) at start "
              f"{_fmt_load(round_load[0])}, at end {_fmt_load(round_load[1])}", flush=True)
        elapsed = time.perf_counter() - t_start
        if args.budget is not None and i + 1 < args.repeat and elapsed + round_load[2] > args.budget:
            print(f"stopping after {i + 1} of {args.repeat} rounds: {elapsed:.0f} s spent, another round "
                  f"(~{round_load[2]:.0f} s) would pass --budget {args.budget:.0f} s", flush=True)
            break
    for _, out in recipes.values():
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    import_wall = statistics.median(w for w, _ in imp)
    import_rss = max(r for _, r in imp)
    print(f"python -c 'import torch': median {import_wall:.2f} s, peak RSS {import_rss:.3f} GiB", flush=True)
    loads.append(load1())

    sizes = {n: model_bytes(p) for n, p in paths.items()}
    bf16_out = args.recipe_dtype in (None, "bfloat16", "bf16")
    floors = {m: floor_of(m, sizes, params, r.get("out_bytes"), roof, import_wall, bf16_out)
              for m, r in rows.items() if not r.get("skip")} if roof and "error" not in roof else {}
    md = render(rows, dims, params, import_wall, import_rss, rounds_done, (load_before, max(loads)), merge_cmd,
                torch_version, size, floors, argv)
    if args.recipe_dtype:
        md = md.replace("## Results\n", f"## Results\n\n**Every recipe here has `dtype: {args.recipe_dtype}`** (inputs "
                        f"rounded to it, output written in it, mergekit computing in it).\n", 1)
    if roof:
        md += render_roofline(roof, floors, rows, import_wall, bf16_out)
    if scaling_names:
        md += render_scaling(rows, args.scaling_methods, args.scaling, floors)
    md += render_loads(round_loads, args.repeat)
    if args.against is not None:
        md += render_against(rows, args.against)
    if mk_exe is not None:
        md += render_mergekit(rows, mk_info, mk_flags)
    results.write_text(md)
    print()
    print(md)
    print(f"(written to {results})")
    return 0


def _fmt_load(t) -> str:
    return ", ".join(f"{x:.2f}" for x in t)


def render_loads(round_loads, requested: int) -> str:
    out = ["", "## Load average per round\n",
           f"{len(round_loads)} of {requested} requested rounds ran. `os.getloadavg()` (1, 5, 15 min) at the start "
           "and end of each round; the benchmark's own child runs up to 2 threads on this machine, the rest is "
           "other work.\n",
           "| round | seconds | load at start | load at end |", "|---:|---:|---|---|"]
    for i, (a, b, t) in enumerate(round_loads):
        out.append(f"| {i + 1} | {t:.0f} | {_fmt_load(a)} | {_fmt_load(b)} |")
    return "\n".join(out) + "\n"


def render_roofline(roof: dict, floors: dict, rows: dict, import_wall: float, bf16_out: bool) -> str:
    """The probe's bandwidths and, per method, the floor's terms beside the wall time."""
    out = ["", "## Roofline\n"]
    if "error" in roof:
        return "\n".join(out + [f"The probe failed: `{roof['error']}`; no floors.\n"])
    out += [f"Measured before the rounds by a probe child (same interpreter and environment as the merge children, "
            f"torch's {roof['threads']} threads):\n",
            "| quantity | how | measured |", "|---|---|---:|",
            f"| page-cache read | one base shard ({roof['read_bytes'] / 2**20:.0f} MiB) read with `readinto` into a reused "
            f"64 MiB buffer; the first read ({roof['read_cold_s']:.2f} s) warms the cache, best of the next 2 | "
            f"**{roof['read_bw'] / 2**30:.2f} GiB/s** |",
            *[f"| bf16 → f32, {label} | `f32.copy_(bf16)` into a preallocated tensor, best of ≥ 20 calls over ≥ 0.3 s "
              f"| {c['up_rate'] / 1e9:.2f} G entries/s |" for label, c in roof["convert"].items()],
            *[f"| f32 → bf16, {label} | `bf16.copy_(f32)`, the same | {c['down_rate'] / 1e9:.2f} G entries/s |"
              for label, c in roof["convert"].items()],
            f"| conversion rates the floor uses | the faster size of each direction | bf16 → f32 **"
            f"{roof['up_rate'] / 1e9:.2f}**, f32 → bf16 **{roof['down_rate'] / 1e9:.2f} G entries/s** |",
            f"| durable write | {roof['write_bytes'] / 2**20:.0f} MiB in 16 MiB writes through {roof['write_via']}, open to "
            f"`close()` (fsync), on the output's file system | **{roof['write_bw'] / 2**20:.0f} MiB/s** |",
            f"| `import torch` | median of the rounds' bare start-ups (the probe's own in-process import: "
            f"{roof['import_torch_s']:.2f} s) | **{import_wall:.2f} s** |",
            "",
            "On these shared cores a conversion call can wait a scheduler slice (~4 ms) for a descheduled torch pool "
            "thread, for a whole process at a time (seen on this machine: the MLP-sized bf16 → f32 at 0.55 G entries/s "
            "in one probe, 19-22 in the next two); hence two sizes, a long window, and the faster rate in the floor.",
            "",
            "floor = import torch + bytes read / read bandwidth + entries read / (bf16→f32 rate)"
            + (" + entries written / (f32→bf16 rate)" if bf16_out else "")
            + " + bytes written / write bandwidth. Bytes read: the safetensors files of every model the recipe "
            "reads (linear: its N task models; task_arithmetic, ties, dare_ties, magmax, widen, model_stock, ...: "
            "the base as well; slerp/nearswap: base + task_a); entries: parameters per model × models read; "
            "bytes written: what the run's output folder held after the first round. The terms are summed as "
            "if nothing overlapped (the merge writes on a helper thread while it computes, so a method near "
            "its floor can come in under it); every other cost (the merge arithmetic itself, planning, page "
            "faults of fresh buffers, Python) is what wall / floor measures.\n",
            "| method | models read | MiB read | MiB written | import s | read s | convert s | write s | floor s "
            "| wall s | wall / floor |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, f in floors.items():
        r = rows[m]
        if f is None or not r.get("walls") or r.get("error"):
            continue
        w = statistics.median(r["walls"])
        out.append(f"| {m} | {f['models']} | {f['read_bytes'] / 2**20:.0f} | {f['write_bytes'] / 2**20:.0f} | {f['import']:.2f} "
                   f"| {f['read']:.2f} | {f['convert']:.2f} | {f['write']:.2f} | {f['floor']:.2f} | {w:.2f} "
                   f"| {w / f['floor']:.2f}× |")
    return "\n".join(out) + "\n"


def render_scaling(rows: dict, methods: list[str], ns: list[int], floors: dict) -> str:
    """Wall, CPU and peak RSS against the number of task models, with the issue's two verdicts."""
    out = ["", "## How cost grows with the number of models (`--scaling`)\n",
           "Each method over the first N task models (linear: no base, weight 1 each; the others: base + "
           "the N models at their defaults), in the same rounds as the table above. wall = median over the "
           "rounds, CPU = the child's user + system seconds (median), RSS = max of the child's peak. Verdicts: "
           "**time linear in N** when a least-squares fit wall = a + b·N over the medians leaves no residual "
           "above 10 % of the fitted value; **RSS flat** when every N's peak RSS is within ±10 % of the "
           "smallest N's.\n"]
    for m in methods:
        pts, failed = [], []
        for n in ns:
            r = rows.get(f"{m}@{n}")
            if r is None:
                continue
            if r.get("skip") or r.get("error") or not r.get("walls"):
                failed.append(f"{n}: {r.get('skip') or r.get('error') or 'no run'}")
                continue
            pts.append((n, statistics.median(r["walls"]), statistics.median(r["cpus"]), max(r["rsss"]),
                        (floors or {}).get(f"{m}@{n}")))
        out.append(f"### {m}\n")
        if failed:
            out.append("Not measured at N = " + "; ".join("`" + x.replace("|", "/")[:160] + "`" for x in failed) + "\n")
        if not pts:
            continue
        rss0 = pts[0][3]
        out.append(f"| N | wall s | CPU s | peak RSS GiB | wall / N s | RSS / RSS at N = {pts[0][0]} | floor s "
                   "| wall / floor |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, w, c, rss, f in pts:
            fc = f"{f['floor']:.2f} | {w / f['floor']:.2f}×" if f else "— | —"
            out.append(f"| {n} | {w:.2f} | {c:.2f} | {rss:.3f} | {w / n:.2f} | {rss / rss0:.3f}× | {fc} |")
        out.append("")
        if len(pts) >= 3:
            xs = [p[0] for p in pts]
            a, b, res = linear_fit(xs, [p[1] for p in pts])
            worst = max(abs(e) / (a + b * x) for e, x in zip(res, xs))
            ca, cb, cres = linear_fit(xs, [p[2] for p in pts])
            cworst = max(abs(e) / (ca + cb * x) for e, x in zip(cres, xs))
            out.append(f"- wall ≈ {a:.2f} s {'+' if b >= 0 else '−'} {abs(b):.2f} s · N; residuals "
                       + ", ".join(f"{e:+.2f} s at N = {x}" for e, x in zip(res, xs))
                       + f"; largest {100 * worst:.1f} % of the fit → time linear in N: "
                       f"**{'yes' if worst <= 0.10 else 'no'}**")
            out.append(f"- CPU ≈ {ca:.2f} s {'+' if cb >= 0 else '−'} {abs(cb):.2f} s · N; largest residual {100 * cworst:.1f} % of the fit")
        else:
            out.append("- fewer than 3 values of N: no linearity verdict (a line fits any two points)")
        spread = max(abs(p[3] / rss0 - 1) for p in pts)
        out.append(f"- peak RSS {min(p[3] for p in pts):.3f}–{max(p[3] for p in pts):.3f} GiB, at most "
                   f"{100 * spread:.1f} % from N = {pts[0][0]} → RSS flat within ±10 %: "
                   f"**{'yes' if spread <= 0.10 else 'no'}**")
        out.append("")
    return "\n".join(out) + "\n"


def render_mergekit(rows, mk_info: str, mk_flags: list[str]) -> str:
    """Ours against mergekit-yaml on the same recipe files, in the same rounds."""
    out = ["", f"## Against mergekit-yaml ({mk_info})\n",
           f"`mergekit-yaml RECIPE OUT {' '.join(mk_flags)}` (CPU) on the same recipe file as ours, in the same "
           "rounds, alternating which tool runs first; wall = median, RSS = max of the child's own ru_maxrss; "
           "ratio = median over rounds of mergekit wall / ours. Compute dtype: ours float32 for every method "
           "(inputs upcast, one rounding to bf16 at the end); mergekit's as in the column (its code, with no "
           "`dtype:` in the recipe, works on the stored bf16 tensors). Agreement (first round's outputs, a few "
           "tensors: embeddings, layer-0 q_proj, a middle down_proj, the last post-attention norm, the final "
           "norm, lm_head): max rel = max|ours − mk| / max|mk|; the share of elements more than one ulp of "
           "the coarser output dtype apart (a different choice, not a different rounding); and "
           "‖ours − mk‖ / ‖mk − base‖ pooled over those tensors, the difference against the merged change "
           "itself (task-vector entries have std 0.01 against weights of std 0.03 and norms of 1.0, so one "
           "bf16 ulp of a weight is ~1 % of a task-vector entry and of a norm ~80 %). Random methods "
           "(dare_*, della*) are compared by statistics: the share of elements moved off the base and the "
           "L1 of the change.\n",
           "| method | ours s | mergekit s | ratio mk/ours | ours RSS GiB | mergekit RSS GiB | mergekit computes in "
           "| output dtype ours / mk | agreement |",
           "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for m, r in rows.items():
        if r.get("skip") or "@" in m:
            continue
        mk = r.get("mergekit") or {}
        mm = merge_method_of(m)
        label = m if m == mm else f"{m} (`{mm}`)"
        ours_w = f"{statistics.median(r['walls']):.2f}" if r.get("walls") else "—"
        ours_r = f"{max(r['rsss']):.3f}" if r.get("rsss") else "—"
        if r.get("error"):
            ours_w = f"FAILED: `{r['error'].replace('|', '/')[:120]}`"
        if mk.get("walls"):
            mk_w, mk_r = f"{statistics.median(mk['walls']):.2f}", f"{max(mk['rsss']):.3f}"
            pairs = list(zip(r["walls"], mk["walls"]))
            ratio = f"{statistics.median(y / x for x, y in pairs):.2f}×" if pairs else "—"
        else:
            mk_w, mk_r, ratio = "—", "—", "—"
        if mk.get("error"):
            mk_w = f"{mk_w} (FAILED: `{mk['error'].replace('|', '/')[:120]}`)" if mk.get("walls") else \
                f"FAILED: `{mk['error'].replace('|', '/')[:120]}`"
        c = mk.get("compare") or {}
        dt = f"{c['dtype_ours']} / {c['dtype_mk']}" if "dtype_ours" in c else "—"
        out.append(f"| {label} | {ours_w} | {mk_w} | {ratio} | {ours_r} | {mk_r} | {MERGEKIT_COMPUTE.get(mm, '?')} "
                   f"| {dt} | {_agreement_cell(mk.get('compare'))} |")
    return "\n".join(out) + "\n"


def render_against(rows, against: Path) -> str:
    """Before/after: this code against another checkout, timed in the same rounds."""
    try:
        rev = subprocess.run(["git", "-C", str(against), "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True).stdout.strip()[:100]
    except OSError:
        rev = ""
    out = ["", f"## This code against `{against.name}`{f' ({rev})' if rev else ''}\n",
           "Same rounds, alternating which runs first; ratio = median over rounds of this wall / that wall; "
           "CPU = the child's user + system seconds (median).\n",
           "| method | this wall s | that wall s | wall ratio | this CPU s | that CPU s | CPU ratio | "
           "this peak RSS GiB | that peak RSS GiB | RSS ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        a = r.get("against") or {}
        if r.get("skip") or r.get("error") or not r.get("walls") or not a.get("walls"):
            continue
        ratio = statistics.median(x / y for x, y in zip(r["walls"], a["walls"]))
        tc, ac = statistics.median(r["cpus"]), statistics.median(a["cpus"])
        out.append(f"| {m} | {statistics.median(r['walls']):.2f} | {statistics.median(a['walls']):.2f} | "
                   f"{ratio:.3f}× | {tc:.2f} | {ac:.2f} | {tc / ac:.3f}× | {max(r['rsss']):.3f} | {max(a['rsss']):.3f} | "
                   f"{max(r['rsss']) / max(a['rsss']):.3f}× |")
    return "\n".join(out) + "\n"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def render(rows, dims, params, import_wall, import_rss, repeat, load, merge_cmd, torch_version,
           size, floors: dict | None = None, argv: list[str] | None = None) -> str:
    def stats(m):
        r = rows.get(m)
        if not r or not r.get("walls") or r.get("error"):
            return None
        return statistics.median(r["walls"]), max(r["rsss"])

    lin = stats("linear")
    out = []
    out.append("# `merge run` end-to-end speed and memory\n")
    cmdline = shlex.join(argv) if argv is not None else ("--small" if size == "small" else "")
    out.append(f"Generated by `python benchmarks/bench_merge.py{' ' + cmdline if cmdline else ''}` "
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
               f"vocab {dims['vocab']}, intermediate {dims['intermediate']}"
               + (f", {dims['heads']} heads, {dims['kv_heads']} key/value heads" if "kv_heads" in dims else "")
               + f": **{params:,} parameters** per model, bf16, {dims.get('shards', 3)} safetensors shards "
               f"({params * 2 / 2**20:.0f} MiB per model); "
               "task models = base + 0.01·N(0,1) noise")
    out.append("- recipes (`RECIPES` in the script; no `dtype:`, so outputs stay bf16 like the inputs; ours "
               "computes in float32): linear = 3 tasks, weight 1, no base_model; linear_2 = base + task_a; "
               "task_arithmetic/ties/dare_* λ 1, density 0.5; della* density 0.5, ε 0.1; breadcrumbs* density "
               "0.5, γ 0.01; sce select_topk 0.5; model_stock and ram* base + 3 tasks; slerp (t 0.5) and "
               "nearswap (t 0.01) base + task_a; nuslerp task_a + task_b, weights 1, no base; karcher and "
               "multislerp the 3 tasks, no base; others base + 3 tasks at their defaults")
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
    out.append("CPU s: the child's user + system seconds (median; on shared cores it moves far less with other "
               "jobs' load than the wall time)." + (" floor s: the I/O-and-conversion floor measured in the same run (see "
                                          "Roofline below); wall / floor: how far above it the method runs."
                                          if floors else "") + "\n")
    fl = bool(floors)
    out.append("| method | wall s (median) | wall s (min–max of the rounds) | wall − import torch s | CPU s "
               "| peak RSS GiB | wall ratio to linear | RSS ratio to linear |" + (" floor s | wall / floor |" if fl else ""))
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if fl else ""))
    blank = " | | | | | |" + (" | |" if fl else "")
    for m, r in rows.items():
        if "@" in m:  # --scaling runs: their own table
            continue
        if r.get("skip"):
            out.append(f"| {m} | skipped: {r['skip']}{blank}")
            continue
        s = stats(m)
        if s is None:
            out.append(f"| {m} | FAILED: `{r.get('error', '').replace('|', '/')}`{blank}")
            continue
        w, rss = s
        wr = w / lin[0] if lin else None
        rr = rss / lin[1] if lin else None
        spread = f"{min(r['walls']):.2f}–{max(r['walls']):.2f}"
        cpu = f"{statistics.median(r['cpus']):.2f}" if r.get("cpus") else "—"
        f = (floors or {}).get(m)
        fcells = ((f" {f['floor']:.2f} | {w / f['floor']:.2f}× |" if f else " — | — |") if fl else "")
        out.append(f"| {m} | {w:.2f} | {spread} | {w - import_wall:.2f} | {cpu} | {rss:.3f} | {_fmt_ratio(wr)} "
                   f"| {_fmt_ratio(rr)} |" + fcells)
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
        ref2 = stats("linear_2") or lin
        s = stats("slerp")
        if s:
            which = "linear_2 (base + task_a)" if stats("linear_2") else "linear (3 models)"
            checks.append((f"slerp (2 models) wall ≤ {which} wall", s[0] <= ref2[0],
                           f"{s[0]:.2f} s vs {ref2[0]:.2f} s ({s[0] / ref2[0]:.2f}×)"))
        s = stats("model_stock")
        if s:
            checks.append(("model_stock wall ≤ 1.3× linear", s[0] / lin[0] <= 1.3, f"{s[0] / lin[0]:.2f}×"))
        for m in ("della", "sce"):
            s = stats(m)
            if s and t:
                checks.append((f"{m} wall ≤ ties", s[0] <= t[0], f"{s[0] / t[0]:.2f}× ties"))
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
