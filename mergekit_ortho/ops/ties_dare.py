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
which they own) and keep the number of full-size temporaries to one float buffer plus a few
boolean masks per tensor; every result is bit-identical to the straightforward formulation
(tests/test_baselines.py checks them against a plain re-derivation).
"""
from __future__ import annotations

import torch

from .registry import Operator, Param, TensorTask, generator, register


# Tensors with at least this many entries (float32/float64, or half types via an exact float32
# copy of the magnitudes) find the top-k threshold by radix select; smaller ones use a stable
# sort. Both give the same kept set; tests lower it to cross-check the two paths.
_RADIX_MIN_NUMEL = 1 << 20
_DIGIT = 16  # bits resolved per radix level (a 65536-bin histogram)


def _kth_largest_bits(flat: torch.Tensor, k: int) -> tuple[int, int, torch.Tensor]:
    """Radix select on the bit patterns of |flat| (float32 or float64, contiguous, 1-D).

    For non-negative floats the IEEE bit pattern read as a signed integer is monotone in the
    value (+0 and -0 both map to 0, +inf below every NaN), so the k-th largest magnitude is the
    k-th largest of ``bits & 0x7FF...F``. Level 1 histograms the top 16 bits of all entries
    (15 after clearing the sign), finds the bucket holding the k-th largest from a cumulative
    count taken from the top, and keeps only that bucket's entries as candidates; each further
    level resolves the next 16 bits among the candidates, until all bits are fixed.

    Returns ``(t, m, work)``: ``t`` the threshold's bit pattern, ``m`` how many entries equal
    to it belong to the top k (1 <= m <= their count; the others above t are all kept), and
    ``work`` a scratch integer tensor of flat's size that the caller may overwrite.
    """
    if flat.dtype == torch.float32:
        ibits, width, sign_clear = flat.view(torch.int32), 32, 0x7FFFFFFF
    else:
        ibits, width, sign_clear = flat.view(torch.int64), 64, 0x7FFFFFFFFFFFFFFF
    shift = width - _DIGIT
    # level 1 on every entry: the top digit with the sign bit dropped, in [0, 2**15)
    work = torch.bitwise_right_shift(ibits, shift)
    work.bitwise_and_((1 << (_DIGIT - 1)) - 1)
    digits, cand = work, None
    need, prefix = k, 0
    while True:
        counts = torch.bincount(digits, minlength=1 << _DIGIT)
        at_or_above = counts.flip(0).cumsum(0).flip(0)  # [j] = #digits >= j (non-increasing)
        j = int((at_or_above >= need).sum()) - 1  # the bucket that holds the need-th largest
        above = int(at_or_above[j + 1]) if j + 1 < counts.numel() else 0
        need -= above
        prefix |= j << shift
        if shift == 0:
            return prefix, need, work
        in_bucket = digits == j
        cand = ibits[in_bucket].bitwise_and_(sign_clear) if cand is None else cand[in_bucket]
        del in_bucket
        shift -= _DIGIT
        digits = torch.bitwise_right_shift(cand, shift).bitwise_and_((1 << _DIGIT) - 1)


def _topk_drop_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat's shape) of the entries to zero so that exactly k survive.

    Kept: every entry with |x| above the k-th largest magnitude t, then the entries with
    |x| == t in increasing flat index until k are kept. 1 <= k <= numel.
    """
    n = flat.numel()
    dt = flat.dtype
    if n >= _RADIX_MIN_NUMEL and dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        src = flat if dt in (torch.float32, torch.float64) else flat.abs().float()  # exact, monotone
        t, m, work = _kth_largest_bits(src, k)
        ibits = src.view(torch.int32 if src.dtype == torch.float32 else torch.int64)
        sign_clear = 0x7FFFFFFF if src.dtype == torch.float32 else 0x7FFFFFFFFFFFFFFF
        mag_bits = torch.bitwise_and(ibits, sign_clear, out=work)  # |x| as ordered integers
        equal = mag_bits == t
        n_equal = int(equal.sum())
        if m == n_equal:  # the whole tie group at the threshold is kept (the usual case)
            return mag_bits < t
        drop = mag_bits <= t
        drop[equal.nonzero().view(-1)[:m]] = False  # nonzero lists indices in increasing order
        return drop
    # small tensors: a stable descending sort puts equal magnitudes in index order
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    drop = torch.ones(n, dtype=torch.bool, device=flat.device)
    drop[order[:k]] = False
    return drop


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
    k = max(int(density * n), 1)
    flat.masked_fill_(_topk_drop_mask(flat, k), 0)
    return x


