"""The sparsifiers of generalized task arithmetic (:mod:`.gta`), one task vector at a time.

Spec: ../shared/specs/mergekit_compat.md M15.1-M15.4 (mergekit 0.1.5 ``sparsify``), M27
(randomness). Every ``*_`` function works in place on a contiguous tensor and returns it.

* ``magnitude`` (ties): d >= 1 unchanged, d <= 0 zeros, else keep the k = max(1, int(d * n))
  largest |tau| of the whole flattened tensor (``trim_rule: kthvalue``: every |tau| >= the
  k'-th smallest, k' = n - int(n * d), the TIES reference code).
* ``random`` (dare_*): d >= 1 unchanged, else keep each entry with probability d.
* ``magnitude_outliers`` (breadcrumbs*): d >= 1 unchanged (gamma ignored too), else drop the
  n_top = int(gamma * n) largest, keep the next n_keep = int(d * n) (fewer dropped on top when
  gamma > 1 - d), drop the rest.
* ``della_magprune`` (della*): d >= 1 unchanged, d <= 0 zeros, else rank |tau| ascending along
  dim 1 (a 1-D tensor is one row; 3-D and more: per fixed index of the other dimensions), r = 0
  .. L-1, and keep each entry with probability p = d - eps + 2 eps r / (L - 1). Requires
  0 < d - eps and d + eps < 1 (mergekit's check). Rows of length 1 get p = d (mergekit divides
  0 by 0 there and crashes, spec A5).

The L1 rescale (``rescale_l1_``) is applied by the caller for every sparsifier alike.

Deliberate deviations (mergekit leaves them unspecified): equal magnitudes are ordered by flat
index - the lower index counts as the larger for magnitude / magnitude_outliers, as the smaller
rank for della - so the kept set (or the probabilities) are deterministic; NaN is the largest
magnitude. Random masks come from a generator seeded by (seed, tensor name, model index): the
same keep probability for every entry as mergekit, not the same draws (M27).

The plain formulations (``*_plain``) are the definitions; the kernels in :mod:`.kernels` (radix
top-k and rank band, chunked DARE drop, DELLA's packed-key rank lookup) are tested bit-equal to them in
tests/test_kernels.py.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .kernels import dare_drop, della_drop, topk
from .kernels._chunks import chunk_len, over_ranges

# ----------------------------------------------------------------------------- plain formulations


def _descending_order(flat: torch.Tensor) -> torch.Tensor:
    return torch.sort(flat.abs(), descending=True, stable=True).indices  # NaN sorts as largest


def keep_top_k_plain_(flat: torch.Tensor, k: int) -> None:
    """Zero, in place, all but the k largest magnitudes of ``flat`` (1-D); equal magnitudes in
    increasing index order (a stable descending sort; NaN sorts as the largest). 1 <= k <= n."""
    keep_rank_band_plain_(flat, 0, k)


def keep_rank_band_plain_(flat: torch.Tensor, lo: int, hi: int) -> None:
    """Zero, in place, all but ranks lo..hi-1 of the stable descending order of |flat|."""
    drop = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    drop[_descending_order(flat)[lo:hi]] = False
    flat.masked_fill_(drop, 0)


def random_drop_plain(x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool) -> torch.Tensor:
    """DARE by the definition: keep x where its float32 draw is < density (density < 1), divided
    by density when ``rescale`` (the 1/d form Core Space uses; GTA rescales by the L1 ratio)."""
    u = torch.rand(x.shape, generator=gen, dtype=torch.float32, device=x.device)
    y = torch.where(u < density, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return y / density if rescale and density > 0 else y


def row_ranks_plain(mag: torch.Tensor) -> torch.Tensor:
    """0-based ranks within each row of ``mag`` (2-D): a stable ascending sort's inverse."""
    idx = torch.sort(mag, dim=1, stable=True).indices
    ar = torch.arange(mag.shape[1], device=mag.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, ar)


def della_keep_prob(ranks: torch.Tensor, length: int, density: float, epsilon: float) -> torch.Tensor:
    """p = d - eps + 2 eps r / (L - 1) in float32, as mergekit rounds it; p = d when L = 1."""
    if length <= 1:
        return torch.full(ranks.shape, density, dtype=torch.float32, device=ranks.device)
    rn = ranks.to(torch.float32).div_(length - 1)
    return rn.mul_(2).mul_(epsilon).add_(density - epsilon)


# ----------------------------------------------------------------------------- the sparsifiers


def _keep_band_(flat: torch.Tensor, lo: int, hi: int) -> None:
    if hi <= lo:
        flat.zero_()
    elif topk.applies(flat):
        topk.keep_rank_band_(flat, lo, hi)  # radix select: the same set, no sort of a large tensor
    else:
        keep_rank_band_plain_(flat, lo, hi)


