"""Core Space merging of LoRA adapters: merge inside a shared pair of orthonormal bases.

Spec: ../shared/specs/widen_corespace.md Part B (B2 math, B3 pseudocode, B4 defaults, B5 tensors,
B8 pitfalls, B10 checks) and its "Design decisions for this toolkit" (Core Space rows). Paper:
Panariello, Marczak et al., NeurIPS 2025, arXiv 2509.17786. Pure tensor functions plus the
registered ``core_space`` LoRA operator; nothing here reads files. Scope (B5): only LoRA-adapted
modules reach this operator (one :class:`LoraTask` per module); every other tensor keeps the base
value. The reference's ``cart`` and plain ``dare`` rules and the KnOTS space are not implemented.

Math (B2), per adapted module W0 (m x n, PyTorch out x in), tasks t = 1..T with factors A_t
(r_t x n), B_t (m x r_t), the LoRA scale already folded into B_t (toolkit decision; the
reference assumes scale 1), R = sum_t r_t:

* stacks A_stack = [A_1; ...; A_T] (R x n) and B_stack = [B_1, ..., B_T] (m x R);
* thin SVDs: V_ref = right singular vectors of A_stack (n x k_A, k_A = min(R, n)), U_ref = left
  singular vectors of B_stack (m x k_B, k_B = min(m, R)); *all* k columns are kept, including
  those of zero singular value (B8.2);
* cores M_t = (U_ref^T B_t)(A_t V_ref), k_B x k_A (rectangular once R exceeds m or n, B8.9);
  U_ref M_t V_ref^T = B_t A_t exactly, so every linear rule equals its full-space result;
* M* = F(M_1..M_T) for the inner rule F; optional isotropization (all singular values of M*
  replaced by their mean); delta* = lambda * U_ref M* V_ref^T.

Inner rules (``inner_method``, reference semantics of ``MatrixPerLayerMerger._merge_tensors``):

* ``task_arithmetic``: sum_t w_t M_t (a **sum**, not a mean, B8.6);
* ``mean``: sum_t w_t M_t / sum_t w_t (the plain mean for unit weights);
* ``ties``: per task keep the top ``density`` fraction of |entries| of its core, weight, elect
  the sign of the sum per entry, average the agreeing entries (disjoint mean). This *is*
  :func:`mergekit_ortho.ops.gta.ties` run on the cores (trimming, sign election and
  disjoint merge are imported, not re-written);
* ``dare_ties``: DARE (:func:`~mergekit_ortho.ops.sparsify.random_drop`: keep each core entry
  with probability ``dare_density``, rescale by 1/dare_density) then the TIES rule above, top-K
  trimming included (as the reference's ``dare-ties``);
* ``tsv``: SVD of each (weighted) core, keep each task's first floor(k/T) triplets
  (k = min(k_B, k_A)), concatenate the U blocks and the V blocks, replace each concatenation by
  its polar factor (U V^T of its SVD), rebuild P_U diag(S) P_V.

Defaults (B4; the reference searches them per task, these are its starting points): lambda 1.0
(the global alpha, applied after reconstruction/isotropization), isotropize false,
inner_method task_arithmetic (exact, and the first rule of DESIGN.md; the paper's headline is
``tsv`` + ``isotropize``), density 0.3 (the vision search's top-K = 30 %, also B10.9's K),
dare_density 0.7 (the reference code's fallback drop rate p = 0.3), trim_rule ``kthvalue`` (the
reference's ``topk_values_mask``: keep |x| >= the (n - int(n*density))-th smallest, ties kept;
``topk`` keeps exactly int(density*n) like the toolkit's ``ties``), normalize true (disjoint
*mean*), rescale true, seed 0.

Toolkit decisions (spec "Design decisions" + choices made here), all deliberate:

* precision: bases, cores, rules and the fold run in float64 (on the factors' device); results
  are cast back to the factors' dtype only at the end (B8.8);
* cached cores are immutable: every stochastic or in-place rule works on copies (B8.7);
* DARE is seeded per (seed, module name, recipe model index) with
  :func:`mergekit_ortho.ops.registry.generator` (the same key as the dense ``dare_*``
  operators), so masks do not depend on processing order or on which other tasks adapt the
  module;
* factorisation gauge: the adapters' native factors are used, as in the reference. TA, mean,
  TSV and isotropization are invariant under (A_t, B_t) -> (G A_t, B_t G^-1); TIES and DARE act
  entry-wise on the cores and are not (B8.4); all rules are invariant under sign flips and
  permutations of basis vectors;
* per-model ``weight`` multiplies the task's core before the rule (TIES/DARE-TIES: after
  trimming/dropping, as the toolkit's ``ties``); per-model ``density`` overrides the method's;
* sign election: a zero sum elects + (the toolkit's TIES); the reference elects the majority
  sign there. Only entries whose kept values cancel exactly differ;
* TSV with heterogeneous ranks: ``tsv_keep: uniform`` (default) is the reference's floor(k/T)
  per task, which truncates tasks of rank > k/T and pads tasks of lower rank with zero-sigma
  triplets; ``tsv_keep: rank`` keeps each task's own LoRA rank r_t (capped at k) instead. With
  equal ranks and R <= min(m, n) both are the same, and core TSV equals full-space TSV keeping r
  triplets per task (B8.5, B10.4b). Polar factors are taken of the kept blocks only (the
  reference also carries zero padding columns, which changes nothing when the kept blocks have
  full column rank);
* output: M* = P S Q^T (an SVD of the small k_B x k_A core, negligible cost) is folded into
  B = U_ref P_rho S_rho, A = Q_rho^T V_ref^T, rho = the numerical rank of M* (singular values
  above max(k_B, k_A) * eps64 * sigma_1; at least 1). This is exact up to float64 round-off,
  gives the smallest exact rank (<= min(k_B, k_A) <= R, smaller than the B = U_ref M*,
  A = V_ref^T form whenever M* is rank deficient or the core is rectangular), and leaves A with
  orthonormal rows (B carries the magnitudes, like the toolkit's other factor outputs).

The inner rules live in :mod:`.core_space_inner` (re-exported here). Public API:
:func:`check_factors`, :func:`core_bases`, :func:`core_matrices`, :func:`decompose`
(-> :class:`CoreSpace`), :func:`merge_matrices` (any rule on any list of equal-shape matrices),
:func:`tsv_merge`, :func:`polar_factor`, :func:`isotropize`, :func:`fold_factors`,
:func:`core_space_merge` (factors -> (A, B, report)), :func:`full_space_merge` (the same rules on
the dense deltas B_t A_t: the full-space reference), and the operator :func:`core_space`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import UserError
# the inner rules on the cores (and on dense deltas for the full-space reference); re-exported
from .core_space_inner import (  # noqa: F401
    INNER_METHODS,
    TRIM_RULES,
    TSV_KEEP,
    merge_matrices,
    finish_core,
    fold_factors,
    polar_factor,
    tsv_keep_counts,
    tsv_merge,
)
from .registry import LoraResult, LoraTask, Operator, Param, register


Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- validation


def check_factors(factors: Factors, name: str = "module") -> tuple[int, int, list[int]]:
    """Validate one module's task factors; return (m, n, ranks). Bad input -> UserError."""
    if len(factors) == 0:
        raise UserError(f"core_space: module '{name}' has no task factors")
    shape = None
    ranks = []
    for i, pair in enumerate(factors):
        if len(pair) != 2:
            raise UserError(f"core_space: module '{name}', task {i}: expected an (A, B) pair")
        A, B = pair
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UserError(
                f"core_space: module '{name}', task {i}: factors must be A (r x in) and B (out x r), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if not (A.is_floating_point() and B.is_floating_point()):
            raise UserError(f"core_space: module '{name}', task {i}: factors must be floating point")
        s = (int(B.shape[0]), int(A.shape[1]))
        if shape is None:
            shape = s
        elif s != shape:
            raise UserError(
                f"core_space: module '{name}': task {i} adapts a {s[0]}x{s[1]} weight but task 0 a "
                f"{shape[0]}x{shape[1]} one; all tasks of a module must have the same shape"
            )
        if not (_finite(A) and _finite(B)):
            raise UserError(f"core_space: module '{name}', task {i}: factors contain NaN or Inf")
        ranks.append(int(A.shape[0]))
    return shape[0], shape[1], ranks


def _finite(x: torch.Tensor) -> bool:
    # a sum is finite when every entry is (cheap); a huge finite sum can overflow: then check all
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


# ----------------------------------------------------------------------------- bases and cores


def core_bases(factors: Factors, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_ref m x k_B, V_ref n x k_A): thin-SVD bases of the stacked B's and A's (B2).

    All k = min(dim, R) singular vectors are kept, zero singular values included. R = 0 (every
    task of rank 0) gives empty bases."""
    A_stack = torch.cat([A.to(dtype) for A, _ in factors], dim=0)  # R x n
    B_stack = torch.cat([B.to(dtype) for _, B in factors], dim=1)  # m x R
    R, n = A_stack.shape
    m = B_stack.shape[0]
    if R == 0:
        return B_stack.new_zeros(m, 0), A_stack.new_zeros(n, 0)
    V_ref = torch.linalg.svd(A_stack, full_matrices=False).Vh.mT  # right singular vectors of A_stack
    U_ref = torch.linalg.svd(B_stack, full_matrices=False).U  # left singular vectors of B_stack
    return U_ref, V_ref


def core_matrices(factors: Factors, U_ref: torch.Tensor, V_ref: torch.Tensor) -> list[torch.Tensor]:
    """M_t = (U_ref^T B_t)(A_t V_ref), each k_B x k_A, without forming B_t A_t."""
    dt = U_ref.dtype
    return [(U_ref.mT @ B.to(dt)) @ (A.to(dt) @ V_ref) for A, B in factors]


@dataclass(frozen=True)
class CoreSpace:
    """One module in core space: the bases and the (never mutated) task cores."""

    U_ref: torch.Tensor  # m x k_B
    V_ref: torch.Tensor  # n x k_A
    cores: tuple[torch.Tensor, ...]  # T x (k_B x k_A)
    ranks: tuple[int, ...]

    @property
    def core_shape(self) -> tuple[int, int]:
        return int(self.U_ref.shape[1]), int(self.V_ref.shape[1])

    def reconstruct(self, M: torch.Tensor) -> torch.Tensor:
        """U_ref M V_ref^T (dense, m x n)."""
        return self.U_ref @ M @ self.V_ref.mT


def decompose(factors: Factors, name: str = "module", dtype: torch.dtype = torch.float64) -> CoreSpace:
    """Validate the factors, build the bases and the cores (B2/B3)."""
    _, _, ranks = check_factors(factors, name)
    U_ref, V_ref = core_bases(factors, dtype)
    return CoreSpace(U_ref, V_ref, tuple(core_matrices(factors, U_ref, V_ref)), tuple(ranks))


# ----------------------------------------------------------------------------- isotropization


def isotropize(M: torch.Tensor) -> torch.Tensor:
    """Replace every singular value of M (thin SVD, min(shape) values) by their mean."""
    if M.numel() == 0:
        return M.clone()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U * S.mean()) @ Vh


# ----------------------------------------------------------------------------- the merge (output folding: core_space_inner)


def core_space_merge(
    factors: Factors,
    inner_method: str = "task_arithmetic",
    *,
    lam: float = 1.0,
    isotropize_result: bool = False,
    name: str = "module",
    out_dtype: torch.dtype | None = None,
    space: CoreSpace | None = None,
    **rule: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Merge one module's LoRA factors in core space; returns (A, B, report), B @ A = delta*.

    ``rule`` takes :func:`merge_matrices`' keyword arguments (weights, density, densities,
    dare_density, rescale, normalize, trim_rule, seed, model_index, tsv_keep). ``space`` reuses
    an existing :func:`decompose` result (its cores are not modified). The result has the factors'
    dtype unless ``out_dtype`` is given. :func:`merged_core` then :func:`finish_core`."""
    cs, M = merged_core(factors, inner_method, isotropize_result=isotropize_result, name=name, space=space, **rule)
    return finish_core(cs.U_ref, cs.V_ref, M, cs.ranks, lam=lam, inner_method=inner_method,
                       isotropize_result=isotropize_result, out_dtype=out_dtype or factors[0][0].dtype,
                       tsv_keep=rule.get("tsv_keep", "uniform"))


def merged_core(
    factors: Factors,
    inner_method: str = "task_arithmetic",
    *,
    isotropize_result: bool = False,
    name: str = "module",
    space: CoreSpace | None = None,
    **rule: Any,
) -> tuple[CoreSpace, torch.Tensor]:
    """Everything before lambda: the core space and the merged (isotropized) core M*."""
    cs = space if space is not None else decompose(factors, name)
    k_B, k_A = cs.core_shape
    if sum(cs.ranks) == 0:
        M = cs.U_ref.new_zeros(k_B, k_A)
    else:
        M = merge_matrices(cs.cores, inner_method, name=name, ranks=cs.ranks, **rule)
    if isotropize_result:
        M = isotropize(M)
    return cs, M


def full_space_merge(
    factors: Factors,
    inner_method: str = "task_arithmetic",
    *,
    lam: float = 1.0,
    isotropize_result: bool = False,
    name: str = "module",
    dtype: torch.dtype = torch.float64,
    **rule: Any,
) -> torch.Tensor:
    """The full-space reference: the same rule on the dense deltas B_t A_t (m x n, ``dtype``).

    TSV in full space keeps floor(min(m, n)/T) triplets per task (the reference, B8.5) with
    ``tsv_keep: uniform``, or r_t per task with ``tsv_keep: rank`` (B10.4b). Isotropization runs
    over min(m, n) singular values. Costs T dense m x n matrices (and T + 2 dense SVDs for TSV)."""
    _, _, ranks = check_factors(factors, name)
    deltas = [B.to(dtype) @ A.to(dtype) for A, B in factors]
    M = merge_matrices(deltas, inner_method, name=name, ranks=ranks, **rule)
    if isotropize_result:
        M = isotropize(M)
    return M * lam if lam != 1.0 else M


# ----------------------------------------------------------------------------- the operator


def core_space(task: LoraTask) -> LoraResult:
    """The registered operator: one LoraTask (one adapted module) -> merged low-rank factors.

    LoRA inputs only: the plan refuses full checkpoints before any tensor is read.
    ``core_space_apply(task, core_space_prepare(task))`` (`merge sweep` caches the prepared part)."""
    return core_space_apply(task, core_space_prepare(task))


def _rule(task: LoraTask) -> dict[str, Any]:
    p = task.params
    T = len(task.factors)
    mps = task.model_params
    if len(mps) != T:
        raise UserError(f"core_space: module '{task.name}': {len(mps)} model parameter sets for {T} tasks")
    index = list(task.model_index)
    return dict(weights=[mp.weight for mp in mps], density=p.density, densities=[mp.density for mp in mps],
                dare_density=p.dare_density, rescale=p.rescale, normalize=p.normalize, trim_rule=p.trim_rule,
                seed=p.seed, model_index=index if len(index) == T else None, tsv_keep=p.tsv_keep)


def core_space_prepare(task: LoraTask) -> dict[str, torch.Tensor]:
    """Everything but lambda: the bases U_ref, V_ref and the merged core M* (float64). Reads every
    parameter except ``lambda``."""
    cs, M = merged_core(task.factors, task.params.inner_method, isotropize_result=task.params.isotropize,
                        name=task.name, **_rule(task))
    return {"U_ref": cs.U_ref, "V_ref": cs.V_ref, "M": M}


def core_space_apply(task: LoraTask, prepared: dict[str, torch.Tensor]) -> LoraResult:
    """lambda * M*, folded into the output factors (one SVD of the small core)."""
    p = task.params
    _rule(task)  # the same checks as prepare, also when prepared comes from a cache
    ranks = [int(A.shape[0]) for A, _ in task.factors]
    A, B, report = finish_core(prepared["U_ref"], prepared["V_ref"], prepared["M"], ranks, lam=p["lambda"],
                               inner_method=p.inner_method, isotropize_result=p.isotropize,
                               out_dtype=task.factors[0][0].dtype, tsv_keep=p.tsv_keep)
    names = list(task.model_names)
    if len(names) == len(task.factors):
        report["tasks"] = names
    return LoraResult(A=A, B=B, report=report)


register(
    Operator(
        name="core_space",
        summary="Core Space: merge LoRAs inside shared SVD bases of the stacked factors (TA/mean/TIES/DARE-TIES/TSV)",
        spec="widen_corespace.md Part B (B2-B5, B8, B10)",
        fn=core_space,
        input_kind="lora",
        needs_base=False,
        params=(
            Param("inner_method", str, "task_arithmetic", "merge rule applied to the cores",
                  choices=INNER_METHODS),
            Param("lambda", float, 1.0, "global scale alpha of the merged delta (after isotropize)"),
            Param("isotropize", bool, False, "replace all singular values of the merged core by their mean (Iso)"),
            Param("density", float, 0.3, "ties / dare_ties: fraction of each core's entries kept by "
                  "magnitude (the reference's top-K / 100)", minimum=0.0, maximum=1.0),
            Param("trim_rule", str, "kthvalue", "kthvalue: keep |x| >= the (n - int(n*density))-th "
                  "smallest (reference); topk: keep exactly int(n*density)", choices=TRIM_RULES),
            Param("dare_density", float, 0.7, "dare_ties: probability that a core entry survives DARE "
                  "(1 - p)", minimum=0.0, maximum=1.0),
            Param("rescale", bool, True, "dare_ties: divide surviving entries by dare_density"),
            Param("normalize", bool, True, "ties / dare_ties: disjoint mean (true) or sum (false) "
                  "of the agreeing entries"),
            Param("seed", int, 0, "dare_ties: masks depend on (seed, module, model index)"),
            Param("tsv_keep", str, "uniform", "tsv: triplets kept per task, floor(k/T) (uniform, "
                  "reference) or each task's LoRA rank (rank)", choices=TSV_KEEP),
        ),
        model_params=(
            Param("weight", float, 1.0, "multiplies the task's core before the rule"),
            Param("density", float, None, "ties / dare_ties: this task's top-K fraction (default: "
                  "the method's density)", minimum=0.0, maximum=1.0),
        ),
        details="Per adapted module (LoRA scale folded into B): V_ref = right singular vectors of "
        "[A_1; ...; A_T], U_ref = left singular vectors of [B_1 ... B_T] (thin, all min(dim, R) "
        "columns, float64); each task becomes the core M_t = (U_ref^T B_t)(A_t V_ref) of size "
        "min(m,R) x min(n,R). The inner rule merges the cores: task_arithmetic = sum (exactly "
        "full-space TA), mean, ties (top density per task, sign election, disjoint mean), "
        "dare_ties (drop with keep probability dare_density, rescale, then ties) or tsv (per-core "
        "SVD, floor(k/T) triplets per task, polar-orthogonalised U and V blocks); isotropize "
        "flattens the spectrum; lambda scales. Output: a LoRA of rank <= R (B = U_ref P S, "
        "A = Q^T V_ref^T from the SVD of the merged core). TIES/DARE depend on the factorisation "
        "gauge (native factors are used); TA/mean/TSV/Iso do not. Panariello, Marczak et al., "
        "NeurIPS 2025, arXiv 2509.17786.",
    )
)
