"""RMM benchmark: reconstruction error and storage against the basis size p, build and revert time.

    python benchmarks/bench_rmm.py                      # 8 adapters, rank 16, 4 layers of 4096x4096
    python benchmarks/bench_rmm.py --layers 2 --width 1024

Synthetic but structured adapters: every task's factors are a shared component plus a task-specific
one (A_i = A_shared + 0.5 * A_task_i), which is what makes a shared basis worth having; with fully
independent random factors the error curve is flat-ish and says little. The bundle is built and
written with the toolkit's own code (ops.rmm.build_module_basis, bundle.write_bundle/read_bundle);
reverting one task reads only the bundle. Results: benchmarks/results_rmm.md.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from mergekit_ortho import bundle
from mergekit_ortho.ops.rmm import build_module_basis, storage_ratio


def adapters(n: int, r: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(r, width, generator=g) / width**0.5
    b0 = torch.randn(width, r, generator=g) / r**0.5
    out = []
    for _ in range(n):
        a = a0 + 0.5 * torch.randn(r, width, generator=g) / width**0.5
        b = b0 + 0.5 * torch.randn(width, r, generator=g) / r**0.5
        out.append((a, b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--p", type=int, nargs="*", default=[0, 1, 2, 3, 4, 5, 6, 7])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results_rmm.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    layers = [adapters(args.tasks, args.rank, args.width, seed=i) for i in range(args.layers)]
    rows = []
    for p in args.p:
        t0 = time.perf_counter()
        mods, reports = {}, {}
        for li, factors in enumerate(layers):
            tensors, stats = build_module_basis(factors, p=p, center=True, name=f"layer{li}")
            mods[f"layer{li}.weight"] = tensors
            reports[f"layer{li}.weight"] = {"tasks": [f"t{i}" for i in range(args.tasks)], **stats}
        build = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            manifest = bundle.build_manifest([f"t{i}" for i in range(args.tasks)], reports, p=p, center=True)
            t0 = time.perf_counter()
            bundle.write_bundle(d, mods, manifest)
            write = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in Path(d).iterdir())
            t0 = time.perf_counter()
            b = bundle.read_bundle(d)
            rev = b.revert("t3")
            revert = time.perf_counter() - t0
        # relative Frobenius error of the reverted deltas, all tasks, all layers (from the build stats)
        errs = [e for rep in reports.values() for e in rep["rel_error_delta"] if e is not None]
        mean_err = (sum(errs) / len(errs)) ** 1.0 if errs else 0.0
        max_err = max(errs) if errs else 0.0
        ratio = storage_ratio(args.rank, args.tasks, min(p, min(args.rank, args.tasks - 1)), True)
        rows.append((p, mean_err, max_err, ratio, size, build, write, revert, len(rev)))
        print(rows[-1], flush=True)
    full_bytes = args.tasks * args.layers * 2 * args.rank * args.width * 4
    lines = [
        "# RMM benchmark",
        "",
        f"{args.tasks} adapters of rank {args.rank} on {args.layers} layers of {args.width}x{args.width} "
        f"(float32; keeping every adapter = {full_bytes / 2**20:.1f} MiB). Factors = shared + 0.5 x task-specific "
        "random components. Centred PCA (p clamped to min(r, n-1)).",
        f"Machine: {platform.machine()}, torch {torch.__version__}, 2 threads; "
        f"{time.strftime('%Y-%m-%d')}. Timings on a shared 2-core box are approximate.",
        "",
        "Errors are relative squared Frobenius errors of each task's delta B_i A_i (the manifest's "
        "`rel_error_delta`), mean and max over tasks and layers.",
        "",
        "| p | mean rel. sq. error | max rel. sq. error | storage ratio | bundle MiB | build s | write s | revert one task s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, me, mx, ratio, size, build, write, revert, _ in rows:
        lines.append(f"| {p} | {me:.3e} | {mx:.3e} | {ratio:.3f} | {size / 2**20:.1f} | {build:.2f} | "
                     f"{write:.2f} | {revert:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
