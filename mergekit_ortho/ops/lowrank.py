"""Low-rank algebra shared by the LoRA paths: exact truncation of a factored product,
factorising a dense delta, and PT-SVD (full fine-tunes' task vectors as factors).

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

``svd_factors`` / ``factors_from_deltas`` are PT-SVD (lora_lego_rmm.md B2): each task vector of a
full fine-tune truncated by SVD to a rank r and split evenly into factors, so that a low-rank
operator that also takes full fine-tunes (``Operator.dense_rank_param``, e.g. ``rmm``) receives
factors like any LoRA. The executor calls them (:func:`mergekit_ortho.inputs.svd_task`); the
operator never sees a dense task vector. Their sign gauge is :func:`canonical_sign` (the first
largest-|value| entry of every u positive, near-ties within ``TIE_RTOL`` counted as tied).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .kernels.randomized_svd import OVERSAMPLE, randomized_svd

TIE_RTOL = 1e-9  # entries within this relative distance of a vector's maximum |entry| count as tied


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


# ----------------------------------------------------------------------------- PT-SVD


def canonical_sign(U: torch.Tensor, dim: int) -> torch.Tensor:
    """+-1 per vector of U along ``dim``: makes the first (near-)largest |entry| positive."""
    a = U.abs()
    m = a.amax(dim=dim, keepdim=True)
    cand = (a >= m * (1.0 - TIE_RTOL)) & (m > 0)
    idx = torch.argmax(cand.to(torch.int8), dim=dim, keepdim=True)  # first True
    val = torch.gather(U, dim, idx)
    return torch.where(val < 0, -1.0, 1.0).to(U.dtype)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a 2-D task vector: (A (k x d_in), B (d_out x k)), delta ~= B @ A.

    k = min(rank, d_out, d_in). B = U_k S_k^(1/2), A = S_k^(1/2) V_k^T (PT-SVD, PEFT letters),
    each pair (u_q, v_q) flipped so that u_q's first (near-)largest |entry| is positive.
    Computed in float64; returned in delta's dtype when that is float32/float64, else float32.
    """
    if delta.dim() != 2:
        raise UserError(f"PT-SVD needs 2-D task vectors, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise UserError(f"PT-SVD: rank must be >= 1, got {rank}")
    out_dtype = delta.dtype if delta.dtype in (torch.float32, torch.float64) else torch.float32
    k = min(int(rank), *delta.shape)
    U, S, Vh = torch.linalg.svd(delta.to("cpu", torch.float64), full_matrices=False)
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    sign = canonical_sign(U, dim=0)  # (1, k)
    U = U * sign
    Vh = Vh * sign.T
    root = S.clamp_min(0.0).sqrt()
    B = (U * root).to(out_dtype).contiguous()
    A = (root.unsqueeze(1) * Vh).to(out_dtype).contiguous()
    return A, B


def factors_from_deltas(
    deltas: "list[torch.Tensor]", rank: int, name: str = "tensor", method: str = "PT-SVD"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PT-SVD every task vector of one tensor (the full fine-tune setting of a low-rank method);
    ``method`` names the method in the error a tensor that is not 2-D gets."""
    for d in deltas:
        if d.dim() != 2:
            raise UserError(
                f"{method}: tensor '{name}' is {d.dim()}-D; PT-SVD covers 2-D weights only - "
                "keep 1-D tensors, embeddings and heads per task"
            )
    return [svd_factors(d, rank) for d in deltas]
