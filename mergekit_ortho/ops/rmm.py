"""Reversible Model Merging (RMM): a per-position PCA basis of LoRA factors, and reverting a task.

Spec: ../shared/specs/lora_lego_rmm.md Part B (B2 math, B3 pseudocode, B4 defaults, B6 stored
tensors, B9 pitfalls, B11 checks) and "Design decisions for this toolkit" (RMM table). Paper:
Alipour & Mohammadi Amiri, "Towards Reversible Model Merging For Low-rank Weights", arXiv
2510.14163. Pure tensor functions; the bundle on disk is :mod:`mergekit_ortho.bundle`.

Conventions (PEFT letters; the paper swaps them, B9.1):

* input per module: n tasks' factors ``(A_i, B_i)`` with A_i (r x d_in), B_i (d_out x r), the
  LoRA scale already folded in (delta_i = B_i @ A_i); reverted adapters therefore have scale 1
  (write them with lora_alpha = r, or sqrt(r) for rsLoRA configs);
* positions (B2): every row of B_i ("left", d_out positions) and every column of A_i ("right",
  d_in positions), each an r-vector; per position X = [x_1 .. x_n] (r x n);
* per position (centred PCA, B2): mu = mean_i x_i, X_c = X - mu 1^T, thin SVD X_c = Q S V^T,
  U = Q[:, :p], C = U^T X_c; error = sum_{q>p} S_q^2 (Eckart-Young). ``center=False`` drops mu
  (the uncentred SVD, no mean stored);
* revert (B2): B^_i[j, :] = mu^L_j + U^L_j c^L_{i,j},  A^_i[:, j] = mu^R_j + U^R_j c^R_{i,j}.

Stored tensors per module (B6 names, relative to the module key; ``bundle`` prefixes ``"<key>."``):

* ``left.mean`` [d_out, r], ``left.basis`` [d_out, r, p], ``left.coef`` [n, d_out, p];
* ``right.mean`` [d_in, r], ``right.basis`` [d_in, r, p], ``right.coef`` [n, d_in, p];
* the ``*.mean`` tensors only when ``center`` is true. Coefficient row i belongs to task i in the
  order the factors were given (the task order is part of the format, B9.9).

Toolkit decisions ([I] in the spec), all deliberate:

* p is clamped per module to min(r, n-1) (centred) or min(r, n) (uncentred); the report records the
  requested and the effective p and warns when the storage ratio is >= 1 (B9.8);
* the PCA runs in float64 on CPU (``torch.linalg.svd`` batched over positions); stored tensors are
  cast back to the factors' dtype (B4);
* sign gauge (B9.7): every basis column is flipped so that its largest-|value| entry is positive
  (the first such entry, counting entries within a relative 1e-9 of the maximum as tied), and its
  coefficients flip with it. Columns whose singular value is numerically zero
  (S_q <= max(r, n) * eps64 * S_1) are stored as zeros with zero coefficients: their direction is
  arbitrary, zeroing them loses nothing and makes the files reproducible;
* different ranks across tasks on one module (B9.6) are refused with a ValueError naming the module
  and the ranks; ``pad_ranks=True`` zero-pads every task to r_max instead (exact, but the module is
  stored and reverted at rank r_max);
* errors are relative squared Frobenius errors ||X - X^||^2 / ||X||^2 (B6), for the stacked left
  factors, the stacked right factors and each task's delta B_i A_i (computed in low-rank form,
  never densified); a zero reference gives 0.0 when the error is 0 and None otherwise;
* full fine-tunes (PT-SVD, B2; the ``rank`` parameter): the executor truncates each task vector
  by SVD to rank r (:func:`mergekit_ortho.ops.lowrank.svd_factors`: B = U_r S_r^(1/2),
  A = S_r^(1/2) V_r^T, each singular pair sign-canonicalised like the basis columns) and hands
  the operator a LoraTask like any LoRA's; the operator never sees a dense task vector.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import UserError
from .errors import BadParameters
from .lowrank import canonical_sign
from .registry import BundleEntry, LoraResult, LoraTask, Operator, Param, register

_EPS64 = torch.finfo(torch.float64).eps

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- shapes and storage


def effective_p(p: int, r: int, n: int, center: bool = True) -> int:
    """The basis size actually used: p clamped to min(r, n-1) (centred) or min(r, n)."""
    if p < 0:
        raise UserError(f"basis_size must be >= 0, got {p}")
    return max(0, min(int(p), r, n - 1 if center else n))


def storage_ratio(r: int, n: int, p: int, center: bool = True) -> float:
    """Stored elements relative to keeping all n rank-r adapters, uniform shapes (spec B2, B11.4).

    Per position: r (mean, when centred) + p*r (basis) + p*n (coefficients) against n*r, i.e.
    (p(r+n) + r) / (r n); uncentred p(r+n) / (r n). d_out and d_in cancel.
    """
    if r <= 0 or n <= 0:
        raise BadParameters(f"storage_ratio needs r >= 1 and n >= 1, got r={r}, n={n}")
    return (p * (r + n) + (r if center else 0)) / (r * n)


def stored_elements(d_out: int, d_in: int, r: int, n: int, p: int, center: bool = True) -> int:
    """Elements stored for one module: (d_out + d_in) * (p(r+n) + r) (centred, spec B11.4)."""
    return (d_out + d_in) * (p * (r + n) + (r if center else 0))


def check_ranks(factors: Factors, name: str = "module") -> int:
    """Validate shapes; return the common rank r. Different ranks -> a UserError naming them."""
    if len(factors) == 0:
        raise UserError(f"rmm: module '{name}' has no task factors")
    shapes = set()
    ranks = []
    for i, (A, B) in enumerate(factors):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UserError(
                f"rmm: module '{name}', task {i}: factors must be A (r x d_in) and B (d_out x r), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        ranks.append(int(A.shape[0]))
        shapes.add((int(B.shape[0]), int(A.shape[1])))
    if len(shapes) > 1:
        raise UserError(
            f"rmm: module '{name}': tasks adapt different shapes (d_out, d_in) {sorted(shapes)}"
        )
    if len(set(ranks)) > 1:
        raise UserError(
            f"rmm: module '{name}' has different LoRA ranks across tasks {ranks}; RMM needs one rank "
            "per module (spec B9.6). Set pad_ranks: true to zero-pad to the largest rank"
        )
    return ranks[0]


def pad_factors(factors: Factors, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-pad every (A, B) to rank r (extra zero rows of A, zero columns of B): same delta."""
    out = []
    for A, B in factors:
        k = A.shape[0]
        if k > r:
            raise ValueError(f"cannot pad rank {k} down to {r}")
        if k < r:
            A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0)
            B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
        out.append((A, B))
    return out


