"""Fused MoE expert stacks as the separate linear maps they hold, for the matrix (SVD) methods.

transformers 5 holds a layer's experts as one 3-D tensor (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]; gate then up along dim 1, the rule of
:mod:`mergekit_ortho.experts`), published checkpoints as one 2-D weight per expert and part
(``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``). Each expert's part is its own linear
map, so a method whose rule is a function of a matrix (its SVD: ``tsv``, ``opcm``'s projection)
must treat the stack as E * parts matrices, one SVD each, not as one [E, rest] or [d1, E*d2]
matrix. :func:`blocks` names the matrices of a stack, :func:`per_matrix` applies a rule to every
one of them and writes the results back into the stack's shape. The rule sees exactly the
matrices (values, shapes, dtype, contiguous) the per-expert 2-D layout gives it, so the fused
layout's result equals the per-expert layout's bit for bit. One call per matrix: torch's batched
SVD on the CPU runs the same per-matrix LAPACK call, so batching would buy nothing there while
giving up bit equality with the 2-D layout. Issue 15.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def blocks(name: str, shape: Sequence[int]) -> list[tuple[int, slice]] | None:
    """[(expert, rows of dim 1)] for each per-expert matrix of a fused expert stack ``name``
    [E, d1, d2], in expert-then-part order; None for any other tensor."""
    from ..experts import FUSED, _fused_parts

    if len(shape) != 3:
        return None
    parts = _fused_parts(name)
    if parts is None:
        return None
    n = len(FUSED[parts[1]][0])
    E, rows = int(shape[0]), int(shape[1])
    if E < 1 or rows % n:
        return None
    h = rows // n
    return [(e, slice(p * h, (p + 1) * h)) for e in range(E) for p in range(n)]


def matrix_shape(name: str, shape: Sequence[int]) -> tuple[int, int] | None:
    """The shape of each per-expert matrix of a fused stack (None: not a stack)."""
    b = blocks(name, shape)
    if b is None:
        return None
    rs = b[0][1]
    return rs.stop - rs.start, int(shape[2])


def per_matrix(rule: Callable[[list[torch.Tensor]], torch.Tensor], stacks: Sequence[torch.Tensor],
               where: list[tuple[int, slice]], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``rule`` (T matrices -> one) applied to each per-expert matrix of T equal-shape stacks;
    the results assembled in the stacks' shape (``dtype``: the result's, default the first
    rule output's). Inputs are not modified."""
    out = None
    for e, rows in where:
        got = rule([x[e, rows].contiguous() for x in stacks])
        if out is None:
            out = torch.empty(stacks[0].shape, dtype=dtype or got.dtype, device=got.device)
        out[e, rows] = got
    return out


def project_stack(name: str, tbar: torch.Tensor, tau: torch.Tensor, project) -> tuple[torch.Tensor, list]:
    """``project(tbar_m, tau_m) -> (P(tau_m), info)`` per matrix of a stack (opcm's projection):
    the assembled P(tau) and the infos in block order."""
    if tbar.shape != tau.shape:
        raise ValueError(f"opcm: project needs two tensors of one shape, got {tuple(tbar.shape)} and {tuple(tau.shape)}")
    infos: list = []

    def rule(pair: list[torch.Tensor]) -> torch.Tensor:
        out, info = project(pair[0], pair[1])
        infos.append(info)
        return out

    return per_matrix(rule, [tbar, tau], blocks(name, tuple(tau.shape)), tau.dtype), infos
