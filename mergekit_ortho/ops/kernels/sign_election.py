"""TIES sign election and disjoint mean on the float bit patterns, in place, chunk by chunk.

Plain formulation (``gta.disjoint_merge_plain``): elect sign(sum_i d_i) per entry (a zero
sum counts as positive, a NaN one as negative), keep each d_i only where it is nonzero with that
sign (NaN never), sum the kept entries in model order and, when normalising, divide by the sum
of the kept weights (1 where that is 0); then times lambda. The plain form allocates several
full-size temporaries (sum, masks, divisor) whose page faults cost more than the arithmetic.

Here: flipping the sign bit of d_i where the elected sign is negative gives o_i = |d_i| where
d_i agrees and a value <= 0 (or NaN) where it does not, so ``threshold(o_i, 0, 0)`` (after
NaN -> 0) is exactly the kept magnitude, ``sign(o_i)`` the kept indicator and sum_i o_i the kept
sum's magnitude (the same additions in the same order as the signed sum: rounding is
symmetric), whose sign bit is then set back. Two chunk-sized scratch buffers (the sum / elected
sign bits, the divisor). Bit-identical to the plain form (tests/test_kernels.py) except at an
entry whose inputs hold a NaN and no agreeing value: -0.0 there instead of +0.0.
"""
from __future__ import annotations

import math

import torch

from ._chunks import INT_OF, chunk_len, over_ranges


def disjoint_merge_(flats: list[torch.Tensor], weights: list[float], normalize: bool, lam: float) -> torch.Tensor:
    """The TIES merge of the weighted task vectors ``flats`` (contiguous 1-D, one dtype, owned:
    all are overwritten); returns ``flats[0]``, which holds the result."""
    mixed = flats[0]
    step = chunk_len(mixed)
    over_ranges(lambda a, b: _disjoint_range_(flats, weights, normalize, lam, a, b, step), mixed.numel(), step)
    return mixed


def _disjoint_range_(flats: list[torch.Tensor], weights: list[float], normalize: bool, lam: float, a: int, b: int,
                     step: int) -> None:
    """:func:`disjoint_merge_` on the chunks of entries a..b (whole chunks of ``step``)."""
    mixed = flats[0]
    itype = INT_OF[mixed.element_size()]
    sign_bit = torch.iinfo(itype).min
    inf = float("inf")
    scratch = torch.empty(min(b - a, step), dtype=mixed.dtype, device=mixed.device)
    div_buf = torch.empty_like(scratch) if normalize else None
    positive_weights = all(w > 0 for w in weights)
    for lo in range(a, b, step):
        ds = [f[lo:min(lo + step, b)] for f in flats]
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


def _energy_chunk_plain_(ts: list[torch.Tensor], weights: list[float]) -> None:
    """:func:`energy_merge_` on one chunk by the definition (``sce.erase_merge_plain``): used
    where the chunk's sum is not finite, so that inf and NaN propagate as there (x * 0)."""
    s = ts[0].clone()
    for t in ts[1:]:
        s += t
    positive = s >= 0
    dv = torch.zeros_like(s)
    for i, (t, w) in enumerate(zip(ts, weights)):
        kept = torch.where(positive, t > 0, t < 0)
        dv.add_(kept.to(dv.dtype), alpha=w)
        t.mul_(w).mul_(kept)
        if i:
            ts[0] += t
    ts[0].div_(dv.clamp_(min=1e-6))


def energy_merge_(flats: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """SCE's erase and merge (``sce.erase_merge_plain``): sign elected on the UNweighted sum
    (s >= 0: +), m_i = [sign(t_i) = that sign], result sum_i w_i m_i t_i / max(sum_i w_i m_i,
    1e-6); ``weights`` >= 0. In place on ``flats`` (contiguous 1-D float, owned); returns
    ``flats[0]``.

    Per chunk, as :func:`disjoint_merge_`: o_i = t_i with the sign bit of s flipped in,
    ``threshold(o_i, 0, 0)`` = |t_i| where kept, else 0; w_i |t_i| = |w_i t_i| and the kept
    terms share the elected sign, so the magnitudes' sum with that sign set back is the signed
    sum, bit for bit. A chunk whose sum is not finite (an inf or NaN input, or overflow) takes
    the plain path, and so does every chunk when a weight is not finite. Bit-equal (tests/test_kernels.py) except the sign of a zero result where
    every kept w_i t_i is zero (w_i = 0, or underflow)."""
    mixed = flats[0]
    step = chunk_len(mixed)
    over_ranges(lambda a, b: _energy_range_(flats, weights, a, b, step), mixed.numel(), step)
    return mixed


def _energy_range_(flats: list[torch.Tensor], weights: list[float], a: int, b: int, step: int) -> None:
    """:func:`energy_merge_` on the chunks of entries a..b (whole chunks of ``step``)."""
    mixed = flats[0]
    itype = INT_OF[mixed.element_size()]
    sign_bit = torch.iinfo(itype).min
    scratch = torch.empty(min(b - a, step), dtype=mixed.dtype, device=mixed.device)
    div_buf, kept_buf = torch.empty_like(scratch), torch.empty_like(scratch)
    finite_weights = all(math.isfinite(w) for w in weights)  # a NaN weight (a NaN input): plain
    for lo in range(a, b, step):
        ts = [f[lo:min(lo + step, b)] for f in flats]
        total = scratch[:ts[0].numel()]
        if len(ts) == 1:
            total.copy_(ts[0])
        else:
            torch.add(ts[0], ts[1], out=total)
            for t in ts[2:]:
                total += t
        # one reduction instead of an elementwise check: an inf or NaN anywhere makes the sum
        # non-finite (a finite chunk whose sum overflows takes the plain path too: still exact)
        if not (finite_weights and math.isfinite(float(total.sum()))):
            _energy_chunk_plain_(ts, weights)
            continue
        # finite s: "s >= 0" is a clear sign bit, except s = -0.0, the sum of -0.0s only: no
        # entry agrees either way, and the flipped-in sign gives the plain form's -0.0 result
        flip = total.view(itype).bitwise_and_(sign_bit)
        divisor = div_buf[:ts[0].numel()]
        for i, (t, w) in enumerate(zip(ts, weights)):
            t.view(itype).bitwise_xor_(flip)
            torch.nn.functional.threshold_(t, 0.0, 0.0)  # |t_i| where kept, else +0
            if i == 0:
                torch.sign(t, out=divisor).mul_(w)  # 0 + w_0 m_0, exactly
            else:
                divisor.add_(torch.sign(t, out=kept_buf[:t.numel()]), alpha=w)
            if w != 1.0:
                t.mul_(w)
            if i:
                ts[0] += t
        ts[0].view(itype).bitwise_xor_(flip)
        ts[0].div_(divisor.clamp_(min=1e-6))
