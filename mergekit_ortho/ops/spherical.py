"""Spherical means of several models: NuSLERP, Multi-SLERP and the Karcher mean.

Spec: ../shared/specs/mergekit_compat.md M18 (``nuslerp``), M19 (``multislerp``), M20 (``karcher``),
M6 (which inputs each sees), M13 (parameters); golden numbers from mergekit 0.1.5. All three read
weights and are mergekit-compatible. They compute in float32 (float64 for float64 inputs) and
return that dtype; the executor casts.

NuSLERP (two models a, b, listed in that order; an optional base theta_0)
------------------------------------------------------------------------
t = w_b / (w_a + w_b) from the per-model ``weight`` (0.5 when |w_a + w_b| < 1e-6): a is the t = 0
end. The vectors are the whole tensor (``nuslerp_flatten``, default), else the last-dimension
vectors W[i, :] or, with ``nuslerp_row_wise``, the dim-0 vectors W[:, j]. mergekit's docs say
row_wise slerps "row vectors"; its code takes dim 0, and so does this (spec A13). A 1-D tensor is
one vector in every mode. Per pair: c = <a/max(|a|, 1e-7), b/max(|b|, 1e-7)> clamped to [-1, 1];
if 1 - c^2 <= 1e-16 (c = +-1 exactly, in float32 and float64 alike) the lerp (1-t) a + t b, else
(sin((1-t) theta) a + sin(t theta) b) / sin theta, theta = acos c, on the un-normalised vectors.
With a base: the same on a - theta_0, b - theta_0, plus theta_0.

Deliberate deviation: mergekit tests sin(acos c) < 1e-8 in float32, where sin(acos(-1)) is
-8.7e-8, so an exactly antipodal pair is divided by ~1e-7 instead of lerped; the spec's
1 - c^2 test (used here) lerps it. Every other pair is treated identically.

Multi-SLERP (N >= 1 models, per-model ``weight``; an optional base)
-------------------------------------------------------------------
x_i = flat model i (minus theta_0 with a base), w <- w / sum w (``normalize_weights``, default).
u_i = x_i / (|x_i| + eps); M = sum w_i u_i; m = M / |M|; g = sum w_i (u_i - <u_i, m> m);
gamma = |g| + eps; r = m cos gamma + g sin gamma / gamma; output r * sum w_i |x_i| (+ theta_0).
In exact arithmetic g = M - <M, m> m = 0, so the result is the renormalised weighted mean of the
unit directions at the weighted mean norm; the tangent step is kept literally for mergekit's
rounding. One model: its tensor. |M| < eps: with two models w_0 x_0 + w_1 x_1 (+ theta_0), with
more a UserError naming the tensor (mergekit's ValueError).

Deliberate deviation: weights summing to 0 with ``normalize_weights`` raise a UserError (mergekit
divides by zero and writes NaN).

Karcher mean (N >= 1 inputs, the base being one of them when given: ``base_input``)
-----------------------------------------------------------------------------------
alpha_i = 1/N. rho_i = |x_i|, u_i = x_i / rho_i (0 when rho_i = 0). Inputs with rho_i > tol take
part, alphas renormalised over them. Start at m = normalise(sum alpha_i u_i), or the first valid u_i
when that norm < tol. Up to ``max_iter`` times: c_i = clamp(<m, u_i>), theta_i = acos c_i; skip
theta_i < tol; g = sum alpha_i (theta_i / sin theta_i)(u_i - c_i m); stop if |g| < tol; else
m <- cos|g| m + sin|g| g/|g|, renormalised (when its norm > tol). Output (sum_i rho_i / N) m over
all N inputs (zeros when every rho_i <= tol). One input: that input.

None of the three has a fold: each needs every model before its first output element (t from
both weights; the normalised mean direction; the iterated mean).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .errors import BadParameters, ShapeMismatch
from .registry import Operator, Param, TensorTask, register

#: nuslerp: norms are floored at this before normalising (mergekit)
NUSLERP_NORM_FLOOR = 1e-7
#: nuslerp: pairs with 1 - c^2 at or below this are colinear and lerped (the spec's form)
NUSLERP_COLINEAR = 1e-16
#: nuslerp: |w_a + w_b| below this gives t = 0.5 (mergekit)
NUSLERP_WEIGHT_SUM = 1e-6


def _compute_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _check_shapes(method: str, name: str, tensors) -> None:
    shapes = {tuple(x.shape) for x in tensors}
    if len(shapes) > 1:
        raise ShapeMismatch(f"{method}: tensor '{name}' has different shapes across models: "
                            f"{sorted(shapes)}")


# ---------------------------------------------------------------------------------------- nuslerp

def nuslerp_pairs(a: torch.Tensor, b: torch.Tensor, t: float, flatten: bool = True,
                  row_wise: bool = False) -> torch.Tensor:
    """The spherical interpolation of a and b (same shape) per vector pair, a at t = 0."""
    shape = a.shape
    if flatten or a.dim() <= 1:
        va, vb = a.reshape(1, -1), b.reshape(1, -1)
        moved = None
    else:
        if row_wise:  # dim-0 vectors (columns), as mergekit's code does (A13)
            a, b = a.transpose(0, -1), b.transpose(0, -1)
        moved = a.shape
        va, vb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    ua = va / torch.linalg.vector_norm(va, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    ub = vb / torch.linalg.vector_norm(vb, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    c = ua.mul_(ub).sum(dim=-1, keepdim=True).clamp_(-1.0, 1.0)
    del ua, ub
    theta = torch.acos(c)
    colinear = (1.0 - c * c) <= NUSLERP_COLINEAR
    # colinear rows: coefficients (1-t, t) over 1; the others (sin((1-t)θ), sin(tθ)) over sin θ
    ca = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta))
    cb = torch.where(colinear, t, torch.sin(t * theta))
    s = torch.where(colinear, 1.0, torch.sin(theta))
    out = (ca * va).add_(cb * vb).div_(s)
    if moved is None:
        return out.reshape(shape)
    out = out.reshape(moved)
    return (out.transpose(0, -1) if row_wise else out).reshape(shape)


def nuslerp(task: TensorTask) -> torch.Tensor:
    a, b = task.inputs  # the plan guarantees two models besides the (optional) base
    wa, wb = task.model_params[0].weight, task.model_params[1].weight
    t = 0.5 if abs(wa + wb) < NUSLERP_WEIGHT_SUM else wb / (wa + wb)
    base = task.base
    _check_shapes("nuslerp", task.name, [a, b] + ([base] if base is not None else []))
    cdt = _compute_dtype([a, b] + ([base] if base is not None else []))
    a, b = a.to(cdt), b.to(cdt)
    if base is None:
        return nuslerp_pairs(a, b, t, task.params.nuslerp_flatten, task.params.nuslerp_row_wise)
    base = base.to(cdt)
    out = nuslerp_pairs(a.sub_(base), b.sub_(base), t, task.params.nuslerp_flatten, task.params.nuslerp_row_wise)
    return out.add_(base)


# ------------------------------------------------------------------------------------- multislerp

def multislerp(task: TensorTask) -> torch.Tensor:
    xs = list(task.inputs)
    if len(xs) == 1:
        return xs[0]  # the model itself (mergekit returns it before any base arithmetic)
    base = task.base
    _check_shapes("multislerp", task.name, xs + ([base] if base is not None else []))
    cdt = _compute_dtype(xs + ([base] if base is not None else []))
    shape, eps = xs[0].shape, task.params.eps
    flat = [x.to(cdt).reshape(-1) for x in xs]
    if base is not None:
        b = base.to(cdt).reshape(-1)
        flat = [x.sub_(b) for x in flat]
    w = torch.tensor([mp.weight for mp in task.model_params], dtype=cdt)
    if task.params.normalize_weights:
        if float(w.sum()) == 0.0:
            raise BadParameters(f"multislerp: tensor '{task.name}': the models' weights sum to 0, so "
                                "normalize_weights cannot scale them; change a weight or set "
                                "normalize_weights: false")
        w = w / w.sum()
    norms = [torch.linalg.vector_norm(x) for x in flat]

    def unit(i: int) -> torch.Tensor:
        return flat[i] / (norms[i] + eps)

    mean = torch.zeros_like(flat[0])
    for i in range(len(flat)):
        mean.add_(unit(i).mul_(w[i]))
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps and all(float(n) == 0.0 for n in norms):
        # No model changed this tensor (a frozen or unused layer): the output r * sum w_i |x_i| is 0
        # for every direction r, i.e. the base. mergekit raises here; there is nothing to choose.
        out = torch.zeros_like(flat[0])
    elif mean_norm < eps:
        if len(flat) != 2:
            raise UserError(f"multislerp: tensor '{task.name}': the weighted sum of the models' unit "
                            "directions is zero (antipodal models whose weights balance out); change "
                            "the weights")
        out = (flat[0] * w[0]).add_(flat[1] * w[1])  # mergekit's fallback: the plain weighted sum
    else:
        m = mean.div_(mean_norm)
        g = torch.zeros_like(m)
        for i in range(len(flat)):
            u = unit(i)
            g.add_(u.sub_(m * torch.dot(u, m)).mul_(w[i]))  # the tangent component at m
        gamma = torch.linalg.vector_norm(g) + eps
        out = (m * torch.cos(gamma)).add_(g.mul_(torch.sin(gamma) / gamma))
        out.mul_(sum(n * wi for n, wi in zip(norms, w)))
    if base is not None:
        out.add_(b)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------- karcher

def karcher_mean(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean of the inputs' directions on the unit sphere, at their mean norm."""
    if len(xs) == 1:
        return xs[0]
    cdt = _compute_dtype(xs)
    shape = xs[0].shape
    flat = [x.to(cdt).reshape(-1) for x in xs]
    alpha = 1.0 / len(flat)
    rho = [float(torch.linalg.vector_norm(x)) for x in flat]
    valid = [i for i, r in enumerate(rho) if r > tol]
    if not valid:
        return torch.zeros(shape, dtype=cdt)
    a = 1.0 / len(valid)  # the equal alphas renormalised over the valid inputs
    units = [flat[i].div_(rho[i]) for i in valid]  # the inputs are ours: normalised in place
    m = torch.zeros_like(units[0])
    for u in units:
        m.add_(u * a)
    m_norm = float(torch.linalg.vector_norm(m))
    m = units[0].clone() if m_norm < tol else m.div_(m_norm)
    for _ in range(max_iter):
        g = torch.zeros_like(m)
        for u in units:
            c = torch.dot(m, u).clamp(-1.0, 1.0)
            theta = torch.acos(c)
            if float(theta) < tol:
                continue  # already at m: no pull
            g.add_((u - c * m).mul_(a * (theta / torch.sin(theta))))
        g_norm = torch.linalg.vector_norm(g)
        if float(g_norm) < tol:
            break
        m = (m * torch.cos(g_norm)).add_(g.mul_(torch.sin(g_norm) / g_norm))  # the exponential map
        n = torch.linalg.vector_norm(m)
        if float(n) > tol:
            m.div_(n)
    scale = sum(alpha * r for r in rho)  # over all inputs, zero-norm ones included
    return m.mul_(scale).reshape(shape)


