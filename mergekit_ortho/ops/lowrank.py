"""Low-rank algebra shared by the LoRA paths: exact truncation of a factored product, and
factorising a dense delta.

Not an operator. ``truncate`` is the exact truncated SVD of ``B @ A`` computed from the factors
(QR of each factor, SVD of the small R x R core), so a rank-R adapter is never densified:
O((out + in) R^2) instead of O(out * in * R). ``factorize`` is the Eckart-Young best rank-k
approximation of a dense delta (thin SVD in float32, float64 for small matrices); it is what
extracting a LoRA from a full-rank merge result needs. For a rank far below the matrix size it
uses a randomised range finder instead (:mod:`.kernels.randomized_svd`), which costs O(m n k) instead
of O(m n min(m, n)) -- a 4096 x 4096 module at rank 64 in well under a second instead of tens of
seconds -- and reports the error it actually makes (exact: ||D||^2 - sum of the kept S^2).

Both split the singular values evenly (B = U sqrt(S), A = sqrt(S) V^T) so the two factors have
comparable norms, and canonicalise signs (largest-|value| entry of every left singular vector
positive) so results are reproducible across BLAS builds.
"""
from __future__ import annotations

import torch

from .kernels.randomized_svd import OVERSAMPLE, randomized_svd


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if U.numel() == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    sign[sign == 0] = 1
    return U * sign, Vh * sign.unsqueeze(1)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, dtype: torch.dtype):
    U, Vh = _canonical_signs(U[:, :k], Vh[:k])
    root = S[:k].clamp_min(0).sqrt()
    return (root.unsqueeze(1) * Vh).to(dtype).contiguous(), (U * root).to(dtype).contiguous()


def truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors (A', B') of ``B @ A`` and the relative Frobenius error.

    A (R x in), B (out x R). Returns the input unchanged (error 0) when R <= rank."""
    R = A.shape[0]
    if R <= rank:
        return A, B, 0.0
    dt = A.dtype
    a64, b64 = A.to(torch.float64), B.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)  # B = Qb Rb
    qa, ra = torch.linalg.qr(a64.t())  # A^T = Qa Ra
    core = rb @ ra.t()  # B A = Qb (Rb Ra^T) Qa^T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    total = float((s * s).sum())
    err = float((s[rank:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    A2, B2 = _split(qb @ u, s, vh @ qa.t(), rank, dt)
    return A2, B2, err


_RANDOMIZED_MIN_DIM = 1024  # below this a full thin SVD is cheap enough


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors (A, B) of a dense 2-D ``delta`` and the relative Frobenius error
    of the factors returned (randomised when rank + oversampling <= min(m, n) / 4 on a matrix of
    at least 1024 in both dimensions, exact otherwise)."""
    if delta.ndim != 2:
        delta = delta.reshape(delta.shape[0], -1)
    dt = delta.dtype
    work = delta.to(torch.float64) if delta.numel() <= 4096 * 1024 else delta.to(torch.float32)
    small = min(work.shape)
    k = min(rank, small)
    total = float(work.double().square().sum())
    if small >= _RANDOMIZED_MIN_DIM and 4 * (k + OVERSAMPLE) <= small:
        u, s, vh = randomized_svd(work, k + OVERSAMPLE)
        kept = float((s[:k].double() ** 2).sum())
        err = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        err = float((s[k:].double() ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    A, B = _split(u, s, vh, k, dt)
    return A, B, err
