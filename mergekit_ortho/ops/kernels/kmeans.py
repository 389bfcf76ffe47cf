"""Weighted k-means (Lloyd, Euclidean, k-means++ initialisation) in kernel form, for LoRA-LEGO.

Plain formulation (tests/test_kernels.py, ``plain_lloyd``): centres as explicit D-vectors, squared
distances ||x - mu||^2 per point and centre, argmin, weighted member means. Here every quantity is
written through the Gram matrix G = X X^T of the (distinct) points instead, a centre being a row
of a k x m membership matrix M (mu_t = sum_j M_tj x_j): one O(m^2 D) product, then O(m^2 k) per
iteration instead of O(m k D) - the MSUs of a module are few (hundreds) but long (d_in + d_out,
thousands). Rounding differs from the plain form, so the two agree to a tolerance, not bit for
bit: the same labels on inputs without near-ties, inertia to 1e-9 relative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import BadParameters

EMPTY_POLICIES = ("reseed", "drop")


class KMeansArgumentError(BadParameters):
    """k, n_init, max_iter, tol or the empty-cluster policy out of range (a recipe can set them)."""


@dataclass
class KMeansResult:
    """labels (m,) in 0..k-1 (every cluster non-empty), k, the weighted inertia (kernel form),
    Lloyd iterations of the kept run, whether it converged, and its empty-cluster events."""

    labels: torch.Tensor
    k: int
    inertia: float
    n_iter: int
    converged: bool
    reseeded: int = 0
    dropped: int = 0
    run: int = 0  # index of the kept restart
    run_inertias: tuple[float, ...] = ()


def _sample(p: torch.Tensor, t: int, g: torch.Generator) -> torch.Tensor:
    """t indices drawn with probability proportional to p >= 0 (sum > 0), from g, deterministically."""
    cum = torch.cumsum(p, 0)
    u = torch.rand(t, generator=g, dtype=torch.float64) * cum[-1]
    idx = torch.searchsorted(cum, u, right=True)
    last = int(torch.nonzero(p > 0)[-1])  # float round-off must not pick a zero-probability point
    return idx.clamp_max(last)


def _kmeanspp(G: torch.Tensor, gd: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator) -> list[int]:
    """Greedy weighted k-means++ on the Gram matrix; fewer than k centres when the pool runs out."""
    n_trials = 2 + int(math.log(k))
    first = int(_sample(w, 1, g)[0])
    centres = [first]
    d2 = (gd + gd[first] - 2 * G[:, first]).clamp_min(0.0)
    d2[first] = 0.0
    for _ in range(1, k):
        p = w * d2
        if not float(p.sum()) > 0.0:
            break
        cand = _sample(p, n_trials, g)
        d2c = (gd[:, None] + gd[cand][None, :] - 2 * G[:, cand]).clamp_min(0.0)
        d2c[cand, torch.arange(len(cand))] = 0.0
        new = torch.minimum(d2[:, None], d2c)
        best = int(torch.argmin((w[:, None] * new).sum(0)))  # ties: first candidate
        centres.append(int(cand[best]))
        d2 = new[:, best]
    return centres


def _membership(labels: torch.Tensor, k: int, w: torch.Tensor) -> torch.Tensor:
    """k x m matrix whose row t holds the weights of cluster t's members, normalised to sum 1."""
    M = torch.zeros(k, labels.numel(), dtype=w.dtype)
    M[labels, torch.arange(labels.numel())] = w
    s = M.sum(1, keepdim=True)
    return M / torch.where(s > 0, s, 1.0)


