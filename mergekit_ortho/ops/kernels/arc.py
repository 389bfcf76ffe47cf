"""Chunked SLERP: the arc's three reductions and the weighted sum, from weights as stored.

Plain formulation (:func:`mergekit_ortho.ops.slerp.slerp_vectors`): with a, b the two tensors as
flat float32 vectors, ``<a, b>``, ``|a|^2``, ``|b|^2`` (:func:`arc_sums`: one float32 dot product
per chunk of ``FOLD_CHUNK`` entries, the chunks' sums in float64), then ``a * w0 + w1 * b``.

:func:`slerp_fold` computes the same from the weights as stored, in two passes over
``FOLD_CHUNK``-entry chunks (cache-sized; no full-size float32 copy of either input):

1. each chunk of a is converted straight into the float32 output (a's only conversion), b's
   into one chunk buffer, and the chunk's three dot products are taken there;
2. once the coefficients are known, each output chunk becomes ``chunk * w0 + w1 * b`` with b's
   chunk converted again (the same elementwise operations as the plain form).

With ``out_dtype`` (a full model's output, bf16 say) the result is formed per chunk in a chunk
buffer and stored into the output in that dtype (a converted a second time): no full-size
float32 tensor at all, the bits of the float32 result's cast.

Bit-equal to the plain form (tests/test_kernels_arc.py).

Threads: each pass runs with torch on one thread per range of chunks
(:func:`._chunks.over_ranges`; one range unless an item runs alone in the executor's lanes). MKL's dot product
is multi-threaded from 2^13 entries on, and then its result depends on the thread count (the
same chunk summed by 1 and 2 threads differs in the last bits), and each of the ~9 ops a chunk
took on several threads was a parallel region that, on shared cores, waits for a descheduled
thread: at load 5-12 on the 2-core dev box the old 2-thread fold took 2-8 s on a 32000 x 1024
bf16 tensor, this one 0.2-0.3 s. On one thread the coefficients, hence the output, are the same
whatever ``merge --threads`` says; the passes are memory-bound, so one core loses little.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import convert
from .convert import converted_chunks
from ._chunks import over_ranges
from .threads import serial

if TYPE_CHECKING:
    import torch


def _step(x: "torch.Tensor", chunk: int | None) -> int:
    n = x.numel()
    return max(1, min(n, chunk or convert.FOLD_CHUNK) if x.device.type == "cpu" else n)


def _dots(va: "torch.Tensor", vb: "torch.Tensor") -> tuple[float, float, float]:
    import torch

    return float(torch.dot(va, vb)), float(torch.dot(va, va)), float(torch.dot(vb, vb))


def arc_sums(a: "torch.Tensor", b: "torch.Tensor", dtype: "torch.dtype",
             chunk: int | None = None) -> tuple[float, float, float]:
    """(<a, b>, |a|^2, |b|^2) of a and b in ``dtype``, chunk by chunk: each chunk's dot products
    in ``dtype`` on one thread, their sum in float64 (Python floats)."""
    dot = aa = bb = 0.0
    step = _step(a, chunk)
    with serial():
        for (_, _, va), (_, _, vb) in zip(converted_chunks(a, dtype, chunk=step), converted_chunks(b, dtype, chunk=step)):
            d, x, y = _dots(va, vb)
            dot, aa, bb = dot + d, aa + x, bb + y
    return dot, aa, bb


def slerp_fold(a: "torch.Tensor", b: "torch.Tensor", weights: Callable[[float, float, float], tuple[float, float]],
               dtype: "torch.dtype", chunk: int | None = None, out_dtype: "torch.dtype | None" = None,
               name: str = "") -> "torch.Tensor":
    """A tensor of a's shape: ``a * w0 + w1 * b`` with ``(w0, w1) = weights(<a, b>, |a|^2,
    |b|^2)``, the sums as :func:`arc_sums` takes them; a and b (same shape, any float dtype)
    converted chunk by chunk, rounded as ``a.to(dtype).mul(w0).add_(b.to(dtype), alpha=w1)``.
    ``out_dtype``: each chunk is stored straight into a tensor of that dtype (values beyond its
    range refused as :func:`mergekit_ortho.dtypes.cast_checked` refuses them, ``name`` in the
    message), else the result is in ``dtype``."""
    import torch

    from ... import buffers
    from .convert import store_checked_

    out = buffers.empty(a.shape, out_dtype or dtype, device=a.device)
    o, af, bf = out.view(-1), a.reshape(-1), b.reshape(-1)
    n = o.numel()
    step = _step(o, chunk)
    direct_out = out.dtype == dtype  # the result is formed in the output itself

    def buffers_for(a0: int, a1: int):  # chunk buffers of one range (None: not needed)
        m = min(step, a1 - a0)
        return (None if direct_out else torch.empty(m, dtype=dtype, device=a.device),
                None if bf.dtype == dtype else torch.empty(m, dtype=dtype, device=a.device))

    def chunks(a0: int, a1: int):
        a_buf, b_buf = buffers_for(a0, a1)
        for lo in range(a0, a1, step):
            hi = min(lo + step, a1)
            vb = bf[lo:hi] if b_buf is None else b_buf[:hi - lo].copy_(bf[lo:hi])
            yield lo, hi, (o[lo:hi] if direct_out else a_buf[:hi - lo]), vb

    def dots(a0: int, a1: int) -> list[tuple[float, float, float]]:
        out_ = []
        for lo, hi, va, vb in chunks(a0, a1):
            # formed in the output: a's chunk converted there once, for both passes
            va = va.copy_(af[lo:hi]) if direct_out or af.dtype != dtype else af[lo:hi]
            out_.append(_dots(va, vb))
        return out_

    def mix(a0: int, a1: int) -> None:
        for lo, hi, va, vb in chunks(a0, a1):
            if direct_out:  # a's converted chunk is there from the first pass
                va.mul_(w0).add_(vb, alpha=w1)
            else:
                store_checked_(o[lo:hi], va.copy_(af[lo:hi]).mul_(w0).add_(vb, alpha=w1), name)

    # both passes' chunks are independent: split over the workers when an item runs alone, each
    # range on one thread; the chunks' dot products are added in chunk order (the same sums)
    dot = aa = bb = 0.0
    for part in over_ranges(dots, n, step):
        for d, x, y in part:
            dot, aa, bb = dot + d, aa + x, bb + y
    w0, w1 = weights(dot, aa, bb)
    over_ranges(mix, n, step)
    return out
