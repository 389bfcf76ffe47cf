"""SCE: select by variance, calculate weights from the task vectors' energy, erase by sign.

Spec: ../shared/specs/mergekit_compat.md M16 (mergekit 0.1.5's ``sce``, golden numbers from
mergekit); FuseChat-2.0, arXiv 2408.07990. mergekit-compatible. Reads task vectors, needs the
base; no per-model weights. Per tensor, with tau_1..tau_N the task vectors:

1. select (only when kappa = ``select_topk`` < 1): v = the population variance of the tau_i
   across models, per entry; k = int(count_nonzero(v) * kappa) - non-zero-variance positions
   only; keep the k positions of largest v over the whole tensor and zero the others in every
   tau_i (kappa <= 0 or k = 0 zeros everything);
2. erase: sigma = sign(sum_i tau_i) per entry (a zero sum counts as +), m_i = [sign(tau_i) =
   sigma] (zeros never count) - the TIES consensus on the unweighted sum;
3. calculate: omega_i = mean(tau_i^2) after step 1, divided by their sum (1/N each when that
   sum is < 1e-6);
4. merged delta = sum_i omega_i m_i tau_i / max(sum_i omega_i m_i, 1e-6), per entry.

``int8_mask`` is accepted and has no numeric effect (mergekit's mask dtype). Deviation: equal
variances at the selection threshold are kept lowest flat index first (mergekit's topk leaves
it unspecified). Speed: in place on the task vectors, chunk by chunk (chunk-sized scratch
only); the selection adds one full-size variance tensor (a :mod:`mergekit_ortho.buffers` buffer, reused
by the next tensor: no page faults), the radix cut of :mod:`.kernels.topk` (the top-k set as a
threshold and an index, v itself left as it is) and a bit-mask pass built from that cut (no bool
masks: ``masked_fill_`` is ~10x slower), tested against the zeroing form in
tests/test_method_speed.py;
steps 2 and 4 are :func:`.kernels.sign_election.energy_merge_` on the bit patterns, tested
against :func:`erase_merge_plain` in tests/test_kernels.py.
"""
from __future__ import annotations

import torch

from . import sparsify as sp
from .gta import _owned
from .. import buffers
from .kernels import sign_election, topk
from .kernels._chunks import chunk_len, over_ranges
from .registry import Operator, Param, TensorTask, register


