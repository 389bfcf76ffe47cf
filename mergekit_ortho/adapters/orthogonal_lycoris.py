"""LyCORIS's orthogonal adapters: diag-OFT (``oft_blocks`` 3-D) and BOFT (``oft_blocks`` 4-D).

Spec: ../shared/specs/adapters.md P15 (diag-OFT), P16 (BOFT), P25 (they share a name with PEFT's
OFT/BOFT but are other formats: output side, Q = B - B^T without the 1/2, another Cayley order,
another permutation, ``rescale`` instead of ``oft_s``/``boft_s``). Reference: lycoris-lora 4.1.3.

Both act on the output rows of X = flat(W0) (conv ``[out, in*kh*kw]``). ``alpha`` is a constraint,
not a scale: when alpha > 0 and ||Q||_F over all blocks exceeds c = alpha*out, Q <- Q c/(||Q||_F + 1e-8).

* diag-OFT, ``oft_blocks [n, b, b]`` with n*b = out: R_k = (I + Q_k)(I - Q_k)^-1 and
  W'[rows of block k] = R_k^T W0[rows of block k] (= (I - Q_k)(I + Q_k)^-1 W0_k).
* BOFT, ``oft_blocks [m, n, b, b]`` with n*b = out, m = log2(n) + 1 stages: R = (I + Q)(I - Q)^-1
  per block; for stage i with k = 2^i b/2, permute the rows (view [out/2k, 2, k], swap the last two
  axes), left-multiply consecutive b-row blocks j by R[i, j], undo the permutation.
* Then W' <- rescale * W' per row when ``rescale`` ([out, 1(, 1, 1)]) is stored.

The multiplier lambda of LyCORIS (each block becomes lambda R + (1 - lambda) I) is not applied here;
this is the merge at multiplier 1 (the toolkit's strength rule is P25's, applied by the caller).
"""
from __future__ import annotations

from typing import Any, Mapping

from .transform_math import as_delta, cayley, f64, fail, flat, require, require_base
from .types import AdapterType


def _constraint(hp: Mapping[str, Any], tensors: Mapping[str, Any]) -> float:
    a = tensors.get("alpha")
    if a is not None:
        return float(f64(a).reshape(-1)[0])
    return float(hp.get("alpha") or 0.0)


def constrained_skew(blocks, alpha: float, out: int):
    """Q = B - B^T per block, scaled to norm c = alpha*out (all blocks together) where it exceeds c."""
    import torch

    q = blocks - blocks.transpose(-1, -2)
    if alpha > 0:
        c = alpha * out
        norm = torch.linalg.vector_norm(q)
        if norm > c:
            q = q * (c / (norm + 1e-8))
    return q


def _rescale(x, tensors, hp):
    if tensors.get("rescale") is None:
        return x
    s = f64(tensors["rescale"]).reshape(-1)
    if s.numel() != x.shape[0]:
        raise fail(hp, f"rescale has {s.numel()} entries but the base weight has {x.shape[0]} rows")
    return x * s[:, None]


def diag_oft_weight(x, blocks, alpha: float, hp):
    """W' rows for diag-OFT (before ``rescale``)."""
    n, b = blocks.shape[0], blocks.shape[1]
    out = x.shape[0]
    if n * b != out:
        raise fail(hp, f"diag-OFT oft_blocks {tuple(blocks.shape)} cover {n * b} rows, the base weight has {out}; "
                       "the adapter was made for another model")
    rt = cayley(constrained_skew(blocks, alpha, out), "minus_plus")  # R_k^T
    return (rt @ x.reshape(n, b, -1)).reshape(out, -1)


def boft_weight(x, blocks, alpha: float, hp):
    """W' rows for LyCORIS BOFT (before ``rescale``)."""
    m, n, b = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    out, cols = x.shape
    if n * b != out:
        raise fail(hp, f"BOFT oft_blocks {tuple(blocks.shape)} cover {n * b} rows, the base weight has {out}; "
                       "the adapter was made for another model")
    if b % 2 or out % (2 ** (m - 1) * b):
        raise fail(hp, f"BOFT oft_blocks {tuple(blocks.shape)}: {m} stages of blocks of {b} do not fit {out} rows")
    rot = cayley(constrained_skew(blocks, alpha, out), "plus_minus")
    for i in range(m):
        k = (2 ** i) * b // 2
        y = x.reshape(out // (2 * k), 2, k, cols).transpose(1, 2).reshape(out, cols)
        y = (rot[i] @ y.reshape(n, b, cols)).reshape(out, cols)
        x = y.reshape(out // (2 * k), k, 2, cols).transpose(1, 2).reshape(out, cols)
    return x


def materialise_lycoris_oft(base, tensors, hp):
    """LyCORIS diag-OFT (3-D ``oft_blocks``) or BOFT (4-D): W' - W0."""
    w = require_base(base, hp, "LyCORIS OFT")
    x = flat(w)
    blocks = require(tensors, "oft_blocks", hp)
    if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
        raise fail(hp, f"oft_blocks has shape {tuple(blocks.shape)}, expected [n, b, b] (diag-OFT) or [m, n, b, b] (BOFT)")
    alpha = _constraint(hp, tensors)
    new = diag_oft_weight(x, blocks, alpha, hp) if blocks.dim() == 3 else boft_weight(x, blocks, alpha, hp)
    return as_delta(_rescale(new, tensors, hp), w)


def lycoris_oft_kind(shapes: Mapping[str, tuple]) -> str:
    """"diag-OFT" or "BOFT" from the stored ``oft_blocks`` shape (for ``merge inspect``)."""
    return "BOFT" if len(shapes.get("oft_blocks", ())) == 4 else "diag-OFT"


LYCORIS_TYPES = [
    AdapterType(
        name="diag-OFT/BOFT (LyCORIS)",
        roles={".oft_blocks": "oft_blocks", ".rescale": "rescale", ".alpha": "alpha"},
        required=frozenset({"oft_blocks"}), materialise=materialise_lycoris_oft, needs_base=True,
        formats=("lycoris",),
        notes="LyCORIS diag-OFT (3-D oft_blocks) / BOFT (4-D); goldens from lycoris-lora 4.1.3 forward, float32 (spec P15/P16)",
        extra={"kind_from_shapes": lycoris_oft_kind},
    ),
]
