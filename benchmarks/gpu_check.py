#!/usr/bin/env python
"""One prepared GPU check (issue 17): ``merge run --device cuda`` against ``--device cpu``.

Run on a fresh GPU machine, from a checkout with mergekit-ortho importable (``pip install -e .``
or PYTHONPATH=.); it builds everything it needs there, in about 10 minutes at the default size:

1. a random bf16 Llama-shaped base and three task models (base + seeded noise), with the project's
   own builder (``mergekit_ortho.testing.checkpoints``), under ``--work``;
2. for each method (linear, ties, magmax, tsv, opcm over the task models; core_space over
   three PEFT LoRA adapters of the base) one recipe, run as a child process
   ``merge -q run RECIPE --out OUT --device D`` for D = cpu and cuda, timed (wall, including start-up);
3. the two outputs compared tensor by tensor: bit-equal count, max |cuda - cpu|, and that difference
   relative to the merged change from the base (max |Δ| / max |merged - base|): the tolerance a
   user should expect. Elementwise methods (linear) should be bit-equal; methods with an SVD or a
   top-k (tsv, opcm, core_space, ties) differ by rounding of the output dtype;
4. a markdown table printed and written to ``--results`` (default benchmarks/results_gpu.md), with
   the device names, torch version and CUDA version.

Without CUDA the script still runs the CPU column (``--cpu-only`` forces that) and says the CUDA
column is missing, so the script itself can be checked anywhere:

    python benchmarks/gpu_check.py                      # default size (~120M params per model)
    python benchmarks/gpu_check.py --hidden 128 --layers 2 --vocab 512 --intermediate 256   # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    # name: (base?, per-model parameters, method parameters)
    "linear": (False, "{weight: 1.0}", ""),
    "ties": (True, "{weight: 1.0, density: 0.3}", "{lambda: 1.0}"),
    "magmax": (True, "", ""),
    "tsv": (True, "", ""),
    "opcm": (True, "", ""),
    "core_space": (True, "", ""),
}
TASKS = ("task_a", "task_b", "task_c")


def build(work: Path, args) -> dict[str, Path]:
    from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

    shapes = llama_shapes(hidden=args.hidden, layers=args.layers, vocab=args.vocab, intermediate=args.intermediate)
    paths = {"base": work / "base"}
    if not (paths["base"] / "config.json").is_file():
        write_checkpoint(paths["base"], shapes, seed=0, dtype="bfloat16", shards=2)
    for i, t in enumerate(TASKS):
        paths[t] = work / t
        if not (paths[t] / "config.json").is_file():
            write_checkpoint(paths[t], shapes, seed=i + 1, base=paths["base"], noise=0.02, dtype="bfloat16", shards=2)
    from mergekit_ortho.testing.loras import write_peft_adapter

    for i, t in enumerate(TASKS):  # core_space merges LoRA adapters
        paths[f"lora_{t}"] = work / f"lora_{t}"
        if not (paths[f"lora_{t}"] / "adapter_config.json").is_file():
            write_peft_adapter(paths[f"lora_{t}"], shapes, ("q_proj", "k_proj", "v_proj", "o_proj"), rank=8,
                               alpha=16, seed=10 + i)
    return paths


def recipe(work: Path, method: str, paths: dict[str, Path]) -> Path:
    with_base, mp, params = METHODS[method]
    lines = [f"merge_method: {method}"]
    if with_base:
        lines.append(f"base_model: {paths['base']}")
    lines.append("models:")
    for t in TASKS:
        lines.append(f"  - model: {paths['lora_' + t] if method == 'core_space' else paths[t]}")
        if mp:
            lines.append(f"    parameters: {mp}")
    if params:
        lines.append(f"parameters: {params}")
    lines.append("dtype: bfloat16")
    p = work / f"{method}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def run(r: Path, out: Path, device: str) -> tuple[float | None, str]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    got = subprocess.run([sys.executable, "-m", "mergekit_ortho.cli", "-q", "run", str(r), "--out", str(out),
                          "--device", device], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if got.returncode != 0:
        return None, (got.stderr.strip().splitlines() or ["?"])[-1][:160]
    return wall, ""


def compare(cpu: Path, cuda: Path, base: Path) -> dict:
    import torch
    from safetensors import safe_open

    def tensors(d: Path):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        return out

    a, b, ref = tensors(cpu), tensors(cuda), tensors(base)
    if a.keys() != b.keys():
        return {"error": "different tensor names"}
    equal, worst, rel = 0, 0.0, 0.0
    for k in a:
        x, y = a[k].float(), b[k].float()
        if torch.equal(a[k], b[k]):
            equal += 1
            continue
        d = (x - y).abs().max().item()
        worst = max(worst, d)
        change = ((x - ref[k].float()) if k in ref and ref[k].shape == x.shape else x).abs().max().item()
        rel = max(rel, d / change if change else float("inf"))
    return {"equal": equal, "total": len(a), "max_abs": worst, "rel_to_change": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work_gpu")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results_gpu.md")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA column (checks the script itself)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_only
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build(args.work, args)
    built = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    rows = []
    for method in args.methods:
        r = recipe(args.work, method, paths)
        cpu_s, cpu_err = run(r, args.work / f"out_{method}_cpu", "cpu")
        cuda_s, cuda_err = run(r, args.work / f"out_{method}_cuda", "cuda") if cuda else (None, "no CUDA device")
        cmp = compare(args.work / f"out_{method}_cpu", args.work / f"out_{method}_cuda", paths["base"]) \
            if cpu_s is not None and cuda_s is not None else {}
        rows.append((method, cpu_s, cpu_err, cuda_s, cuda_err, cmp))
        print(method, cpu_s, cuda_s, cmp or cuda_err or cpu_err, flush=True)
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    lines = [
        "# GPU check: `merge run --device cuda` vs `--device cpu`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"3 task models + base, bf16, {size / 2**20:.0f} MiB each (hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}); models built in {built:.0f} s; wall includes process start-up.",
        "",
        "| method | cpu s | cuda s | speed-up | bit-equal tensors | max abs diff | diff / max merged change |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, cpu_s, cpu_err, cuda_s, cuda_err, cmp in rows:
        fmt = lambda s, e: f"{s:.2f}" if s is not None else ("n/a" if e == "no CUDA device" else f"failed: {e}")  # noqa: E731
        speed = f"{cpu_s / cuda_s:.1f}x" if cpu_s and cuda_s else "-"
        if "equal" in cmp:
            lines.append(f"| {method} | {fmt(cpu_s, cpu_err)} | {fmt(cuda_s, cuda_err)} | {speed} | "
                         f"{cmp['equal']}/{cmp['total']} | {cmp['max_abs']:.3g} | {cmp['rel_to_change']:.3g} |")
        else:
            lines.append(f"| {method} | {fmt(cpu_s, cpu_err)} | {fmt(cuda_s, cuda_err)} | {speed} | - | - | "
                         f"{cmp.get('error', '-')} |")
    if not cuda:
        lines += ["", "No CUDA device here: the CUDA column is missing; the CUDA path stays untested on hardware."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.write_text(text)
    print(json.dumps({"results": str(args.results)}))


if __name__ == "__main__":
    main()
