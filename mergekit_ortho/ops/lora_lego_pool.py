"""The MSU pool of LoRA-LEGO (:mod:`.lora_lego`, whose docstring gives the math, the paper, the
defaults and the spec sections, lora_lego_rmm.md Part A): building the pool of minimal semantic
units u_ij = [A_i[j, :] ; B_i[:, j]], its feature transforms (sign canonicalisation, a/b balance,
normalised features), its content order, and its partition into clusters.

:func:`partition` is the clustering step of A3: every MSU its own cluster when k = N (the
concatenation); the distinct groups when there are at most k distinct MSUs; else weighted
k-means (:func:`.kernels.kmeans.kmeans`) on the distinct MSUs, weighted by multiplicity (exactly
k-means on the full pool), seeded by ``registry.generator(seed, module name)``. Clusters are then
ordered by size (descending), then by their first member in the pool.

Toolkit decisions ([I] in the spec) of the pool, all deliberate:

* the pool is deduplicated: identical MSUs (in the clustering feature space) become one point with
  a weight (its multiplicity), which is exactly weighted k-means on the full pool; it also makes
  "fewer distinct MSUs than k" a counted fact instead of a numerical accident.
* content sorting (A9.6, ``sort_pool``): the pool is sorted lexicographically by the MSU values
  (after -0.0 -> +0.0) before anything random happens, so the result is bitwise independent of the
  order of the LoRAs and of the ranks inside each LoRA. Clusters are ordered by size (descending),
  then by their first member in that sorted pool.
* ``features="normalized"`` assigns clusters on [a/||a|| ; b/||b||] (re-implementation R2) but the
  centroids always average the raw MSUs; ``canonicalize_sign`` flips each MSU so that the first
  largest-|value| entry of a (of b when a = 0) is positive; ``balance_msu`` rescales a and b to
  equal 2-norms sqrt(||a|| ||b||) (zero MSUs stay zero). Both change the centroids, not only the
  assignment, and both leave every MSU's own update b a^T unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import UserError
from .kernels.kmeans import KMeansResult, kmeans
from .registry import generator

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


def check_factors(factors: Factors, name: str = "module") -> tuple[int, int, list[int]]:
    """Validate one module's factors; return (d_in, d_out, ranks). Errors name the module."""
    if len(factors) == 0:
        raise UserError(f"lora_lego: module '{name}' has no LoRA factors")
    shapes, ranks = set(), []
    for i, pair in enumerate(factors):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise UserError(f"lora_lego: module '{name}', LoRA {i}: expected a pair (A, B)")
        A, B = pair
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
            raise UserError(f"lora_lego: module '{name}', LoRA {i}: A and B must be tensors")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UserError(
                f"lora_lego: module '{name}', LoRA {i}: factors must be A (r x d_in) and "
                f"B (d_out x r), got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if not (A.dtype.is_floating_point and B.dtype.is_floating_point):
            raise UserError(f"lora_lego: module '{name}', LoRA {i}: factors must be floating point")
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise UserError(f"lora_lego: module '{name}', LoRA {i}: factors contain NaN or Inf")
        shapes.add((int(B.shape[0]), int(A.shape[1])))
        ranks.append(int(A.shape[0]))
    if len(shapes) > 1:
        raise UserError(
            f"lora_lego: module '{name}': LoRAs adapt different shapes (d_out, d_in) {sorted(shapes)}"
        )
    if sum(ranks) == 0:
        raise UserError(f"lora_lego: module '{name}': every LoRA has rank 0, nothing to merge")
    d_out, d_in = shapes.pop()
    return d_in, d_out, ranks


def msu_pool(factors: Factors, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The MSU pool: X (N x (d_in + d_out)), row = [A_i[j, :] ; B_i[:, j]], and ids (N x 2) = (i, j).

    Rows are in input order: LoRA by LoRA, rank by rank. On CPU, in ``dtype``."""
    rows, ids = [], []
    for i, (A, B) in enumerate(factors):
        r = A.shape[0]
        if r == 0:
            continue
        rows.append(torch.cat([A.detach().to("cpu", dtype), B.detach().to("cpu", dtype).T], 1))
        ids.append(torch.stack([torch.full((r,), i, dtype=torch.long), torch.arange(r)], 1))
    return torch.cat(rows, 0), torch.cat(ids, 0)


def canonical_signs(X: torch.Tensor, d_in: int) -> torch.Tensor:
    """+-1 per MSU making the first largest-|value| entry of a (of b when a = 0) positive (A9.1)."""

    def lead(P: torch.Tensor) -> torch.Tensor:
        if P.shape[1] == 0:
            return P.new_zeros(P.shape[0])
        idx = P.abs().argmax(1, keepdim=True)  # first maximum
        return torch.sign(P.gather(1, idx).squeeze(1))

    s = lead(X[:, :d_in])
    s = torch.where(s == 0, lead(X[:, d_in:]), s)
    return torch.where(s == 0, torch.ones_like(s), s)


def balance(X: torch.Tensor, d_in: int) -> torch.Tensor:
    """Rescale every MSU to ||a|| = ||b|| = sqrt(||a|| ||b||) (A9.2); b a^T is unchanged."""
    a, b = X[:, :d_in], X[:, d_in:]
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    fa = torch.where(ok, (nb / torch.where(ok, na, 1.0)).sqrt(), 0.0)
    fb = torch.where(ok, (na / torch.where(ok, nb, 1.0)).sqrt(), 0.0)
    return torch.cat([a * fa[:, None], b * fb[:, None]], 1)


def normalized_features(X: torch.Tensor, d_in: int) -> torch.Tensor:
    """[a/||a|| ; b/||b||] (zero parts stay zero): the R2 assignment features."""
    a, b = X[:, :d_in], X[:, d_in:]
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    return torch.cat([a / torch.where(na > 0, na, 1.0), b / torch.where(nb > 0, nb, 1.0)], 1)


def content_order(X: torch.Tensor) -> torch.Tensor:
    """A permutation sorting the rows of X lexicographically (stable: equal rows keep their order)."""
    if X.shape[0] <= 1:
        return torch.arange(X.shape[0])
    _, inverse = torch.unique(X, dim=0, return_inverse=True)  # sorted distinct rows
    return torch.argsort(inverse, stable=True)


def group_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Identical rows -> groups numbered by first occurrence. Returns (inverse (N,), first (m,))."""
    N = X.shape[0]
    _, inv = torch.unique(X, dim=0, return_inverse=True)
    m = int(inv.max()) + 1
    first = torch.full((m,), N, dtype=torch.long).scatter_reduce(0, inv, torch.arange(N), "amin")
    order = torch.argsort(first)  # groups by first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m)
    return rank[inv], first[order]


@dataclass(frozen=True)
class Partition:
    """The pool's clusters: ``cluster[pos]`` for every MSU (clusters ordered by size, descending,
    then by first member), ``sizes`` per cluster, the number of distinct MSUs (N when k = N: not
    counted), the k-means result when k-means ran, and the warnings of the step."""

    cluster: torch.Tensor
    sizes: torch.Tensor
    n_distinct: int
    km: KMeansResult | None = None
    warnings: list[str] = field(default_factory=list)


def partition(F: torch.Tensor, k_cl: int, *, n_init: int, max_iter: int, tol: float, seed: int, name: str,
              empty_clusters: str) -> Partition:
    """Partition the N pool rows of F (the clustering features, float64, in pool order) into at
    most ``k_cl`` (<= N) clusters: singletons, the distinct groups, or weighted k-means."""
    N = F.shape[0]
    warnings: list[str] = []
    km: KMeansResult | None = None
    n_distinct = N
    if k_cl == N:  # singletons: no clustering, the concatenation
        cluster = torch.arange(N)
        kk = N
    else:
        inverse, first = group_rows(F)
        n_distinct = int(first.numel())
        if n_distinct <= k_cl:
            cluster, kk = inverse, n_distinct
            if n_distinct < k_cl:
                warnings.append(f"only {n_distinct} distinct MSUs for k={k_cl}: {k_cl - n_distinct} "
                                "empty cluster(s) dropped")
        else:
            w = torch.bincount(inverse, minlength=n_distinct).to(torch.float64)
            km = kmeans(F[first], k_cl, weights=w, n_init=n_init, max_iter=max_iter, tol=tol,
                        generator=generator(seed, name), empty_clusters=empty_clusters)
            cluster, kk = km.labels[inverse], km.k
            if km.dropped:
                warnings.append(f"{km.dropped} empty cluster(s) dropped")
            if not km.converged:
                warnings.append(f"k-means did not converge in max_iter={max_iter} iterations")

    # deterministic cluster order: size descending, then first member in the (sorted) pool
    sizes = torch.bincount(cluster, minlength=kk)
    firstpos = torch.full((kk,), N, dtype=torch.long).scatter_reduce(0, cluster, torch.arange(N), "amin")
    perm = sorted(range(kk), key=lambda t: (-int(sizes[t]), int(firstpos[t])))
    relabel = torch.empty(kk, dtype=torch.long)
    relabel[torch.tensor(perm, dtype=torch.long)] = torch.arange(kk)
    return Partition(relabel[cluster], sizes[perm], n_distinct, km, warnings)
