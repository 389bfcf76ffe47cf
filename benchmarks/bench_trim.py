#!/usr/bin/env python
"""Micro-benchmark of TIES magnitude trimming and the ties / dare operators on large tensors.

Compares the previous implementation (``torch.topk`` over |x| + an index scatter; separate
temporaries in the sign election / disjoint mean and in DARE) with the current one
(radix select on the float bit patterns, in-place operators) on float32 tensors of the sizes
that dominate a Llama merge:

    python benchmarks/bench_trim.py                          # 2048x5632 and 32000x2048, 2 threads
    python benchmarks/bench_trim.py --shapes 4096x4096 --repeat 5 --data randn
    python benchmarks/bench_trim.py --no-ops                 # trimming only

``--data bf16delta`` (default) makes task vectors the way the end-to-end benchmark does
(bf16(base + 0.01 N(0,1)) - bf16(base), computed in float32: many equal magnitudes);
``--data randn`` uses N(0,1) (all magnitudes distinct in practice). Times are the minimum and
the median over ``--repeat`` runs, each on fresh copies (the copy is not timed). Wall times on
cores shared with other jobs swing widely (the load average is printed); ``--cpu-time`` runs one
thread and reports its CPU time instead, a steadier measure of the work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask, generator
from mergekit_ortho.ops.sparsify import magnitude_ as _trim_, magnitude_trim

# --- the previous implementation, kept here only as the baseline being measured ----------------


def old_magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    n = x.numel()
    k = max(int(density * n), 1)
    flat = x.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(x.shape)


def old_random_drop(x, density, gen, rescale=True):
    keep = torch.rand(x.shape, generator=gen, dtype=torch.float32, device=x.device) < density
    out = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if rescale and density > 0:
        out.div_(density)
    return out


def old_operator(task: TensorTask, method: str) -> torch.Tensor:
    ws = []
    for i, (x, mp) in enumerate(zip(task.inputs, task.model_params)):
        if method == "ties":
            y = old_magnitude_trim(x, mp["density"])
        else:
            y = old_random_drop(x, mp["density"], generator(task.params["seed"], f"{task.name}\x00{i}"),
                                task.params["rescale"])
        if mp["weight"] != 1.0:
            y.mul_(mp["weight"])
        ws.append(y)
    weights = [mp["weight"] for mp in task.model_params]
    if method != "dare_linear":
        total = ws[0].clone()
        for d in ws[1:]:
            total += d
        positive = total >= 0
        del total
        mixed = torch.zeros_like(ws[0])
        divisor = torch.zeros_like(ws[0])
        for d, w in zip(ws, weights):
            agree = torch.where(positive, d > 0, d < 0)
            mixed += torch.where(agree, d, 0.0)
            divisor += agree.to(d.dtype) * w
        divisor[divisor == 0] = 1.0
    else:
        mixed = ws[0].clone()
        for d in ws[1:]:
            mixed += d
        total_w = float(sum(weights))
        divisor = 1.0 if abs(total_w) < 1e-8 else total_w
    if task.params["normalize"]:
        mixed /= divisor
    if task.params["lambda"] != 1.0:
        mixed.mul_(task.params["lambda"])
    return mixed


# --- harness -------------------------------------------------------------------------------------


def make(shape, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(shape, generator=g)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return tuned.float() - base.float()


CLOCK = time.perf_counter


def timed(fn, make_args, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        args = make_args()
        t0 = CLOCK()
        out = fn(*args)
        times.append(CLOCK() - t0)
        del out, args
    return min(times), statistics.median(times)


def check_topk(out: torch.Tensor, x: torch.Tensor, k: int) -> None:
    """Kept entries are unchanged, at most k nonzero ones, and no dropped magnitude exceeds a
    kept one (true for any choice among ties; kept zeros are invisible, hence "at most")."""
    flat, o = x.reshape(-1), out.reshape(-1)
    kept = o != 0
    dropped = (flat != 0) & ~kept
    assert torch.equal(o[kept], flat[kept]) and int(kept.sum()) <= k
    if int(kept.sum()) < k:
        assert not bool(dropped.any())
    elif bool(dropped.any()):
        assert float(flat[kept].abs().min()) >= float(flat[dropped].abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["2048x5632", "32000x2048"],
                    help="tensor shapes ROWSxCOLS (default: a Llama-7B MLP matrix and a 32k x 2048 embedding)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=("bf16delta", "randn"), default="bf16delta")
    ap.add_argument("--models", type=int, default=3, help="task vectors per operator call")
    ap.add_argument("--no-ops", action="store_true", help="time magnitude_trim only")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its CPU time (work done; steady on shared cores)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        args.threads, CLOCK = 1, time.thread_time
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU time' if args.cpu_time else 'wall time'}, data {args.data}, density {args.density}, "
          f"best/median of {args.repeat}, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'shape':>12} {'elements':>11} {'what':<34} {'old s':>14} {'new s':>14} {'speed-up':>8}")
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.lower().split("x"))
        n = 1
        for v in shape:
            n *= v
        x = make(shape, args.data, 0)
        k = max(int(args.density * n), 1)
        new, old = magnitude_trim(x, args.density), old_magnitude_trim(x, args.density)
        check_topk(new, x, k)
        check_topk(old, x, k)
        assert int((new != 0).sum()) == int((old != 0).sum())
        same = torch.equal(new, old)
        del new, old
        old_trim = timed(old_magnitude_trim, lambda: (x, args.density), args.repeat)
        rows = [("magnitude_trim (topk rule)" + ("" if same else " *"), old_trim,
                 timed(magnitude_trim, lambda: (x, args.density), args.repeat)),
                # what the ties operator runs: in place on the task vector it owns (no copy)
                ("  in place (_trim_, inside ties)", old_trim,
                 timed(lambda t: _trim_(t, args.density, "topk"), lambda: (x.clone(),), args.repeat))]
        if not args.no_ops:
            xs = [x] + [make(shape, args.data, i + 1) for i in range(args.models - 1)]
            for method in ("ties", "dare_ties", "dare_linear"):
                op = registry.get(method)
                params = op.resolve_params({} if method == "ties" else {"seed": 1})
                mps = [op.resolve_model_params({"density": args.density}, f"m{i}") for i in range(len(xs))]

                def fresh():
                    return (TensorTask("model.layers.0.mlp.up_proj.weight", None, [t.clone() for t in xs],
                                       params, mps),)

                a, b = old_operator(*fresh(), method), op.fn(*fresh())
                ok = torch.equal(a, b)
                del a, b
                rows.append((f"{method} ({len(xs)} models)" + ("" if ok else " *"),
                             timed(lambda t, m=method: old_operator(t, m), fresh, args.repeat),
                             timed(op.fn, fresh, args.repeat)))
            del xs
        for what, (o_min, o_med), (n_min, n_med) in rows:
            print(f"{spec:>12} {n:>11,} {what:<34} {o_min:6.3f}/{o_med:6.3f} {n_min:6.3f}/{n_med:6.3f} "
                  f"{o_min / n_min:7.1f}x", flush=True)
    print("* = results differ from the old implementation only in which of several entries with the "
          "same magnitude at the threshold are kept (old: unspecified; new: lowest index)")


if __name__ == "__main__":
    main()
