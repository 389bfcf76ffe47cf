"""MagMax (max-magnitude selection of task vectors) and the random-mix baseline.

Spec: ../shared/specs/magmax_opcm_baselines.md Part A (MagMax: A2 math, A4 defaults, A9 pitfalls),
C4 (random mix) and D1 (golden numbers); defaults from "Design decisions for this toolkit".

``magmax`` (reads task vectors tau_i = theta_i - theta_0, one tensor at a time):

* ``selection: magnitude`` (default): per element keep the tau_i entry with the largest |.|,
  *sign included* (A9.3), computed as the reference's fold
  ``m_1 = tau_1; m_i = where(|tau_i| >= |m_{i-1}|, tau_i, m_{i-1})`` so that ties go to the LATER
  model (A9.2; a naive ``argmax`` would keep the first). Merged delta = lambda * m, lambda applied
  once after selection (A9.4). Every tensor shape goes through the same elementwise rule (A5).
* ``selection: random``: the paper's random-mix baseline (C4): each element is taken from a
  uniformly chosen model. Computed as reservoir sampling of size 1 -- at step t (t >= 2) each
  element is replaced by tau_t with probability exactly 1/t, drawn as ``randint(0, t) == 0`` --
  which gives the uniform distribution of C4 (not the reference's RNG stream, a documented design
  decision). The draws come from ``registry.generator(seed, tensor name + step)`` so a tensor's result
  does not depend on the order tensors are processed in, nor on a restart between steps; on a CUDA tensor the generator lives on that
  device, whose stream differs from the CPU one.
* ``lambda`` defaults to ``None`` = "operator decides": 0.5 for ``magnitude`` (A4), 1.0 for
  ``random`` (A4 / C6).

Both forms are a fold over the models, so the operator has an exact :class:`Fold` (one model
tensor in memory at a time, memory O(1) in the number of models); ``fn`` runs that same fold over
``task.inputs``, so batch and streaming results are bit-identical, random draws included.
"""
from __future__ import annotations

import torch

from .kernels import select
from .errors import NoInputs, ShapeMismatch
from .kernels.convert import fold_input
from .registry import Fold, Operator, Param, Params, TensorTask, generator, register

DEFAULT_LAMBDA = {"magnitude": 0.5, "random": 1.0}


def resolved_lambda(params: Params) -> float:
    """The scale actually applied: the recipe's ``lambda``, else the selection's default."""
    lam = params["lambda"]
    return DEFAULT_LAMBDA[params.selection] if lam is None else float(lam)


def _start(task: TensorTask) -> None:
    return None


def _step(sel: torch.Tensor | None, x: torch.Tensor, i: int, task: TensorTask) -> torch.Tensor:
    """Fold model i (0-based) into the running selection. The state is the selection tensor
    alone, so a continual-merging state can persist it between processes."""
    if sel is None:  # x is ours (see Fold): it becomes the state
        return fold_input(x, task)
    if sel.shape != x.shape:
        raise ShapeMismatch(
            f"magmax: tensor '{task.name}' has shape {tuple(x.shape)} in model {i}, expected {tuple(sel.shape)}"
        )
    if task.params.selection == "random":
        # step t = i + 1 replaces with probability 1/t; one generator per (seed, tensor, step) so
        # neither tensor order nor a process restart between steps changes the draws
        x = fold_input(x, task)
        gen = generator(task.params.seed, f"{task.name}\x00{i}", device=x.device)
        take = torch.randint(0, i + 1, x.shape, generator=gen, dtype=torch.int32, device=x.device) == 0
        return torch.where(take, x.to(sel.dtype), sel)
    # where(|tau| >= |sel|, tau, sel) ('>=': the later model wins ties, A9.2), in place
    return select.keep_larger_magnitude_(sel, x, task)


def _finish(sel: torch.Tensor | None, task: TensorTask) -> torch.Tensor:
    if sel is None:
        raise NoInputs(f"magmax: no input models for tensor '{task.name}'")
    lam = resolved_lambda(task.params)
    out = sel
    if lam != 1.0:
        out = out.mul_(lam)
    return out


def _selects_by_magnitude(params: Params) -> bool:
    # the random selection draws per tensor, so its result depends on the tensor as a whole
    return params.selection == "magnitude"


def magmax(task: TensorTask) -> torch.Tensor:
    """Merged delta lambda * select(tau_1..tau_T) for one tensor (A2 / C4). The inputs are not
    modified (the fold works on a copy of the first)."""
    state = _start(task)
    for i, x in enumerate(task.inputs):
        state = _step(state, x.clone() if i == 0 else x, i, task)
    return _finish(state, task)


register(
    Operator(
        name="magmax",
        summary="MagMax: per element keep the largest-magnitude task-vector entry, times lambda",
        spec="magmax_opcm_baselines.md A2-A9, C4, D1",
        fn=magmax,
        params=(
            Param(
                "lambda",
                float,
                None,
                "scale applied once to the selected task vector (default: 0.5 for magnitude, 1.0 for random)",
            ),
            Param(
                "selection",
                str,
                "magnitude",
                "magnitude: largest |tau_i| per element, later model wins ties (MagMax); "
                "random: uniformly chosen model per element (random-mix baseline)",
                choices=("magnitude", "random"),
            ),
            Param("seed", int, 0, "random selection only; draws depend on (seed, tensor name)"),
        ),
        fold=Fold(_start, _step, _finish, raw_weights=True),
        elementwise=_selects_by_magnitude,
        details="theta = theta_0 + lambda * tau_sel. magnitude: tau_sel[j] = tau_{i*}[j] with "
        "i* = the LAST argmax_i |tau_i[j]| (sign kept; fold m = where(|tau_i| >= |m|, tau_i, m)). "
        "random: tau_sel[j] = tau_i[j] for i uniform per element, drawn by reservoir sampling "
        "(replace with probability 1/t at step t) from a generator seeded by (seed, tensor name, step). "
        "lambda defaults to 0.5 (magnitude, MagMax paper/code) or 1.0 (random mix, reference "
        "scripts). Elementwise on every float tensor of any shape; streams one model at a time "
        "with results identical to the batch form.",
    )
)