def keep_largest_(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest magnitudes of ``flat`` (1-D contiguous; 0 <= k <= n), in place."""
    _keep_band_(flat, 0, k)
    return flat


def magnitude_(x: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    if density <= 0.0:
        return x.zero_()
    flat = x.view(-1)
    if rule == "kthvalue":
        # reference semantics: threshold at the k'-th smallest magnitude, keep |x| >= thr
        kth = n - int(n * density)
        if kth <= 0:
            return x
        mags = flat.abs()
        keep = mags >= mags.kthvalue(kth).values
        del mags
        flat.masked_fill_(keep.logical_not_(), 0)
        return x
    _keep_band_(flat, 0, max(int(density * n), 1))
    return x


def magnitude_trim(x: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    """``magnitude`` on a copy of x: with ``rule="topk"`` exactly k = max(int(density * n), 1)
    entries survive (none at density <= 0): every magnitude above the k-th largest t, then those
    equal to t in increasing flat index order until k are kept. +0 and -0 are equal magnitudes;
    NaN is larger than any number. ``rule="kthvalue"``: every |x| >= the k'-th smallest."""
    return magnitude_(x.clone(memory_format=torch.contiguous_format), density, rule)


def random_(x: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry iff its float32 draw from ``gen`` is < density (draws in flat order)."""
    return x if density >= 1.0 else dare_drop.random_drop_(x, density, gen, False)


def random_drop(x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """:func:`random_drop_plain` without its full-size draws and mask, on a copy of x (Core
    Space's DARE: survivors divided by density when ``rescale``)."""
    if density >= 1.0:
        return x.clone()
    return dare_drop.random_drop_(x.clone(memory_format=torch.contiguous_format), density, gen, rescale)


def outliers_(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    n_keep, n_top = int(density * n), int(gamma * n)
    n_top = min(n_top, n - n_keep)  # n_bot = n - n_keep - n_top would be negative
    _keep_band_(x.view(-1), n_top, n_top + n_keep)
    return x


def check_della(name: str, density: float, epsilon: float) -> None:
    if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise UserError(
            f"tensor '{name}': della needs density +/- epsilon in (0, 1) (Epsilon must be chosen such "
            f"that density +/- epsilon is in (0, 1)); got density {density}, epsilon {epsilon}: "
            "lower epsilon or move density away from 0 and 1")


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as (A, L, R): ranks run along the middle axis (dim 1; a 0-D / 1-D tensor is one row)."""
    if x.dim() < 2:
        return x.view(1, -1, 1)
    return x.view(x.shape[0], x.shape[1], -1)


def della_(x: torch.Tensor, density: float, epsilon: float, gen: torch.Generator) -> torch.Tensor:
    """DELLA's MAGPRUNE in place (x contiguous), blocks of whole rows at a time: chunk-sized
    keys, probabilities and draws, the draws taken in flat order from ``gen``."""
    if density >= 1.0 or x.numel() == 0:
        return x
    if density <= 0.0:
        return x.zero_()
    v = _rows_view(x)
    A, L, R = v.shape
    table = della_keep_prob(torch.arange(L, device=x.device), L, density, epsilon)  # p by rank
    if della_drop.applies(v):
        della_drop.della_drop_(v, table, gen)  # sorted packed keys -> table scatter, no rank tensor
        return x
    rows = max(1, chunk_len(x) // max(L * R, 1))
    for a in range(0, A, rows):
        blk = v[a:a + rows]  # (b, L, R), contiguous
        mag = blk.abs().transpose(1, 2).reshape(-1, L)  # one row per (a, r)
        p = table[row_ranks_plain(mag)].view(blk.shape[0], R, L).transpose(1, 2)
        u = torch.rand(blk.shape, generator=gen, dtype=torch.float32, device=x.device)
        blk.masked_fill_(torch.ge(u, p), 0)
    return x


def della_plain(x: torch.Tensor, density: float, epsilon: float, gen: torch.Generator) -> torch.Tensor:
    """:func:`della_` by the definition, on the whole tensor at once (a new tensor)."""
    if density >= 1.0:
        return x.clone()
    if density <= 0.0:
        return torch.zeros_like(x)
    v = _rows_view(x)
    A, L, R = v.shape
    ranks = row_ranks_plain(v.abs().transpose(1, 2).reshape(-1, L))
    p = della_keep_prob(ranks, L, density, epsilon).view(A, R, L).transpose(1, 2)
    u = torch.rand(v.shape, generator=gen, dtype=torch.float32, device=x.device)
    return torch.where(u < p, v, torch.zeros((), dtype=x.dtype)).reshape(x.shape)


# ----------------------------------------------------------------------------- the L1 rescale

L1_EPS = 1e-7


def l1_norm(x: torch.Tensor) -> float:
    """sum |x| over the whole tensor, accumulated in float64 chunk by chunk (no full-size |x|), each
    chunk on one thread (:func:`.kernels._chunks.over_ranges`: the same sum whatever the thread
    count or the split, and no parallel region per chunk)."""
    flat = x.reshape(-1)
    step = chunk_len(flat)

    def sums(a: int, b: int) -> list[float]:
        return [float(torch.sum(flat[lo:min(lo + step, b)].abs(), dtype=torch.float64)) for lo in range(a, b, step)]
    total = 0.0
    for part in over_ranges(sums, flat.numel(), step):  # split when an item runs alone
        for chunk_sum in part:  # added in chunk order: the same sum for any split
            total += chunk_sum
    return total


def rescale_factor(before: float, after: float) -> float:
    """mergekit's L1 ratio |tau|_1 / |tau~|_1, or 1 when either norm is < 1e-7 (an empty mask)."""
    if before < L1_EPS or after < L1_EPS:
        return 1.0
    return before / after