def _variance(flats: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry population variance across the models (two-pass, chunk by chunk): the mean
    sum_i t_i / N, then sum_i (t_i - mean)^2 / N, in model order (chunk-sized scratch)."""
    n = flats[0].numel()
    v = buffers.empty((n,), flats[0].dtype, flats[0].device)  # pages kept between tensors (no faults)
    step = chunk_len(v)
    over_ranges(lambda a, b: _variance_range(flats, v, a, b, step), n, step)  # chunks are independent
    return v


def _variance_range(flats: list[torch.Tensor], v: torch.Tensor, a: int, b: int, step: int) -> None:
    mean_buf = torch.empty(min(step, b - a), dtype=v.dtype, device=v.device)
    sq_buf = torch.empty_like(mean_buf)
    for lo in range(a, b, step):
        ts = [f[lo:min(lo + step, b)] for f in flats]
        mean = mean_buf[:ts[0].numel()]
        if len(ts) > 1:
            torch.add(ts[0], ts[1], out=mean)  # == copy of t_0, then += t_1
        else:
            mean.copy_(ts[0])
        for t in ts[2:]:
            mean += t
        mean.div_(len(ts))
        out = torch.sub(ts[0], mean, out=v[lo:min(lo + step, b)]).square_()  # == 0 + (t_0 - mean)^2
        for t in ts[1:]:
            d = torch.sub(t, mean, out=sq_buf[:t.numel()])
            out.add_(d.square_())  # += (t_i - mean)^2
        out.div_(len(ts))


def variance_plain(taus: list[torch.Tensor]) -> torch.Tensor:
    """:func:`_variance` by the definition on whole tensors (a new tensor), for the tests."""
    mean = sum(taus[1:], taus[0]) / len(taus)
    acc = (taus[0] - mean).square()
    for t in taus[1:]:
        acc = acc + (t - mean).square()
    return acc / len(taus)


def _select_(flats: list[torch.Tensor], kappa: float) -> list[float] | None:
    """Step 1 in place: zero every tau_i outside the top-k variance positions. Returns the sums
    of squares of the masked tau_i (step 3's, summed in the same chunks as
    :func:`_energy_sums`), or None where everything was zeroed."""
    v = _variance(flats) if kappa > 0 else None
    k = int(int(torch.count_nonzero(v)) * kappa) if v is not None else 0
    if k == 0:
        for f in flats:
            f.zero_()
        return None
    flat = v.view(-1)
    top = None  # the top-k cut (t, c) of :func:`.kernels.topk.cut`: kept iff |v| > t, or == t before c
    if k < flat.numel() and topk.applies(flat) and flat.dtype in (torch.float32, torch.float64):
        top = topk.cut(flat, k)  # the set keep_largest_ keeps, without its pass zeroing v
    else:
        sp.keep_largest_(flat, k)  # the kept positions have v > 0 (or NaN)
    return _mask_(flats, v, top)


def _mask_(flats: list[torch.Tensor], v: torch.Tensor, top: tuple[int, int] | None) -> list[float]:
    """Zero every tau_i where position is not selected, chunk by chunk, and sum the squares of the
    masked tau_i (float32 squares, float64 sums of each chunk's, in chunk order). ``top``: the cut
    (t, c) on v's bit patterns; None: v itself is already zero outside the selection."""
    vbits = v.view(torch.int32 if v.element_size() == 4 else torch.int64).view(-1)
    step = chunk_len(v)
    parts = over_ranges(lambda a, b: _mask_range_(flats, vbits, top, a, b, step), vbits.numel(), step)
    sums = [0.0] * len(flats)
    for per_chunk in parts:  # the chunks' sums added in chunk order, as one loop adds them
        for chunk_sums in per_chunk:
            for i, x in enumerate(chunk_sums):
                sums[i] += x
    return sums


def _mask_range_(flats: list[torch.Tensor], vbits: torch.Tensor, top, a: int, b: int, step: int) -> list[list[float]]:
    """:func:`_mask_` on the chunks of entries a..b; per chunk, each model's sum of squares."""
    keep = torch.empty(min(step, b - a), dtype=vbits.dtype, device=vbits.device)
    sq = torch.empty(min(step, b - a), dtype=flats[0].dtype, device=vbits.device)
    # the float64 sum of a float32 chunk as torch.sum(sq, dtype=float64) gives it, bit for bit (the
    # same values into the same reduction; tests/test_method_speed.py), without its slow cast-on-load
    # path (about 17x slower on two threads)
    dsq = torch.empty(min(step, b - a), dtype=torch.float64, device=vbits.device)
    out = []
    smax = torch.iinfo(vbits.dtype).max
    for lo in range(a, b, step):
        hi = min(lo + step, b)
        m = torch.bitwise_and(vbits[lo:hi], smax, out=keep[:hi - lo])  # |v|'s bit pattern
        if top is None:
            # all ones where v != 0, else 0: -(|v|'s bit pattern) has its sign bit set iff v != 0,
            # spread by the arithmetic shift (masked_fill_ with a bool mask is ~10x slower)
            m.neg_().bitwise_right_shift_(vbits.element_size() * 8 - 1)
        else:
            t, c = top
            s = min(max(c - lo, 0), hi - lo)  # before c: |v| >= t kept, from c on: |v| > t
            if s:
                torch.ge(m[:s], t, out=m[:s])
            if s < hi - lo:
                torch.gt(m[s:], t, out=m[s:])
            m.neg_()  # 1 -> all ones, 0 -> 0
        chunk_sums = []
        for f in flats:
            ch = f[lo:hi]
            ch.view(vbits.dtype).bitwise_and_(m)
            torch.square(ch, out=sq[:hi - lo])
            chunk_sums.append(float(dsq[:hi - lo].copy_(sq[:hi - lo]).sum()))  # step 3's, in cache
        out.append(chunk_sums)
    return out


def _energy_sums(flats: list[torch.Tensor]) -> list[float]:
    """sum(tau_i^2) per model, chunk by chunk (float64 sums of the chunks' float32 squares, each as
    torch.sum(sq, dtype=float64) gives it: see :func:`_mask_`)."""
    step = chunk_len(flats[0])
    n = flats[0].numel()
    sq = torch.empty(min(step, n), dtype=flats[0].dtype, device=flats[0].device)
    dsq = torch.empty(min(step, n), dtype=torch.float64, device=flats[0].device)
    sums = []
    for f in flats:
        total = 0.0
        for lo in range(0, n, step):
            c = f[lo:lo + step]
            total += float(dsq[:c.numel()].copy_(torch.square(c, out=sq[:c.numel()])).sum())
        sums.append(total)
    return sums


def _energy_weights(flats: list[torch.Tensor], sums: list[float] | None = None) -> list[float]:
    """Step 3: omega_i = mean(tau_i^2), normalised to sum 1 (1/N when the sum is < 1e-6);
    ``sums``: the sums of squares when already known (from :func:`_select_`)."""
    n = max(flats[0].numel(), 1)
    omega = [s / n for s in (sums if sums is not None else _energy_sums(flats))]
    total = sum(omega)
    if abs(total) < 1e-6:
        return [1.0 / len(flats)] * len(flats)
    return [w / total for w in omega]


def sce(task: TensorTask) -> torch.Tensor:
    """The SCE merged delta of one tensor; may modify ``task.inputs`` in place."""
    if not task.inputs:
        return torch.zeros_like(task.base)
    xs = _owned(task.inputs)
    flats = [x.view(-1) for x in xs]
    sums = None
    if task.params.select_topk < 1:
        sums = _select_(flats, task.params.select_topk) or [0.0] * len(flats)
    omega = _energy_weights(flats, sums)
    sign_election.energy_merge_(flats, omega)  # steps 2 and 4 on the bit patterns, in place
    return xs[0]


def erase_merge_plain(taus: list[torch.Tensor], omega: list[float]) -> torch.Tensor:
    """Steps 2 and 4 by the definition (a new tensor): sigma = sign(sum_i tau_i) (zero: +),
    m_i = [sign(tau_i) = sigma], sum_i omega_i m_i tau_i / max(sum_i omega_i m_i, 1e-6)."""
    positive = sum(taus[1:], taus[0]) >= 0  # NaN elects the negative sign, as in TIES
    kept = [torch.where(positive, t > 0, t < 0) for t in taus]
    div = sum(k.to(taus[0].dtype) * w for k, w in zip(kept, omega))  # 0 + omega_0 m_0 + ...
    terms = [t * w * k for t, w, k in zip(taus, omega, kept)]  # x * 0 turns inf / NaN into NaN
    mixed = sum(terms[1:], terms[0])
    return mixed / div.clamp(min=1e-6)


register(
    Operator(
        name="sce",
        summary="SCE: select by variance, weights from the task vectors' energy, sign erase",
        spec="mergekit_compat.md M16",
        fn=sce,
        params=(
            Param("select_topk", float, 1.0, "fraction of the non-zero-variance positions kept (1: all)"),
            Param("int8_mask", bool, False, "accepted for mergekit compatibility; no effect (mergekit's mask dtype)"),
        ),
        details="Per tensor: keep the select_topk fraction of positions of largest variance across the "
        "task vectors, weight each task vector by its mean square (normalised), keep the entries agreeing "
        "with sign(sum tau_i) and take their weighted mean. arXiv 2408.07990; mergekit-compatible. "
        "No per-model weights.",
    )
)
