"""MagMax's selection step in place, chunk by chunk.

Plain formulation: ``sel = torch.where(tau.abs() >= sel.abs(), tau, sel)`` with tau the model
input as :func:`.convert.fold_input` gives it; it allocates |tau|, |sel|, the mask and the result
(and, for raw weights, the task vector) at full size. Bit-equal (tests/test_kernels.py).
"""
from __future__ import annotations

from typing import Any

import torch

from .convert import fold_input_chunks


def keep_larger_magnitude_(sel: torch.Tensor, x: torch.Tensor, task: Any) -> torch.Tensor:
    """sel = where(|tau| >= |sel|, tau, sel) in place ('>=': the later model wins ties, A9.2),
    tau being model input x, chunk by chunk through cache-sized buffers: no full-size |tau|,
    |sel|, mask, result (the plain form allocates all four) or, for raw weights, task vector."""
    s = sel.view(-1)
    buffers = None
    for lo, hi, v in fold_input_chunks(x, task):
        if v.dtype != s.dtype:
            v = v.to(s.dtype)
        part = s[lo:hi]
        if buffers is None or buffers[0].numel() < hi - lo:
            buffers = (torch.empty_like(part), torch.empty_like(part),
                       torch.empty(hi - lo, dtype=torch.bool, device=part.device))
        a, b, take = (t[:hi - lo] for t in buffers)
        torch.ge(torch.abs(v, out=b), torch.abs(part, out=a), out=take)
        torch.where(take, v, part, out=part)
    return sel
