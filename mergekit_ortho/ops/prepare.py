"""Operators split into a prepare and an apply step, so that `merge sweep` (issue 18) can keep what
does not depend on the swept value and redo only the rest.

For a method listed in :data:`PREPARATIONS`, ``prepare(task)`` returns a dict of tensors (so a
result can be stored as safetensors) and reads every parameter except those named in ``skips``;
``apply(task, prepared)`` finishes the merge (it may modify ``prepared`` in place) and returns what
the operator returns. ``apply(task, prepare(task))`` is the operator, bit for bit:

* ``tsv``: the operator *is* ``tsv_apply(tsv_prepare(task))`` (:mod:`.tsv`). prepare: the whole
  lambda = 1 merge in float64 (the weighted mean for non-SVD tensors); apply: times lambda, cast.
  lambda only scales the result (spec widen_corespace.md B2, ``tsv`` row), so the per-task SVDs and
  the two polar SVDs run once per sweep.
* ``core_space``: the operator *is* ``core_space_apply(core_space_prepare(task))``
  (:mod:`.core_space`). prepare: the bases U_ref, V_ref and the merged (isotropized) core M*;
  apply: lambda * M*, folded into factors by one SVD of the small core.
* generalized task arithmetic (``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``, :mod:`.gta`):
  lambda is the last operation of the merge, one float multiply of the merged value (both the
  sign-election kernel and the plain sum multiply by lambda after the division and skip it at 1),
  so prepare is the merge at lambda = 1 and apply multiplies by lambda: the same rounding. Tested
  bit-equal in tests/test_sweep.py. DARE / DELLA masks are seeded by (seed, tensor, model), so
  the prepared merge is deterministic too.

Pure tensor functions: no file I/O here (the cache lives in :mod:`mergekit_ortho.sweep`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import core_space as cs_mod
from . import gta
from . import tsv as tsv_mod
from .registry import Params, TensorTask


@dataclass(frozen=True)
class Preparation:
    """A method's split: ``prepare(task) -> {name: tensor}`` (reads every parameter but ``skips``),
    ``apply(task, prepared) -> the operator's result``."""

    prepare: Callable[[Any], dict[str, torch.Tensor]]
    apply: Callable[[Any, dict[str, torch.Tensor]], Any]
    skips: tuple[str, ...] = ("lambda",)


def _at_lambda_one(task: TensorTask) -> TensorTask:
    params = Params({**task.params, "lambda": 1.0})
    return TensorTask(task.name, task.base, task.inputs, params, task.model_params, task.model_names,
                      task.dtype, task.raw_inputs, task.stats, task.scalars)


def _gta(variant: gta.Variant) -> Preparation:
    def prepare(task: TensorTask) -> dict[str, torch.Tensor]:
        return {"merged": gta.merge(_at_lambda_one(task), variant)}

    def apply(task: TensorTask, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        lam = task.params["lambda"]
        merged = prepared["merged"]
        return merged.mul_(lam) if lam != 1.0 else merged

    return Preparation(prepare, apply)


PREPARATIONS: dict[str, Preparation] = {
    "tsv": Preparation(tsv_mod.tsv_prepare, tsv_mod.tsv_apply),
    "core_space": Preparation(cs_mod.core_space_prepare, cs_mod.core_space_apply),
    **{name: _gta(v) for name, v in gta.VARIANTS.items()},
}


def preparation(method: str) -> Preparation | None:
    """The split of ``method`` (its canonical name), or None when it has none."""
    return PREPARATIONS.get(method)
