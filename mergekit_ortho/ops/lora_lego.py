"""LoRA-LEGO: rank-wise k-means clustering of the LoRAs' minimal semantic units, dual reweighting.

Spec: ../shared/specs/lora_lego_rmm.md Part A (A1 intuition, A2 math, A3 pseudocode, A4 defaults,
A5 tensors, A6 what to store, A7 complexity, A9 pitfalls, A11 checks) and "Design decisions for
this toolkit" (LoRA-LEGO table). Paper: Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the
Modularity of LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025, arXiv 2409.16167. Only the
paper's first page was available; the [R]/[I] items of the spec are implemented as listed there and
every toolkit decision is named below. Pure tensor functions, no I/O.

Math (A2), per adapted module, PEFT letters, delta_i = B_i @ A_i with the scale already folded in:

* MSU (minimal semantic unit): rank j of LoRA i, u_ij = [a_ij ; b_ij] in R^(d_in + d_out), where
  a_ij = A_i[j, :] and b_ij = B_i[:, j]. The pool holds N = sum_i r_i MSUs; since
  delta_i = sum_j b_ij a_ij^T, a set of LoRAs is a bag of MSUs (permutation invariance and
  concatenation-summation equivalence, A1).
* k-means (Eq. 2): minimise sum_t sum_{u in C_t} ||u - mu_t||^2 over partitions into k clusters,
  mu_t = the member mean. Centroid t becomes rank t of the merged LoRA: A'[t] = abar_t,
  B'[:, t] = bbar_t.
* parameter reweighting ("norm decay"): mu_t <- mu_t * mean_{u in C_t} ||u||_q / ||mu_t||_q, with q = inf
  (largest |entry|) or 2, on the whole concatenated vector (a- and b-part jointly). The update
  bbar abar^T scales with the SQUARE of that factor (A9.4): on the A11 toy, plain centroid 0.25,
  L2 0.5, L-inf 1.0 per entry - expected behaviour.
* output reweighting ("variance expansion"): B' <- gamma * B', gamma = sqrt(r_ref / k) (put into B'
  only, never into both factors), r_ref = mean | max | min of the ranks on this module, or a number.
* special cases (A2): k = N without output reweighting is the exact sum (concatenation); k = N with
  it is sqrt(r_ref / N) * sum; one LoRA with k = r comes back unchanged; one LoRA with k < r is rank
  pruning; different ranks simply pool their MSUs.

Defaults ("Design decisions", A4): k = r_ref (rounded half up: the merged adapter is the size of one
input); k-means++ initialisation (greedy, 2 + floor(ln k) candidates per centre, as scikit-learn),
n_init = 10 restarts keeping the lowest inertia (ties: the earliest restart), max_iter = 300,
tol = 1e-4 (relative to the pool's mean per-feature variance, as scikit-learn), seed = 0; fp32 in and
out; parameter reweighting on with q = inf; output reweighting on with r_ref = mean; raw features;
``canonicalize_sign`` and ``balance_msu`` off; content sorting of the pool on.

Toolkit decisions ([I] in the spec), all deliberate:

* k-means is written in torch (:mod:`.kernels.kmeans`) rather than taken from scikit-learn: no heavy
  dependency for one operator, and full control of determinism (the seeded
  ``registry.generator(seed, module name)``, argmin/argmax ties to the lowest index, no thread-count
  dependent reductions in the decisions). It runs in float64 on CPU in *kernel form* on the Gram
  matrix of the distinct MSUs (m x m): one O(m^2 D) product per module, after which every Lloyd
  iteration costs O(m^2 k) instead of O(m k D).
* scale folding (A2 step 0): the operator receives factors with the scale already folded in; the
  spec's geometry wants sqrt(s_i) in both A_i and B_i (``LoraSource.factors(m, fold="sqrt")``). Any
  split gives the same deltas and keeps concatenation-summation exact; only the clustering geometry
  depends on it (identical when s = 1). The operator is registered with ``factor_fold="sqrt"``,
  so the engine hands it the sqrt split.
* the MSU pool (:mod:`.lora_lego_pool`, whose docstring gives the details) is deduplicated
  (exactly weighted k-means) and sorted by content (A9.6, ``sort_pool``): the result is bitwise
  independent of the order of the LoRAs and of the ranks inside each LoRA.
* k is clamped to N (warning). k = N skips k-means: every MSU is a singleton (duplicates too), so
  the output is the concatenation. If there are only m < k distinct MSUs, the m groups are the
  clusters and k - m clusters are necessarily empty: they are dropped (recorded, warning).
* empty clusters during Lloyd (A9.7), ``empty_clusters``: ``reseed`` (default) moves the point
  farthest from its centre (among clusters with >= 2 distinct members; ties to the lowest index) into
  the empty cluster, deterministically; ``drop`` removes the cluster. The output rank is the number
  of non-empty clusters, and gamma uses that actual rank.
* the reweighting guard (A9.1): a centroid is left as it is (factor 1, listed in
  ``reweight_skipped``) when ||mu_t||_q <= eps * mean member norm, eps = 1e-6 (relative, so the
  factor is bounded by 1e6 and never NaN/Inf, e.g. when (A, B) and (-A, -B) cancel).
* ``features="normalized"`` assigns clusters on normalised a and b parts (centroids always average
  the raw MSUs); ``canonicalize_sign`` and ``balance_msu`` transform the MSUs (:mod:`.lora_lego_pool`).

Per-module report (A6; JSON-safe): k_requested, k_clamped, k (actual rank), n_loras, ranks, n_msu,
n_distinct, r_ref and its rule, gamma, norm, the reweighting switches, seed, n_init, max_iter, tol,
cluster_sizes, inertia (in the clustering feature space; inertia_a / inertia_b split it into the
a- and b-part contributions, A9.2), n_iter, converged, empty_reseeded, empty_dropped,
param_factors, reweight_skipped, members (per cluster, [model index, rank index] pairs) and warnings.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import UserError
from .kernels.kmeans import EMPTY_POLICIES, KMeansResult, kmeans  # noqa: F401  (lego API, tests use L.kmeans)
# the MSU pool: building, feature transforms, content order, partition into clusters; re-exported
from .lora_lego_pool import (balance, canonical_signs, check_factors, content_order,  # noqa: F401
                             group_rows, msu_pool, normalized_features, partition)
from .registry import LoraResult, LoraTask, Operator, Param, register

NORMS = ("inf", "2")
REF_RULES = ("mean", "max", "min")
FEATURES = ("raw", "normalized")
REWEIGHT_EPS = 1e-6  # relative guard of the parameter reweighting (A9.1)

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- parameters


def norm_order(norm: Any) -> str:
    """``"inf"`` or ``"2"`` from the accepted spellings (inf, "inf", "linf", 2, "2", "l2")."""
    if isinstance(norm, bool):
        raise UserError(f"lora_lego: norm must be inf or 2, got {norm!r}")
    if isinstance(norm, (int, float)):
        if math.isinf(norm) and norm > 0:
            return "inf"
        if norm == 2:
            return "2"
    elif isinstance(norm, str):
        s = norm.strip().lower()
        if s in ("inf", "linf", "l_inf", "max", ".inf", "infinity"):
            return "inf"
        if s in ("2", "l2", "2.0"):
            return "2"
    raise UserError(f"lora_lego: norm must be inf or 2, got {norm!r}")


def ref_rank_rule(value: Any) -> str | float:
    """``"mean" | "max" | "min"`` or a positive number (an explicit reference rank)."""
    if isinstance(value, bool):
        raise UserError(f"lora_lego: ref_rank must be mean, max, min or a positive number, got {value!r}")
    if isinstance(value, str):
        s = value.strip().lower()
        if s in REF_RULES:
            return s
        try:
            value = float(s)
        except ValueError:
            raise UserError(
                f"lora_lego: ref_rank must be mean, max, min or a positive number, got {value!r}"
            ) from None
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    raise UserError(f"lora_lego: ref_rank must be mean, max, min or a positive number, got {value!r}")


def reference_rank(rule: Any, ranks: Sequence[int]) -> float:
    """r_ref for gamma = sqrt(r_ref / k) and the default k (A2; A9.9: it sets the global scale)."""
    rule = ref_rank_rule(rule)
    if not isinstance(rule, str):
        return rule
    ranks = [int(r) for r in ranks if r > 0]
    if not ranks:
        raise UserError("lora_lego: no LoRA with rank >= 1 to take a reference rank from")
    if rule == "max":
        return float(max(ranks))
    if rule == "min":
        return float(min(ranks))
    return sum(ranks) / len(ranks)  # integer sum: exact, independent of the order


def default_k(r_ref: float) -> int:
    """k = r_ref rounded half up (at least 1): the merged adapter is the size of one input."""
    return max(1, int(math.floor(r_ref + 0.5)))


class _NormParam(Param):
    def coerce(self, value: Any) -> Any:
        try:
            return norm_order(value)
        except UserError:
            raise ValueError(f"parameter '{self.name}' must be inf or 2, got {value!r}") from None


class _RefRankParam(Param):
    def coerce(self, value: Any) -> Any:
        try:
            return ref_rank_rule(value)
        except UserError:
            raise ValueError(
                f"parameter '{self.name}' must be mean, max, min or a positive number, got {value!r}"
            ) from None


# ----------------------------------------------------------------------------- LEGO


def _qnorm(X: torch.Tensor, q: str) -> torch.Tensor:
    if X.shape[1] == 0:
        return X.new_zeros(X.shape[0])
    return X.abs().amax(1) if q == "inf" else X.norm(dim=1)


def lego_merge(
    factors: Factors,
    k: int | None = None,
    *,
    param_reweight: bool = True,
    output_reweight: bool = True,
    norm: Any = "inf",
    ref_rank: Any = "mean",
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    features: str = "raw",
    sort_pool: bool = True,
    canonicalize_sign: bool = False,
    balance_msu: bool = False,
    empty_clusters: str = "reseed",
    eps: float = REWEIGHT_EPS,
    name: str = "module",
    model_ids: Sequence[Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """LoRA-LEGO on one module (spec A3 for one M). Returns (A' (k x d_in), B' (d_out x k), report).

    ``factors[i] = (A_i, B_i)``, scale folded in (delta_i = B_i @ A_i). The merged delta is B' @ A'
    (gamma already in B'; write it with scale 1). ``k`` None: r_ref rounded half up. Randomness comes
    from ``registry.generator(seed, name)`` only. ``model_ids[i]`` labels LoRA i in the report's
    membership lists (default: i). The output has the dtype of the first factor (float32 in the
    toolkit) and lives on its device; the computation runs on CPU in float64.
    """
    d_in, d_out, ranks = check_factors(factors, name)
    q = norm_order(norm)
    if features not in FEATURES:
        raise UserError(f"lora_lego: features must be one of {', '.join(FEATURES)}, got {features!r}")
    if empty_clusters not in EMPTY_POLICIES:
        raise UserError(
            f"lora_lego: empty_clusters must be one of {', '.join(EMPTY_POLICIES)}, got {empty_clusters!r}"
        )
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
        raise UserError(f"lora_lego: module '{name}': rank k must be an integer >= 1, got {k!r}")
    if n_init < 1 or max_iter < 1 or tol < 0:
        raise UserError(f"lora_lego: n_init and max_iter must be >= 1 and tol >= 0 "
                        f"(got {n_init}, {max_iter}, {tol})")
    rule = ref_rank_rule(ref_rank)
    r_ref = reference_rank(rule, ranks)
    out_dtype = factors[0][0].dtype
    device = factors[0][0].device
    ids_model = list(model_ids) if model_ids is not None else list(range(len(factors)))
    if len(ids_model) != len(factors):
        raise ValueError("model_ids must have one entry per LoRA")

    X, ids = msu_pool(factors)
    N = X.shape[0]
    warnings: list[str] = []
    k_req = int(k) if k is not None else default_k(r_ref)
    k_cl = min(k_req, N)
    if k_cl < k_req:
        warnings.append(f"rank k={k_req} clamped to the number of MSUs N={N}")
    if canonicalize_sign:
        X = X * canonical_signs(X, d_in)[:, None]
    if balance_msu:
        X = balance(X, d_in)
    X = X + 0.0  # -0.0 -> +0.0: equal values sort and group as equal
    order = content_order(X) if sort_pool else torch.arange(N)
    X, ids = X[order], ids[order]
    F = normalized_features(X, d_in) if features == "normalized" else X

    part = partition(F, k_cl, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, name=name,
                     empty_clusters=empty_clusters)
    warnings += part.warnings
    km, n_distinct, cluster, sizes = part.km, part.n_distinct, part.cluster, part.sizes
    kk = int(sizes.numel())
    cnt = sizes.to(torch.float64)[:, None]

    C = torch.zeros(kk, X.shape[1], dtype=torch.float64).index_add_(0, cluster, X) / cnt
    Fc = C if F is X else torch.zeros(kk, F.shape[1], dtype=torch.float64).index_add_(0, cluster, F) / cnt
    diff2 = (F - Fc[cluster]).pow(2)
    inertia_a = float(diff2[:, :d_in].sum())
    inertia_b = float(diff2[:, d_in:].sum())

    member_norm = torch.zeros(kk, dtype=torch.float64).index_add_(0, cluster, _qnorm(X, q)) / cnt[:, 0]
    centre_norm = _qnorm(C, q)
    skipped = centre_norm <= eps * member_norm
    factor = torch.where(skipped, 1.0, member_norm / torch.where(skipped, 1.0, centre_norm))
    if param_reweight:
        C = C * factor[:, None]
    gamma = math.sqrt(r_ref / kk) if output_reweight else 1.0

    A_out = C[:, :d_in].to(device=device, dtype=out_dtype).contiguous()
    B64 = C[:, d_in:].T
    if gamma != 1.0:
        B64 = B64 * gamma
    B_out = B64.to(device=device, dtype=out_dtype).contiguous()

    members: list[list[list[Any]]] = [[] for _ in range(kk)]
    for pos in range(N):
        i, j = int(ids[pos, 0]), int(ids[pos, 1])
        members[int(cluster[pos])].append([ids_model[i], j])
    report: dict[str, Any] = {
        "k_requested": k_req,
        "k_clamped": k_cl,
        "k": kk,
        "n_loras": len(factors),
        "ranks": ranks,
        "n_msu": N,
        "n_distinct": n_distinct,
        "r_ref": r_ref,
        "ref_rank": rule,
        "gamma": gamma,
        "norm": q,
        "param_reweight": bool(param_reweight),
        "output_reweight": bool(output_reweight),
        "features": features,
        "sort_pool": bool(sort_pool),
        "canonicalize_sign": bool(canonicalize_sign),
        "balance_msu": bool(balance_msu),
        "seed": int(seed),
        "n_init": int(n_init),
        "max_iter": int(max_iter),
        "tol": float(tol),
        "clustered": km is not None,
        "cluster_sizes": [int(s) for s in sizes],
        "inertia": inertia_a + inertia_b,
        "inertia_a": inertia_a,
        "inertia_b": inertia_b,
        "n_iter": km.n_iter if km else 0,
        "converged": km.converged if km else True,
        "best_restart": km.run if km else None,
        "empty_clusters": empty_clusters,
        "empty_reseeded": km.reseeded if km else 0,
        "empty_dropped": (km.dropped if km else 0) + (k_cl - n_distinct if km is None and k_cl < N else 0),
        "param_factors": [float(f) for f in factor],
        "reweight_skipped": [int(t) for t in torch.nonzero(skipped).flatten()],
        "members": members,
        "warnings": warnings,
    }
    return A_out, B_out, report


# ----------------------------------------------------------------------------- the operator


def lora_lego(task: LoraTask) -> LoraResult:
    """The registered operator: one LoraTask (one adapted module) -> the merged rank-k factors.

    LoRA inputs only: the plan refuses full checkpoints before any tensor is read (``rank`` is the
    merged rank k, not an SVD extraction rank)."""
    p = task.params
    index = list(task.model_index)
    A, B, report = lego_merge(
        task.factors,
        p.rank,
        param_reweight=p.param_reweight,
        output_reweight=p.output_reweight,
        norm=p.norm,
        ref_rank=p.ref_rank,
        seed=p.seed,
        n_init=p.n_init,
        max_iter=p.max_iter,
        tol=p.tol,
        features=p.features,
        sort_pool=p.sort_pool,
        canonicalize_sign=p.canonicalize_sign,
        balance_msu=p.balance_msu,
        empty_clusters=p.empty_clusters,
        name=task.name,
        model_ids=index if len(index) == len(task.factors) else None,
    )
    return LoraResult(A=A, B=B, report=report)


register(
    Operator(
        name="lora_lego",
        summary="LoRA-LEGO: k-means over the rank-1 units of all LoRAs, dual reweighting (one rank-k LoRA)",
        spec="lora_lego_rmm.md Part A (A2-A6, A9, A11)",
        fn=lora_lego,
        input_kind="lora",
        needs_base=False,
        factor_fold="sqrt",  # spec A2 step 0: sqrt(s) into each factor before forming MSUs
        params=(
            Param("rank", int, None, "k, the merged rank (clusters per module); default r_ref rounded "
                  "(the size of one input); clamped to the number of MSUs. Sweep r, 2r, 4r, N",
                  minimum=1),
            Param("param_reweight", bool, True, "rescale each centroid by mean member norm / centroid "
                  "norm (norm decay)"),
            Param("output_reweight", bool, True, "multiply the merged update by sqrt(r_ref / k) "
                  "(variance expansion); off + rank = N gives the exact sum"),
            _NormParam("norm", str, "inf", "q of the parameter reweighting: inf (largest |entry|) or 2",
                       choices=NORMS),
            _RefRankParam("ref_rank", str, "mean", "r_ref: mean, max or min of the ranks on the module, "
                          "or a number"),
            Param("seed", int, 0, "k-means++ seed; per module the generator is seeded by (seed, module)"),
            Param("n_init", int, 10, "k-means restarts; the lowest inertia is kept", minimum=1),
            Param("max_iter", int, 300, "Lloyd iterations per restart", minimum=1),
            Param("tol", float, 1e-4, "convergence: squared centre shift <= tol * mean feature variance",
                  minimum=0.0),
            Param("features", str, "raw", "clustering features: raw concat(a, b) or normalized "
                  "concat(a/|a|, b/|b|) (centroids always average raw MSUs)", choices=FEATURES),
            Param("sort_pool", bool, True, "sort the MSUs by content first: result independent of the "
                  "order of LoRAs and ranks"),
            Param("canonicalize_sign", bool, False, "flip each MSU so that a's largest |entry| is "
                  "positive ((a, b) and (-a, -b) are the same update)"),
            Param("balance_msu", bool, False, "rescale each MSU to |a| = |b| before clustering"),
            Param("empty_clusters", str, "reseed", "a cluster left empty: reseed (farthest point) or "
                  "drop (lower rank)", choices=EMPTY_POLICIES),
        ),
        details="Per adapted module, every rank j of every LoRA i is a minimal semantic unit "
        "u = concat(row j of A_i, column j of B_i) (scale folded in). The N = sum r_i units are "
        "clustered with "
        "k-means (k-means++, n_init restarts, seeded per module); centroid t becomes rank t of the "
        "merged LoRA (A' row, B' column). Parameter reweighting scales each centroid by the mean "
        "q-norm of its members over its own q-norm; output reweighting multiplies B' by "
        "sqrt(r_ref / k). rank = N without output reweighting is the plain sum of the LoRAs; one "
        "LoRA with rank = r is returned unchanged. Output: a LoRA of rank k with scale 1; the merge "
        "report lists k, cluster sizes and members, inertia, gamma and the reweighting factors per "
        "module. Paper: Zhao et al., ICLR 2025, arXiv 2409.16167.",
    )
)
