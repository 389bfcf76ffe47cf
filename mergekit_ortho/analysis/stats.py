"""Interference statistics of task vectors: pure functions on tensors (no file I/O), issue 18.

For the task vectors t_1..t_n of one tensor (float32, flattened; sums accumulated in float64):

* **norm**: ||t_i||_F. Squared norms and dot products add up over tensors, so a layer's (or a
  module kind's) norm is sqrt(sum ||t_i||^2) and its cosine sum <t_i, t_j> / sqrt(sum ||t_i||^2
  sum ||t_j||^2): the cosine of the concatenated vectors, not a mean of per-tensor cosines.
* **TIES sign conflict** at density d: each t_i trimmed exactly as the ``ties`` operator trims it
  (:func:`..ops.sparsify.magnitude_trim`, ``trim_rule`` topk: the k = max(1, int(d n)) largest
  |t_i|), weighted, u_i = w_i trim(t_i); the elected sign is sign(sum_i u_i) with a zero sum
  counting as + (the operator's rule, :func:`..ops.gta.disjoint_merge_plain`). Over the entries
  where some u_i != 0: the conflict rate is the share where nonzero u_i of both signs meet, the
  dropped mass sum |u_i| over nonzero u_i against the elected sign divided by sum |u_i|: what the
  disjoint mean throws away.
* **top-k mask overlap** of models i, j: |M_i ∩ M_j| / |M_i ∪ M_j| (Jaccard) of the entries
  their trimmed vectors keep nonzero.
* **top singular energy** (2-D tensors only): sum_{k<q} s_k^2 / ||t||_F^2, the share of the
  task vector's energy in its q largest singular directions. Exact (``torch.linalg.svdvals``)
  when min(m, n) <= q + oversampling, else a seeded randomised SVD
  (:mod:`..ops.kernels.randomized_svd`, q + oversampling probes, at most ``MAX_PROBES``), whose
  captured energy is a lower bound of the exact share, and tight on decaying spectra.
* **LoRA** modules delta = s B A: rank r, scale s, energy ||delta||_F^2 and its singular values,
  exactly from the factors (QR of B and A^T, then the SVD of an r x r core).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_DENSITY = 0.2  # when the recipe gives none: the density of the quality benchmark's TIES
DEFAULT_TOP_RANK = 16
OVERSAMPLE = 8
MAX_PROBES = 64


def sq_norm(t: torch.Tensor) -> float:
    """||t||_F^2 in float64 (t as given, any float dtype)."""
    return float(t.double().square().sum())


def task_vector_sq_norm(x: torch.Tensor, base: torch.Tensor) -> float:
    """||x - base||_F^2: the float32 difference of the tensors as read, summed in float64 (the
    continual gate's norm)."""
    return sq_norm(x.to(torch.float32) - base.to(torch.float32))


def gram(ts: list[torch.Tensor]) -> list[list[float]]:
    """G_ij = <t_i, t_j> in float64 (flattened)."""
    flat = [t.reshape(-1).double() for t in ts]
    n = len(flat)
    g = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            g[i][j] = g[j][i] = float(flat[i] @ flat[j])
    return g


def cosine(dot: float, sq_i: float, sq_j: float) -> float | None:
    """<a, b> / (|a| |b|); None when either vector is zero."""
    den = math.sqrt(sq_i) * math.sqrt(sq_j)
    return dot / den if den > 0 else None


def trimmed(t: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    """t trimmed as the ties operator trims it (a copy)."""
    from ..ops.sparsify import magnitude_trim

    return magnitude_trim(t.to(torch.float32).reshape(-1), density, rule)


@dataclass
class Conflict:
    """Sums over entries: entries some model keeps, those where kept signs disagree, kept mass
    agreeing with / against the elected sign; and per pair intersections / unions of the masks."""

    active: int = 0
    conflicted: int = 0
    agree_mass: float = 0.0
    against_mass: float = 0.0
    inter: dict = field(default_factory=dict)  # (i, j) -> |M_i & M_j|
    union: dict = field(default_factory=dict)  # (i, j) -> |M_i | M_j|

    def add(self, other: "Conflict") -> None:
        self.active += other.active
        self.conflicted += other.conflicted
        self.agree_mass += other.agree_mass
        self.against_mass += other.against_mass
        for k, v in other.inter.items():
            self.inter[k] = self.inter.get(k, 0) + v
        for k, v in other.union.items():
            self.union[k] = self.union.get(k, 0) + v

    @property
    def rate(self) -> float | None:
        return self.conflicted / self.active if self.active else None

    @property
    def dropped_mass(self) -> float | None:
        total = self.agree_mass + self.against_mass
        return self.against_mass / total if total > 0 else None

    def overlap(self, i: int, j: int) -> float | None:
        u = self.union.get((i, j), 0)
        return self.inter.get((i, j), 0) / u if u else None


def sign_conflict(ts: list[torch.Tensor], densities: list[float], weights: list[float] | None = None,
                  rule: str = "topk") -> Conflict:
    """TIES trim + sign election statistics of one tensor's task vectors (see the module doc)."""
    weights = weights if weights is not None else [1.0] * len(ts)
    us = [trimmed(t, d, rule).mul_(w) for t, d, w in zip(ts, densities, weights)]
    total = us[0].clone()
    for u in us[1:]:
        total += u
    positive = total >= 0
    pos_any = torch.zeros_like(positive)
    neg_any = torch.zeros_like(positive)
    out = Conflict()
    masks = []
    for u in us:
        pos, neg = u > 0, u < 0
        pos_any |= pos
        neg_any |= neg
        agree = torch.where(positive, pos, neg)
        against = torch.where(positive, neg, pos)
        a = u.abs().double()
        out.agree_mass += float(a[agree].sum())
        out.against_mass += float(a[against].sum())
        masks.append(u != 0)
    out.active = int((pos_any | neg_any).sum())
    out.conflicted = int((pos_any & neg_any).sum())
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            out.inter[(i, j)] = int((masks[i] & masks[j]).sum())
            out.union[(i, j)] = int((masks[i] | masks[j]).sum())
    return out


def top_energy(t: torch.Tensor, q: int = DEFAULT_TOP_RANK, oversample: int = OVERSAMPLE) -> tuple[float, float]:
    """(energy in the top-q singular directions, total energy) of a 2-D tensor; see module doc."""
    if t.dim() != 2:
        raise ValueError("top_energy takes a 2-D tensor")
    work = t.to(torch.float32)
    total = sq_norm(work)
    small = min(work.shape)
    q = min(q, small)
    if total == 0 or q == 0:
        return 0.0, total
    probes = min(q + oversample, MAX_PROBES, small)
    if probes >= small:
        s = torch.linalg.svdvals(work.double())
    else:
        from ..ops.kernels.randomized_svd import randomized_svd

        s = randomized_svd(work, probes)[1].double()
    return float(s[:q].square().sum()), total


def lora_singular_values(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale * B @ A (B: m x r, A: r x n), exactly, without forming the product."""
    _, rb = torch.linalg.qr(B.double())
    _, ra = torch.linalg.qr(A.double().mT)
    return torch.linalg.svdvals(scale * (rb @ ra.mT))


@dataclass
class LoraModule:
    rank: int
    scale: float
    energy: float  # ||scale B A||_F^2
    top_energy: float  # the share in the largest singular direction


def lora_module(A: torch.Tensor, B: torch.Tensor, scale: float) -> LoraModule:
    s = lora_singular_values(A, B, scale)
    e = float(s.square().sum())
    return LoraModule(int(A.shape[0]), float(scale), e, float(s[:1].square().sum()) / e if e > 0 else 0.0)
