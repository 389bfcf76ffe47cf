"""Passthrough: the single input, optionally scaled.

Spec: ../shared/specs/mergekit_compat.md M24 (mergekit's ``passthrough``), M6 (its input
contract) and M13 (its parameter). mergekit-compatible.

The one input theta_1, times ``scale`` when the model's ``scale`` is set (per model, so it
takes every form a per-model parameter takes); ``scale`` unset (None, the default) returns the
input unchanged. mergekit uses it for frankenmerges (M7), one source per slice.

Input contract: reads weights, needs no base, and the base is an ordinary input
(``base_input``): a ``models:`` recipe with a ``base_model`` therefore has two inputs and is
refused, as mergekit refuses it ("requires exactly 1 inputs ... got 2").
"""
from __future__ import annotations

import torch

from .registry import Operator, Param, TensorTask, register


def passthrough(task: TensorTask) -> torch.Tensor:
    (x,) = task.inputs  # the plan guarantees exactly one input (Operator.model_count)
    scale = task.model_params[0].scale
    return x if scale is None else x.mul_(scale)  # the input is ours (see Fold)


register(
    Operator(
        name="passthrough",
        summary="The single input model's tensors, optionally times a per-model scale",
        spec="mergekit_compat.md M24, M6, M13",
        fn=passthrough,
        reads="weights",
        needs_base=False,
        base_input=True,
        model_count=1,
        model_params=(Param("scale", float, None, "multiply the tensor by this (unset: unchanged)"),),
        details="theta = scale * theta_1 (scale unset: theta_1 as it is). Exactly one input: a "
        "base_model in a models: recipe counts as a second input and is refused (mergekit's rule). "
        "mergekit-compatible; its use is frankenmerges (one source per slice).",
    )
)
