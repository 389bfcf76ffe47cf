"""Chunked dtype conversion of fold inputs.

Plain formulation: ``v = x.to(dtype)``, minus ``base.to(dtype)`` for the raw weights of a deltas
method (:func:`fold_input` does exactly that). The chunked forms convert ``FOLD_CHUNK`` entries
at a time into one cache-sized buffer, so no full-size converted copy of a weight, of the base or
of a task vector is allocated (two fp32 tensors less at peak for a bf16 model), and a mixed-dtype
``add_`` (about 3x slower on CPU) never runs. Same values (tests/test_kernels.py).

torch is imported inside the functions: ``registry`` imports this module, and ``merge --help``
must not pay for torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from ... import buffers

if TYPE_CHECKING:
    import torch

FOLD_CHUNK = 1 << 18  # entries a fold prepares at a time (1 MiB of float32: stays in L2)


def fold_input(x: "torch.Tensor", task: Any) -> "torch.Tensor":
    """Model input x as a whole tensor in ``task.dtype`` (x itself when it already is one; it is
    owned by the caller): raw weights of a deltas method also have the base subtracted."""
    v = x if task.dtype is None or x.dtype == task.dtype else buffers.like(x, task.dtype)
    return v if not task.raw_inputs or task.base is None else add_converted_(v, task.base, -1.0)


def add_converted_(acc: "torch.Tensor", x: "torch.Tensor", alpha: float = 1.0) -> "torch.Tensor":
    """acc += alpha * x in place, exactly as ``acc.add_(x.to(acc.dtype), alpha=alpha)``, with x
    converted chunk by chunk."""
    if x.dtype == acc.dtype:
        return acc.add_(x, alpha=alpha)
    a = acc.view(-1)
    for lo, hi, v in converted_chunks(x, acc.dtype):
        a[lo:hi].add_(v, alpha=alpha)
    return acc


def store_checked_(dst: "torch.Tensor", src: "torch.Tensor", name: str) -> None:
    """``dst.copy_(src)`` (a chunk of an output in its own dtype), refusing values the cast turns
    into inf as :func:`mergekit_ortho.dtypes.cast_checked` does (one reduction when all is well)."""
    import torch

    dst.copy_(src)
    if dst.dtype != src.dtype and not bool(torch.isfinite(dst.sum())):
        from ...dtypes import cast_checked

        cast_checked(src, dst.dtype, name)


def fold_input_chunks(x: "torch.Tensor", task: Any, chunk: int | None = None):
    """Yield ``(lo, hi, v)`` over the flat entries of model input x, ``chunk`` (default
    ``FOLD_CHUNK``) at a time on CPU, one chunk on other devices: ``v`` holds entries lo..hi as
    :func:`fold_input` would give them, a view of x when nothing needs computing, else one
    reused buffer (valid until the next chunk)."""
    base = task.base if task.raw_inputs else None
    return converted_chunks(x, task.dtype if task.dtype is not None else x.dtype, base, chunk)


def converted_chunks(x: "torch.Tensor", dtype: "torch.dtype", base: "torch.Tensor | None" = None,
                     chunk: int | None = None) -> Iterator[tuple[int, int, "torch.Tensor"]]:
    """Yield ``(lo, hi, v)``: entries lo..hi of ``x.to(dtype) - base.to(dtype)`` (no base: of
    ``x.to(dtype)``), a view of x when nothing needs computing, else one reused buffer."""
    import torch

    flat = x.reshape(-1)
    n = flat.numel()
    base = base.reshape(-1) if base is not None else None
    step = max(1, min(n, chunk or FOLD_CHUNK) if x.device.type == "cpu" else n)
    direct = flat.dtype == dtype and base is None
    buf = None if direct else torch.empty(step, dtype=dtype, device=x.device)
    base_buf = None if base is None or base.dtype == dtype else torch.empty(step, dtype=dtype, device=x.device)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        if direct:
            yield lo, hi, flat[lo:hi]
            continue
        v = buf[:hi - lo].copy_(flat[lo:hi])
        if base is not None:
            v.sub_(base[lo:hi] if base_buf is None else base_buf[:hi - lo].copy_(base[lo:hi]))
        yield lo, hi, v
