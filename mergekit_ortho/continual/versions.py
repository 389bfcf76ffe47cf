"""Versions of a continual state: retention, listing with disk use, promote (roll back or forward)
and tags (issue 16).

Each ``add`` commits a new version directory ``vNNNNNN`` (numbered by ``next_version``, not by the
number of models: after a promote the next add's models differ from an older version of the same
length). Its ``version.json`` records what it holds: ``t``, ``scalars`` and ``history``. In
``state.json``, ``versions`` lists the versions kept, oldest first; after each commit the last
``retain`` of them (default 3), every tagged one and the current one are kept, the others are
dropped from the list and then swept from disk (a crash between the two leaves orphans that the
next add sweeps).

``promote(v)``: under the state lock, ``state.json`` is rewritten naming ``v`` as current with
``v``'s t, scalars and history: one atomic rename, so a kill -9 leaves the old or the new state.
Later adds fold into ``v``'s tensors; the versions after ``v`` stay until retention drops them.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from ..errors import UserError
from .state import DEFAULT_RETAIN, STATE_FILE, VERSION_FILE, State, _lock, _sweep, _write_json_atomic

_NUMBER = re.compile(r"^v(\d+)$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def number(name: str) -> int:
    m = _NUMBER.match(name or "")
    return int(m.group(1)) if m else 0


def records(data: dict) -> list[dict]:
    """The versions kept, oldest first (a state written before versions were kept: its current one)."""
    if "versions" in data:
        return list(data["versions"])
    cur = data.get("current")
    return [{"version": cur, "t": data["t"], "time": data.get("created", "")}] if cur else []


def next_name(data: dict) -> str:
    known = [number(r["version"]) for r in records(data)] + [number(data.get("current") or "")]
    n = max([int(data.get("next_version", 0))] + [k + 1 for k in known] + [data["t"] + 1])
    return f"v{n:06d}"


def retain_of(data: dict) -> int:
    return int(data.get("retain", DEFAULT_RETAIN))


def keep_names(data: dict) -> set[str]:
    """The version directories to keep: the last ``retain`` versions, the tagged ones, the current one."""
    names = [r["version"] for r in records(data)]
    keep = set(names[-retain_of(data):]) | set(data.get("tags", {}).values())
    if data.get("current"):
        keep.add(data["current"])
    return keep


def with_new_version(data: dict, version: str, t: int) -> dict:
    """``data`` (the state about to be committed, ``current`` already ``version``) with ``version``
    recorded and the retention applied to the list."""
    out = dict(data)
    out["versions"] = records(data) + [{"version": version, "t": t, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    out["next_version"] = number(version) + 1
    keep = keep_names(out)
    out["versions"] = [r for r in out["versions"] if r["version"] in keep]
    return out


def sidecar(data: dict) -> dict:
    """What a version directory's ``version.json`` holds (written before the directory is in place)."""
    return {"t": data["t"], "scalars": data["scalars"], "history": data["history"]}


def _read_sidecar(root: Path, st: State, version: str) -> dict:
    from ..io.json_files import check_fields, read_object

    if version == st.data.get("current"):
        return sidecar(st.data)
    f = root / version / VERSION_FILE
    if not f.is_file():
        raise UserError(f"{root}: version {version} has no {VERSION_FILE}; it cannot be promoted or exported")
    data = read_object(f, "continual version file")
    check_fields(data, {"t": int, "scalars": dict, "history": list}, f, required=("t", "scalars", "history"))
    return data


def _find(st: State, version: str) -> dict:
    if re.fullmatch(r"\d+", version or ""):
        version = f"v{int(version):06d}"
    tags = st.data.get("tags", {})
    version = tags.get(version, version)
    for r in records(st.data):
        if r["version"] == version and (st.root / version).is_dir():
            return r
    have = ", ".join(r["version"] for r in records(st.data)) or "none"
    raise UserError(f"{st.root}: no version '{version}' is kept (kept: {have}); see `merge continual versions`")


def state_at(st: State, version: str | None) -> State:
    """The state as it was at ``version`` (a name, a number or a tag; None: the current one)."""
    if version is None:
        return st
    r = _find(st, version)
    data = dict(st.data)
    data.update(_read_sidecar(st.root, st, r["version"]), current=r["version"])
    return State(st.root, data)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def list_versions(state_dir: Path) -> list[dict]:
    """Each kept version, oldest first: name, models merged, time, tags, current, disk bytes."""
    st = State.load(Path(state_dir))
    tags: dict[str, list[str]] = {}
    for name, v in st.data.get("tags", {}).items():
        tags.setdefault(v, []).append(name)
    out = []
    for r in records(st.data):
        d = st.root / r["version"]
        if not d.is_dir():
            continue
        models = None
        try:
            models = [h["name"] for h in _read_sidecar(st.root, st, r["version"])["history"]]
        except UserError:
            pass
        out.append({"version": r["version"], "t": r["t"], "time": r.get("time", ""), "models": models,
                    "tags": sorted(tags.get(r["version"], [])), "current": r["version"] == st.data.get("current"),
                    "disk_bytes": _dir_bytes(d)})
    return out


def promote(state_dir: Path, version: str, lock_timeout: float = -1) -> dict:
    """Make ``version`` the current one (roll back or forward); later adds continue from it."""
    from filelock import Timeout

    root = Path(state_dir)
    State.load(root)
    try:
        with _lock(root).acquire(timeout=lock_timeout):
            st = State.load(root)
            target = state_at(st, version)
            data = dict(target.data)
            data["versions"] = records(st.data)
            _write_json_atomic(root / STATE_FILE, data)  # the commit point
            return {"version": target.data["current"], "t": target.t}
    except Timeout:
        raise UserError(f"{root} is locked by another process; try again later") from None


def tag(state_dir: Path, version: str, name: str) -> dict:
    """Tag a kept version: tagged versions are never swept by retention."""
    root = Path(state_dir)
    if not _TAG.match(name or ""):
        raise UserError(f"tag {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    with _lock(root):
        st = State.load(root)
        r = _find(st, version)
        data = dict(st.data)
        data["versions"] = records(st.data)
        data["tags"] = dict(st.data.get("tags", {}), **{name: r["version"]})
        _write_json_atomic(root / STATE_FILE, data)
        return {"version": r["version"], "tag": name}


def set_retain(state_dir: Path, retain: int) -> None:
    root = Path(state_dir)
    if retain < 1:
        raise UserError(f"--retain must be at least 1, got {retain}")
    with _lock(root):
        st = State.load(root)
        if st.data.get("retain") == retain:
            return
        data = dict(st.data, retain=retain, versions=records(st.data))
        data["versions"] = [r for r in data["versions"] if r["version"] in keep_names(data)]
        _write_json_atomic(root / STATE_FILE, data)
        _sweep(root, keep_names(data))