# ----------------------------------------------------------------------------- the PCA


def pca_positions(
    X: torch.Tensor, p: int, center: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred (or not) PCA of every position at once.

    X: (n, P, r) float64 - task i's r-vector at position j is X[i, j].
    Returns mean (P, r) or None, basis U (P, r, p), coef (n, P, p) and the discarded energy per
    position (P,) = sum of the squared singular values not kept (incl. zeroed columns).
    """
    n, P, r = X.shape
    mean = X.mean(0) if center else None
    Xc = (X - mean if center else X).permute(1, 2, 0)  # (P, r, n)
    if P == 0 or p == 0:
        U = X.new_zeros(P, r, p)
        discarded = Xc.pow(2).sum((1, 2))
        return mean, U, X.new_zeros(n, P, p), discarded
    Q, S, _ = torch.linalg.svd(Xc, full_matrices=False)  # Q (P, r, k), S (P, k), k = min(r, n)
    U = Q[:, :, :p]
    tol = max(r, n) * _EPS64 * S[:, :1]
    keep = S[:, :p] > tol  # numerically zero directions are arbitrary: store zeros
    U = U * keep.unsqueeze(1).to(U.dtype)
    U = U * canonical_sign(U, dim=1)
    coef = U.transpose(1, 2) @ Xc  # (P, p, n)
    discarded = S.pow(2).sum(1) - (S[:, :p].pow(2) * keep).sum(1)
    return mean, U, coef.permute(2, 0, 1).contiguous(), discarded.clamp_min(0.0)


def _rel(err: float, ref: float) -> float | None:
    if ref > 0:
        return err / ref
    return 0.0 if err == 0 else None


def _sq_norm_lowrank(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F^2 without forming the product: sum((B^T B) * (A A^T))."""
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0))


def delta_sq_error(
    A: torch.Tensor, B: torch.Tensor, A_hat: torch.Tensor, B_hat: torch.Tensor
) -> tuple[float, float]:
    """(||B^A^ - BA||_F^2, ||BA||_F^2) in float64, in low-rank form (never densified)."""
    A, B, A_hat, B_hat = (t.to("cpu", torch.float64) for t in (A, B, A_hat, B_hat))
    M = torch.cat([B_hat, -B], 1)
    N = torch.cat([A_hat, A], 0)
    return _sq_norm_lowrank(M, N), _sq_norm_lowrank(B, A)