def karcher(task: TensorTask) -> torch.Tensor:
    _check_shapes("karcher", task.name, task.inputs)
    return karcher_mean(list(task.inputs), task.params.max_iter, task.params.tol)


# -------------------------------------------------------------------------------------- registry

WEIGHT = Param("weight", float, help="this model's weight")

register(
    Operator(
        name="nuslerp",
        summary="Spherical interpolation between two models, t = w_b/(w_a+w_b); about the base if given",
        spec="mergekit_compat.md M18",
        fn=nuslerp,
        reads="weights",
        needs_base=False,
        optional_base=True,
        model_count=2,
        params=(
            Param("nuslerp_flatten", bool, True, help="slerp each tensor as one flat vector"),
            Param("nuslerp_row_wise", bool, False,
                  help="without flatten: slerp the dim-0 vectors W[:, j] instead of the last-dim W[i, :] "
                  "(mergekit's code; its docs say the opposite)"),
        ),
        model_params=(WEIGHT,),
        details="Two models a (listed first, the t = 0 end) and b (t = 1); t = w_b / (w_a + w_b) "
        "(0.5 when |w_a + w_b| < 1e-6), so weights [1, 0] give a, [0, 1] give b, [1, 3] t = 0.75. "
        "Per vector pair: c = cos of the angle (norms floored at 1e-7); c = +-1 exactly: the lerp "
        "(1-t) a + t b; else (sin((1-t) theta) a + sin(t theta) b) / sin theta, theta = acos c, on "
        "the un-normalised vectors (no 0.9995 threshold, unlike slerp). Vectors: the whole tensor "
        "(nuslerp_flatten: true, default); with flatten false, the last-dimension vectors W[i, :], "
        "or with nuslerp_row_wise the dim-0 vectors W[:, j] (mergekit's code; its docs describe "
        "the two the other way round). 1-D tensors are one vector. With base_model: the task "
        "vectors a - base and b - base are slerped and the base added back; without, the weights "
        "themselves. In float32. mergekit-compatible (its nuslerp), except that an exactly "
        "antipodal pair is lerped (mergekit divides by sin(acos(-1)) ~ 1e-7 in float32).",
    )
)

