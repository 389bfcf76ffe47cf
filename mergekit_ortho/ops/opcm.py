"""OPCM: orthogonal-projection continual merging with one adaptive global scale.

Spec: ../shared/specs/magmax_opcm_baselines.md Part B (B2 math, B3 pseudocode, B4 defaults,
B5 tensor rule, B6 state, B9 pitfalls), golden tests D2/D3, and "Design decisions for this
toolkit"; DESIGN.md "Continual state".

Models theta_1, theta_2, ... arrive one at a time; tau_t = theta_t - theta_0 (always relative to
the base). Per tensor the running, UN-normalised sum S_t = sum_{i<=t} P_i(tau_i) is kept, where

* P_1 = identity: the first model is copied unchanged (lambda_1 = 1, B9.8);
* for t >= 2 and a *projectable* tensor (a linear map's 2-D weight, see below), P_t projects tau_t
  away from the current merged update: thin SVD S_{t-1} = U diag(s) V^T (the basis of S_{t-1} is
  the basis of the reference's normalised tau_bar_{t-1} = S_{t-1}/lambda_{t-1}, B9.6),
  M = U^T tau V, and the components M_ij with i = j (``zero_diagonal``) or i, j < r are removed:
  ``P(tau) = tau - U (M restricted to those entries) V^T``. r = the 0-based index of the first j
  whose cumulative singular-value share c_j = sum_{i<=j} s_i / sum_i s_i exceeds ``alpha``
  (0 when there is none), the reference's ``argmax`` semantics (B9.2);
* every other float tensor takes the identity path, P(tau) = tau (plain sum, B2). A fused MoE expert
  stack is E * parts maps, each projected on its own (:mod:`.expert_stacks`; matrices are counted).

One global lambda_t = ||S_t|| / nu_t, with nu_t = mean_i ||tau_i|| and both norms over ALL merged
tensors of the model (B9.7), makes the exported update S_t / lambda_t have norm nu_t. This equals
the reference's recursion Delta_t = lambda_{t-1} tau_bar_{t-1} + P(tau_t), tau_bar_t =
Delta_t / lambda_t, since lambda_t tau_bar_t = S_t (B2).

Projectable tensors (toolkit rule, B5): float, 2-D, name ends in ``weight`` (so open_clip's packed
``in_proj_weight`` is included, a deliberate deviation from the reference's leaf-module traversal
which skips it), and not an embedding table (``EMBEDDING_PATTERN``: ``*embed*`` except
``embed_out``, GPT-2 ``wte``/``wpe``, T5 ``shared`` and ``relative_attention_bias``). The
``projectable`` parameter replaces this rule by a regex (``re.search`` on the tensor name; 2-D float
tensors only). Parameters the reference traversal skips (``class_embedding``) take the identity
path here (B9.4).

Robust guard (``robust``, default on, B9.3): a projectable tensor whose merged update is zero
(largest singular value <= the smallest normal number of the SVD dtype) is not projected
(P = identity: there is no basis to project against); the diagonal is zeroed only for singular
values s_i > rtol * s_1 with rtol = max(m, n) * eps(SVD dtype) (numerical rank), and singular
values below that threshold count as 0 in the shares c_j. For full-rank merged updates, the normal
case, this is exactly the reference. ``robust: false`` reproduces the reference's behaviour on
zero / rank-deficient updates (diagonal zeroed in an arbitrary basis). Independently of ``robust``
a zero nu_t or ||S_t|| gives lambda_t = 1 instead of the reference's 0/0 (the merged update is
then zero for any lambda).

Numerics: thin SVD (identical to the reference's full-matrices SVD, B9.11) computed in
``svd_dtype`` (float32 by default) or the inputs' dtype if wider (float64 inputs stay float64);
the result is cast back to the inputs' dtype. Global norms are accumulated in float64.

Two entry points share the projection:

* :data:`FOLD` - the fold form that `merge run` and `merge continual` drive (``step`` per tensor
  and model, ``reduce`` per model over all tensors, ``finish`` per tensor); state = S_t per tensor
  (float32 on disk, the shape of the tensor, so memory does not grow with t) plus a few JSON
  scalars.
* :func:`opcm_merge` - an in-memory reference that runs the spec's B3 pseudocode literally
  (stores the normalised tau_bar and lambda_prev); tests check that both agree.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .errors import NoInputs, NonFiniteInput, ShapeMismatch
from .expert_stacks import blocks, project_stack
from .registry import Fold, Operator, Param, Params, TensorTask, name_matches, register

DEFAULT_ALPHA = 0.5
#: default embedding-table names (identity path although 2-D and named ``...weight``)
EMBEDDING_PATTERN = r"(?i)(embed(?!_out)|(^|\.)(wte|wpe|shared)\.weight$|relative_attention_bias)"
_SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def is_projectable(name: str, tensor: torch.Tensor, params: Params | None = None) -> bool:
    """Whether ``name`` is a linear map's weight that OPCM projects (B5; a fused expert stack: per
    map, :func:`project_tensor`); otherwise identity path. ``params`` None: the default rule."""
    if not tensor.is_floating_point():
        return False
    stack = tensor.dim() == 3 and blocks(name, tuple(tensor.shape)) is not None
    if tensor.dim() != 2 and not stack:
        return False
    override = params.projectable if params is not None else None
    if override is not None:
        return name_matches(override, name)
    return (stack or name.endswith("weight")) and not name_matches(EMBEDDING_PATTERN, name)


def project_tensor(name: str, tbar: torch.Tensor, tau: torch.Tensor, **options) -> tuple[torch.Tensor, list[dict]]:
    """P(tau) of a projectable tensor and the infos of :func:`project` per matrix: a 2-D weight is
    one matrix, a fused expert stack one per expert and part (:func:`.expert_stacks.project_stack`)."""
    if tau.dim() == 2:
        out, info = project(tbar, tau, **options)  # options may carry ``svd`` (sweep's cache)
        return out, [info]
    return project_stack(name, tbar, tau, lambda a, b: project(a, b, **options))


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """r of B2/B9.2: 0-based index of the first j with cumsum(s)[j] / sum(s) > alpha; 0 if none.

    The share is normalised by the last cumulative sum, so the last share is exactly 1 and
    alpha >= 1 gives r = 0 without fp noise; a zero (or NaN) ``s`` gives r = 0 like the reference.
    """
    if s.numel() == 0:
        return 0
    cs = torch.cumsum(s, 0)
    above = (cs / cs[-1]) > alpha
    if not bool(above.any()):
        return 0
    return int(torch.argmax(above.to(torch.int8)))


def _compute_dtype(*tensors: torch.Tensor | None, svd_dtype: str | torch.dtype = "float32") -> torch.dtype:
    dt = _SVD_DTYPES[svd_dtype] if isinstance(svd_dtype, str) else svd_dtype
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def project(
    tbar: torch.Tensor,
    tau: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    zero_diagonal: bool = True,
    robust: bool = True,
    svd_dtype: str | torch.dtype = "float32",
    svd: Callable[[torch.Tensor], tuple] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """P(tau) against the merged update ``tbar`` (any positive multiple of it gives the same P).

    ``svd(A) -> (U, s, Vh)``: the thin SVD to use (default :func:`thin_svd`; `merge sweep`
    passes one that caches it by the content of A). Returns (P(tau) in tau's dtype, info) with
    info = {"r": r, "k": k, "rank": numerical rank used for the diagonal, "identity": True when
    the zero guard skipped the projection}.
    """
    if tbar.shape != tau.shape or tau.dim() != 2:
        raise ValueError(f"opcm: project needs two 2-D tensors of one shape, got {tuple(tbar.shape)} and {tuple(tau.shape)}")
    m, n = tau.shape
    k = min(m, n)
    cdt = _compute_dtype(tbar, tau, svd_dtype=svd_dtype)
    if k == 0:
        return tau.clone(), {"r": 0, "k": 0, "rank": 0, "identity": True}
    A = tbar.to(cdt)
    T = tau.to(cdt)
    U, s, Vh = (svd or thin_svd)(A)
    if robust and not bool(s[0] > torch.finfo(cdt).tiny):  # zero (or NaN) merged update: no basis
        return tau.clone(), {"r": 0, "k": k, "rank": 0, "identity": True}
    if robust:
        keep = s > s[0] * (max(m, n) * torch.finfo(cdt).eps)
        rank = int(keep.sum())
        r = split_rank(torch.where(keep, s, torch.zeros_like(s)), alpha)
    else:
        rank = k
        r = split_rank(s, alpha)
    X = U.mT @ T  # (k x n)
    M = X @ Vh.mT  # (k x k) = U^T tau V
    C = torch.zeros_like(M)  # the removed components
    if r > 0:
        C[:r, :r] = M[:r, :r]
    if zero_diagonal and rank > r:
        idx = torch.arange(r, rank)
        C[idx, idx] = M[idx, idx]
    out = T - (U @ C) @ Vh
    return out.to(tau.dtype), {"r": r, "k": k, "rank": rank, "identity": False}


def thin_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of the merged update that a projection is taken against."""
    return torch.linalg.svd(A, full_matrices=False)


def _options(params: Params) -> dict:
    return {"alpha": params.alpha, "zero_diagonal": params.zero_diagonal, "robust": params.robust,
            "svd_dtype": params.svd_dtype or "float32"}


def _sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 if t.numel() else 0.0


def _lambda(delta_norm: float, nu: float) -> float:
    """lambda_t = ||Delta_t|| / nu_t, guarded: 1 when either is zero (the update is zero then)."""
    if not (math.isfinite(delta_norm) and math.isfinite(nu)):
        raise NonFiniteInput("opcm: a task vector or the merged update is not finite (NaN or Inf)")
    if delta_norm > 0.0 and nu > 0.0:
        return delta_norm / nu
    return 1.0


# -- the fold ---------------------------------------------------------------------------------------
#
# state = S_t of one tensor; the executor sums each tensor's stats per model and calls ``_reduce``
# once per model; ``_finish`` writes S_t / lambda_t. See registry.Fold ("reduce").


def _start(task: TensorTask) -> None:
    return None


def _step(prev: torch.Tensor | None, tau: torch.Tensor, i: int,
          task: TensorTask, svd: Callable | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """S_1 = tau_1; S_t = S_{t-1} + P_t(tau_t) (t = i + 1), P_t from the SVD of S_{t-1} for
    projectable tensors, identity otherwise. The projection needs no scalar of step t-1: U, V and r
    of S_{t-1} are those of tau_bar_{t-1} = S_{t-1}/lambda_{t-1}. Stats, float64, summed over the
    tensors by the executor: ``tau_sq`` ||tau||^2, ``proj_sq`` ||P(tau)||^2, ``sum_sq`` ||S_t||^2,
    ``projected`` 1.0 if the tensor was projected (SVD taken) else 0.0."""
    name, t = task.name, i + 1
    if t < 1:
        raise ValueError(f"opcm: step t must be >= 1, got {t}")
    if t == 1:
        if prev is not None:
            raise ValueError(f"opcm: tensor '{name}' has a stored state at step 1")
        sq = _sq(tau)
        return tau.clone(), {"tau_sq": sq, "proj_sq": sq, "sum_sq": sq, "projected": 0.0}
    if prev is None:
        raise ValueError(f"opcm: tensor '{name}' has no stored state at step {t}")
    if prev.shape != tau.shape:
        raise ShapeMismatch(f"opcm: tensor '{name}' has shape {tuple(tau.shape)}, its state {tuple(prev.shape)}")
    projected = 0.0
    if is_projectable(name, tau, task.params):
        ptau, infos = project_tensor(name, prev, tau, svd=svd, **_options(task.params))
        projected = float(sum(not i["identity"] for i in infos))
    else:
        ptau = tau
    new = prev.to(ptau.dtype) + ptau
    return new, {"tau_sq": _sq(tau), "proj_sq": _sq(ptau), "sum_sq": _sq(new), "projected": projected}


def _reduce(stats_sum: dict[str, float], scalars_prev: dict[str, Any], t: int, params: Params) -> dict[str, Any]:
    """The global scalars after model t (JSON): ``t``; ``lambda`` (lambda_t, 1 for t = 1);
    ``norm_sum`` (sum_i ||tau_i||); ``nu`` (norm_sum / t, the target norm); ``task_norm``
    (||tau_t||); ``projected_norm`` (||P_t(tau_t)||, global); ``merged_norm`` (||S_t||, the
    un-normalised sum; equals lambda * nu except when guarded); ``projected_tensors`` (how many
    tensors were projected). A stat no tensor reported counts as 0."""
    def total(key: str) -> float:
        return max(float(stats_sum.get(key, 0.0)), 0.0)

    task_norm, merged_norm = math.sqrt(total("tau_sq")), math.sqrt(total("sum_sq"))
    if t == 1:
        norm_sum, lam = task_norm, 1.0  # the first model is copied: lambda_1 = 1 (B9.8)
        if not math.isfinite(task_norm):
            raise NonFiniteInput("opcm: the first task vector is not finite (NaN or Inf)")
    else:
        if not scalars_prev or int(scalars_prev.get("t", -1)) != t - 1:
            raise ValueError(f"opcm: scalars of step {t - 1} are missing or belong to another step")
        norm_sum = float(scalars_prev["norm_sum"]) + task_norm
        lam = _lambda(merged_norm, norm_sum / t)
    return {
        "t": t,
        "lambda": lam,
        "norm_sum": norm_sum,
        "nu": norm_sum / t,
        "task_norm": task_norm,
        "projected_norm": math.sqrt(total("proj_sq")),
        "merged_norm": merged_norm,
        "projected_tensors": int(round(total("projected"))),
    }


def _finish(state: torch.Tensor, task: TensorTask) -> torch.Tensor:
    """The merged delta S_t / lambda_t, to add to the base."""
    return state / float(task.scalars["lambda"])


FOLD = Fold(_start, _step, _finish, reduce=_reduce)


def fold_with_svd(svd: Callable[[torch.Tensor], tuple]) -> Fold:
    """:data:`FOLD` with the projections' thin SVDs taken by ``svd`` (`merge sweep`'s cache,
    issue 18: the SVD of S_{t-1} is keyed by its content, so it is reused wherever an earlier
    point had the same merged update, e.g. S_1 = tau_1 for every alpha)."""
    from dataclasses import replace

    return replace(FOLD, step=lambda prev, tau, i, task: _step(prev, tau, i, task, svd))


# -- in-memory reference (B3 pseudocode, literally) -------------------------------------------------


def opcm_merge(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], *,
               history: list | None = None, **params) -> dict[str, torch.Tensor]:
    """theta_bar_T for ``models`` folded in order, as the B3 pseudocode does it.

    Keeps the normalised tau_bar and lambda_prev (not the un-normalised sum), SVDs tau_bar, and
    rescales once per step by the global lambda. Float keys are merged; other keys are copied from
    ``base``. The first model's float tensors are returned unchanged (B9.8). Outputs have each
    model tensor's dtype; the arithmetic runs in float32 or wider (the inputs' dtype if wider).
    If ``history`` is a list, one dict per step is appended: t, lambda, nu, task_norm,
    projected_norm (global), merged_norm (||theta_bar_t - theta_0||), ranks {tensor: r (a list for a stack)} and
    proj_norms {tensor: ||P(tau_t)||} of the projected tensors.
    """
    p = OPERATOR.resolve_params(params)
    opts = _options(p)
    if not models:
        raise NoInputs("opcm: no models to merge")
    keys = [k for k, v in base.items() if v.is_floating_point()]
    for i, m in enumerate(models):
        for k in keys:
            if k not in m or m[k].shape != base[k].shape:
                raise ShapeMismatch(f"opcm: model {i + 1} lacks tensor '{k}' or has another shape")

    def cdt(x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    tbar = {k: models[0][k].to(cdt(models[0][k])) - base[k].to(cdt(models[0][k])) for k in keys}
    lam_prev = 1.0
    s_norm = math.sqrt(sum(_sq(v) for v in tbar.values()))
    if history is not None:
        history.append({"t": 1, "lambda": 1.0, "nu": s_norm, "task_norm": s_norm,
                        "projected_norm": s_norm, "merged_norm": s_norm, "ranks": {}, "proj_norms": {}})
    for t, model in enumerate(models[1:], start=2):
        tau = {k: model[k].to(tbar[k].dtype) - base[k].to(tbar[k].dtype) for k in keys}
        n_t = math.sqrt(sum(_sq(v) for v in tau.values()))
        s_norm += n_t
        nu = s_norm / t
        delta, ranks, p_norms, p_sq = {}, {}, {}, 0.0
        for k in keys:
            if is_projectable(k, tau[k], p):
                ptau, infos = project_tensor(k, tbar[k], tau[k], **opts)
                ranks[k] = infos[0]["r"] if tau[k].dim() == 2 else [i["r"] for i in infos]
                p_norms[k] = math.sqrt(_sq(ptau))
            else:
                ptau = tau[k]
            p_sq += _sq(ptau)
            delta[k] = lam_prev * tbar[k] + ptau
        d_norm = math.sqrt(sum(_sq(v) for v in delta.values()))
        lam = _lambda(d_norm, nu)
        tbar = {k: v / lam for k, v in delta.items()}
        lam_prev = lam
        if history is not None:
            history.append({"t": t, "lambda": lam, "nu": nu, "task_norm": n_t, "projected_norm": math.sqrt(p_sq),
                            "merged_norm": math.sqrt(sum(_sq(v) for v in tbar.values())), "ranks": ranks,
                            "proj_norms": p_norms})
    out: dict[str, torch.Tensor] = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif len(models) == 1:
            out[k] = models[0][k].clone()
        else:
            dt = models[-1][k].dtype
            out[k] = (base[k].to(tbar[k].dtype) + tbar[k]).to(dt)
    return out


# -- registry ---------------------------------------------------------------------------------------


def opcm(task: TensorTask) -> torch.Tensor:
    """Not callable per tensor: lambda_t is one global scale over all tensors of every model."""
    from ..errors import UserError

    raise UserError(
        "opcm cannot merge one tensor on its own: its scale lambda_t is global over all tensors of "
        "each model, so it runs as a fold with a reduce across tensors (ops.opcm.FOLD, registered as Operator.fold) that "
        "`merge run` and `merge continual` drive model by model"
    )


OPERATOR = register(
    Operator(
        name="opcm",
        summary="OPCM: continual merging, new task vectors projected orthogonally to the merged "
        "update, one adaptive global scale",
        spec="magmax_opcm_baselines.md B1-B9, D2, D3",
        fn=opcm,
        fold=FOLD,
        params=(
            Param("alpha", float, DEFAULT_ALPHA,
                  "singular-value-mass threshold: the top-r x top-r block of the merged update's "
                  "basis is removed, r = first index whose cumulative share of sum(s) exceeds alpha "
                  "(alpha >= 1 or 0 gives r = 0, the reference's semantics)",
                  minimum=0.0, maximum=1.0),
            Param("zero_diagonal", bool, True,
                  "also remove the diagonal components u_i^T tau v_i (current FusionBench); "
                  "false reproduces the paper-v1 code"),
            Param("robust", bool, True,
                  "guard zero / rank-deficient merged updates (no projection against a zero "
                  "update; diagonal zeroed only above the numerical rank)"),
            Param("projectable", str, None,
                  "regex (re.search on the tensor name) replacing the default rule for which 2-D "
                  "tensors are projected", regex=True),
            Param("svd_dtype", str, "float32", "dtype of the SVD and projection (inputs of a wider "
                  "dtype keep theirs)", choices=("float32", "float64")),
        ),
        details="theta_bar_1 = theta_1 (copied); for t >= 2, per tensor S_t = S_{t-1} + P_t(tau_t) "
        "with tau_t = theta_t - theta_0, and theta_bar_t = theta_0 + S_t / lambda_t, "
        "lambda_t = ||S_t|| / mean_i ||tau_i|| (norms global over all merged tensors), so the "
        "merged update's norm is the mean task-vector norm. P_t: thin SVD S_{t-1} = U s V^T, "
        "M = U^T tau V, remove M_ii (zero_diagonal) and M[:r, :r], r = first j with "
        "cumsum(s)_j / sum(s) > alpha (0 if none). Projected: float 2-D tensors named '*weight' "
        "(incl. in_proj_weight), except embedding tables (*embed*, wte, wpe, shared, "
        "relative_attention_bias), and fused MoE expert stacks (3-D experts.gate_up_proj / down_proj), "
        "projected per expert and part; override with `projectable`. All other float tensors (biases, "
        "norms, embeddings, conv kernels, class tokens) are summed and share the global scale. "
        "The result depends on model order. The continual state stores S_t per tensor (float32, "
        "memory constant in the number of models) plus lambda_t, sum of norms and t.",
    )
)
