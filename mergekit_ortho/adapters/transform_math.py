"""Shared helpers for the base-dependent adapter types (DoRA, OFT/BOFT/HRA, IA3).

Spec: ../shared/specs/adapters.md P2, P5-P8, P14-P16, P18. These types are transforms W0 -> W';
each ``materialise`` returns W' - W0 in float32 in the base's layout. The maths is done in float64
(rotations and norms of float32 inputs), so that a delta that is small against W0 keeps its digits.

``fail(hp, message)``: the one-line ``UserError`` naming the module.
``flat(W)``: ``W.reshape(out, -1)`` (conv ``[out, in, kh, kw]`` -> ``[out, in*kh*kw]``).
``cayley(S, order)``: per-block exact Cayley transform of skew-symmetric blocks ``[n, b, b]``:
``order="minus_plus"`` gives (I - S)(I + S)^-1, ``order="plus_minus"`` gives (I + S)(I - S)^-1
(the two are each other's transpose and inverse).
``block_diag(blocks)``: ``[n, b, b]`` -> the ``[n*b, n*b]`` block-diagonal matrix.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import UserError


def module_name(hp: Mapping[str, Any]) -> str:
    return str(hp.get("module") or "<module>")


def fail(hp: Mapping[str, Any], message: str) -> UserError:
    """The error to raise for a module whose stored tensors do not fit its base (one line)."""
    return UserError(f"{module_name(hp)}: {message}".replace("\n", " "))


def f64(t):
    import torch

    return torch.as_tensor(t).to(torch.float64)


def flat(w):
    return w.reshape(w.shape[0], -1)


def require(tensors: Mapping[str, Any], role: str, hp: Mapping[str, Any]):
    if role not in tensors or tensors[role] is None:
        raise fail(hp, f"the stored tensor {role!r} is missing")
    return f64(tensors[role])


def require_base(base, hp: Mapping[str, Any], name: str, min_dim: int = 2):
    if base is None:
        raise fail(hp, f"{name} depends on the base weight W0; pass base: so that it can be materialised")
    w = f64(base)
    if w.dim() < min_dim:
        raise fail(hp, f"{name} needs a weight of at least {min_dim} dimensions, the base has shape {tuple(w.shape)}")
    return w


def cayley(s, order: str):
    """Exact Cayley transform of each skew-symmetric block of ``s`` ``[n, b, b]`` (float64)."""
    import torch

    eye = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    if order == "minus_plus":  # (I - S)(I + S)^-1  ==  solve from the right
        return torch.linalg.solve(eye + s, eye - s, left=False)
    if order == "plus_minus":  # (I + S)(I - S)^-1
        return torch.linalg.solve(eye - s, eye + s, left=False)
    raise ValueError(order)


def block_diag(blocks):
    import torch

    return torch.block_diag(*blocks.unbind(0)) if blocks.shape[0] else torch.zeros(0, 0, dtype=blocks.dtype)


def as_delta(new_w, base):
    """W' - W0 in float32 with the base's shape."""
    import torch

    return (new_w.reshape(base.shape) - f64(base)).to(torch.float32)