register(
    Operator(
        name="multislerp",
        summary="Weighted spherical mean of any number of models (about the base if given)",
        spec="mergekit_compat.md M19",
        fn=multislerp,
        reads="weights",
        needs_base=False,
        optional_base=True,
        min_models=1,
        params=(
            Param("normalize_weights", bool, True, help="divide the weights by their sum"),
            Param("eps", float, 1e-8, help="added to every norm (unit directions, tangent norm)", minimum=0.0),
        ),
        model_params=(WEIGHT,),
        details="Each tensor is one flat vector x_i (x_i - base with base_model). w <- w / sum w "
        "(normalize_weights, default). u_i = x_i / (|x_i| + eps); m = normalise(sum w_i u_i); "
        "g = sum w_i (u_i - <u_i, m> m); gamma = |g| + eps; result (m cos gamma + g sin gamma / "
        "gamma) * sum w_i |x_i| (+ base). g vanishes in exact arithmetic, so this is the weighted "
        "mean direction of the models at their weighted mean norm: with normalize_weights false "
        "the norm scales by sum w. One model: that model. A zero weighted mean direction: two "
        "models give w_0 x_0 + w_1 x_1 (+ base), more an error. Weights summing to 0 with "
        "normalize_weights are an error (mergekit writes NaN). In float32. mergekit-compatible "
        "(its multislerp).",
    )
)

