"""PEFT's orthogonal fine-tuning family: OFT (four stored generations), BOFT and HRA.

Spec: ../shared/specs/adapters.md P5 (OFT), P6 (BOFT), P7 (HRA), P24-P25. Papers: Qiu et al. 2023
"OFT"; Liu et al. 2024 "BOFT" (butterfly factorisation); Yuan et al. 2024 "HRA" (Householder
reflections). LyCORIS's diag-OFT/BOFT (P15/P16, another format) are in ``orthogonal_lycoris``;
this module's ``ADAPTER_TYPES`` lists both families.

Every type rotates W0: ``flat(W)`` is ``W.reshape(out, -1)`` (conv: ``[out, in*kh*kw]``, the
row-major order PEFT's unfold uses) and the delta returned is W' - W0 (full rank in general).

OFT (P5). Blocks of size b act on n features; Q is skew per block.
* >= 0.16 (``oft_R.weight [R, b(b-1)/2]``): the vector fills the strict upper triangle row-major,
  Q = U - U^T. Exact (``use_cayley_neumann=false``): R = (I - Q)(I + Q)^-1. Neumann with n terms:
  >= 0.18 (``peft_version`` present): I + 2Q + ... + 2Q^(n-2) + Q^(n-1); 0.16-0.17 (no
  ``peft_version``): I + 2(Q + ... + Q^(n-1)). ``coft``: Q_k <- eps'/||Q_k|| Q_k where
  ||Q_k||_F > eps' = eps/sqrt(R). W' = flat(W0) R^T with R = blockdiag (block 0 repeated for
  ``block_share``).
* 0.14-0.15 (``oft_r [R, b, b]`` + ``oft_s [out, 1]``): S = (A - A^T)/2, R = (I - S)(I + S)^-1,
  W' = (flat(W0) R^T) * oft_s (rows). ``coft`` projects each stored block A to Frobenius norm
  <= eps*ceil(out/nblocks)^2/sqrt(R) first.
* <= 0.13 (``oft_r [R, ceil(out/R), ceil(out/R)]`` alone): the same R from S on the output side,
  padded block-diagonal cut to [out, out], W' = R^T flat(W0).

BOFT (P6): ``boft_R [N, D, b, b]`` full blocks, S = (A - A^T)/2, R = (I - S)(I + S)^-1; stage i is
M_i = P_i blockdiag(R[i]) P_i^T with the butterfly permutation P_i; M = M_{N-1} ... M_0 and
W' = (flat(W0) M^T) * boft_s (rows; conv's ``boft_s`` is ``[1, out]``).

HRA (P7): ``hra_u [n, r]``. ``apply_GS=false``: H = prod_i (I - 2 u_i u_i^T / ||u_i||^2) taken
left to right; ``apply_GS=true``: Q = Gram-Schmidt(u), H = I - 2 Q Q^T. W' = flat(W0) H.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from .transform_math import as_delta, block_diag, cayley, fail, flat, require, require_base
from .types import AdapterType


def _config(hp: Mapping[str, Any]) -> Mapping[str, Any]:
    return hp.get("config") or {}


def _version(text) -> tuple[int, ...] | None:
    if not text:
        return None
    nums = re.findall(r"\d+", str(text))[:2]
    return tuple(int(x) for x in nums) if nums else None


def _blocks_for(hp, n_features: int, stored_blocks: int, b: int, what: str) -> int:
    """The number of b-blocks on n features; checks the stored count (1 when ``block_share``)."""
    if b <= 0 or n_features % b:
        raise fail(hp, f"{what} block size {b} does not divide the {n_features} features of the base weight; "
                       "the adapter was made for another model")
    nblocks = n_features // b
    if stored_blocks == nblocks:
        return nblocks
    if stored_blocks == 1 and _config(hp).get("block_share"):
        return nblocks
    raise fail(hp, f"{what} stores {stored_blocks} blocks of size {b}, but the base weight's {n_features} "
                   f"features need {nblocks}" + ("" if stored_blocks != 1 else " (or block_share: true)"))


def skew_from_triangle(vec, b: int):
    """[R, b(b-1)/2] -> skew [R, b, b]: the vector fills the strict upper triangle row-major, Q = U - U^T."""
    import torch

    rows, cols = torch.triu_indices(b, b, 1)
    u = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    u[:, rows, cols] = vec
    return u - u.transpose(1, 2)


def neumann_rotation(q, terms: int, new_series: bool):
    """PEFT's truncated Cayley-Neumann series (P5): >= 0.18 I + 2Q + ... + 2Q^(n-2) + Q^(n-1);
    0.16-0.17 I + 2(Q + ... + Q^(n-1)). Note: this approximates (I + Q)(I - Q)^-1."""
    import torch

    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    out = eye.clone()
    power = eye
    for j in range(1, max(terms, 1)):
        power = power @ q
        last = j == terms - 1
        out = out + (power if (new_series and last) else 2 * power)
    return out


def _project(blocks, radius: float):
    """Each block scaled to Frobenius norm ``radius`` where its norm exceeds it (COFT)."""
    import torch

    norms = torch.linalg.matrix_norm(blocks, keepdim=True)
    return torch.where(norms > radius, blocks * (radius / norms), blocks)


def _block_size_from_triangle(hp, length: int) -> int:
    b = int(round((1 + math.sqrt(1 + 8 * length)) / 2))
    if b * (b - 1) // 2 != length:
        raise fail(hp, f"oft_R.weight has {length} entries per block, which is no b(b-1)/2; not a PEFT OFT file")
    return b


def oft_rotation_v16(theta, hp) -> Any:
    """The per-block rotations [R, b, b] of a PEFT >= 0.16 OFT module (stored ``oft_R.weight``)."""
    cfg = _config(hp)
    b = _block_size_from_triangle(hp, theta.shape[1])
    q = skew_from_triangle(theta, b)
    if cfg.get("coft"):
        q = _project(q, float(cfg.get("eps", 6e-5)) / math.sqrt(theta.shape[0]))
    if cfg.get("use_cayley_neumann", True):
        ver = _version(cfg.get("peft_version"))
        new_series = ver is not None and ver >= (0, 18)
        return neumann_rotation(q, int(cfg.get("num_cayley_neumann_terms", 5)), new_series)
    return cayley(q, "minus_plus")


def oft_rotation_v15(a, hp, n_out: int, nblocks: int) -> Any:
    """The per-block rotations [R, b, b] of a PEFT <= 0.15 OFT module (stored ``oft_r`` full blocks);
    ``nblocks`` is the block count of the whole block-diagonal (PEFT's ``r``)."""
    cfg = _config(hp)
    if cfg.get("coft"):
        radius = float(cfg.get("eps", 6e-5)) * math.ceil(n_out / nblocks) ** 2 / math.sqrt(a.shape[0])
        a = _project(a, radius)
    return cayley(0.5 * (a - a.transpose(1, 2)), "minus_plus")


def materialise_oft(base, tensors, hp):
    """PEFT OFT, every stored generation (P5): the delta W' - W0."""
    w = require_base(base, hp, "OFT")
    x = flat(w)
    out, n = x.shape
    if "oft_R" in tensors:  # PEFT >= 0.16
        theta = require(tensors, "oft_R", hp)
        if theta.dim() != 2:
            raise fail(hp, f"oft_R.weight has shape {tuple(theta.shape)}, expected [blocks, b(b-1)/2]")
        blocks = oft_rotation_v16(theta, hp)
        nblocks = _blocks_for(hp, n, blocks.shape[0], blocks.shape[1], "OFT")
        rot = block_diag(blocks.expand(nblocks, -1, -1) if blocks.shape[0] == 1 else blocks)
        return as_delta(x @ rot.T, w)
    a = require(tensors, "oft_r", hp)
    if a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise fail(hp, f"oft_r has shape {tuple(a.shape)}, expected [blocks, b, b]")
    b = a.shape[1]
    if "oft_s" in tensors:  # PEFT 0.14-0.15: input side, then row scale
        s = require(tensors, "oft_s", hp).reshape(-1)
        if s.numel() != out:
            raise fail(hp, f"oft_s has {s.numel()} entries but the base weight has {out} rows")
        nblocks = _blocks_for(hp, n, a.shape[0], b, "OFT")
        blocks = oft_rotation_v15(a, hp, out, nblocks)
        rot = block_diag(blocks.expand(nblocks, -1, -1) if blocks.shape[0] == 1 else blocks)
        return as_delta((x @ rot.T) * s[:, None], w)
    # PEFT <= 0.13: output side, padded blocks cut to [out, out]
    nblocks = math.ceil(out / b)
    if a.shape[0] not in (nblocks, 1) or (a.shape[0] == 1 and nblocks != 1 and not _config(hp).get("block_share")):
        raise fail(hp, f"oft_r stores {a.shape[0]} blocks of size {b}, which does not fit the base weight's {out} rows")
    blocks = oft_rotation_v15(a, hp, out, nblocks)
    rot = block_diag(blocks.expand(nblocks, -1, -1) if blocks.shape[0] == 1 else blocks)[:out, :out]
    return as_delta(rot.T @ x, w)


def butterfly_permutation(n: int, blocks: int, b: int, stage: int) -> list[int]:
    """PEFT BOFT's permutation for ``stage`` (P6): c = blocks/2^stage chunks of L = n/c indices; in
    each chunk the groups of b/2 consecutive indices are listed even-numbered first, then odd."""
    chunks = blocks // (2 ** stage)
    if chunks <= 0 or n % chunks:
        raise ValueError((n, blocks, stage))
    size, half = n // chunks, b // 2
    perm: list[int] = []
    for c in range(chunks):
        start = c * size
        groups = [list(range(start + g * half, start + (g + 1) * half)) for g in range(size // half)]
        for g in groups[0::2] + groups[1::2]:
            perm.extend(g)
    return perm


def boft_matrix(blocks_r, hp, n: int):
    """M = M_{N-1} ... M_0 for ``boft_R`` [N, D, b, b] acting on n features (P6)."""
    import torch

    stages, d, b = blocks_r.shape[0], blocks_r.shape[1], blocks_r.shape[2]
    if blocks_r.dim() != 4 or b != blocks_r.shape[3]:
        raise fail(hp, f"boft_R has shape {tuple(blocks_r.shape)}, expected [factors, blocks, b, b]")
    if d * b != n:
        raise fail(hp, f"BOFT block size {b} x {d} blocks does not match the base weight's {n} features")
    if stages > 1 and (b % 2 or d % (2 ** (stages - 1))):
        raise fail(hp, f"BOFT with {stages} butterfly factors needs an even block size and {2 ** (stages - 1)} | blocks")
    a = blocks_r.reshape(stages * d, b, b)
    rots = cayley(0.5 * (a - a.transpose(1, 2)), "minus_plus").reshape(stages, d, b, b)
    m = torch.eye(n, dtype=a.dtype)
    for i in range(stages):
        stage = block_diag(rots[i])
        if i:
            p = torch.zeros(n, n, dtype=a.dtype)
            p[torch.arange(n), torch.tensor(butterfly_permutation(n, d, b, i))] = 1
            stage = p @ stage @ p.T
        m = stage @ m
    return m


def materialise_boft(base, tensors, hp):
    """PEFT BOFT (P6): W' = (flat(W0) M^T) * boft_s, per row; returns W' - W0."""
    w = require_base(base, hp, "BOFT")
    fifo = bool(_config(hp).get("fan_in_fan_out")) and w.dim() == 2
    x = w.T if fifo else flat(w)
    out, n = x.shape
    m = boft_matrix(require(tensors, "boft_R", hp), hp, n)
    s = require(tensors, "boft_s", hp).reshape(-1)
    if s.numel() != out:
        raise fail(hp, f"boft_s has {s.numel()} entries but the base weight has {out} output units")
    new = (x @ m.T) * s[:, None]
    return as_delta(new.T if fifo else new, w)


def householder_matrix(u, apply_gs: bool, hp):
    """HRA's H for ``hra_u`` [n, r] (P7)."""
    import torch

    n, r = u.shape
    norms = torch.linalg.vector_norm(u, dim=0)
    if bool((norms == 0).any()):
        raise fail(hp, "hra_u has an all-zero column; the Householder reflection is undefined")
    eye = torch.eye(n, dtype=u.dtype)
    if apply_gs:
        basis = []
        for i in range(r):
            v = u[:, i].clone()
            for q in basis:
                v = v - (q @ v) * q
            nv = torch.linalg.vector_norm(v)
            if nv <= 1e-12 * norms[i]:
                raise fail(hp, f"hra_u columns are linearly dependent (column {i}); Gram-Schmidt fails")
            basis.append(v / nv)
        q = torch.stack(basis, dim=1)
        return eye - 2 * q @ q.T
    h = eye
    for i in range(r):
        v = u[:, i] / norms[i]
        h = h - 2 * torch.outer(h @ v, v)  # h @ (I - 2 v v^T)
    return h


def materialise_hra(base, tensors, hp):
    """PEFT HRA (P7): W' = flat(W0) H; returns W' - W0."""
    w = require_base(base, hp, "HRA")
    x = flat(w)
    u = require(tensors, "hra_u", hp)
    if u.dim() != 2 or u.shape[0] != x.shape[1]:
        raise fail(hp, f"hra_u has shape {tuple(u.shape)}, but the base weight has {x.shape[1]} input features")
    h = householder_matrix(u, bool(_config(hp).get("apply_GS")), hp)
    return as_delta(x @ h, w)


_PEFT_NOTE = "goldens from peft 0.21.2 (0.13.2/0.15.2/0.17.1 for the OFT history) merge_and_unload (spec {})"

PEFT_TYPES = [
    AdapterType(name="OFT", roles={".oft_R.weight": "oft_R"}, required=frozenset({"oft_R"}),
                materialise=materialise_oft, needs_base=True, formats=("peft",),
                notes="OFT, PEFT >= 0.16 (Cayley-Neumann or exact); " + _PEFT_NOTE.format("P5")),
    AdapterType(name="OFT (peft 0.14-0.15)", roles={".oft_r": "oft_r", ".oft_s": "oft_s"},
                required=frozenset({"oft_r", "oft_s"}), materialise=materialise_oft, needs_base=True,
                formats=("peft",), notes="OFT, input side with oft_s; " + _PEFT_NOTE.format("P5")),
    AdapterType(name="OFT (peft <= 0.13)", roles={".oft_r": "oft_r"}, required=frozenset({"oft_r"}),
                materialise=materialise_oft, needs_base=True, formats=("peft",),
                notes="OFT, output side; " + _PEFT_NOTE.format("P5")),
    AdapterType(name="BOFT", roles={".boft_R": "boft_R", ".boft_s": "boft_s"},
                required=frozenset({"boft_R", "boft_s"}), materialise=materialise_boft, needs_base=True,
                formats=("peft",), notes="BOFT (Liu et al. 2024); " + _PEFT_NOTE.format("P6")),
    AdapterType(name="HRA", roles={".hra_u": "hra_u"}, required=frozenset({"hra_u"}),
                materialise=materialise_hra, needs_base=True, formats=("peft",),
                notes="HRA (Yuan et al. 2024); " + _PEFT_NOTE.format("P7")),
]


def _all_types():
    from .orthogonal_lycoris import LYCORIS_TYPES

    return PEFT_TYPES + LYCORIS_TYPES


ADAPTER_TYPES = _all_types()
