"""Hub models read header-first: validate before downloading, then download only what is read.

A safetensors file starts with an 8-byte little-endian header length n, then n bytes of JSON
naming every tensor's dtype, shape and byte span (spec formats.md §2.1). So a plan (names, shapes,
dtypes, parameters, memory estimate) needs, per weight file, exactly 8 + n bytes: two HTTP range
requests (``bytes=0-7``, then ``bytes=8-(8+n-1)``). huggingface_hub's ``get_safetensors_metadata``
asks for a fixed 100 kB instead, so it is not used.

* ``headers_only()``: every hub id resolves to a *view*: a fresh directory (removed at exit) holding
  the repository's config/tokenizer files (downloaded as usual) and, per weight file, a file of its
  header alone, registered with its real size (``remote_size``), so the usual checkpoint reader
  plans over it and refuses (never zero-fills) a tensor read. `merge validate` and `--dry-run`.
* ``hub_plan.build_plan(recipe)``: plans under ``headers_only()``, collects the weight files that plan reads
  (``files_read``), downloads those (``allow_patterns``) and plans again over them: `merge run`. Files
  the plan does not read stay header-only in the view (hard links to the downloaded ones).

Only safetensors checkpoints are read this way; a repository of pickles (``*.bin``) or a LoRA
adapter (small) is downloaded whole, as before. Offline (``HF_HUB_OFFLINE``), nothing changes: the
cache answers.
"""
from __future__ import annotations

import atexit
import contextvars
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

_MODE: contextvars.ContextVar = contextvars.ContextVar("mergekit_ortho_hub_files", default=None)


@dataclass
class View:
    ref: str
    weights: list[str]  # the checkpoint's weight files, as the index (or the listing) names them
    sizes: dict[str, int] = field(default_factory=dict)  # header-only files: their real sizes
    repo: str = ""
    sha: str = ""  # the commit the view shows: it pins every file's content


_VIEWS: dict[Path, View] = {}
_TOUCHED: list[str] = []  # hub ids resolved through a view or a partial download, in order
_MADE: dict[tuple, Path] = {}  # (ref, files downloaded) -> its view: one per process, however often resolved
_HEADERS: dict[tuple, bytes] = {}  # (repo, sha, file) -> its header, fetched once per process


@contextmanager
def headers_only():
    """Within: hub ids resolve to views of headers (no weight file downloaded)."""
    token = _MODE.set({})
    try:
        yield
    finally:
        _MODE.reset(token)


@contextmanager
def only_files(wanted: dict[str, set[str]]):
    """Within: hub id ``ref`` downloads the weight files ``wanted[ref]`` only (others: headers)."""
    token = _MODE.set(dict(wanted))
    try:
        yield
    finally:
        _MODE.reset(token)


def remote_size(path: Path) -> int | None:
    """The real size of ``path`` if it is a header-only file of a view this process made."""
    v = _VIEWS.get(Path(path).absolute().parent)
    return None if v is None else v.sizes.get(Path(path).name)


def hub_identity(path: Path) -> tuple[str, str, str] | None:
    """(repository, commit sha, path inside it) of a file or folder of a hub model, wherever this
    machine keeps it: a view of this process, or a snapshot of a Hugging Face cache
    (``.../models--org--name/snapshots/<sha>/...``); None for anything else. The commit pins the
    content of every file, so this identifies a hub input without its local path or its bytes."""
    p = Path(path).absolute()
    for d in (p, *p.parents):
        v = _VIEWS.get(d)
        if v is not None and v.sha:
            return v.repo, v.sha, p.relative_to(d).as_posix()
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
            repo = d.parent.parent.name.removeprefix("models--").replace("--", "/")
            return repo, d.name, p.relative_to(d).as_posix()
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _select_weights(files: dict[str, int], folder: Path) -> list[str] | None:
    """The weight files the checkpoint reader would read (``checkpoint._find_weight_files``'s
    order of preference), or None where the header-first path does not apply."""
    from ..io.json_files import read_object

    if "adapter_config.json" in files:
        return None
    index = folder / "model.safetensors.index.json"
    if "model.safetensors.index.json" in files and index.is_file():
        wm = read_object(index, "shard index").get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(x, str) for x in wm.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names")
        names = sorted(set(wm.values()))
        missing = [n for n in names if n not in files]
        if missing:
            raise UserError(f"{index}: shard '{missing[0]}' is not in the hub repository")
        return names
    if "model.safetensors" in files:
        return ["model.safetensors"]
    singles = [f for f in files if f.endswith(".safetensors") and "/" not in f and not f.startswith("adapter_model")]
    return singles if len(singles) == 1 else None