register(
    Operator(
        name="karcher",
        summary="Karcher (Riemannian) mean of the models on the sphere, at their mean norm",
        spec="mergekit_compat.md M20",
        fn=karcher,
        reads="weights",
        needs_base=False,
        base_input=True,
        min_models=1,
        params=(
            Param("max_iter", int, 10, help="the most gradient steps on the sphere", minimum=0),
            Param("tol", float, 1e-5, help="norms, angles and step sizes below this count as zero", minimum=0.0),
        ),
        details="Equal weights 1/N over the N inputs; base_model, when given, is one of them (it "
        "is averaged in, as mergekit does). Each tensor is one flat vector: rho_i = |x_i|, "
        "u_i = x_i / rho_i; inputs with rho_i <= tol are left out of the direction. From the "
        "normalised mean of the u_i, up to max_iter Riemannian gradient steps: g = mean_i "
        "(theta_i / sin theta_i)(u_i - cos theta_i m), m <- cos|g| m + sin|g| g/|g| (stop when "
        "|g| < tol; angles < tol pull nothing). Result: m * mean_i rho_i (zero-norm inputs count in "
        "the mean norm). One input: that input; every norm <= tol: zeros. No per-model weights. "
        "Norms in float32 (float64 for float64 inputs). mergekit-compatible (its karcher).",
    )
)