def _distances(G: torch.Tensor, gd: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Squared distances (m x k) from every point to every centre mu_t = sum_j M_tj x_j."""
    GM = G @ M.T
    cc = (M * GM.T).sum(1)
    D = (gd[:, None] - 2 * GM + cc[None, :]).clamp_min(0.0)
    return torch.where(M.sum(1)[None, :] > 0, D, torch.inf)  # empty centres are never nearest


def _fix_empty(labels: torch.Tensor, dmin: torch.Tensor, k: int, policy: str) -> tuple[torch.Tensor, int, int, int]:
    """Re-seed or drop empty clusters. Returns (labels, k, reseeded, dropped)."""
    counts = torch.bincount(labels, minlength=k)
    empty = [int(j) for j in torch.nonzero(counts == 0).flatten()]
    if not empty:
        return labels, k, 0, 0
    labels, dmin = labels.clone(), dmin.clone()
    reseeded = 0
    left = []
    for j in empty:
        eligible = counts[labels] >= 2 if policy == "reseed" else torch.zeros_like(labels, dtype=torch.bool)
        if not bool(eligible.any()):
            left.append(j)
            continue
        i = int(torch.argmax(torch.where(eligible, dmin, -1.0)))  # farthest; ties: lowest index
        counts[labels[i]] -= 1
        labels[i] = j
        counts[j] = 1
        dmin[i] = 0.0
        reseeded += 1
    if left:
        keep = torch.ones(k, dtype=torch.bool)
        keep[left] = False
        remap = torch.cumsum(keep.long(), 0) - 1
        labels = remap[labels]
        k -= len(left)
    return labels, k, reseeded, len(left)


def _lloyd(G, gd, w, centres: list[int], k: int, max_iter: int, tol_abs: float, policy: str):
    m = w.numel()
    M = torch.zeros(k, m, dtype=G.dtype)
    M[torch.arange(len(centres)), torch.tensor(centres, dtype=torch.long)] = 1.0
    prev, converged, it = None, False, 0
    reseeded = dropped = 0
    labels = None
    for it in range(1, max_iter + 1):
        D = _distances(G, gd, M)
        labels = torch.argmin(D, 1)  # ties: lowest cluster index
        dmin = D.gather(1, labels[:, None]).squeeze(1)
        labels, k_new, nr, nd = _fix_empty(labels, dmin, k, policy)
        reseeded += nr
        dropped += nd
        M_new = _membership(labels, k_new, w)
        if prev is not None and k_new == k and torch.equal(labels, prev):
            M, converged = M_new, True
            break
        if k_new == k:
            dM = M_new - M
            shift = float(((dM @ G) * dM).sum())
        else:
            shift = math.inf
        M, k, prev = M_new, k_new, labels
        if shift <= tol_abs:
            converged = True
            break
    GM = G @ M.T
    cc = (M * GM.T).sum(1)
    d = (gd - 2 * GM.gather(1, labels[:, None]).squeeze(1) + cc[labels]).clamp_min(0.0)
    inertia = float((w * d).sum())
    return labels, k, inertia, it, converged, reseeded, dropped


def kmeans(
    X: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    empty_clusters: str = "reseed",
    init: Sequence[int] | None = None,
) -> KMeansResult:
    """Weighted k-means (Lloyd, Euclidean), k-means++ initialisation, best of ``n_init`` restarts.

    X (m x D) points, ``weights`` (m,) positive multiplicities (default 1). Works in float64 on the
    Gram matrix (kernel form). ``init``: explicit initial centres (point indices; then one run).
    Convergence: labels unchanged, or the total squared centre shift <= tol * (mean per-feature
    variance of the weighted points). Restarts draw from ``generator`` one after another, so
    restart j is the same whatever n_init is: the best inertia never increases with n_init.
    Points should be distinct (``lego_merge`` deduplicates and passes multiplicities as weights);
    with duplicate points a re-seeded cluster may hold a copy of another cluster's point.
    """
    if X.dim() != 2 or X.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty 2-D point matrix, got shape {tuple(X.shape)}")
    if k < 1 or n_init < 1 or max_iter < 1 or tol < 0:
        raise KMeansArgumentError(f"kmeans needs k, n_init, max_iter >= 1 and tol >= 0 (k={k}, "
                                  f"n_init={n_init}, max_iter={max_iter}, tol={tol})")
    if empty_clusters not in EMPTY_POLICIES:
        raise KMeansArgumentError(f"empty_clusters must be one of {', '.join(EMPTY_POLICIES)}, got {empty_clusters!r}")
    Xd = X.detach().to("cpu", torch.float64)
    m = Xd.shape[0]
    w = torch.ones(m, dtype=torch.float64) if weights is None else weights.detach().to("cpu", torch.float64)
    if w.shape != (m,) or not bool((w > 0).all()):
        raise ValueError("kmeans weights must be positive, one per point")
    k = min(int(k), m)
    G = Xd @ Xd.T
    gd = G.diagonal().clone()
    W = float(w.sum())
    mean_var = max(float((w * gd).sum()) - float(w @ G @ w) / W, 0.0) / (W * max(Xd.shape[1], 1))
    tol_abs = tol * mean_var
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    runs = 1 if init is not None else n_init
    best, inertias = None, []
    for run in range(runs):
        centres = [int(i) for i in init] if init is not None else _kmeanspp(G, gd, w, k, g)
        if init is not None and (len(centres) > k or any(not 0 <= c < m for c in centres)):
            raise ValueError(f"kmeans init must be at most k={k} point indices in [0, {m})")
        res = _lloyd(G, gd, w, centres, k, max_iter, tol_abs, empty_clusters)
        inertias.append(res[2])
        if best is None or res[2] < best[0][2]:
            best = (res, run)
    (labels, kk, inertia, it, conv, nr, nd), run = best
    return KMeansResult(labels, kk, inertia, it, conv, nr, nd, run, tuple(inertias))
