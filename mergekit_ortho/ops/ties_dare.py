"""TIES and DARE (sparsify, elect a sign, disjoint merge).

Spec: ../shared/specs/magmax_opcm_baselines.md Part C3 (TIES) and D4 (golden numbers); DARE from
Yu et al. 2023 (arXiv 2311.03099). Recipe semantics are mergekit's generalized task arithmetic so
that a mergekit recipe gives the same tensors:

1. sparsify each task vector per tensor: ``ties`` keeps the ``density`` fraction of largest
   magnitudes; ``dare_*`` keeps each entry with probability ``density`` and (``rescale: true``)
   divides the survivors by ``density``;
2. weight: d_i = w_i * tau_i;
3. ``ties`` / ``dare_ties`` elect the sign of sum_i d_i per entry (a zero sum counts as positive,
   as mergekit) and keep only entries of that sign (zeros never count);
4. mixed = sum of kept d_i, divided by the sum of the kept weights when ``normalize``;
5. merged delta = lambda * mixed.

Deviations from mergekit, all deliberate:
* trimming keeps exactly k = int(density * n) entries, the k largest magnitudes; entries whose
  magnitude equals the k-th largest (the threshold) are kept lowest flat index first, so the
  kept set is fully determined (mergekit's argsort and ``torch.topk`` leave that choice
  unspecified). NaN counts as the largest magnitude. Large float tensors find the threshold by
  an exact radix select on the float bit patterns instead of a sort/topk (see
  :func:`magnitude_trim`); the result is the same set either way. The
  ``trim_rule: kthvalue`` option reproduces the TIES/MagMax reference code, which keeps every
  entry >= the k'-th smallest magnitude (int(n * density) + 1 entries, ties included; spec C3.2);
* a density that would keep no entry of a tiny tensor keeps one (mergekit asserts instead);
* DARE draws its masks from a generator seeded by (seed, tensor name, model index), so results do
  not depend on the order tensors are processed in (mergekit uses the global RNG).

Trimming is per tensor (mergekit), not global over the model as in the TIES reference code:
streaming one tensor at a time makes a global threshold a second pass we do not pay for.

Speed: the operators work in place on the task vectors the engine hands them (``task.inputs``,
which the engine computes afresh for each call; an input passed twice or non-contiguous is
copied first) and avoid full-size temporaries, whose page faults cost more than the arithmetic:
the top-k threshold comes from a radix select (:func:`_radix_threshold`) and is applied by an
in-place ``hardshrink``; the DARE mask is the sign bit of ``u - density``; the sign election and
disjoint mean run on the float bit patterns (:func:`_mix`); all of it chunk by chunk (see
``_CHUNK``). Every result is bit-identical to the plain formulation
(tests/test_baselines.py re-derives it), with the deterministic tie rule above as the only
change of the kept set.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .registry import Operator, Param, TensorTask, generator, register


# Tensors with at least this many entries (float32/float64, or half types via an exact float32
# copy of the magnitudes) find the top-k threshold by radix select; smaller ones use a stable
# sort (faster below ~16k entries, where the fixed cost of the histograms dominates; far slower
# above). Both give the same kept set; tests lower it to cross-check the two paths.
_RADIX_MIN_NUMEL = 1 << 14

# Every full-tensor pass here (radix histograms, applying the threshold, the DARE mask, the sign
# election and disjoint mean) walks the tensor in chunks of 256K entries (1 MiB of float32): each
# chunk stays in L2 through all its passes and no full-size temporary is allocated. End to end
# (3 x 271M-entry bf16 models, ties density 0.5, 2 idle cores): 12.4 s with 32K-entry chunks
# (each op below ATen's parallel grain, so on one thread), 8.1 s with 256K, 7.7-8.4 s with 1M+.
# Chunks above the grain run on torch's thread pool; on cores oversubscribed by other jobs its
# parallel regions can stall (seen during development at load ~6: 32K chunks were then 10x
# faster), so set OMP_NUM_THREADS=1 there. On other devices (CUDA) a chunk is the whole tensor.
_CHUNK = (1 << 18) - 1
_MIX_CHUNK = _CHUNK  # entries per chunk in the sign election / disjoint mean
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer view of a float


def _chunk(t: torch.Tensor, size: int | None = None) -> int:
    return (_CHUNK if size is None else size) if t.device.type == "cpu" else max(t.numel(), 1)


def _host_counts(digits: torch.Tensor, bins: int) -> np.ndarray:
    """Histogram (on the host) of a 1-D tensor of integers in [0, bins), chunk by chunk: torch's
    bincount takes a (parallel) min and max of its input first."""
    counts = np.zeros(bins, dtype=np.int64)
    step = _chunk(digits)
    for lo in range(0, digits.numel(), step):
        counts += torch.bincount(digits[lo:lo + step], minlength=bins).cpu().numpy()
    return counts


def _pick(counts: np.ndarray, need: int) -> tuple[int, int, int]:
    """The histogram bin holding the need-th largest value: (bin, rank within it, bin count)."""
    at_or_above = np.cumsum(counts[::-1])[::-1]  # [j] = #values in bins >= j, non-increasing
    j = int(np.count_nonzero(at_or_above >= need)) - 1
    if j + 1 < counts.size:
        need -= int(at_or_above[j + 1])
    return j, need, int(counts[j])


def _radix_threshold(flat: torch.Tensor, k: int) -> tuple[int, int, int, int | None]:
    """Radix select of the k-th largest magnitude of ``flat`` (contiguous 1-D float32/float64).

    For non-negative floats the IEEE bit pattern read as an integer is monotone in the value
    (+0 and -0 both map to 0 once the sign bit is cleared; +inf sits below every NaN), so the
    k-th largest magnitude is the k-th largest of ``bits & 0x7FF...F``. Level 1 histograms the
    top 16 bits of every entry (15 once the sign is dropped; read through an int16 view) and a
    cumulative count from the top picks the bucket that holds the k-th largest. That bucket's
    entries, with their flat indices, become the candidates; each further level resolves the
    next 16 bits among them (2 levels for float32, 4 for float64). A bucket holding a large share
    of the tensor is usually one value repeated (task vectors of bf16 checkpoints), and
    gathering it costs more than testing that value: :func:`_pivot_threshold` tries it first.

    Returns ``(t, m, n_eq, c)``: ``t`` the threshold's bit pattern (sign cleared), ``n_eq`` the
    number of entries whose magnitude has exactly that pattern, ``m`` how many of them belong
    to the top k (1 <= m <= n_eq; every entry above t does) and, when m < n_eq, ``c`` = 1 + the
    flat index of the m-th of them in index order (else None): candidates stay in increasing
    index order through every level.
    """
    n = flat.numel()
    width = flat.element_size() * 8
    ibits = flat.view(_INT_OF[flat.element_size()])
    words = flat.view(torch.int16).view(-1, width // 16)
    top = words[:, -1] if sys.byteorder == "little" else words[:, 0]
    step = _chunk(flat)
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=flat.device)
    # the level-1 digits are kept (2 bytes an entry) for the gathering pass below
    top_digits = torch.empty(n, dtype=torch.int16, device=flat.device)
    for lo in range(0, n, step):
        digits = torch.bitwise_and(top[lo:lo + step], 0x7FFF, out=top_digits[lo:lo + step])  # sign dropped
        counts += torch.bincount(digits, minlength=1 << 15)
    j, need, in_bucket = _pick(counts.cpu().numpy(), k)
    if in_bucket >= max(n >> 5, _PIVOT_MIN):
        found = _pivot_threshold(flat, j, k)
        if found is not None:
            return found
    shift = width - 16
    prefix = j << shift
    idx, cand = [], []  # the bucket's flat indices and raw bits (the sign bit is never read)
    for lo in range(0, n, step):
        sel = (top_digits[lo:lo + step] == j).nonzero().view(-1)
        cand.append(ibits[lo:lo + step][sel])
        idx.append(sel.add_(lo))
    idx, cand = torch.cat(idx), torch.cat(cand)
    del top_digits
    while True:
        shift -= 16
        digits = torch.bitwise_right_shift(cand, shift).bitwise_and_(0xFFFF)
        j, need, n_eq = _pick(_host_counts(digits, 1 << 16), need)
        prefix |= j << shift
        if shift == 0:
            c = int(idx[(digits == j).nonzero()[need - 1]]) + 1 if need < n_eq else None
            return prefix, need, n_eq, c
        sel = (digits == j).nonzero().view(-1)
        idx, cand = idx[sel], cand[sel]
        del sel, digits


_PIVOT_MIN = 1 << 16  # smallest level-1 bucket worth a pivot test (also >= 1/32 of the tensor)


def _pivot_threshold(flat: torch.Tensor, j: int, k: int):
    """Test whether the magnitude of the first entry in level-1 bucket ``j`` is the k-th
    largest: one pass counts the entries above and equal to it. Returns what
    :func:`_radix_threshold` returns, or None when it is not."""
    itype = _INT_OF[flat.element_size()]
    sign_clear = torch.iinfo(itype).max
    shift = flat.element_size() * 8 - 16
    ibits = flat.view(itype)
    n = flat.numel()
    step = _chunk(flat)
    pivot = None
    for lo in range(0, n, step):
        hit = torch.bitwise_right_shift(ibits[lo:lo + step].bitwise_and(sign_clear), shift) == j
        if bool(hit.any()):
            pivot = int(ibits[lo + int(hit.view(torch.uint8).argmax())]) & sign_clear  # first hit
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
    for i, cnt in enumerate(equal):  # the chunk holding the m-th entry equal to the pivot
        if seen + cnt >= m:
            lo = i * step
            hit = ibits[lo:lo + step].bitwise_and(sign_clear) == pivot
            return pivot, m, n_eq, lo + int(hit.nonzero()[m - seen - 1]) + 1
        seen += cnt
    raise AssertionError("unreachable")  # pragma: no cover


def _topk_(flat: torch.Tensor, k: int) -> None:
    """Zero, in place, all but k entries of ``flat`` (contiguous 1-D): every entry whose
    magnitude exceeds the k-th largest magnitude t, then the entries with magnitude t in
    increasing index until k are kept. 1 <= k <= numel."""
    n = flat.numel()
    dt = flat.dtype
    if n < _RADIX_MIN_NUMEL or dt not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # small tensors: a stable descending sort puts equal magnitudes in index order
        order = torch.sort(flat.abs(), descending=True, stable=True).indices
        drop = torch.ones(n, dtype=torch.bool, device=flat.device)
        drop[order[:k]] = False
        flat.masked_fill_(drop, 0)
        return
    src = flat if dt in (torch.float32, torch.float64) else flat.abs().float()  # exact, monotone
    t, m, n_eq, c = _radix_threshold(src, k)
    if m == n_eq:  # the whole tie group at t is kept (always, without ties at the threshold)
        c = n
    # keep |x| >= t before index c and |x| > t from c on (c = 1 + the last kept entry equal to t)
    itype = _INT_OF[src.element_size()]
    min_normal, inf = (0x00800000, 0x7F800000) if itype == torch.int32 else (1 << 52, 0x7FF << 52)
    step = _chunk(flat)
    if src is flat and min_normal < t < inf:
        # hardshrink(x, l) zeroes |x| <= l branch-free, in one pass; with l = the float just
        # below t it zeroes |x| < t. NaN compares false, so it is kept (it counts as largest).
        tf = torch.tensor(t, dtype=itype).view(dt)
        below = float(torch.nextafter(tf, torch.zeros_like(tf)))
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            if lo < c:
                part = flat[lo:min(hi, c)]
                torch.hardshrink(part, below, out=part)
            if hi > c:
                part = flat[max(lo, c):hi]
                torch.hardshrink(part, float(tf), out=part)
        return
    # a zero, subnormal, infinite or NaN threshold, or a half dtype: compare the bit patterns of
    # |x| (exact whatever the denormal mode; NaN patterns sit above +inf)
    mag_bits = src.view(itype).bitwise_and(torch.iinfo(itype).max)
    drop = torch.empty(n, dtype=torch.bool, device=flat.device)
    torch.lt(mag_bits[:c], t, out=drop[:c])
    torch.le(mag_bits[c:], t, out=drop[c:])
    del mag_bits
    flat.masked_fill_(drop, 0)


def _trim_(x: torch.Tensor, density: float, rule: str) -> torch.Tensor:
    """:func:`magnitude_trim` in place on x (contiguous); returns x."""
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    flat = x.view(-1)
    if rule == "kthvalue":
        # reference semantics: threshold at the k'-th smallest magnitude, keep |x| >= thr
        kth = n - int(n * density)
        if kth <= 0:
            return x
        mags = flat.abs()
        thr = mags.kthvalue(kth).values
        keep = mags >= thr
        del mags
        flat.masked_fill_(keep.logical_not_(), 0)
        return x
    _topk_(flat, max(int(density * n), 1))
    return x


def magnitude_trim(x: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    """Zero all but the largest-magnitude ``density`` fraction of x (a new tensor; x is untouched).

    ``rule="topk"`` keeps exactly k = max(int(density * n), 1) entries: all entries whose
    magnitude exceeds the k-th largest magnitude t, and then those with magnitude exactly t in
    increasing flat (row-major) index order until k are kept - so among equal magnitudes at the
    threshold the lowest indices win, deterministically. +0 and -0 are equal magnitudes; NaN
    counts as larger than any number. Tensors of at least ``_RADIX_MIN_NUMEL`` entries find t
    with an exact radix select over the float bit patterns (:func:`_radix_threshold`: a
    histogram of the top 16 bits, then the next 16 bits of the one bucket that holds t) instead
    of ``torch.topk``; smaller ones use a stable sort. Same set either way.

    ``rule="kthvalue"`` keeps every entry with magnitude >= the k'-th smallest, k' = n - int(n *
    density) (the TIES reference code; one more entry, ties all kept).
    """
    if density >= 1.0 or x.numel() == 0:
        return x.clone()
    return _trim_(x.clone(memory_format=torch.contiguous_format), density, rule)


def _keep_below_(x: torch.Tensor, u: torch.Tensor, density: float) -> None:
    """x = where(u < density, x, +0) in place, exactly; ``u`` (float32, x's shape, never NaN) is
    overwritten. The comparison is torch's (in float32, against float32(density))."""
    if x.dtype in (torch.float32, torch.float64) and u.dtype == torch.float32:
        # u - d < 0 exactly when u < d (distinct floats never subtract to 0; u == d gives +0), so
        # the sign bit, spread by an arithmetic shift, is an all-ones/all-zeros keep mask
        u.sub_(density)
        mask = u.view(torch.int32).bitwise_right_shift_(31)
        x.view(_INT_OF[x.element_size()]).bitwise_and_(mask)  # int32 -1 widens to all ones
    else:
        x.masked_fill_(torch.ge(u, density), 0)


def _drop_(x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool) -> torch.Tensor:
    """:func:`random_drop` in place on x (contiguous)."""
    if density >= 1.0:
        return x
    # the draws of torch.rand(x.shape, generator=gen, dtype=float32), taken chunk by chunk from
    # the same generator: on the CPU that is one draw per entry in order, so the same numbers
    # (tests pin them); elsewhere the chunk is the whole tensor. Kept iff the draw is < density.
    xf = x.view(-1)
    step = _chunk(xf)
    u = torch.empty(min(step, xf.numel()), dtype=torch.float32, device=x.device)
    for lo in range(0, xf.numel(), step):
        xc = xf[lo:lo + step]
        uc = torch.rand(xc.shape, generator=gen, dtype=torch.float32, device=x.device, out=u[:xc.numel()])
        _keep_below_(xc, uc, density)
        if rescale and density > 0:
            xc.div_(density)
    return x


def random_drop(
    x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; divide survivors by it if ``rescale``.

    Draws ``torch.rand(x.shape, generator=gen, dtype=float32)`` and keeps the entries whose draw
    is below ``density`` (a new tensor; x is untouched)."""
    if density >= 1.0:
        return x.clone()
    return _drop_(x.clone(memory_format=torch.contiguous_format), density, gen, rescale)


def _owned(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs, cloned only where writing in place would be unsafe: a non-contiguous tensor
    or one sharing storage with an earlier input (the same tensor passed for two models)."""
    seen: set[int] = set()
    out = []
    for x in inputs:
        ptr = x.untyped_storage().data_ptr()
        if not x.is_contiguous() or ptr in seen:
            x = x.clone(memory_format=torch.contiguous_format)
            ptr = x.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(x)
    return out


def _sparsify(task: TensorTask, sparsify: str) -> list[torch.Tensor]:
    """Sparsified, weighted task vectors, computed in place in ``task.inputs``."""
    out = []
    for i, (x, mp) in enumerate(zip(_owned(task.inputs), task.model_params)):
        d = mp["density"]
        if sparsify == "magnitude":
            y = _trim_(x, d, task.params["trim_rule"])
        else:
            gen = generator(task.params["seed"], f"{task.name}\x00{i}")
            y = _drop_(x, d, gen, task.params["rescale"])
        w = mp["weight"]
        if w != 1.0:
            yf = y.view(-1)
            step = _chunk(yf)
            for lo in range(0, yf.numel(), step):
                yf[lo:lo + step].mul_(w)
        out.append(y)
    return out


def _mix(task: TensorTask, weighted: list[torch.Tensor], consensus: bool) -> torch.Tensor:
    """Combine the weighted task vectors d_i (owned: they are overwritten; the result is d_0's
    storage).

    With ``consensus`` (TIES): elect sign(sum_i d_i) per entry (a zero sum counts as positive,
    a NaN one as negative), keep each d_i only where it is nonzero with that sign (NaN never),
    sum the kept entries in model order and, when ``normalize``, divide by the sum of the kept
    weights (1 where that is 0). Without: the plain sum, divided by the sum of the weights when
    ``normalize``. Then times lambda.

    The consensus runs on the bit patterns, every pass in place: flipping the sign bit of d_i
    where the elected sign is negative gives o_i = |d_i| where d_i agrees and a value <= 0 (or
    NaN) where it does not, so ``threshold(o_i, 0, 0)`` (after NaN -> 0) is exactly the kept
    magnitude, ``sign(o_i)`` the kept indicator and sum_i o_i the kept sum's magnitude (the
    same additions in the same order as the signed sum: rounding is symmetric), whose sign bit is
    then set back. It runs chunk by chunk (``_MIX_CHUNK`` entries, see ``_CHUNK``) with
    two chunk-sized scratch buffers (the sum / elected sign bits, the divisor). Bit-identical to
    the plain formulation (tests/test_baselines.py); the only exception is an entry whose inputs
    hold a NaN and no agreeing value, which gives -0.0 there instead of +0.0.
    """
    weights = [mp["weight"] for mp in task.model_params]
    normalize = task.params["normalize"]
    lam = task.params["lambda"]
    mixed = weighted[0]
    n = mixed.numel()
    step = _chunk(mixed, _MIX_CHUNK)
    flats = [d.view(-1) for d in weighted]
    if not consensus:
        total_w = float(sum(weights))
        divisor = 1.0 if abs(total_w) < 1e-8 else total_w
        for lo in range(0, n, step):
            ds = [f[lo:lo + step] for f in flats]
            for d in ds[1:]:
                ds[0] += d
            if normalize:
                ds[0] /= divisor
            if lam != 1.0:
                ds[0].mul_(lam)
        return mixed
    itype = _INT_OF[mixed.element_size()]
    sign_bit = torch.iinfo(itype).min
    inf = float("inf")
    scratch = torch.empty(min(n, step), dtype=mixed.dtype, device=mixed.device)
    div_buf = torch.empty_like(scratch) if normalize else None
    positive_weights = all(w > 0 for w in weights)
    for lo in range(0, n, step):
        ds = [f[lo:lo + step] for f in flats]
        total = scratch[:ds[0].numel()]
        if len(ds) == 1:
            total.copy_(ds[0])
        else:
            torch.add(ds[0], ds[1], out=total)
            for d in ds[2:]:
                total += d
        # elected sign bit: set where not (total >= 0), i.e. total < 0 or NaN; -0.0 is +
        total.nan_to_num_(nan=-1.0, posinf=inf, neginf=-inf).add_(0.0)  # NaN -> -1, -0.0 -> +0
        flip = total.view(itype).bitwise_and_(sign_bit)
        divisor = None if div_buf is None else div_buf[:ds[0].numel()]
        for i, (d, w) in enumerate(zip(ds, weights)):
            d.view(itype).bitwise_xor_(flip)  # o_i: > 0 exactly where d_i agrees
            torch.nn.functional.threshold_(d.nan_to_num_(nan=0.0, posinf=inf, neginf=-inf), 0.0, 0.0)
            if i == 0:
                if divisor is not None:
                    torch.sign(d, out=divisor)  # 1 where kept, else 0
                    if w != 1.0:
                        divisor.mul_(w)
                continue
            ds[0] += d
            if divisor is not None:
                divisor.add_(torch.sign(d, out=d), alpha=w)  # == divisor + kept_i * w, exactly
        ds[0].view(itype).bitwise_xor_(flip)  # back to the elected sign
        if divisor is not None:
            if positive_weights:  # divisor >= +0: a branch-free "0 -> 1"
                torch.nn.functional.threshold_(divisor, 0.0, 1.0)
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
            ds[0] /= divisor
        if lam != 1.0:
            ds[0].mul_(lam)
    return mixed


def ties(task: TensorTask) -> torch.Tensor:
    """TIES merge of one tensor. Like every operator here it may modify ``task.inputs`` (the
    task vectors, which the engine computes fresh for each call) in place and may return one of
    them as the result; pass copies if the inputs must survive."""
    return _mix(task, _sparsify(task, "magnitude"), consensus=True)


def dare_ties(task: TensorTask) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election; may modify ``task.inputs`` in place."""
    return _mix(task, _sparsify(task, "random"), consensus=True)


def dare_linear(task: TensorTask) -> torch.Tensor:
    """DARE drop-and-rescale, then a weighted sum; may modify ``task.inputs`` in place."""
    return _mix(task, _sparsify(task, "random"), consensus=False)


_MODEL_PARAMS = (
    Param("weight", float, 1.0, "per-model weight"),
    Param("density", float, 1.0, "fraction of entries kept", minimum=0.0, maximum=1.0),
)
_LAMBDA = Param("lambda", float, 1.0, "scale applied to the merged task vector")
_INT8 = Param("int8_mask", bool, False, "accepted for mergekit compatibility; masks are boolean here")
_SEED = Param("seed", int, 0, "DARE seed; masks depend on (seed, tensor name, model index)")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the sum of the weights that took part")


register(
    Operator(
        name="ties",
        summary="TIES: trim to density, elect sign by mass, disjoint mean",
        spec="magmax_opcm_baselines.md C3, D4",
        fn=ties,
        params=(
            _LAMBDA,
            _normalize(True),
            Param("rescale", bool, False, "accepted for mergekit compatibility (no effect on magnitude trimming)"),
            Param("trim_rule", str, "topk", "topk: keep exactly int(density*n) (mergekit); "
                  "kthvalue: keep |x| >= k'-th smallest (TIES reference, one more entry)",
                  choices=("topk", "kthvalue")),
            _INT8,
        ),
        model_params=_MODEL_PARAMS,
        details="Per tensor: keep the top density fraction of |tau_i|, weight, elect sign(sum), "
        "average the agreeing entries (normalize: true) or sum them (false), times lambda.",
    )
)

for _name, _fn, _consensus in (("dare_ties", dare_ties, True), ("dare_linear", dare_linear, False)):
    register(
        Operator(
            name=_name,
            summary=f"DARE random drop-and-rescale, then {'TIES sign election' if _consensus else 'a weighted sum'}",
            spec="magmax_opcm_baselines.md C3 (sign election); DARE arXiv 2311.03099",
            fn=_fn,
            params=(
                _LAMBDA,
                _normalize(False),
                Param("rescale", bool, True, "divide kept entries by density"),
                _SEED,
                _INT8,
            ),
            model_params=_MODEL_PARAMS,
            details="Each entry of tau_i survives with probability density (rescaled by 1/density), "
            "seeded per (seed, tensor, model) so the result does not depend on processing order.",
        )
    )
