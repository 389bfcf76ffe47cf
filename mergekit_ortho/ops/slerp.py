"""The two-model interpolations between the base and one model: SLERP and NearSwap.

Spec: ../shared/specs/mergekit_compat.md M17 (mergekit's ``slerp``) and M22 (``nearswap``), golden
numbers from mergekit. Both read weights, need the base (one end) and exactly one other model.

SLERP
-----

Each tensor is one flat vector. v0 is the base (t = 0 gives the base), v1 the other model:

    c = <v0/|v0|, v1/|v1|> clamped to [-1, 1]   (a norm <= 1e-8 counts as 1)
    |c| > 0.9995 (colinear or antipodal):  (1 - t) v0 + t v1
    otherwise, theta = acos c:             (sin((1 - t) theta) v0 + sin(t theta) v1) / sin theta

on the un-normalised vectors. A zero vector gives c = 0, so theta = pi/2 and the result is
sin(t pi/2) v1, not a lerp (mergekit's behaviour, kept). ``t`` must lie in [0, 1] (mergekit
extrapolates; here that is refused as the likely typo it is). The dot products are float32
(float64 for float64 inputs) per chunk of 2^18 entries, on one thread (so the same whatever
``merge --threads`` says), summed in float64; the coefficients in float64. The fold streams both
weights as stored in two passes, the base converted straight into the output
(:mod:`.kernels.arc`): no full-size float32 copy of either input, bit-equal to :func:`slerp`.

Reads weights, needs the base (it is one end of the arc) and exactly one other model; a recipe
that lists the base among its models (mergekit's style) works too, the base is not counted twice.

NearSwap
--------
Elementwise, with a the base and b the model (mergekit's formula, kept literally for its rounding):

    omega = clamp(t / max(|a - b|, 1e-6), 0, 1),   result = omega b + (1 - omega) a

which is a + clamp(b - a, -t, t) wherever |a - b| >= 1e-6: an element takes the model's value
where the two are within t of each other, otherwise moves t from the base towards it. Below the
1e-6 guard (and t < 1e-6) it moves t/1e-6 of the gap, never more than t. t <= 0 gives the base.
Computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

from .errors import BadParameters, ShapeMismatch
from .kernels.arc import arc_sums, slerp_fold
from .registry import Fold, Operator, Param, TensorTask, register

#: |cos| above which the two directions count as colinear and slerp falls back to lerp (mergekit)
COLINEAR = 0.9995
#: norms at or below this are replaced by 1 (mergekit's guard against dividing by zero)
TINY_NORM = 1e-8
#: nearswap's floor on |a - b| (mergekit): keeps t / |a - b| finite where the models agree
NEARSWAP_FLOOR = 1e-6


def _arc_weights(dot: float, aa: float, bb: float, t: float) -> tuple[float, float]:
    """(w0, w1) of slerp from <v0, v1>, |v0|^2 and |v1|^2."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > TINY_NORM else 1.0), (nb if nb > TINY_NORM else 1.0)
    c = min(1.0, max(-1.0, dot / (na * nb)))
    if abs(c) > COLINEAR:
        return 1.0 - t, t
    theta = math.acos(c)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def slerp_vectors(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """The spherical interpolation of two tensors seen as flat vectors (same shape). The dot
    products are float32 per chunk, summed in float64 (:func:`.kernels.arc.arc_sums`)."""
    if v0.shape != v1.shape:
        raise ShapeMismatch(f"slerp: tensors of shapes {tuple(v0.shape)} and {tuple(v1.shape)}")
    cdt = _compute_dtype(v0, v1)
    a, b = v0.to(cdt).reshape(-1), v1.to(cdt).reshape(-1)
    w0, w1 = _arc_weights(*arc_sums(a, b, cdt), t)
    return a.mul(w0).add_(b, alpha=w1).reshape(v0.shape)  # one full-size buffer, not two


def slerp(task: TensorTask) -> torch.Tensor:
    (model,) = task.inputs  # the plan guarantees one model besides the base (Operator.model_count)
    return slerp_vectors(task.base, model, task.params.t)


# -- the fold: the same arithmetic from the weights as stored, chunk by chunk (kernels.arc) --------


def _start(task: TensorTask) -> None:
    return None


def _step(state, x: torch.Tensor, i: int, task: TensorTask) -> torch.Tensor:
    if state is not None:
        raise BadParameters(f"slerp: tensor '{task.name}' gets a second model; slerp interpolates between "
                            "the base and exactly one model")
    base = task.base
    if base.shape != x.shape:
        raise ShapeMismatch(f"slerp: tensors of shapes {tuple(base.shape)} and {tuple(x.shape)}")
    t = task.params.t
    return slerp_fold(base, x, lambda dot, aa, bb: _arc_weights(dot, aa, bb, t), _compute_dtype(base, x),
                      out_dtype=task.out_dtype, name=task.name)


def _finish(state, task: TensorTask) -> torch.Tensor:
    if state is None:  # no model besides the base (the plan refuses that): the base
        return task.base.to(_compute_dtype(task.base)).clone()
    return state


register(
    Operator(
        name="slerp",
        summary="Spherical interpolation from the base (t = 0) to one model (t = 1)",
        spec="mergekit_compat.md M17",
        fn=slerp,
        fold=Fold(_start, _step, _finish, raw_weights=True),
        reads="weights",
        needs_base=True,
        model_count=1,
        # mergekit does not check t; outside [0, 1] slerp leaves the arc between the two models,
        # which is a typo far more often than an intent, so it is refused here
        params=(Param("t", float, help="position on the arc: 0 gives the base, 1 the model", minimum=0.0,
                      maximum=1.0),),
        details="Each tensor is one flat vector; c = cos of the angle between base and model "
        "(norms <= 1e-8 count as 1). |c| > 0.9995: (1-t) base + t model; else "
        "(sin((1-t) theta) base + sin(t theta) model) / sin theta, theta = acos c. Norms and "
        "coefficients in float32. mergekit-compatible (its classic slerp, scalar t).",
    )
)


def nearswap_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap of base ``a`` towards model ``b`` (same shape); ``b`` is overwritten (it is the
    operator's own input buffer)."""
    if a.shape != b.shape:
        raise ShapeMismatch(f"nearswap: tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    cdt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(cdt), b.to(cdt)
    if t <= 0:
        return a.clone()  # omega = 0 everywhere: the base (a copy, the base is not ours to hand out)
    omega = torch.sub(a, b).abs_().clamp_(min=NEARSWAP_FLOOR)
    omega.reciprocal_().mul_(t).clamp_(0.0, 1.0)  # t / |a - b| in place, rounded as torch rounds t / x
    out = b.mul_(omega)
    return out.add_(omega.neg_().add_(1.0).mul_(a))  # omega b + (1 - omega) a, as mergekit rounds it


def nearswap(task: TensorTask) -> torch.Tensor:
    (model,) = task.inputs  # one model besides the base (Operator.model_count)
    return nearswap_tensors(task.base, model, task.params.t)


register(
    Operator(
        name="nearswap",
        summary="Per element: the model's value where it is within t of the base, else t towards it",
        spec="mergekit_compat.md M22",
        fn=nearswap,
        reads="weights",
        needs_base=True,
        model_count=1,
        params=(Param("t", float, help="the largest move away from the base, per element (<= 0 gives the base)"),),
        details="Elementwise, base a, model b: omega = clamp(t / max(|a-b|, 1e-6), 0, 1), result "
        "omega*b + (1-omega)*a, i.e. a + clamp(b-a, -t, t): where base and model differ by at most "
        "t the element becomes the model's, elsewhere it moves exactly t from the base towards "
        "the model. t = 0 (or below) gives the base; a large t gives the model. No other "
        "parameter; every tensor (1-D, embeddings) is treated alike. In float32. "
        "mergekit-compatible (its nearswap).",
    )
)
