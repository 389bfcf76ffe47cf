"""Reproducible safetensors files from ``safetensors.torch.save_file``.

safetensors (0.8) keeps ``__metadata__`` in a Rust ``HashMap``, so the order of its entries in the
header, and with it the file's bytes, changes from one process to the next. Every other byte is
already a function of the tensors (their layout is safetensors' own sorted order). ``fix_order``
rewrites the header in place with the metadata in the order the caller gave it: the same length
(the same entries, serialised as serde_json does: compact, UTF-8, the same escapes), so no tensor
moves. Two runs, or a serial run and a sharded run's `merge finalize`, then write the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path


def fix_order(path: Path, metadata: dict[str, str] | None) -> None:
    """Put ``path``'s ``__metadata__`` entries in ``metadata``'s order (a file safetensors just wrote)."""
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
        header = json.loads(raw)
        stored = header.get("__metadata__") or {}
        if list(stored) == list(metadata) or set(stored) != set(metadata) or _dumps(header) != raw.rstrip(b" "):
            return  # in order already, or not the file we think, or not serialised as we would: as written
        header["__metadata__"] = {k: stored[k] for k in metadata}
        header = {"__metadata__": header["__metadata__"], **{k: v for k, v in header.items() if k != "__metadata__"}}
        text = _dumps(header)
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def _dumps(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