def magnitude_trim(x: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    """Zero all but the largest-magnitude ``density`` fraction of x (a new tensor; x is untouched).

    ``rule="topk"`` keeps exactly k = max(int(density * n), 1) entries: all entries whose
    magnitude exceeds the k-th largest magnitude t, and then those with magnitude exactly t in
    increasing flat (row-major) index order until k are kept - so among equal magnitudes at the
    threshold the lowest indices win, deterministically. +0 and -0 are equal magnitudes; NaN
    counts as larger than any number. Tensors of at least ``_RADIX_MIN_NUMEL`` entries find t
    with an exact radix select over the float bit patterns (two 65536-bin histograms for
    float32) instead of ``torch.topk``; smaller ones use a stable sort. Same set either way.

    ``rule="kthvalue"`` keeps every entry with magnitude >= the k'-th smallest, k' = n - int(n *
    density) (the TIES reference code; one more entry, ties all kept).
    """
    if density >= 1.0 or x.numel() == 0:
        return x.clone()
    return _trim_(x.clone(memory_format=torch.contiguous_format), density, rule)


def _drop_(
    x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool, buf: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`random_drop` in place on x; ``buf`` (float32, x's shape) may hold the uniform draws."""
    if density >= 1.0:
        return x
    # the same draws as torch.rand(x.shape, generator=gen, dtype=float32): one uniform per entry,
    # in order; entry kept iff u < density (so dropped iff u >= density: u is never NaN)
    u = torch.rand(x.shape, generator=gen, dtype=torch.float32, device=x.device, out=buf)
    drop = torch.ge(u, density)
    del u
    x.masked_fill_(drop, 0)
    del drop
    if rescale and density > 0:
        x.div_(density)
    return x


def random_drop(
    x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; divide survivors by it if ``rescale``.

    Draws ``torch.rand(x.shape, generator=gen, dtype=float32)`` and keeps entries whose draw is
    below ``density`` (a new tensor; x is untouched)."""
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
    buf = None
    for i, (x, mp) in enumerate(zip(_owned(task.inputs), task.model_params)):
        d = mp["density"]
        if sparsify == "magnitude":
            y = _trim_(x, d, task.params["trim_rule"])
        else:
            if d < 1.0 and (buf is None or buf.shape != x.shape or buf.device != x.device):
                buf = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            gen = generator(task.params["seed"], f"{task.name}\x00{i}")
            y = _drop_(x, d, gen, task.params["rescale"], buf)
        w = mp["weight"]
        if w != 1.0:
            y.mul_(w)
        out.append(y)
    return out


def _mix(task: TensorTask, weighted: list[torch.Tensor], consensus: bool) -> torch.Tensor:
    """Combine the weighted task vectors d_i (owned: they are overwritten; the result is d_0's
    storage). With ``consensus``: elect sign(sum_i d_i) per entry (a zero sum counts as
    positive), keep each d_i only where it is nonzero with that sign, sum the kept entries in
    model order and, when ``normalize``, divide by the sum of the kept weights (1 where none is
    kept). Without: the plain sum, divided by the sum of the weights when ``normalize``."""
    weights = [mp["weight"] for mp in task.model_params]
    normalize = task.params["normalize"]
    mixed = weighted[0]
    if consensus:
        total = weighted[0].clone() if len(weighted) == 1 else weighted[0] + weighted[1]
        for d in weighted[2:]:
            total += d
        positive = total >= 0
        # the sum is no longer needed: its buffer becomes the divisor
        divisor = total.zero_() if normalize else None
        del total
        for i, (d, w) in enumerate(zip(weighted, weights)):
            agree = d < 0
            torch.where(positive, d > 0, agree, out=agree)  # nonzero and of the elected sign
            if divisor is not None:
                divisor.add_(agree, alpha=w)  # == divisor + agree.to(dtype) * w, exactly
            d.masked_fill_(agree.logical_not_(), 0)
            del agree
            if i:
                mixed += d
        del positive
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1.0)
            mixed /= divisor
            del divisor
    else:
        for d in weighted[1:]:
            mixed += d
        if normalize:
            total_w = float(sum(weights))
            mixed /= 1.0 if abs(total_w) < 1e-8 else total_w
    lam = task.params["lambda"]
    if lam != 1.0:
        mixed.mul_(lam)
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
