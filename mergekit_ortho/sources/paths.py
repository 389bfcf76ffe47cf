"""Containment: every file a model contributes lies inside that model.

A shard index may name ``../elsewhere/x.safetensors`` or an absolute path, and any file of a model
directory may be a symlink to anywhere on the machine; followed blindly, weights or tokenizer
files from outside the model end up in the merged output. So each file a model directory
contributes must resolve (after symlinks) inside the directory, or, for a hub snapshot, inside its
repository folder of the cache (snapshot files are symlinks to ``../../blobs``), and must be a
regular file (a FIFO would block the read for ever). A user who means a file elsewhere names it
directly, as a single ``.safetensors`` model.
"""
from __future__ import annotations

import stat
from pathlib import Path

from ..errors import UserError


def model_root(directory: Path) -> Path:
    """The folder every file of the model in ``directory`` must resolve into."""
    d = Path(directory).absolute()
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent.resolve()  # a hub cache snapshot: its repository folder
    return d.resolve()


def require_regular(path: Path, what: str = "file") -> Path:
    """Refuse a path that is not a regular file (a FIFO, a device, a socket) before opening it."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return path  # missing: the caller reports it in its own words
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: the {what} is not a regular file (a pipe, device or socket?); refusing to open it")
    return path


def contained(directory: Path, path: Path, what: str = "file") -> Path:
    """``path`` if it resolves inside the model in ``directory`` and is a regular file; else one
    line naming the file."""
    root = model_root(directory)
    real = Path(path).resolve()
    if not real.is_relative_to(root):
        raise UserError(f"{path}: the {what} resolves to {real}, outside the model directory {directory}; refusing "
                        "to read it (to use a file elsewhere, give that file itself as the model)")
    return require_regular(path, what)
