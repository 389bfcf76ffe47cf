"""PyTorch pickle checkpoints (``.bin``, ``.pt``, ``.ckpt``), read safely.

Only ever ``torch.load(weights_only=True)``: plain tensors and containers, no code from the file
runs. Files in torch's zip format (every ``torch.save`` since 1.6) are memory-mapped, so a shard
costs no resident memory until a tensor is copied out; legacy (pre-1.6, non-zip) files cannot be
mapped and are read into memory whole, one shard at a time.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

_ZIP_MAGIC = b"PK\x03\x04"


def is_zip_format(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def load_weights_only(path: Path):
    """The unpickled object (tensors and containers only); one line naming the file on failure."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip_format(path))
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: refused to unpickle (only plain tensors are loaded, weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first[:300]})") from None
