"""The inner merge rules of Core Space, applied to equal-shape matrices: the task cores M_t
(k_B x k_A) in core space, or the dense deltas B_t A_t for the full-space reference.

Part of the ``core_space`` operator (:mod:`.core_space`, whose docstring gives the math, the
paper, the defaults and the spec sections, widen_corespace.md B2/B4/B8): ``task_arithmetic``
(a sum), ``mean``, ``ties`` and ``dare_ties`` (the dense :func:`~mergekit_ortho.ops.gta.ties`
and :func:`~mergekit_ortho.ops.sparsify.random_drop` run on the matrices, not re-written) and
``tsv`` (per-matrix SVD, floor(k/T) or r_t triplets per task, polar-orthogonalised U and V
blocks). No lambda and no isotropization here; the inputs are never modified. Also the output
step: :func:`finish_core` (lambda, then :func:`fold_factors`: the merged core folded into factors).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import UserError
from . import registry
from .registry import TensorTask, generator
from .gta import ties
from .sparsify import random_drop

INNER_METHODS = ("task_arithmetic", "mean", "ties", "dare_ties", "tsv")
TSV_KEEP = ("uniform", "rank")
TRIM_RULES = ("kthvalue", "topk")
_EPS64 = torch.finfo(torch.float64).eps


def _weights(weights: Sequence[float] | None, T: int, name: str) -> list[float]:
    if weights is None:
        return [1.0] * T
    w = [float(x) for x in weights]
    if len(w) != T:
        raise UserError(f"core_space: module '{name}': {len(w)} weights for {T} tasks")
    return w


def polar_factor(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U V^T of X's thin SVD (orthonormal columns, or rows if wide)."""
    if X.numel() == 0:
        return X.clone()
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def tsv_keep_counts(
    T: int, shape: tuple[int, int], tsv_keep: str = "uniform", ranks: Sequence[int] | None = None
) -> list[int]:
    """Triplets kept per task: floor(min(shape)/T) each (``uniform``, the reference), or each
    task's LoRA rank capped at min(shape) (``rank``)."""
    k = min(shape)
    if tsv_keep == "uniform":
        return [k // T] * T
    if tsv_keep == "rank":
        if ranks is None or len(ranks) != T:
            raise UserError("core_space: tsv_keep 'rank' needs one rank per task")
        return [min(int(r), k) for r in ranks]
    raise UserError(f"core_space: tsv_keep must be one of {', '.join(TSV_KEEP)}, got {tsv_keep!r}")


def tsv_merge(mats: Sequence[torch.Tensor], keep: Sequence[int] | None = None) -> torch.Tensor:
    """Task Singular Vectors merge of equal-shape matrices (B2 table, ``tsv``).

    SVD of each matrix, keep its first ``keep[t]`` triplets (default floor(min(shape)/T) each),
    concatenate the U blocks (columns) and the V blocks (rows), replace both concatenations by
    their polar factors and rebuild P_U diag(S) P_V. The inputs are not modified."""
    T = len(mats)
    shape = tuple(mats[0].shape)
    if keep is None:
        keep = tsv_keep_counts(T, shape)
    Us, Ss, Vhs = [], [], []
    for M, c in zip(mats, keep):
        if c <= 0:
            continue
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        Us.append(U[:, :c])
        Ss.append(S[:c])
        Vhs.append(Vh[:c])
    if not Us:
        return mats[0].new_zeros(shape)
    P_U = polar_factor(torch.cat(Us, dim=1))
    P_V = polar_factor(torch.cat(Vhs, dim=0))
    return (P_U * torch.cat(Ss)) @ P_V


def _ties_task(name: str, inputs: list[torch.Tensor], weights, densities, normalize, trim_rule) -> TensorTask:
    # the cores as a TensorTask of the dense ``ties`` operator, its parameters resolved by its schema
    op = registry.get("ties")
    params = op.resolve_params({"lambda": 1.0, "normalize": normalize, "trim_rule": trim_rule,
                                "rescale": False, "int8_mask": False})
    mps = [op.resolve_model_params({"weight": w, "density": d}, f"task {t}")
           for t, (w, d) in enumerate(zip(weights, densities))]
    return TensorTask(name, None, inputs, params, mps)


def merge_matrices(
    mats: Sequence[torch.Tensor],
    inner_method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.3,
    densities: Sequence[float | None] | None = None,
    dare_density: float = 0.7,
    rescale: bool = True,
    normalize: bool = True,
    trim_rule: str = "kthvalue",
    seed: int = 0,
    name: str = "module",
    model_index: Sequence[int] | None = None,
    tsv_keep: str = "uniform",
    ranks: Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply one inner rule to equal-shape matrices (cores, or dense deltas for full space).

    No lambda and no isotropization here. ``mats`` are never modified. ``densities`` (per task,
    None entries fall back to ``density``) are TIES top-K fractions; ``dare_density`` is DARE's
    keep probability; DARE masks are drawn per (seed, name, model_index[t]) (default index t)."""
    T = len(mats)
    if T == 0:
        raise UserError(f"core_space: module '{name}' has no task matrices")
    w = _weights(weights, T, name)
    if inner_method == "task_arithmetic":
        out = mats[0] * w[0]
        for M, wt in zip(mats[1:], w[1:]):
            out = out.add(M, alpha=wt)
        return out
    if inner_method == "mean":
        total = sum(w)
        if abs(total) < 1e-12:
            raise UserError(f"core_space: module '{name}': the weights sum to 0; 'mean' is undefined")
        return merge_matrices(mats, "task_arithmetic", weights=w, name=name) / total
    if inner_method in ("ties", "dare_ties"):
        if trim_rule not in TRIM_RULES:
            raise UserError(f"core_space: trim_rule must be one of {', '.join(TRIM_RULES)}, got {trim_rule!r}")
        ds = [density] * T if densities is None else [density if d is None else d for d in densities]
        if len(ds) != T:
            raise UserError(f"core_space: module '{name}': {len(ds)} densities for {T} tasks")
        for d in ds + ([dare_density] if inner_method == "dare_ties" else []):
            if not 0.0 <= d <= 1.0:
                raise UserError(f"core_space: module '{name}': densities must lie in [0, 1], got {d}")
        if inner_method == "ties":
            inputs = [M.clone(memory_format=torch.contiguous_format) for M in mats]
        else:
            idx = list(model_index) if model_index is not None else list(range(T))
            if len(idx) != T:
                raise UserError(f"core_space: module '{name}': {len(idx)} model indices for {T} tasks")
            inputs = [
                random_drop(M.contiguous(), dare_density, generator(seed, f"{name}\x00{i}", M.device), rescale)
                for M, i in zip(mats, idx)
            ]
        # ties() trims to each density, weights, elects signs and takes the disjoint mean/sum;
        # it works in place on ``inputs`` (our copies), never on the cached cores
        return ties(_ties_task(name, inputs, w, ds, normalize, trim_rule))
    if inner_method == "tsv":
        keep = tsv_keep_counts(T, tuple(mats[0].shape), tsv_keep, ranks)
        scaled = [M if wt == 1.0 else M * wt for M, wt in zip(mats, w)]
        return tsv_merge(scaled, keep)
    raise UserError(
        f"core_space: module '{name}': unknown inner_method {inner_method!r} "
        f"(choose one of {', '.join(INNER_METHODS)})"
    )


def fold_factors(
    U_ref: torch.Tensor, M: torch.Tensor, V_ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, S): B @ A = U_ref M V_ref^T with the smallest exact rank.

    M = P S Q^T; rho = #(S > max(shape) * eps64 * S_1), at least 1; B = U_ref P_rho S_rho
    (m x rho), A = Q_rho^T V_ref^T (rho x n, orthonormal rows). S is every singular value of M."""
    m, n = U_ref.shape[0], V_ref.shape[0]
    if M.numel() == 0:
        return M.new_zeros(1, n), M.new_zeros(m, 1), M.new_zeros(0)
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    tol = max(M.shape) * _EPS64 * float(S[0]) if S.numel() else 0.0
    rho = int((S > tol).sum()) if float(S[0]) > 0 else 0
    if rho == 0:
        return M.new_zeros(1, n), M.new_zeros(m, 1), S
    B = U_ref @ (P[:, :rho] * S[:rho])
    A = Qh[:rho] @ V_ref.mT
    return A, B, S


def finish_core(
    U_ref: torch.Tensor, V_ref: torch.Tensor, M: torch.Tensor, ranks: Sequence[int], *, lam: float,
    inner_method: str, isotropize_result: bool, out_dtype: torch.dtype, tsv_keep: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """lambda * M*, folded into factors (:func:`fold_factors`), cast to ``out_dtype``; the report."""
    m, n = U_ref.shape[0], V_ref.shape[0]
    R = sum(ranks)
    k_B, k_A = int(U_ref.shape[1]), int(V_ref.shape[1])
    warnings: list[str] = []
    if inner_method == "tsv" and tsv_keep == "uniform":
        T = len(ranks)
        if min(k_B, k_A) // T == 0:
            warnings.append(f"tsv keeps floor({min(k_B, k_A)}/{T}) = 0 triplets per task: the merge is 0")
        elif len(set(ranks)) > 1:
            warnings.append("heterogeneous ranks: tsv keeps floor(k/T) triplets per task "
                            "(tsv_keep: rank keeps each task's own rank)")
    if lam != 1.0:
        M = M * lam
    A, B, S = fold_factors(U_ref, M, V_ref)
    report = {
        "inner_method": inner_method,
        "isotropize": bool(isotropize_result),
        "ranks": list(ranks),
        "total_rank": R,
        "core_shape": [k_B, k_A],
        "saturated": R > min(m, n),
        "out_rank": int(A.shape[0]),
        "warnings": warnings,
    }
    return A.to(out_dtype), B.to(out_dtype), report
