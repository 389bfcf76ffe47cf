"""Ranks within rows (DELLA's keep probabilities), by one sort of packed integer keys.

Plain formulation (``sparsify.row_ranks_plain``): the inverse permutation of a stable ascending
``torch.sort`` of each row (equal values by increasing column; NaN largest). torch's CPU sort of
a 4096 x 4096 float32 tensor along dim 1 takes ~1.4 s on one core, numpy's vectorised sort of
int64 keys ~0.2 s. So each float32 value's bit pattern (sign cleared: monotone in the
magnitude, NaN above +inf) is shifted left and its column put into the low bits; the keys of a
row are then distinct, a plain (unstable) sort orders them exactly like the stable sort, and the
low bits of the sorted keys say which column holds each rank. Bit-equal (tests/test_kernels.py).
"""
from __future__ import annotations

import numpy as np
import torch


def applies(mag: torch.Tensor) -> bool:
    """Whether :func:`row_ranks` takes ``mag``: float32 on the CPU (elsewhere torch's sort)."""
    return mag.device.type == "cpu" and mag.dtype == torch.float32 and mag.numel() > 0


def row_ranks(mag: torch.Tensor) -> torch.Tensor:
    """0-based rank of every entry of ``mag`` (2-D magnitudes, :func:`applies`) within its row:
    int64, mag's shape."""
    rows, L = mag.shape
    lbits = max(1, (L - 1).bit_length())  # 31 value bits + lbits < 64 for any row length < 2**32
    key = mag.contiguous().view(torch.int32).numpy().astype(np.int64)
    key &= 0x7FFFFFFF
    key <<= lbits
    key |= np.arange(L, dtype=np.int64)
    key.sort(axis=1)
    key &= (1 << lbits) - 1  # the column holding each rank
    ranks = torch.empty((rows, L), dtype=torch.int64)
    ranks.scatter_(1, torch.from_numpy(key), torch.arange(L, dtype=torch.int64).expand(rows, L))
    return ranks
