#!/usr/bin/env python
"""Micro-benchmark of TIES magnitude trimming and the ties / dare operators on large tensors.

Compares the previous implementation (``torch.topk`` over |x| + an index scatter; separate
temporaries in the sign election / disjoint mean and in DARE) with the current one
(radix select on the float bit patterns, in-place operators) on float32 tensors of the sizes
that dominate a Llama merge:

    python benchmarks/bench_trim.py                          # 2048x5632 and 32000x2048, 2 threads
    python benchmarks/bench_trim.py --shapes 4096x4096 --repeat 5 --data randn
    python benchmarks/bench_trim.py --no-ops                 # trimming only
    python benchmarks/bench_trim.py --previous               # radix select before/after the worker pool

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


# --- the previous radix select (before the worker pool; kept only as the baseline measured) --------


def prev_radix_threshold(flat: torch.Tensor, k: int):
    """``topk.radix_threshold`` as it was: level-1 histogram on the calling thread into a 2 B/entry
    digit buffer, a gather of the bucket, the pivot test's counts on the calling thread."""
    import sys

    import numpy as np

    from mergekit_ortho.ops.kernels import topk
    from mergekit_ortho.ops.kernels._chunks import INT_OF, chunk_len

    n = flat.numel()
    width = flat.element_size() * 8
    ibits = flat.view(INT_OF[flat.element_size()])
    words = flat.view(torch.int16).view(-1, width // 16)
    top = words[:, -1] if sys.byteorder == "little" else words[:, 0]
    step = chunk_len(flat)
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    top_digits = torch.empty(n, dtype=torch.int16)
    for lo in range(0, n, step):
        digits = torch.bitwise_and(top[lo:lo + step], 0x7FFF, out=top_digits[lo:lo + step])
        counts += torch.bincount(digits, minlength=1 << 15)
    j, need, in_bucket = topk._pick(counts.numpy(), k)
    if in_bucket >= max(n >> 5, topk.PIVOT_MIN):
        found = _prev_pivot(flat, j, k)
        if found is not None:
            return found
    shift = width - 16
    prefix = j << shift
    idx, cand = [], []
    for lo in range(0, n, step):
        sel = (top_digits[lo:lo + step] == j).nonzero().view(-1)
        cand.append(ibits[lo:lo + step][sel])
        idx.append(sel.add_(lo))
    idx, cand = torch.cat(idx), torch.cat(cand)
    del top_digits
    while True:
        shift -= 16
        digits = torch.bitwise_right_shift(cand, shift).bitwise_and_(0xFFFF)
        j, need, n_eq = topk._pick(topk._host_counts(digits, 1 << 16), need)
        prefix |= j << shift
        if shift == 0:
            c = int(idx[(digits == j).nonzero()[need - 1]]) + 1 if need < n_eq else None
            return prefix, need, n_eq, c
        sel = (digits == j).nonzero().view(-1)
        idx, cand = idx[sel], cand[sel]
        del sel, digits


def _prev_pivot(flat, j, k):
    from mergekit_ortho.ops.kernels._chunks import INT_OF, chunk_len

    itype = INT_OF[flat.element_size()]
    sign_clear = torch.iinfo(itype).max
    shift = flat.element_size() * 8 - 16
    ibits = flat.view(itype)
    n, step, pivot = flat.numel(), chunk_len(flat), None
    for lo in range(0, n, step):
        hit = torch.bitwise_right_shift(ibits[lo:lo + step].bitwise_and(sign_clear), shift) == j
        if bool(hit.any()):
            pivot = int(ibits[lo + int(hit.view(torch.uint8).argmax())]) & sign_clear
            break
    above, equal = 0, []
    for lo in range(0, n, step):
        mag = ibits[lo:lo + step].bitwise_and(sign_clear)
        above += int(torch.count_nonzero(mag > pivot))
        equal.append(int(torch.count_nonzero(mag == pivot)))
    n_eq = sum(equal)
    if not above < k <= above + n_eq:
        return None
    m = k - above
    if m == n_eq:
        return pivot, m, n_eq, None
    seen = 0
    for i, cnt in enumerate(equal):
        if seen + cnt >= m:
            lo = i * step
            hit = ibits[lo:lo + step].bitwise_and(sign_clear) == pivot
            return pivot, m, n_eq, lo + int(hit.nonzero()[m - seen - 1]) + 1
        seen += cnt


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


class _previous_radix:
    """Context: every top-k in the package runs ``prev_radix_threshold``."""

    def __enter__(self):
        from mergekit_ortho.ops.kernels import topk

        self.topk, self.real = topk, topk.radix_threshold
        topk.radix_threshold = prev_radix_threshold

    def __exit__(self, *exc):
        self.topk.radix_threshold = self.real


def timed_both(fn, make_args, repeat: int) -> tuple[float, float, float]:
    """(min wall, median wall, min process CPU time: all threads) over ``repeat`` fresh runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        args = make_args()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        del out, args
    return min(walls), statistics.median(walls), min(cpus)


def previous_rows(spec: str, x: torch.Tensor, args) -> None:
    """The radix select before / after the worker pool: the threshold alone, the in-place trim
    and the ties operator, interleaved run by run; results checked equal."""
    from mergekit_ortho.ops.kernels import topk

    n = x.numel()
    flat = x.reshape(-1)
    k = max(int(args.density * n), 1)
    assert prev_radix_threshold(flat, k) == topk.radix_threshold(flat, k)
    op = registry.get("ties")
    xs = [x] + [make(tuple(x.shape), args.data, i + 1) for i in range(args.models - 1)]
    mps = [op.resolve_model_params({"density": args.density}, f"m{i}") for i in range(len(xs))]
    params = op.resolve_params({})

    def fresh():
        return (TensorTask("model.layers.0.mlp.up_proj.weight", None, [t.clone() for t in xs], params, mps),)
    with _previous_radix():
        before = op.fn(*fresh())
    assert torch.equal(before.view(torch.int32), op.fn(*fresh()).view(torch.int32))
    cases = [("radix_threshold", lambda: topk.radix_threshold(flat, k), lambda: ()),
             ("  in place (_trim_, inside ties)", lambda t: _trim_(t, args.density, "topk"), lambda: (x.clone(),)),
             (f"ties ({len(xs)} models)", op.fn, fresh)]
    for what, fn, mk in cases:
        res = {"prev": [], "new": []}
        for _ in range(args.repeat):  # interleaved, so a drift in machine speed touches both
            with _previous_radix():
                res["prev"].append(timed_both(fn, mk, 1))
            res["new"].append(timed_both(fn, mk, 1))
        (pw, pm, pc), (nw, nm, nc) = [(min(r[0] for r in v), statistics.median(r[0] for r in v),
                                       min(r[2] for r in v)) for v in (res["prev"], res["new"])]
        print(f"{spec:>12} {n:>11,} {what:<34} {pw:6.3f}/{pm:6.3f} {nw:6.3f}/{nm:6.3f} {pw / nw:7.2f}x "
              f"  cpu {pc:6.3f} -> {nc:6.3f}", flush=True)


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
    ap.add_argument("--previous", action="store_true",
                    help="compare the radix select before the worker pool (serial histograms, a 2 B/entry digit "
                    "buffer) with the current one, instead of the old torch.topk trim")
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
    print(f"{'shape':>12} {'elements':>11} {'what':<34} {'old s':>14} {'new s':>14} {'speed-up':>8}"
          + ("   process CPU s (all threads), min: previous -> new" if args.previous else ""))
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.lower().split("x"))
        n = 1
        for v in shape:
            n *= v
        x = make(shape, args.data, 0)
        if args.previous:
            previous_rows(spec, x, args)
            continue
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
    if not args.previous:
        print("* = results differ from the old implementation only in which of several entries with the "
              "same magnitude at the threshold are kept (old: unspecified; new: lowest index)")


if __name__ == "__main__":
    main()
