"""Continual merging benchmark: peak RSS and wall time of each `merge continual add`, models 2..N.

    python benchmarks/bench_continual.py                         # opcm and magmax, 16 models, ~106M params
    python benchmarks/bench_continual.py --methods opcm --models 8
    python benchmarks/bench_continual.py --small                 # tiny checkpoints, to debug the script

Each task model (base + 0.01 N(0,1), bf16, Llama-shaped: hidden 768, 8 layers, vocab 32000,
intermediate 2048 = 106M parameters) is written just before its `add` and deleted after it, so
disk use stays flat. Every `add` is a child process: wall time and the child's own peak RSS
(``ru_maxrss`` from ``os.wait4`` in bench_merge's lean wrapper). The target (issue 5): RSS flat within +-10 % from model 2 to
N, time per add close to one streaming pass plus the SVDs. The reference pass is one
`merge run` of task_arithmetic over a single model (read base + model, write the output).
Results: benchmarks/results_continual.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_merge import run_child  # noqa: E402  (the same child measurement as the merge benchmark)
from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint  # noqa: E402


def merge_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("merge")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mergekit_ortho.cli"]


def timed(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall s, peak RSS GiB, exit code, last stderr line) of ``cmd``, measured by bench_merge's
    lean wrapper: a child forked from this process would start with this process's resident
    pages (torch, the checkpoint writer) counted in its ru_maxrss."""
    rc, wall, rss, tail = run_child(cmd)
    return wall, rss, rc, tail


def svd_seconds(shapes: dict) -> float:
    """Time of the SVDs an OPCM add computes: one thin SVD per projectable 2-D weight."""
    import torch

    from mergekit_ortho.ops.opcm import is_projectable

    total = 0.0
    for name, shape in shapes.items():
        x = torch.randn(*shape) if len(shape) == 2 else torch.zeros(shape)
        if not is_projectable(name, x):
            continue
        t0 = time.perf_counter()
        torch.linalg.svd(x, full_matrices=False)
        total += time.perf_counter() - t0
    return total


def registered(method: str) -> bool:
    return subprocess.run(merge_cmd() + ["methods", method], capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=["opcm", "magmax"])
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = HERE / "_work" / ("continual_small" if args.small else "continual")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shapes = llama_shapes(64, 2, 512, 128) if args.small else llama_shapes(768, 8, 32000, 2048)
    params = sum(int(__import__("math").prod(s)) for s in shapes.values())
    write_checkpoint(work / "base", shapes, seed=0)
    results: dict[str, list[tuple[int, float, float, int, str]]] = {}
    # reference: one streaming pass (read base + one model, write a model)
    write_checkpoint(work / "m1", shapes, seed=1, base=work / "base")
    (work / "ref.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {work / 'base'}\n"
                                   f"models:\n  - model: {work / 'm1'}\noutput: {{path: {work / 'ref_out'}}}\n")
    ref = timed(merge_cmd() + ["-q", "run", str(work / "ref.yaml"), "--overwrite"])
    for method in args.methods:
        if not registered(method):
            results[method] = []
            print(f"{method}: not registered, skipped", flush=True)
            continue
        state = work / f"state_{method}"
        (work / f"{method}.yaml").write_text(f"merge_method: {method}\nbase_model: {work / 'base'}\nmodels: []\n")
        subprocess.run(merge_cmd() + ["continual", "init", str(state), "--recipe", str(work / f"{method}.yaml")],
                       check=True, capture_output=True)
        rows = []
        for t in range(1, args.models + 1):
            model = work / f"task_{t}"
            write_checkpoint(model, shapes, seed=100 + t, base=work / "base")
            wall, rss, code, err = timed(merge_cmd() + ["continual", "add", str(state), str(model)])
            shutil.rmtree(model)
            disk = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
            rows.append((t, wall, rss, code, err, disk))
            print(method, rows[-1][:4], flush=True)
            if code != 0:
                break
        results[method] = rows
    svd_s = svd_seconds(shapes) if "opcm" in results else None
    out = args.out or (work / "results_continual.md" if args.small else HERE / "results_continual.md")
    lines = ["# Continual merging benchmark", "",
             f"{params / 1e6:.1f}M-parameter bf16 Llama-shaped checkpoints; one `merge continual add` per model "
             "(child process; wall time and its own peak RSS). "
             f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, {time.strftime('%Y-%m-%d')}.", "",
             f"Reference, one streaming pass (`merge run` task_arithmetic over one model): {ref[0]:.1f} s, "
             f"{ref[1]:.2f} GiB peak RSS."]
    if svd_s is not None:
        lines.append(f"OPCM's SVDs alone (one float32 thin SVD of every projectable weight shape, in one process, "
                     f"after the adds): {svd_s:.1f} s, so one pass + the SVDs = {ref[0] + svd_s:.1f} s.")
    lines.append("")
    for method, rows in results.items():
        if not rows:
            lines += [f"## {method}", "", "not registered when the benchmark ran", ""]
            continue
        lines += [f"## {method}", "", "| model t | wall s | peak RSS GiB | state on disk MiB | exit |",
                  "|---|---|---|---|---|"]
        for t, wall, rss, code, err, disk in rows:
            lines.append(f"| {t} | {wall:.1f} | {rss:.2f} | {disk / 2**20:.0f} | {code}{' ' + err if code else ''} |")
        later = [r for r in rows if r[0] >= 2 and r[3] == 0]
        if later:
            rss = [r[2] for r in later]
            med = statistics.median(rss)
            spread = max(abs(x - med) / med for x in rss)
            walls = [r[1] for r in later]
            lines += ["", f"Models 2..{later[-1][0]}: peak RSS median {med:.2f} GiB, max deviation "
                      f"{100 * spread:.1f} % ({'flat within 10 %' if spread <= 0.10 else 'NOT flat within 10 %'}); "
                      f"time per add median {statistics.median(walls):.1f} s "
                      f"({statistics.median(walls) / ref[0]:.2f}x one streaming pass).", ""]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
