"""Core Space benchmark: merge time in core space vs full space, and task-arithmetic exactness.

    python benchmarks/bench_core_space.py                     # 8 rank-16 LoRAs, 4 layers of 4096x4096
    python benchmarks/bench_core_space.py --layers 1 --full-tsv-layers 1
    python benchmarks/bench_core_space.py --width 1024 --full-dtype float64   # quick, reference precision

Synthetic adapters (A ~ N(0, 1/n), B ~ N(0, 1/r), float32, LoRA scale 1), one set per layer. Both
paths use the toolkit's own code (mergekit_ortho.ops.core_space):

* core space: :func:`core_space_merge` from the factors to the merged low-rank factors (bases,
  cores, inner rule, fold), float64; the "+ dense" column adds forming the m x n delta B @ A;
* full space: :func:`full_space_merge`, the same rule on the dense deltas B_t A_t
  (``--full-dtype``, default float32 = the toolkit's dense compute dtype; the reference uses
  float64, which is about 2x slower, so the default favours full space). Full-space TSV is the
  reference's: floor(min(m, n)/T) triplets per task, T + 2 dense SVDs per layer.

Full-space TSV costs minutes per 4096x4096 layer on 2 cores, so it is measured on
``--full-tsv-layers`` layers (default 1) and extrapolated linearly to ``--layers``; the table says
which numbers are extrapolated. Full-space TSV + iso (one more dense SVD per layer) is measured only
with ``--full-iso``. Timings are wall clock with torch.set_num_threads(2) on a machine
that may be shared: the load average is recorded, treat the numbers as approximate.
Results: benchmarks/results_core_space.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from mergekit_ortho.ops.core_space import core_space_merge, decompose, full_space_merge


def adapters(n_tasks: int, r: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, width, generator=g) / width**0.5, torch.randn(width, r, generator=g) / r**0.5)
        for _ in range(n_tasks)
    ]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096, help="layers are width x width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--full-tsv-layers", type=int, default=1,
                    help="layers on which full-space TSV is measured (0: skip); extrapolated to --layers")
    ap.add_argument("--full-ties-layers", type=int, default=None,
                    help="layers on which full-space TIES is measured (default: all)")
    ap.add_argument("--full-iso", action="store_true",
                    help="also measure full-space TSV + iso (one more dense SVD per layer than TSV)")
    ap.add_argument("--full-dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--density", type=float, default=0.3, help="TIES top-K fraction (both spaces)")
    ap.add_argument("--repeat", type=int, default=3, help="core-space runs per layer (best is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results_core_space.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    full_dt = getattr(torch, args.full_dtype)
    L = args.layers
    tsv_l = min(args.full_tsv_layers, L)
    ties_l = L if args.full_ties_layers is None else min(args.full_ties_layers, L)
    layers = [adapters(args.tasks, args.rank, args.width, seed=i) for i in range(L)]
    loads = [load()]
    started = time.perf_counter()

    methods = [("task_arithmetic", False), ("ties", False), ("tsv", False), ("tsv", True)]
    core_t = {m: 0.0 for m in methods}
    core_dense_t = {m: 0.0 for m in methods}
    full_t = {m: 0.0 for m in methods}
    full_n = {m: 0 for m in methods}
    diff = {m: [] for m in methods}
    ta_err, ta_err_fp32 = [], []
    bases_t = 0.0
    out_rank = {}

    for li, factors in enumerate(layers):
        bases_t += timed(lambda: decompose(factors, f"layer{li}"), args.repeat)[0]
        for meth in methods:
            method, iso = meth
            kw = {"density": args.density} if method == "ties" else {}
            t, (A, B, rep) = timed(
                lambda: core_space_merge(factors, method, isotropize_result=iso, name=f"layer{li}", **kw),
                args.repeat,
            )
            core_t[meth] += t
            out_rank[meth] = rep["out_rank"]
            t_dense, core_delta = timed(lambda: B @ A)
            core_dense_t[meth] += t + t_dense
            measure = (method == "task_arithmetic" or (method == "ties" and li < ties_l)
                       or (method == "tsv" and li < tsv_l and (args.full_iso or not iso)))
            if measure:
                print(f"layer {li}: full-space {method}{' + iso' if iso else ''} ...", flush=True)
                tf, full = timed(lambda: full_space_merge(factors, method, isotropize_result=iso,
                                                          name=f"layer{li}", dtype=full_dt, **kw))
                full_t[meth] += tf
                full_n[meth] += 1
                diff[meth].append(rel(core_delta, full))
                if method == "task_arithmetic":
                    exact = sum(B_.double() @ A_.double() for A_, B_ in factors)
                    ta_err.append(rel(core_delta, exact))
                    ta_err_fp32.append(rel(full, exact))
                del full
            loads.append(load())
        print(f"layer {li} done ({time.perf_counter() - started:.0f} s)", flush=True)

    total = time.perf_counter() - started
    lines = [
        "# Core Space benchmark (`benchmarks/bench_core_space.py`)",
        "",
        f"{args.tasks} synthetic rank-{args.rank} LoRAs over {L} layer(s) of {args.width}x{args.width} "
        f"(R = {args.tasks * args.rank}); core space in float64, full space in {args.full_dtype}; "
        f"TIES density {args.density} (kthvalue rule), TSV keeps floor(k/T) triplets per task "
        f"(core: k = R, full: k = {args.width}). torch {torch.__version__}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{datetime.date.today().isoformat()}. 1-minute load average during the run: "
        f"{min(loads):.1f}-{max(loads):.1f} on a CPU shared with other jobs, so every timing is "
        f"approximate. Total run time {total:.0f} s.",
        "",
        f"Core-space bases + cores alone (thin SVDs of the {args.tasks * args.rank}x{args.width} "
        f"stacks): {bases_t:.3f} s for {L} layer(s).",
        "",
        "| method | core space (s) | core + dense ΔW (s) | full space (s) | speed-up (full / core) "
        "| output rank | rel. difference core vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for meth in methods:
        method, iso = meth
        label = method + (" + iso" if iso else "")
        n = full_n[meth]
        if n == 0:
            full_s, speed = "not measured", "—"
        else:
            f_total = full_t[meth] * L / n
            note = "" if n == L else f" (extrapolated from {n} layer{'s' if n > 1 else ''}: {full_t[meth] / n:.1f} s/layer)"
            full_s = f"{f_total:.2f}{note}"
            speed = f"{f_total / core_t[meth]:.0f}x"
        d = f"{max(diff[meth]):.2e}" if diff[meth] else "—"
        lines.append(f"| {label} | {core_t[meth]:.3f} | {core_dense_t[meth]:.3f} | {full_s} | {speed} "
                     f"| {out_rank[meth]} | {d} |")
    lines += [
        "",
        f"**Task arithmetic exactness**: core-space TA (float32 factors out, B @ A) vs the exact float64 "
        f"sum of B_t A_t: max relative error {max(ta_err):.2e} over {len(ta_err)} layer(s) "
        f"(target < 1e-5); full-space TA in {args.full_dtype}: {max(ta_err_fp32):.2e}.",
        "",
        "TIES and TSV are different merges in the two spaces (spec B8.5): TIES trims entries of the "
        "cores instead of the dense deltas, and full-space TSV keeps floor(min(m,n)/T) triplets per "
        "task (most with sigma = 0 and arbitrary vectors) where core TSV keeps each task's r, so the "
        "last column is a difference, not an error. Isotropization averages min(m,n) singular values "
        "in full space and R in core space. Speed-ups compare the full-space time with the core-space "
        "time to low-rank factors; the '+ dense ΔW' column adds materialising B @ A.",
        "",
    ]
    text = "\n".join(lines)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
