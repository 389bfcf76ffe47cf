"""RAM and RAM+ (tensor-local): keep each model's unique changes, average where models overlap.

Spec: ../shared/specs/mergekit_compat.md M25 (mergekit's ``ram`` and ``ramplus_tl``, golden
numbers from mergekit 0.1.5); paper: "Reinforced Agent Merging" (arXiv 2601.13572).
mergekit-compatible.

Task vectors tau_i = theta_i - theta_0. Entry j of tau_i is *active* where |tau_i[j]| > epsilon;
c[j] is the number of models active at j.

* ``ram``: merged tau[j] = sum of the active tau_i[j] / max(c[j], 1): the one active value where
  c = 1, the mean of the active values where c > 1, 0 where c = 0.
* ``ramplus_tl``: per model i, s_i = its active entries with c > 1 (shared), u_i = those with
  c = 1 (unique), rho_i = s_i / max(u_i, epsilon), lambda_i = 1 + r clamp(rho_i, 0, alpha). Its
  unique entries are multiplied by lambda_i; shared entries are averaged as in ``ram``.

Streaming. ``ram`` folds one model at a time: the state is the running sum of active entries and
the per-entry count (two tensors, which continual merging stores as the fold's ``parts``).
``ramplus_tl``'s lambda_i needs c over every model before model i's unique entries are known, so
its fold has a ``gather`` pre-pass that counts c; the second pass adds each model's weighted
active entries. Either way memory is one input plus two full-size accumulators. The direct
forms run these very folds, so fold and direct form agree bit for bit.

Deviation from mergekit, rounding only: where c > 1 the active values are summed and then divided
by c (mergekit divides each by c and then sums). lambda_i is computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShapeMismatch
from .registry import Fold, Operator, Param, StateParts, TensorTask, register


def _active(x: torch.Tensor, task: TensorTask) -> torch.Tensor:
    return x.abs() > task.params.epsilon


def _check(shape: torch.Size, x: torch.Tensor, i: int, task: TensorTask) -> None:
    if x.shape != shape:
        raise ShapeMismatch(f"ram: tensor '{task.name}' has shape {tuple(x.shape)} in model {i}, "
                            f"expected {tuple(shape)}")


@dataclass
class _Sum:
    total: torch.Tensor  # sum of the active entries (weighted by lambda_i for ramplus_tl)
    count: torch.Tensor  # int32, models active per entry (ram: so far; ramplus_tl: from the gather)


def _start(task: TensorTask) -> None:
    return None


def _finish(state: _Sum | None, task: TensorTask) -> torch.Tensor:
    if state is None:  # the base alone gives the base (mergekit)
        return torch.zeros_like(task.base)
    return state.total.div_(state.count.clamp(min=1))


# -- ram: sum and count fold together ---------------------------------------------------------------


def _ram_step(state: _Sum | None, x: torch.Tensor, i: int, task: TensorTask) -> _Sum:
    active = _active(x, task)
    x = x.mul_(active)  # x is ours (see Fold); NaN stays NaN, as in mergekit
    if state is None:
        return _Sum(x, active.to(torch.int32))
    _check(state.total.shape, x, i, task)
    state.total.add_(x)
    state.count.add_(active)
    return state


def _fold_all(fold: Fold, task: TensorTask) -> torch.Tensor:
    """The direct form: the fold over ``task.inputs`` (gather first, if any)."""
    if fold.gather is not None:
        stats = None
        for i, x in enumerate(task.inputs):
            stats = fold.gather(stats, x, i, task)
        task.stats = stats
    state = fold.start(task)
    for i, x in enumerate(task.inputs):
        state = fold.step(state, x, i, task)
    return fold.finish(state, task)


def ram(task: TensorTask) -> torch.Tensor:
    return _fold_all(RAM_FOLD, task)


# -- ramplus_tl: count first (gather), then weigh each model's unique entries ------------------------


def _count(stats: torch.Tensor | None, x: torch.Tensor, i: int, task: TensorTask) -> torch.Tensor:
    active = _active(x, task)  # x is read, not modified: the second pass reads it again
    if stats is None:
        return active.to(torch.int32)
    _check(stats.shape, x, i, task)
    return stats.add_(active)


def unique_scale(shared: int, unique: int, r: float, alpha: float, epsilon: float) -> float:
    """lambda_i = 1 + r clamp(s_i / max(u_i, epsilon), 0, alpha)."""
    rho = shared / max(unique, epsilon)
    return 1.0 + r * min(max(rho, 0.0), alpha)


def _plus_step(state: _Sum | None, x: torch.Tensor, i: int, task: TensorTask) -> _Sum:
    count = task.stats
    p = task.params
    active = _active(x, task)
    unique = active & (count == 1)
    n_unique = int(unique.sum())
    n_shared = int(active.sum()) - n_unique
    lam = unique_scale(n_shared, n_unique, p.r, p.alpha, p.epsilon)
    x = x.mul_(active)
    if lam != 1.0 and n_unique:
        x[unique] *= lam
    if state is None:
        return _Sum(x, count)
    state.total.add_(x)
    return state


def ramplus_tl(task: TensorTask) -> torch.Tensor:
    return _fold_all(PLUS_FOLD, task)


def _layout(shape: tuple[int, ...], params) -> dict[str, tuple[tuple[int, ...], str]]:
    return {"total": (tuple(shape), "float32"), "count": (tuple(shape), "int32")}


def _pack(state: _Sum) -> dict[str, torch.Tensor]:
    return {"total": state.total, "count": state.count}


def _unpack(parts: dict[str, torch.Tensor], task: TensorTask) -> _Sum:
    return _Sum(parts["total"], parts["count"])


RAM_FOLD = Fold(_start, _ram_step, _finish, parts=StateParts(_layout, _pack, _unpack))
PLUS_FOLD = Fold(_start, _plus_step, _finish, gather=_count)

_EPSILON = Param("epsilon", float, 1e-5, "an entry of a task vector is active where |tau| > epsilon", minimum=0.0)

register(
    Operator(
        name="ram",
        summary="RAM: each model's unique changes kept, overlapping changes averaged",
        spec="mergekit_compat.md M25, M6, M13",
        fn=ram,
        reads="deltas",
        needs_base=True,
        params=(_EPSILON,),
        fold=RAM_FOLD,
        details="Active: |tau_i| > epsilon; c = number of models active per entry. Merged tau = "
        "sum of the active tau_i / max(c, 1): the single active value where c = 1, their mean where "
        "c > 1, 0 where none. Needs the base; a base alone gives the base. Streams one model at a "
        "time (sum and count), so continual merging takes it. "
        "mergekit-compatible; paper arXiv 2601.13572.",
    )
)

register(
    Operator(
        name="ramplus_tl",
        summary="RAM+ (tensor-local): RAM with each model's unique changes scaled up by its overlap ratio",
        spec="mergekit_compat.md M25, M6, M13",
        fn=ramplus_tl,
        reads="deltas",
        needs_base=True,
        params=(
            Param("r", float, 0.1, "strength of the unique-entry boost"),
            Param("alpha", float, 0.2, "cap on the shared/unique ratio rho"),
            _EPSILON,
        ),
        fold=PLUS_FOLD,
        details="As ram, and per model i: s_i = its active entries where c > 1, u_i = those where "
        "c = 1, rho_i = s_i / max(u_i, epsilon), lambda_i = 1 + r clamp(rho_i, 0, alpha); its "
        "unique (c = 1) entries are multiplied by lambda_i, overlaps averaged unscaled. Per tensor. "
        "Two passes over the models (counts first), so no continual merging. mergekit-compatible.",
    )
)