def view(ref: str, repo: str, revision: str | None, config_patterns: list[str]) -> Path | None:
    """The folder ``hub.resolve`` returns under ``headers_only`` / ``only_files``; None: resolve
    as usual (not in either mode, offline, or not a safetensors checkpoint)."""
    mode = _MODE.get()
    if mode is None or _offline():
        return None
    wanted = set(mode.get(ref, ()))
    key = (ref, tuple(sorted(wanted)))
    _TOUCHED.append(ref)
    if key in _MADE and _MADE[key].is_dir():
        return _MADE[key]
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    sha = api.repo_info(repo, revision=revision).sha
    files = {f.path: f.size for f in api.list_repo_tree(repo, revision=sha, recursive=True) if isinstance(f, RepoFile)}
    folder = Path(snapshot_download(repo, revision=sha, allow_patterns=config_patterns + sorted(wanted)))
    weights = _select_weights(files, folder)
    if weights is None:
        return None
    if set(weights) <= wanted:
        _MADE[key] = folder
        return folder  # every weight file is read: the snapshot itself
    out = Path(tempfile.mkdtemp(prefix=".mergekit-ortho-view-", dir=_cache_root()))
    atexit.register(shutil.rmtree, out, True)
    v = View(ref, weights, repo=repo, sha=sha)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel.endswith(".safetensors") and rel not in wanted:
            # not read (header-only below), though perhaps in the snapshot from an earlier run:
            # never linked, so writing its header can never write through a link into the cache
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in weights:  # downloaded because the plan reads it
            _link_or_copy(f.resolve(), out / rel)
        else:
            shutil.copyfile(f, out / rel)
    for w in weights:
        if w not in wanted:
            (out / w).parent.mkdir(parents=True, exist_ok=True)
            (out / w).write_bytes(fetch_header(repo, w, sha, files[w]))
            v.sizes[w] = files[w]
    _VIEWS[out.absolute()] = v
    _MADE[key] = out
    return out


def _cache_root() -> Path:
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    return root  # beside the blobs, so that hard links to them work


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def fetch_header(repo: str, filename: str, revision: str, size: int | None) -> bytes:
    """The first 8 + n bytes of a hub safetensors file: its header, nothing else."""
    from ..io.safetensors import MAX_HEADER_BYTES

    key = (repo, revision, filename)
    if key in _HEADERS:
        return _HEADERS[key]
    head = _fetch_range(repo, filename, revision, 0, 8)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or (size is not None and 8 + n > size):
        raise UserError(f"hub model '{repo}': {filename} is not a readable safetensors file (header length {n} "
                        "points past the end of the file)")
    _HEADERS[key] = out = head + _fetch_range(repo, filename, revision, 8, n)
    return out


def _fetch_range(repo: str, filename: str, revision: str, start: int, length: int) -> bytes:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if length == 0:
        return b""
    headers = build_hf_headers()
    headers.update({"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"})
    url = hf_hub_url(repo, filename, revision=revision)
    buf = bytearray()
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as r:
        hf_raise_for_status(r)
        skip = start if r.status_code == 200 else 0  # a server that ignores Range: read no further than needed
        for chunk in r.iter_bytes():
            buf += chunk
            if len(buf) >= skip + length:
                break
    got = bytes(buf[skip:skip + length])
    if len(got) < length:
        raise UserError(f"hub model '{repo}': {filename} ended after {len(got) + start} bytes, inside its header "
                        "(truncated upload?)")
    return got