def build_module_basis(
    factors: Factors,
    p: int = 2,
    center: bool = True,
    dtype: torch.dtype = torch.float64,
    *,
    name: str = "module",
    pad_ranks: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RMM basis of one module (spec B3 ``rmm_build`` for one M).

    ``factors[i] = (A_i, B_i)``, scale folded. ``dtype`` is the compute dtype of the PCA; the
    returned tensors have the factors' dtype. Returns (tensors, stats): tensors keyed
    ``left.mean`` ... ``right.coef`` (module docstring), stats a JSON-safe dict.
    """
    ranks = [int(A.shape[0]) for A, _ in factors]
    if pad_ranks and len(set(ranks)) > 1:
        factors = pad_factors(factors, max(ranks))
    r = check_ranks(factors, name)
    n = len(factors)
    out_dtype = factors[0][0].dtype
    d_out, d_in = int(factors[0][1].shape[0]), int(factors[0][0].shape[1])
    pe = effective_p(p, r, n, center)
    warnings: list[str] = []
    if pe != p:
        bound = "min(r, n-1)" if center else "min(r, n)"
        warnings.append(f"basis_size {p} clamped to {pe} = {bound} (r={r}, n={n})")

    left = torch.stack([B.to("cpu", dtype) for _, B in factors])  # (n, d_out, r)
    right = torch.stack([A.to("cpu", dtype).T for A, _ in factors])  # (n, d_in, r)
    tensors: dict[str, torch.Tensor] = {}
    rel: dict[str, float | None] = {}
    for side, X in (("left", left), ("right", right)):
        mean, U, coef, discarded = pca_positions(X, pe, center)
        if mean is not None:
            tensors[f"{side}.mean"] = mean.to(out_dtype).contiguous()
        tensors[f"{side}.basis"] = U.to(out_dtype).contiguous()
        tensors[f"{side}.coef"] = coef.to(out_dtype).contiguous()
        rel[side] = _rel(float(discarded.sum()), float(X.pow(2).sum()))

    delta_err = []
    for i, (A, B) in enumerate(factors):
        A_hat, B_hat = revert_module(tensors, i, dtype=torch.float64)
        delta_err.append(_rel(*delta_sq_error(A, B, A_hat, B_hat)))

    stored = stored_elements(d_out, d_in, r, n, pe, center)
    full = sum(k * (d_out + d_in) for k in ranks)
    ratio = stored / full if full else 0.0
    if ratio >= 1.0:
        warnings.append(
            f"storage ratio {ratio:.3f} >= 1: storing the {n} adapters individually is cheaper"
        )
    known = [e for e in delta_err if e is not None]
    stats: dict[str, Any] = {
        "rank": r,
        "task_ranks": ranks,
        "padded": r != min(ranks),
        "n_tasks": n,
        "p_requested": int(p),
        "p": pe,
        "center": bool(center),
        "d_out": d_out,
        "d_in": d_in,
        "rel_error_left": rel["left"],
        "rel_error_right": rel["right"],
        "rel_error_delta": delta_err,
        "max_rel_error_delta": max(known) if known else None,
        "stored_elements": stored,
        "full_elements": full,
        "storage_ratio": ratio,
        "warnings": warnings,
    }
    return tensors, stats


def _side(tensors: dict[str, torch.Tensor], side: str, i: int, dtype) -> torch.Tensor:
    U = tensors[f"{side}.basis"]  # (P, r, p)
    coef = tensors[f"{side}.coef"]  # (n, P, p)
    if not 0 <= i < coef.shape[0]:
        raise IndexError(f"task index {i} out of range for {coef.shape[0]} tasks")
    dt = dtype or U.dtype
    x = (U.to(dt) @ coef[i].to(dt).unsqueeze(-1)).squeeze(-1)  # (P, r)
    mean = tensors.get(f"{side}.mean")
    if mean is not None:
        x = x + mean.to(dt)
    return x


def revert_module(
    tensors: dict[str, torch.Tensor], task_index: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild task ``task_index``'s factors (A (r x d_in), B (d_out x r)), scale 1 (spec B2).

    ``tensors`` are the local names of :func:`build_module_basis`; missing ``*.mean`` = uncentred.
    ``dtype`` None keeps the stored dtype.
    """
    B = _side(tensors, "left", task_index, dtype).contiguous()
    A = _side(tensors, "right", task_index, dtype).T.contiguous()
    return A, B


def reconstruction_error(
    factors: Factors, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Measured errors of a basis against the original factors, by reverting every task.

    Relative squared Frobenius errors: ``rel_error_left`` / ``rel_error_right`` over the stacked
    factors of all tasks, ``rel_error_delta[i]`` for task i's delta, and ``max_abs_delta`` =
    max |B^_i A^_i - B_i A_i| over tasks (this one densifies; meant for tests and small modules).
    Factors of lower rank than the stored basis are zero-padded first.
    """
    r = tensors["left.basis"].shape[1]
    factors = pad_factors(factors, r)
    errs = {"left": 0.0, "right": 0.0}
    refs = {"left": 0.0, "right": 0.0}
    deltas: list[float | None] = []
    max_abs = 0.0
    for i, (A, B) in enumerate(factors):
        A_hat, B_hat = revert_module(tensors, i, dtype=torch.float64)
        A64, B64 = A.to("cpu", torch.float64), B.to("cpu", torch.float64)
        errs["left"] += float((B_hat - B64).pow(2).sum())
        refs["left"] += float(B64.pow(2).sum())
        errs["right"] += float((A_hat - A64).pow(2).sum())
        refs["right"] += float(A64.pow(2).sum())
        deltas.append(_rel(*delta_sq_error(A64, B64, A_hat, B_hat)))
        max_abs = max(max_abs, float((B_hat @ A_hat - B64 @ A64).abs().max()) if B64.numel() and A64.numel() else 0.0)
    return {
        "rel_error_left": _rel(errs["left"], refs["left"]),
        "rel_error_right": _rel(errs["right"], refs["right"]),
        "rel_error_delta": deltas,
        "max_abs_delta": max_abs,
    }


# ----------------------------------------------------------------------------- the operator


def task_names(task: LoraTask, n: int) -> list[str]:
    """Names of the n tasks in coefficient-row order (unique; the bundle reverts by name)."""
    names = list(task.model_names)
    index = list(task.model_index)
    if len(names) == n:
        out = names
    elif len(index) == n and names and max(index) < len(names):
        out = [names[j] for j in index]
    else:
        out = [f"model{j}" for j in (index if len(index) == n else range(n))]
    if len(set(out)) != len(out):
        raise UserError(f"rmm: task names must be unique to be reverted by name, got {out}")
    return out


def rmm(task: LoraTask) -> LoraResult:
    """Per-module RMM on a LoraTask: LoRA factors, or full fine-tunes' task vectors truncated by
    SVD to ``rank`` by the executor (PT-SVD, ``task.svd_rank`` set).

    Returns a LoraResult without A/B/delta: RMM's output is a bundle, not one adapter. ``bundle``
    holds the module's basis tensors (local names), which the executor hands to
    :func:`mergekit_ortho.bundle.write_bundle`; the report the JSON-safe stats plus ``tasks``
    (coefficient-row order).
    """
    p = task.params
    warnings = []
    if task.svd_rank is None and p.rank is not None:
        warnings.append("parameter rank applies to full fine-tune inputs only; ignored")
    tensors, stats = build_module_basis(
        task.factors,
        p=p.basis_size,
        center=p.center,
        name=task.name,
        pad_ranks=p.pad_ranks,
    )
    stats["warnings"] = warnings + stats["warnings"]
    report = {"tasks": task_names(task, len(task.factors)), **stats}
    return LoraResult(report=report, bundle=BundleEntry(tensors))


register(
    Operator(
        name="rmm",
        summary="Reversible Model Merging: per-position PCA basis + per-task coefficients (a bundle)",
        spec="lora_lego_rmm.md Part B (B2-B6, B9, B11)",
        fn=rmm,
        input_kind="lora",
        result="bundle",
        dense_rank_param="rank",
        needs_base=False,
        params=(
            Param("basis_size", int, 2, "p: basis vectors per position, clamped to min(r, n-1)",
                  minimum=0),
            Param("center", bool, True, "subtract the per-position task mean (stored) before the PCA"),
            Param("rank", int, None, "full fine-tune inputs only: truncated-SVD rank of each task "
                  "vector (PT-SVD)", minimum=1),
            Param("pad_ranks", bool, False, "zero-pad tasks of lower LoRA rank to the module's "
                  "largest rank instead of refusing"),
        ),
        details="For every row of lora_B and every column of lora_A (scale folded), stack the n "
        "tasks' r-vectors, subtract their mean and keep the top-p principal directions and each "
        "task's p coefficients. Any task is rebuilt as mean + basis @ coef; p = min(r, n-1) is "
        "exact, p = 0 is factor averaging. Storage vs all adapters: (p(r+n)+r)/(rn).",
    )
)
