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

import torch

from ._chunks import INT_OF, chunk_len


def disjoint_merge_(flats: list[torch.Tensor], weights: list[float], normalize: bool, lam: float) -> torch.Tensor:
    """The TIES merge of the weighted task vectors ``flats`` (contiguous 1-D, one dtype, owned:
    all are overwritten); returns ``flats[0]``, which holds the result."""
    mixed = flats[0]
    n = mixed.numel()
    step = chunk_len(mixed)
    itype = INT_OF[mixed.element_size()]
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
