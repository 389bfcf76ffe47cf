"""DARE's random drop, in place and chunk by chunk.

Plain formulation (``sparsify.random_drop_plain``): ``u = torch.rand(x.shape, generator=gen)``
(float32), ``y = where(u < density, x, +0)``, divided by density when rescaling. Here the draws
are taken chunk by chunk from the same generator (on the CPU one draw per entry in order, so the
same numbers; elsewhere the chunk is the whole tensor) into one chunk-sized buffer, and the keep
mask is the sign bit of ``u - density``: no full-size draws, mask or result. Bit-equal
(tests/test_kernels.py).
"""
from __future__ import annotations

import torch

from ._chunks import INT_OF, chunk_len


def keep_below_(x: torch.Tensor, u: torch.Tensor, density: float) -> None:
    """x = where(u < density, x, +0) in place, exactly; ``u`` (float32, x's shape, never NaN) is
    overwritten. The comparison is torch's (in float32, against float32(density))."""
    if x.dtype in (torch.float32, torch.float64) and u.dtype == torch.float32:
        # u - d < 0 exactly when u < d (distinct floats never subtract to 0; u == d gives +0), so
        # the sign bit, spread by an arithmetic shift, is an all-ones/all-zeros keep mask
        u.sub_(density)
        mask = u.view(torch.int32).bitwise_right_shift_(31)
        x.view(INT_OF[x.element_size()]).bitwise_and_(mask)  # int32 -1 widens to all ones
    else:
        x.masked_fill_(torch.ge(u, density), 0)


def random_drop_(x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool) -> torch.Tensor:
    """Keep each entry of x (contiguous) iff its draw is < density, divide survivors by density
    when ``rescale``; in place, returns x. density < 1."""
    xf = x.view(-1)
    step = chunk_len(xf)
    u = torch.empty(min(step, xf.numel()), dtype=torch.float32, device=x.device)
    for lo in range(0, xf.numel(), step):
        xc = xf[lo:lo + step]
        uc = torch.rand(xc.shape, generator=gen, dtype=torch.float32, device=x.device, out=u[:xc.numel()])
        keep_below_(xc, uc, density)
        if rescale and density > 0:
            xc.div_(density)
    return x
