"""Seeded randomised SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4: randomised range finder
with power iterations and re-orthonormalisation).

Plain formulation: ``torch.linalg.svd(work, full_matrices=False)`` truncated to q. This costs
O(m n q) instead of O(m n min(m, n)) and is an approximation: with the power iterations the
kept singular values match the exact ones to a stated tolerance on matrices with a decaying
spectrum (tests/test_kernels.py), and ``lowrank.factorize`` reports the error it really makes.
"""
from __future__ import annotations

import torch

OVERSAMPLE = 16  # extra Gaussian probes beyond the rank wanted
POWER_ITERATIONS = 4


def randomized_svd(work: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-q thin SVD (U, S, Vh) of ``work`` (m x n); the same every run (seed 0)."""
    gen = torch.Generator(device=work.device).manual_seed(0)  # reproducible factors
    omega = torch.randn(work.shape[1], q, generator=gen, dtype=work.dtype, device=work.device)
    Q = torch.linalg.qr(work @ omega).Q
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(work.mT @ Q).Q
        Q = torch.linalg.qr(work @ Q).Q
    ub, s, vh = torch.linalg.svd(Q.mT @ work, full_matrices=False)
    return Q @ ub, s, vh
