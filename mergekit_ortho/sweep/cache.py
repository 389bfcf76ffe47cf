"""The cache of `merge sweep`: prepared parts of merges (:mod:`mergekit_ortho.ops.prepare`), one
safetensors file per key in a work directory, bounded in bytes, safe to delete.

Key (:func:`task_key`): SHA-256 of the method, the tensor / module name, every parameter the
prepare step reads (all but the method's ``skips``), the per-model parameters, the model indices,
and a digest of every input tensor as the operator receives it (dtype, shape, bytes: the task
vectors, raw weights or LoRA factors). Anything that changes an input's values (another
checkpoint, another base, a vocabulary alignment, a LoRA scale) changes the key.

An entry is written to a temporary file and renamed into place; its metadata holds the key and a
digest of its tensors, checked on the first read in a process (and again whenever the file's size,
mtime, ctime or inode changed since), so a truncated, edited or foreign file is deleted and
recomputed (never used). Eviction is least-recently-used by bytes (file mtimes, touched on
every hit): when an entry would exceed ``max_bytes``, entries this process has not used go
first, oldest first; if that is not enough the new entry is not stored (this sweep's own
entries are never evicted by it) and :attr:`Cache.skipped` counts it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "mergekit-ortho-sweep-cache/1"
SUFFIX = ".safetensors"


def _update(h, t) -> None:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensors_digest(tensors) -> str:
    """SHA-256 over tensors in order (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def input_tensors(task) -> list:
    """The tensors a task's operator reads: its inputs, or its LoRA factors (A_0, B_0, A_1, ...)."""
    from ..ops.registry import LoraTask

    if isinstance(task, LoraTask):
        return [t for pair in task.factors for t in pair]
    return list(task.inputs)


def task_key(method: str, task, skips: tuple[str, ...], digests: list[str] | None = None) -> str:
    """The cache key of a task's prepared part (see the module docstring); ``digests``: the
    inputs' :func:`tensors_digest` each, when already known."""
    from .. import __version__
    from ..ops.registry import LoraTask

    meta: dict[str, Any] = {
        "format": FORMAT, "tool": __version__, "method": method, "name": task.name,
        "params": {k: v for k, v in task.params.items() if k not in skips},
        "model_params": [dict(mp) for mp in task.model_params],
    }
    if isinstance(task, LoraTask):
        meta.update(model_index=list(task.model_index), svd_rank=task.svd_rank)
    else:
        meta.update(raw_inputs=bool(task.raw_inputs))
    if digests is None:
        digests = [tensors_digest([t]) for t in input_tensors(task)]
    return _hash(meta, digests)


def part_key(method: str, task, i: int, reads: tuple[str, ...], model_reads: tuple[str, ...], digest: str) -> str:
    """The key of model i's per-model part: only its input, its ``model_reads`` and ``reads``."""
    from .. import __version__

    meta = {"format": FORMAT, "tool": __version__, "part": method,
            "params": {k: task.params[k] for k in reads},
            "model_params": {k: task.model_params[i][k] for k in model_reads}}
    return _hash(meta, [digest])


def _hash(meta: dict, digests: list[str]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=repr).encode())
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()


class Cache:
    """Prepared parts by key in ``root`` (created on first write), at most ``max_bytes`` on disk."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.used: set[str] = set()  # keys read or written by this process: never evicted by it
        self.corrupt = 0  # entries found unreadable or altered (deleted, recomputed)
        self.skipped = 0  # entries not stored: the cache was full of this sweep's own entries
        self._sizes: dict[str, int] = {}
        self._times: dict[str, float] = {}
        self._verified: dict[str, tuple] = {}  # key -> stamp of the file when this process last checked it
        if self.root.is_dir():
            for f in self.root.iterdir():
                if f.name.endswith(SUFFIX) and f.is_file():
                    st = f.stat()
                    key = f.name[: -len(SUFFIX)]
                    self._sizes[key], self._times[key] = st.st_size, st.st_mtime
                elif f.name.startswith(".tmp-"):
                    _unlink(f)  # an interrupted write

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str, device: Any = "cpu") -> dict | None:
        """The entry's tensors (fresh, on ``device``), or None (missing, or corrupt: then deleted).
        The digest is checked on the first read in this process; later reads of an entry whose
        size, mtime and inode are as this process last saw them skip it."""
        path = self._path(key)
        if key not in self._sizes and not path.is_file():
            return None
        try:
            st = path.stat()
            meta, tensors = _read(path)
            names = json.loads(meta.get("names", "null"))
            ok = meta.get("format") == FORMAT and meta.get("key") == key and sorted(tensors) == sorted(names)
            if ok and self._verified.get(key) != _stamp(st):
                ok = meta.get("digest") == tensors_digest([tensors[n] for n in names])
        except Exception:  # noqa: BLE001 - any unreadable file is a corrupt entry
            ok = False
        if not ok:
            self.corrupt += 1
            self._drop(key)
            return None
        self.used.add(key)
        try:
            os.utime(path)
            st = path.stat()
            self._sizes[key], self._times[key] = st.st_size, st.st_mtime
            self._verified[key] = _stamp(st)
        except OSError:
            self._verified.pop(key, None)
        return {n: t.to(device) for n, t in tensors.items()}

    def put(self, key: str, tensors: dict) -> bool:
        """Store an entry; False when it does not fit (see the module docstring)."""
        from safetensors.torch import save

        names = sorted(tensors)
        cpu = {n: tensors[n].detach().cpu().contiguous() for n in names}
        meta = {"format": FORMAT, "key": key, "names": json.dumps(names),
                "digest": tensors_digest([cpu[n] for n in names])}
        blob = save(cpu, metadata=meta)
        if not self._make_room(len(blob), key):
            self.skipped += 1
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, self._path(key))
        except OSError:
            _unlink(tmp)
            raise
        st = self._path(key).stat()
        self._sizes[key], self._times[key] = len(blob), st.st_mtime
        self._verified[key] = _stamp(st)
        self.used.add(key)
        return True

    def _make_room(self, need: int, key: str) -> bool:
        if need > self.max_bytes:
            return False
        total = self.total_bytes - self._sizes.get(key, 0)
        if total + need <= self.max_bytes:
            return True
        for old in sorted((k for k in self._sizes if k not in self.used and k != key), key=self._times.get):
            self._drop(old)
            total = self.total_bytes
            if total + need <= self.max_bytes:
                return True
        return False

    def _drop(self, key: str) -> None:
        _unlink(self._path(key))
        self._verified.pop(key, None)
        self._sizes.pop(key, None)
        self._times.pop(key, None)


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file read into one writable buffer: the tensors are
    views of it (copied only where an offset is not aligned to the dtype), so a cached entry
    costs one read, not the page faults of a copy-on-write mapping when apply scales it in place."""
    import torch

    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        got = 0
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError("truncated")
            got += n
    hlen = int.from_bytes(bytes(view[:8]), "little")
    header = json.loads(bytes(view[8:8 + hlen]))
    meta = header.pop("__metadata__", None) or {}
    start = 8 + hlen
    tensors = {}
    for name, info in header.items():
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        lo, hi = info["data_offsets"]
        if not 0 <= lo <= hi <= size - start:
            raise ValueError("offsets out of range")
        raw = buf[start + lo:start + hi]
        item = torch.empty((), dtype=dtype).element_size()
        if (start + lo) % item:
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(info["shape"])
    return meta, tensors


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
