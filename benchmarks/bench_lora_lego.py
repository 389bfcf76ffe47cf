"""LoRA-LEGO benchmark: time per module against the module width and the merged rank k.

    python benchmarks/bench_lora_lego.py                         # 8 LoRAs of rank 16, 4096x4096 and 1024x1024
    python benchmarks/bench_lora_lego.py --widths 4096 --ks 16 --repeats 5

One "module" is one call of ops.lora_lego.lego_merge (what the engine does per adapted weight):
pool the N = n*r MSUs, sort them by content, deduplicate, k-means (k-means++, n_init restarts, in
kernel form on the Gram matrix), rebuild and reweight. Loading and writing are not timed.

Two kinds of synthetic adapters, scaled like trained LoRAs (A rows ~ unit norm, B small):
"shared": each task's factors are a shared component plus a task-specific one (A_i = A0 + 0.5 A_task,
same for B) - like LoRAs trained from one seed, where k-means groups the MSUs by rank index (spec
A9.2) and converges at once; "independent": only the task-specific parts, where k-means has no
structure to find and works hardest. Results: benchmarks/results_lora_lego.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from mergekit_ortho.ops.lora_lego import lego_merge


def adapters(n: int, r: int, width: int, seed: int, shared: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    a0 = shared * torch.randn(r, width, generator=g) / width**0.5
    b0 = shared * 0.01 * torch.randn(width, r, generator=g)
    out = []
    for _ in range(n):
        a = a0 + 0.5 * torch.randn(r, width, generator=g) / width**0.5
        b = b0 + 0.005 * torch.randn(width, r, generator=g)
        out.append((a.contiguous(), b.contiguous()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loras", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--widths", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--ks", type=int, nargs="*", default=[16, 32, 64, 128],
                    help="merged ranks (k = N = loras*rank is the concatenation, no k-means)")
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per setting (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results_lora_lego.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N = args.loras * args.rank
    rows = []
    for width, kind in [(w, kind) for w in args.widths for kind in ("shared", "independent")]:
        factors = adapters(args.loras, args.rank, width, seed=width, shared=1.0 if kind == "shared" else 0.0)
        lego_merge(factors, args.ks[0], n_init=args.n_init, name="warmup")  # first-call overheads
        for k in args.ks:
            times, rep = [], None
            for i in range(args.repeats):
                t0 = time.perf_counter()
                _, _, rep = lego_merge(factors, k, n_init=args.n_init, name=f"layer.{i}.q_proj.weight")
                times.append(time.perf_counter() - t0)
            sizes = rep["cluster_sizes"]
            rows.append((width, kind, k, rep["k"], statistics.median(times), min(times), rep["n_iter"],
                         f"{max(sizes)}/{min(sizes)}", rep["inertia"]))
            print(rows[-1], flush=True)
    lines = [
        "# LoRA-LEGO benchmark",
        "",
        f"{args.loras} LoRAs of rank {args.rank} per module (N = {N} MSUs), square modules of the widths "
        f"below (MSU length D = 2 x width), float32 in/out, k-means in float64 on CPU, n_init = {args.n_init}, "
        "max_iter = 300, tol = 1e-4, both reweightings on. Factors = shared + 0.5 x task-specific random "
        "components ('shared') or task-specific components only ('independent'). One module = one `lego_merge` call (pool, content sort, dedup, k-means, rebuild); "
        "loading and writing not included.",
        f"Machine: {platform.machine()}, torch {torch.__version__}, torch.set_num_threads({args.threads}); "
        f"{time.strftime('%Y-%m-%d')}. The 2-core box was shared with other jobs while this ran, so timings "
        "are approximate (median and best of the repeats are both given).",
        "",
        "k = N is the concatenation (no k-means). 'iters' is the Lloyd iteration count of the kept "
        "restart; 'largest/smallest' are cluster sizes.",
        "",
        f"| width | adapters | k | actual k | s per module (median of {args.repeats}) | best s | iters | "
        "largest/smallest | inertia |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for width, kind, k, kk, med, best, iters, sz, inertia in rows:
        lines.append(f"| {width} | {kind} | {k} | {kk} | {med:.3f} | {best:.3f} | {iters} | {sz} | {inertia:.4g} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
