"""The one safetensors header parser and positioned reader (spec formats.md §2.1).

Full checkpoints and LoRA / kohya files both go through here, so every file a user brings is
checked the same way before a byte of tensor data is trusted. Every defect of a file is a
``UserError`` naming it; nothing else escapes for a bad file (a hostile header must not surface as
RecursionError, OverflowError, KeyError or TypeError, which the CLI would report as an internal
error).

Tensors are read with positioned reads into fresh buffers rather than through ``safe_open``'s
memory map: mapped pages of every input stay in the process's resident set for as long as the file
is open, which made peak RSS grow with the model (1.8 GiB for 3 x 0.5 GB inputs); plain reads keep
it at the live tensors.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import buffers
from ..dtypes import ST_DTYPES
from ..errors import UserError

MAX_HEADER_BYTES = 100 * 2**20  # the format's own cap
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TensorEntry:
    """One header entry: ``dtype`` is the torch attribute name (``"bfloat16"``), ``st_dtype`` the
    header's (``"BF16"``); offsets are relative to the data section."""

    dtype: str
    st_dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section


class _BadFile(Exception):
    """A defect of the file; turned into one UserError naming it."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of repeated keys; a repeated tensor name would hide a second data span
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _BadFile(f"key '{dup}' appears twice in the header")
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true/false decode to bool, an int subclass


def _entry(name: str, e: object) -> TensorEntry:
    if not isinstance(e, dict):
        raise _BadFile(f"tensor '{name}' is described by a {type(e).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in e:
            raise _BadFile(f"tensor '{name}' has no '{field}'")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise _BadFile(f"tensor '{name}' has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _BadFile(f"tensor '{name}' has shape {json.dumps(shape)[:80]}, not a list of non-negative integers")
    numel = 1
    for d in shape:
        numel *= d
        if numel > _INT64_MAX:
            raise _BadFile(f"tensor '{name}' has shape {shape} whose element count overflows int64")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _BadFile(f"tensor '{name}' has data_offsets {json.dumps(offsets)[:80]}, not two integers")
    begin, end = offsets
    torch_name, size = ST_DTYPES[dtype]
    if begin < 0 or end < begin or end - begin != numel * size:
        raise _BadFile(f"tensor '{name}' has offsets that do not match its shape")
    return TensorEntry(torch_name, dtype, tuple(shape), begin, end)


def _parse(path: Path, check_size: bool, size: int | None = None) -> SafetensorsHeader:
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _BadFile("file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _BadFile("header length points past the end of the file (truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except RecursionError:  # json's C scanner recurses once per nesting level
        raise _BadFile("header JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _BadFile(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _BadFile("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _BadFile("__metadata__ is not an object of string values")
    entries = {name: _entry(name, e) for name, e in header.items()}
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            raise _BadFile("tensor data overlaps")
        if e.begin > pos:
            raise _BadFile("tensor data leaves gaps")
        pos = e.end
    data_start = 8 + n
    if check_size and data_start + pos != size:
        raise _BadFile(f"data section is {size - data_start} bytes, the header describes {pos} "
                       "(truncated or padded file)")
    return SafetensorsHeader(path, entries, metadata, data_start)


def read_header(path: Path, check_size: bool = True, size: int | None = None) -> SafetensorsHeader:
    """Parse and validate ``path``'s header; no tensor data is read.

    ``check_size=False`` skips only the check that the data section has exactly the bytes the
    header describes, for format detection, which must not depend on the tensor data. ``size``:
    the file's size when ``path`` holds only its header (a hub file whose header alone was fetched,
    ``sources.hub_remote``); the header is checked against that size."""
    path = Path(path)
    try:
        return _parse(path, check_size, size)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except _BadFile as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None


class SafetensorsFile:
    """One validated safetensors file; ``read(name)`` reads one tensor with positioned reads.

    ``remote_size``: ``path`` holds only the header of a hub file of that size (validation and
    planning need nothing more); reading a tensor of it is refused, never answered with zeros."""

    def __init__(self, path: Path, remote_size: int | None = None):
        self.path = Path(path)
        self.remote_size = remote_size
        self.header = read_header(self.path, size=remote_size)
        self.entries = self.header.entries
        self.metadata = self.header.metadata
        self._fh = None
        self._open_lock = threading.Lock()

    def read(self, name: str):
        e = self.entries[name]
        return self._read(name, e.begin, e.end - e.begin, e.shape)

    def read_rows(self, name: str, lo: int, hi: int):
        """Rows lo..hi (along dim 0; 0 <= lo <= hi <= shape[0]) of tensor ``name``: one positioned
        read of their bytes (row-major storage), a fresh buffer."""
        e = self.entries[name]
        row = (e.end - e.begin) // max(e.shape[0], 1)
        return self._read(name, e.begin + lo * row, (hi - lo) * row, (hi - lo, *e.shape[1:]))

    def _read(self, name: str, begin: int, length: int, shape):
        import torch

        e = self.entries[name]
        if self.remote_size is not None:
            raise UserError(f"{self.path.name}: only its header was fetched from the Hub, so tensor '{name}' cannot be "
                            "read here; run without --dry-run (merge run downloads the files a merge reads)")
        try:
            fd = self._fd()
            buf = buffers.empty((length,), torch.uint8)  # a reused buffer: no page clearing
            view = memoryview(buf.numpy())
            start = self.header.data_start + begin
            got = 0
            while got < len(view):  # positioned reads: items merged on several threads share the file
                r = os.preadv(fd, [view[got:]], start + got)
                if not r:
                    raise UserError(f"{self.path}: file ended while reading tensor '{name}' (truncated?)")
                got += r
        except OSError as err:
            raise UserError(f"{self.path}: cannot read tensor '{name}' ({err.strerror or err})") from None
        return buf.view(getattr(torch, e.dtype)).reshape(shape)

    def _fd(self) -> int:
        with self._open_lock:
            if self._fh is None:
                self._fh = open(self.path, "rb", buffering=0)
            return self._fh.fileno()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
