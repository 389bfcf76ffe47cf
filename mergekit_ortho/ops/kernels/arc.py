"""Chunked SLERP: the arc's three reductions and the weighted sum, from weights as stored.

Plain formulation (:func:`mergekit_ortho.ops.slerp.slerp_vectors`): with a, b the two tensors as
flat float32 vectors, ``<a, b>``, ``|a|^2``, ``|b|^2``, then ``w0 a + w1 b``. Here both tensors
are converted ``FOLD_CHUNK`` entries at a time into cache-sized buffers (bf16 in, no full-size
float32 copy of either), the three float32 dot products of each chunk are summed in float64
(:func:`arc_sums`, which the plain form uses too, so both see the same coefficients), and the
result is written straight into one float32 output (:func:`weighted_pair`). The elementwise
arithmetic is the plain form's (``a * w0``, then ``+ w1 * b``), so the outputs are bit-equal
(tests/test_kernels_arc.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .convert import converted_chunks

if TYPE_CHECKING:
    import torch


def arc_sums(a: "torch.Tensor", b: "torch.Tensor", dtype: "torch.dtype",
             chunk: int | None = None) -> tuple[float, float, float]:
    """(<a, b>, |a|^2, |b|^2) of a and b in ``dtype``, chunk by chunk: each chunk's dot products
    in ``dtype``, their sum in float64 (Python floats)."""
    import torch

    dot = aa = bb = 0.0
    for (_, _, va), (_, _, vb) in zip(converted_chunks(a, dtype, chunk=chunk), converted_chunks(b, dtype, chunk=chunk)):
        dot += float(torch.dot(va, vb))
        aa += float(torch.dot(va, va))
        bb += float(torch.dot(vb, vb))
    return dot, aa, bb


def weighted_pair(a: "torch.Tensor", b: "torch.Tensor", w0: float, w1: float, dtype: "torch.dtype",
                  chunk: int | None = None) -> "torch.Tensor":
    """A new tensor of a's shape in ``dtype``: ``a * w0 + w1 * b`` (a and b converted chunk by
    chunk, rounded as ``a.to(dtype).mul(w0).add_(b.to(dtype), alpha=w1)``)."""
    import torch

    out = torch.empty(a.shape, dtype=dtype, device=a.device)
    o = out.view(-1)
    for (lo, hi, va), (_, _, vb) in zip(converted_chunks(a, dtype, chunk=chunk), converted_chunks(b, dtype, chunk=chunk)):
        torch.mul(va, w0, out=o[lo:hi]).add_(vb, alpha=w1)
    return out
