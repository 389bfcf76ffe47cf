"""SLERP: spherical linear interpolation between the base and one model.

Spec: ../shared/specs/mergekit_compat.md M17 (mergekit's ``slerp``, golden numbers from mergekit).

Each tensor is one flat vector. v0 is the base (t = 0 gives the base), v1 the other model:

    c = <v0/|v0|, v1/|v1|> clamped to [-1, 1]   (a norm <= 1e-8 counts as 1)
    |c| > 0.9995 (colinear or antipodal):  (1 - t) v0 + t v1
    otherwise, theta = acos c:             (sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta

on the un-normalised vectors. A zero vector gives c = 0, so theta = pi/2 and the result is
sin(t pi/2) v1, not a lerp (mergekit's behaviour, kept). ``t`` is not clamped. Norms and
coefficients are computed in float32 (float64 for float64 inputs), as mergekit does.

Reads weights, needs the base (it is one end of the arc) and exactly one other model; a recipe
that lists the base among its models (mergekit's style) works too, the base is not counted twice.
"""
from __future__ import annotations

import math

import torch

from .errors import ShapeMismatch
from .registry import Operator, Param, TensorTask, register

#: |cos| above which the two directions count as colinear and slerp falls back to lerp (mergekit)
COLINEAR = 0.9995
#: norms at or below this are replaced by 1 (mergekit's guard against dividing by zero)
TINY_NORM = 1e-8


def slerp_vectors(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """The spherical interpolation of two tensors seen as flat vectors (same shape)."""
    if v0.shape != v1.shape:
        raise ShapeMismatch(f"slerp: tensors of shapes {tuple(v0.shape)} and {tuple(v1.shape)}")
    cdt = torch.float64 if torch.float64 in (v0.dtype, v1.dtype) else torch.float32
    a, b = v0.to(cdt).reshape(-1), v1.to(cdt).reshape(-1)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na, nb = (na if na > TINY_NORM else 1.0), (nb if nb > TINY_NORM else 1.0)
    c = min(1.0, max(-1.0, float(torch.dot(a, b)) / (na * nb)))
    if abs(c) > COLINEAR:
        w0, w1 = 1.0 - t, t
    else:
        theta = math.acos(c)
        s = math.sin(theta)
        w0, w1 = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    return a.mul(w0).add_(b, alpha=w1).reshape(v0.shape)  # one full-size buffer, not two


def slerp(task: TensorTask) -> torch.Tensor:
    (model,) = task.inputs  # the plan guarantees one model besides the base (Operator.model_count)
    return slerp_vectors(task.base, model, task.params.t)


register(
    Operator(
        name="slerp",
        summary="Spherical interpolation from the base (t = 0) to one model (t = 1)",
        spec="mergekit_compat.md M17",
        fn=slerp,
        reads="weights",
        needs_base=True,
        model_count=1,
        params=(Param("t", float, help="position on the arc: 0 gives the base, 1 the model (not clamped)"),),
        details="Each tensor is one flat vector; c = cos of the angle between base and model "
        "(norms <= 1e-8 count as 1). |c| > 0.9995: (1-t) base + t model; else "
        "(sin((1-t) theta) base + sin(t theta) model) / sin theta, theta = acos c. Norms and "
        "coefficients in float32. mergekit-compatible (its classic slerp, scalar t).",
    )
)
