"""The staging directory of a sharded run: units' files, their receipts, and their verification.

A unit of work (``merge run --shard i/N --stage DIR``) writes ``DIR/unit-IIIII-of-NNNNN/``: its
shard files and ``receipt.json``. The directory appears atomically (built beside it, renamed into
place; a killed unit leaves only a hidden ``.unit-...partial-PID`` that the next run of that unit
removes), so re-running a unit replaces its own directory and nothing else.

A receipt records: the plan hash (``plan_hash``: SHA-256 of the resolved plan — recipe, method,
items, per-item parameters, output layout and metadata — and of the inputs' identities, which
do not depend on where this machine keeps them: a hub model by repository and commit sha (so a
unit that downloaded only its own files and a finalize that read only headers agree; another
commit is another plan), a local file by its name inside its input, size and mtime), the inputs'
identities themselves (to name a hub model that moved on), the unit id and count, the phase
(``shards``: output shards; ``fold``: the running sums of a fold with a reduce), and per file
its bytes and per tensor its SHA-256, byte count and whether it is finite; a fold's per-tensor
statistics; the items' reports.

``verify_unit`` checks a unit against the plan before `merge finalize` uses it: present, receipt
readable, same plan (else *stale*: another recipe, other inputs, or another --shard count),
every file of the planned size (else *truncated*), with the planned header and the recorded
tensor hashes (else *tampered*). Each failure is one line naming the unit.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import UserError

RECEIPT = "receipt.json"
FORMAT = "mergekit-ortho-unit/1"
_UNIT_DIR = re.compile(r"^unit-(\d{5})-of-(\d{5})$")


def unit_dir_name(i: int, n: int) -> str:
    return f"unit-{i:05d}-of-{n:05d}"


def staged_counts(stage: Path) -> set[int]:
    """The unit counts N of the unit directories found in ``stage``."""
    if not stage.is_dir():
        return set()
    return {int(m.group(2)) for p in stage.iterdir() if (m := _UNIT_DIR.match(p.name)) and p.is_dir()}


# --- the plan hash -----------------------------------------------------------------------------------


def _jsonable(v):
    from .planning import ItemParams

    if isinstance(v, ItemParams):
        return [v.method, list(v.models)]
    if isinstance(v, (tuple, set, frozenset)):
        return list(v)
    return repr(v)


def _file_identity(p: Path, rel: str) -> list:
    st = p.stat()
    real = p.resolve()
    if real.parent.name == "blobs":  # a Hugging Face cache blob: its name is its content hash
        return ["blob", real.name, st.st_size]
    return ["file", rel, st.st_size, st.st_mtime_ns]


def input_identities(plan) -> list:
    """Every input the plan may read, by identity, not content, and not by where it lies: a hub
    model by (repository, commit), however much of it this machine downloaded (a header-only view
    and a full snapshot are the same input); a local file by its name inside the input, size and
    mtime (a directory: each of its files)."""
    from .plan import input_paths
    from .sources.hub_remote import hub_identity

    recipe_path = plan.recipe._source_path
    seen, out = set(), []
    for p in input_paths(plan):
        if recipe_path is not None and Path(p) == recipe_path:
            continue  # its content is in the plan; a copy of it elsewhere is the same recipe
        hub = hub_identity(Path(p))
        if hub is not None:
            key = ("hub", *hub)
            if key not in seen:
                seen.add(key)
                out.append(list(key))
            continue
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) \
            if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            key = str(f.absolute())
            if key not in seen:
                seen.add(key)
                out.append(_file_identity(f, f.name))
    return out


def plan_hash(plan) -> str:
    """SHA-256 of the resolved plan and the input files' identities (stable across processes)."""
    from . import __version__
    from .sinks import merge_metadata

    recipe = plan.recipe
    data = {
        "tool": __version__,
        "recipe": recipe._raw if recipe._raw is not None else recipe.model_dump(),
        "method": plan.op.name, "params": plan.params, "compute": plan.compute_dtype, "load": str(plan.load_dtype),
        "format": plan.out_format,
        "models": [[m.label, m.ref] for m in plan.models], "base": plan.base.ref if plan.base else None,
        "items": [[i.name, i.action, list(i.shape), i.in_dtype, i.out_dtype,
                   [[m.label, n] for m, n in plan.sources_of(i.name)[1]]] for i in plan.items.values()],
        "item_params": plan.item_params,
        "shards": [[[t.name, list(t.shape), t.dtype] for t in s] for s in plan.shards],
        "metadata": merge_metadata(recipe, plan.op.name),
        "inputs": input_identities(plan),
    }
    if plan.module_mode:  # an adapter or bundle output has no items or shards: its modules instead
        data["modules"] = [[k, list(plan.module_shapes.get(k, ()))] for k in plan.module_keys]
    raw = json.dumps(data, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


# --- writing a unit ----------------------------------------------------------------------------------


def write_receipt(directory: Path, receipt: dict) -> None:
    (Path(directory) / RECEIPT).write_text(json.dumps({"format": FORMAT, **receipt}, indent=1) + "\n",
                                           encoding="utf-8")


# --- verifying a unit --------------------------------------------------------------------------------


def _hash_range(fh, start: int, length: int) -> str:
    h = hashlib.sha256()
    fh.seek(start)
    left = length
    while left:
        chunk = fh.read(min(left, 16 * 2**20))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _changed_hub_input(receipt: dict, inputs) -> str:
    """`` (org/name is at commit X now, the unit read Y; pin a revision ...)`` where a hub model
    got a new commit between the unit and now, else ""."""
    old = {x[1]: x[2] for x in receipt.get("inputs") or []
           if isinstance(x, list) and len(x) > 2 and x[0] == "hub" and isinstance(x[2], str)}
    for x in (y for y in inputs or [] if y[0] == "hub"):
        if x[1] in old and old[x[1]] != x[2]:
            return (f" ({x[1]} is at commit {x[2][:12]} now, the unit read {old[x[1]][:12]}; pin a revision, "
                    f"{x[1]}@{x[2]}, so that every unit reads the same files)")
    return ""


def _open_receipt(stage: Path, i: int, n: int, want_hash: str, phase: str, retry: str, inputs):
    """(unit directory, its label, its receipt) once the unit is present, its receipt readable and
    of this plan, unit, count and phase."""
    d = stage / unit_dir_name(i, n)
    label = f"unit {i}/{n} ({d})"
    if not d.is_dir():
        raise UserError(f"{label} is missing; run `{retry}`")
    try:
        receipt = json.loads((d / RECEIPT).read_text(encoding="utf-8"))
        if not isinstance(receipt, dict) or receipt.get("format") != FORMAT:
            raise ValueError("not a unit receipt")
    except (OSError, ValueError) as e:
        raise UserError(f"{label}: its receipt cannot be read ({e}); run `{retry}`") from None
    if receipt.get("plan_hash") != want_hash or receipt.get("unit") != i or receipt.get("units") != n \
            or receipt.get("phase") != phase:
        raise UserError(f"{label} is stale: it was computed for another plan (recipe, inputs or --shard count "
                        f"changed){_changed_hub_input(receipt, inputs)}; run `{retry}`")
    return d, label, receipt


def verify_unit(stage: Path, i: int, n: int, want_hash: str, phase: str, files: list[tuple[str, list, dict]],
                retry: str, inputs=None) -> dict:
    """The receipt of unit ``i`` of ``n`` once every check passes; ``files``: (file name, planned
    shard, metadata) the unit must hold. ``retry``: the command line that recomputes the unit;
    ``inputs``: the plan's ``input_identities`` (to name a hub model whose commit changed)."""
    from .writer import shard_header

    d, label, receipt = _open_receipt(stage, i, n, want_hash, phase, retry, inputs)
    listed = {f.get("name"): f for f in receipt.get("files", []) if isinstance(f, dict)}
    if sorted(listed) != sorted(name for name, _, _ in files):
        raise UserError(f"{label} is stale: its files are not the planned ones; run `{retry}`")
    for fname, shard, metadata in files:
        path = d / fname
        header = shard_header(shard, metadata)
        size = len(header) + sum(t.nbytes for t in shard)
        if not path.is_file():
            raise UserError(f"{label}: {fname} is missing; run `{retry}`")
        got = path.stat().st_size
        if got < size:
            raise UserError(f"{label}: {fname} is truncated ({got} of {size} bytes); run `{retry}`")
        if got > size or listed[fname].get("bytes") != size:
            raise UserError(f"{label}: {fname} has {got} bytes, the plan {size}: tampered; run `{retry}`")
        records = {r.get("name"): r for r in listed[fname].get("tensors", []) if isinstance(r, dict)}
        with open(path, "rb") as fh:
            if fh.read(len(header)) != header:
                raise UserError(f"{label}: {fname} does not have the planned header: tampered; run `{retry}`")
            offset = len(header)
            for t in shard:
                rec = records.get(t.name, {})
                if _hash_range(fh, offset, t.nbytes) != rec.get("sha256"):
                    raise UserError(f"{label}: tensor '{t.name}' in {fname} does not match its receipt: tampered; "
                                    f"run `{retry}`")
                offset += t.nbytes
    return receipt


# --- a unit of modules (an adapter or bundle output, :mod:`.module_units`) ---------------------------


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        return hashlib.sha256(prefix + fh.read(int.from_bytes(prefix, "little"))).hexdigest()


def verify_modules(stage: Path, i: int, n: int, want_hash: str, phase: str, fname: str, keys: list[str],
                   retry: str, inputs=None) -> dict:
    """The receipt of unit ``i`` of ``n`` of a module-mode output once every check passes: its
    modules are ``keys`` in order, and ``fname`` has the recorded size, header and tensor hashes
    (the factors' ranks are known only once computed, so the receipt, not the plan, holds the
    layout; its header is hashed whole)."""
    d, label, receipt = _open_receipt(stage, i, n, want_hash, phase, retry, inputs)
    modules = receipt.get("modules")
    listed = [f for f in receipt.get("files", []) if isinstance(f, dict)]
    if not isinstance(modules, list) or [m.get("key") if isinstance(m, dict) else None for m in modules] != keys \
            or [f.get("name") for f in listed] != [fname]:
        raise UserError(f"{label} is stale: its modules are not the planned ones; run `{retry}`")
    entry, path = listed[0], d / fname
    if not path.is_file():
        raise UserError(f"{label}: {fname} is missing; run `{retry}`")
    got, size = path.stat().st_size, entry.get("bytes")
    if not isinstance(size, int):
        raise UserError(f"{label}: its receipt gives no size of {fname}: tampered; run `{retry}`")
    if got < size:
        raise UserError(f"{label}: {fname} is truncated ({got} of {size} bytes); run `{retry}`")
    if got > size:
        raise UserError(f"{label}: {fname} has {got} bytes, its receipt {size}: tampered; run `{retry}`")
    records = {r.get("name"): r for r in entry.get("tensors", []) if isinstance(r, dict)}
    stored = {s for m in modules for s in (m.get("tensors") or {}).values()}
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little")
        raw = fh.read(length) if 8 + length <= got else b""
        if hashlib.sha256(prefix + raw).hexdigest() != entry.get("header_sha256"):
            raise UserError(f"{label}: {fname} does not have the header of its receipt: tampered; run `{retry}`")
        header = json.loads(raw)
        header.pop("__metadata__", None)
        if set(header) != set(records) or not stored <= set(records):
            raise UserError(f"{label}: {fname} does not hold the tensors of its receipt: tampered; run `{retry}`")
        for name, info in header.items():
            start, end = info["data_offsets"]
            if _hash_range(fh, 8 + length + start, end - start) != records[name].get("sha256"):
                raise UserError(f"{label}: tensor '{name}' in {fname} does not match its receipt: tampered; "
                                f"run `{retry}`")
    return receipt
