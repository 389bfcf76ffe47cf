"""`merge sweep` benchmark (issue 18): an N-point lambda sweep against N plain `merge run`s.

    python benchmarks/bench_sweep.py                    # tsv, ties, core_space; 8 x 1024x1024, 3 models, N = 5
    python benchmarks/bench_sweep.py --tensors 4 --size 512 --methods tsv
    python benchmarks/bench_sweep.py --small            # tiny, to debug the script

Inputs (float32, written once into a temporary directory): a base of ``--tensors`` 2-D weights of
``--size`` x ``--size`` plus one norm vector per tensor, and 3 fine-tunes (base + 0.02 N(0, 1)).
core_space merges 3 PEFT LoRAs of rank ``--rank`` on every 2-D weight (inner rule tsv,
isotropize, written as a PEFT adapter). Both sides run in this process (no interpreter start-up
on either side, which favours the plain runs): "plain" is N x (plan + ``outputs.run``) with
lambda set in the recipe, "sweep" is one ``sweep.driver.sweep`` of the same N values starting
from an empty work directory (so it pays the first point's full merge plus writing the cache).
Goal (issue 18): sweep <= 1 + N x 0.2 plain runs for the SVD methods. Prints a markdown table;
the numbers in benchmarks/results_sweep.md come from this script.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import yaml  # noqa: E402

# as `merge` itself sets (cli/__init__.py): idle OpenMP workers sleep instead of spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def write_models(root: Path, tensors: int, size: int, rank: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from mergekit_ortho.testing.loras import write_peft_adapter

    g = torch.Generator().manual_seed(0)
    shapes = {}
    for i in range(tensors):
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (size, size)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (size,)
    base = {k: torch.randn(s, generator=g) / size ** 0.5 for k, s in shapes.items()}
    cfg = '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}'
    paths = {}
    for name in ("base", "a", "b", "c"):
        d = root / name
        d.mkdir()
        ts = base if name == "base" else {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(cfg)
        paths[name] = d
    for i in range(3):
        write_peft_adapter(root / f"lora{i}", shapes, ("up_proj",), rank=rank, alpha=rank, seed=10 + i)
        paths[f"lora{i}"] = root / f"lora{i}"
    return paths


def recipe(method: str, paths: dict) -> dict:
    if method == "core_space":
        return {"merge_method": "core_space", "base_model": str(paths["base"]),
                "models": [{"model": str(paths[f"lora{i}"])} for i in range(3)],
                "parameters": {"inner_method": "tsv", "isotropize": True}}
    params = {"density": 0.3} if method == "ties" else {}
    if method == "opcm":
        params = {"alpha": 0.5}
    return {"merge_method": method, "base_model": str(paths["base"]),
            "models": [{"model": str(paths[k])} for k in "abc"], "parameters": params}


# the swept parameter: lambda, except for methods without one
AXES = {"widen": "temperature", "opcm": "alpha"}


def plain_run(doc: dict, path: Path, out: Path) -> float:
    from mergekit_ortho import outputs
    from mergekit_ortho import plan as plan_mod
    from mergekit_ortho import recipe as recipe_mod

    path.write_text(yaml.safe_dump(doc))
    start = time.perf_counter()
    r = recipe_mod.load(path)
    plan = plan_mod.build_plan(r)
    try:
        outputs.run(plan, out)
    finally:
        plan_mod.close(plan)
    return time.perf_counter() - start


def bench(method: str, paths: dict, small: dict, root: Path, lambdas: list[float], rounds: int) -> dict:
    from mergekit_ortho.sweep.driver import sweep

    # unmeasured, on tiny models: first-call costs (imports, LAPACK set-up) land on neither side
    plain_run(recipe(method, small), root / f"{method}-warm.yaml", root / f"{method}-warm")
    shutil.rmtree(root / f"{method}-warm")
    axis = AXES.get(method, "lambda")
    plain_totals, plain_each, sweeps, firsts, laters, loads = [], [], [], [], [], []
    for k in range(rounds):  # interleaved: N plain runs, one sweep, N plain runs, ...
        loads.append(os.getloadavg()[0])
        total = 0.0
        for i, v in enumerate(lambdas):
            doc = recipe(method, paths)
            doc["parameters"][axis] = v
            t = plain_run(doc, root / f"{method}-plain{i}.yaml", root / f"{method}-plain{i}")
            shutil.rmtree(root / f"{method}-plain{i}")
            plain_each.append(t)
            total += t
        plain_totals.append(total)
        r = root / f"{method}-sweep.yaml"
        r.write_text(yaml.safe_dump(recipe(method, paths)))
        work = root / f"{method}-work"
        start = time.perf_counter()
        res = sweep(r, [f"{axis}=" + ",".join(map(str, lambdas))], root / f"{method}-sweep", work_dir=work)
        sweeps.append(time.perf_counter() - start)
        firsts.append(res.points[0].seconds)
        laters.extend(p.seconds for p in res.points[1:])
        shutil.rmtree(root / f"{method}-sweep")
        shutil.rmtree(work)
    loads.append(os.getloadavg()[0])
    med = statistics.median
    plain = med(plain_each)
    n = len(lambdas)
    return {"method": method, "axis": axis, "plain_median": plain, "plain_total": med(plain_totals),
            "sweep": med(sweeps), "first": med(firsts), "later": med(laters), "ratio": med(sweeps) / plain,
            "goal": 1 + 0.2 * n, "n": n, "rounds": rounds, "load": (min(loads), max(loads))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="tsv,ties,core_space")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (N plain runs, then a sweep)")
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    if a.small:
        a.tensors, a.size, a.rank = 2, 64, 8
    import torch

    lambdas = [round(0.2 + 0.2 * i, 3) for i in range(a.points)]  # alpha too: 0.2 .. 1.0
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        paths = write_models(root, a.tensors, a.size, a.rank)
        (root / "small").mkdir()
        small = write_models(root / "small", 1, 32, 4)
        rows = []
        for m in a.methods.split(","):
            rows.append(bench(m, paths, small, root, lambdas, a.rounds))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{a.tensors} x {a.size}x{a.size} float32 tensors (+ {a.tensors} norms), 3 models, LoRA rank {a.rank}, "
          f"N = {a.points}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| method (axis) | plain run | N plain runs | sweep (N points) | first point | later point "
          "| sweep / plain run | goal | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "met" if r["ratio"] <= r["goal"] else "missed"
        print(f"| {r['method']} ({r['axis']}) | {r['plain_median']:.2f} s | {r['plain_total']:.2f} s | "
              f"{r['sweep']:.2f} s | {r['first']:.2f} s | {r['later']:.3f} s | {r['ratio']:.2f} | "
              f"<= {r['goal']:.1f} ({ok}) | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    print(f"\nmedians over {a.rounds} interleaved rounds (N plain runs, then one sweep from an empty work "
          "directory); load: 1-minute load average before each round and after the last")


if __name__ == "__main__":
    main()
