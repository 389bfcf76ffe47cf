"""The continual state on disk: ``state.json`` (typed, checked), the state lock, and how a
fold's state tensors are laid out in a version directory (DESIGN.md "Continual state").

Models arrive one at a time; each ``add`` (:mod:`.service`) folds one model into the state in a
single streaming pass (one tensor of the state, the base and the new model in memory at a time), so
memory does not grow with the number of models and earlier models are never re-read.

    STATE/
      state.json      format version, method, parameters, base reference, t, scalars, history
                      (name, source, sha256 of its tensors, time, per-model parameters), ``current``:
                      the tensor directory in force, and (optional, :mod:`.versions`) ``versions``
                      retained, ``retain``, ``tags``, ``next_version``
      v000003/        one version's state tensors (safetensors, sharded): per merged tensor NAME,
                      ``NAME`` (a one-tensor state, float32) or ``NAME#part`` per part of a fold's
                      ``StateParts`` (model_stock, ram), in the dtypes the fold lays out; and
                      ``version.json``: the t, scalars and history this version holds (promote)
      queue/          the job queue of `merge serve` (:mod:`.queue`)
      lock            held (filelock) while a process updates the state

An ``add`` writes ``v000004/`` beside ``v000003/`` (fsynced), then atomically replaces
``state.json`` (write temp, fsync, rename). That rename is the commit point: a crash before it
leaves the old state (the orphan directory is swept by the next add), a crash after it leaves the
new one. Versioned directories instead of one ``merged/`` directory make the switch a single
rename of a small file; older versions are kept as ``retain`` says (:mod:`.versions`).

What is persisted per method (all exact, see each operator's spec):
* streaming-fold operators (``linear`` running weighted sum, ``task_arithmetic`` running sum,
  ``magmax`` running selection): the fold's state tensor; export applies the fold's ``finish``
  with the recorded per-model parameters;
* folds whose state has several parts (``model_stock``: the sums of tau and of tau/|tau| and per
  row the pair sum and norm bounds; ``ram``: the sum and per-entry count): each part, exactly as
  in memory, so `add` after `add` equals `merge run` bit for bit;
* ``opcm``: the un-normalised sum S_t = sum_i P_i(tau_i) per tensor plus the global scalars from
  ``ops.opcm`` (spec B6); export is theta_0 + S_t * scale.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..placement import fsync_path

# 2: a state of parts (``NAME#part`` tensors); one-tensor states are still written as version 1
FORMAT_VERSION = 2
PART_SEP = "#"
STATE_FILE = "state.json"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# state.json: every field a command reads, with its type (a hand-edited file is checked, not trusted)
_STATE_FIELDS = {"format_version": int, "method": str, "params": dict, "recipe": dict, "base_model": str,
                 "t": int, "scalars": dict, "history": list, "current": (str, type(None)), "tensors": dict}
_HISTORY_FIELDS = {"name": str, "source": str, "sha256": str, "time": str, "params": dict, "t": int}
# optional fields (states written before versions were kept have none of them)
_VERSION_FIELDS = {"retain": int, "versions": list, "tags": dict, "next_version": int, "gate": dict,
                   "accumulate": str, "window": (int, type(None))}
VERSION_FILE = "version.json"
DEFAULT_RETAIN = 3


def _check_state(data: dict, f: Path) -> None:
    from ..io.json_files import check_fields
    from ..ops import registry

    try:
        registry.get(data["method"])
    except ValueError as e:
        raise UserError(f"{f}: field 'method': {e}") from None
    if data["t"] < 0 or data["t"] != len(data["history"]):
        raise UserError(f"{f}: field 't' is {data['t']} but the history lists {len(data['history'])} model(s)")
    for i, h in enumerate(data["history"]):
        if not isinstance(h, dict):
            raise UserError(f"{f}: history[{i}] must be an object")
        check_fields(h, _HISTORY_FIELDS, Path(f"{f} history[{i}]"), required=tuple(_HISTORY_FIELDS))
    for name, info in data["tensors"].items():
        if not isinstance(info, dict):
            raise UserError(f"{f}: tensors['{str(name)[:60]}'] must be an object")
        check_fields(info, {"shape": list, "dtype": str, "out_dtype": str, "action": str},
                     Path(f"{f} tensors['{str(name)[:60]}']"), required=("shape", "dtype", "out_dtype", "action"))
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]):
            raise UserError(f"{f}: tensors['{str(name)[:60]}'].shape must list non-negative integers")
    if data["current"] is not None and ("/" in data["current"] or data["current"] in ("", ".", "..")):
        raise UserError(f"{f}: field 'current' must name a version directory of the state, got {data['current']!r}")
    check_fields(data, _VERSION_FIELDS, f)
    if data.get("retain", 1) < 1:
        raise UserError(f"{f}: field 'retain' must be at least 1, got {data['retain']}")
    if data.get("accumulate", "float32") not in ("float32", "float64"):
        raise UserError(f"{f}: field 'accumulate' must be float32 or float64, got {data['accumulate']!r}")
    for i, v in enumerate(data.get("versions", [])):
        if not isinstance(v, dict) or not isinstance(v.get("version"), str) or "/" in v["version"]:
            raise UserError(f"{f}: versions[{i}] must be an object naming a version directory")
    for k, v in data["scalars"].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{f}: scalars['{str(k)[:60]}'] must be a number")


@dataclass
class State:
    root: Path
    data: dict[str, Any]

    @property
    def t(self) -> int:
        return int(self.data["t"])

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def tensor_dir(self) -> Path | None:
        cur = self.data.get("current")
        return self.root / cur if cur else None

    @classmethod
    def load(cls, root: Path) -> "State":
        """The state in force. Readers take no lock, so an ``add`` committing meanwhile can replace
        ``state.json`` and sweep the version it named; the file is then read again (a tensor
        directory still missing after that is damage)."""
        for _ in range(3):
            st = cls._load_once(Path(root))
            if st.tensor_dir is None or st.tensor_dir.is_dir():
                return st
            if cls._load_once(Path(root)).data.get("current") == st.data.get("current"):
                break
        f = Path(root) / STATE_FILE
        raise UserError(f"{f}: its tensor directory {st.tensor_dir.name} is missing; the state is damaged")

    @classmethod
    def _load_once(cls, root: Path) -> "State":
        f = root / STATE_FILE
        if not f.is_file():
            raise UserError(f"{root} is not a continual state (no {STATE_FILE}); create one with `merge continual init`")
        from ..io.json_files import check_fields, read_object

        data = read_object(f, "continual state file")
        version = data.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise UserError(f"{f}: state format version {version!r} is newer than this mergekit-ortho "
                            f"understands ({FORMAT_VERSION}); upgrade mergekit-ortho")
        check_fields(data, _STATE_FIELDS, f, required=tuple(_STATE_FIELDS))
        _check_state(data, f)
        return cls(root, data)

    def recipe(self):
        from .. import recipe as recipe_mod

        return recipe_mod.from_dict(self.data["recipe"], str(self.root / STATE_FILE), require_models=False)


def _lock(root: Path):
    from filelock import FileLock

    return FileLock(str(root / "lock"))


def _sweep(root: Path, keep) -> None:
    """Remove tensor directories that are not kept (``keep``: a name or a set of names): those
    left by crashes, replaced, or past the retention."""
    keep = {keep} if isinstance(keep, str) or keep is None else set(keep)
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith("v") or p.name.startswith(".v")) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)



class _StateLayout:
    """Where each merged tensor's state lives in a version directory: under the tensor's own name
    (a one-tensor state, float32: the layout of every state before parts existed), or, for a fold
    with ``parts``, as ``NAME#part`` entries kept together, 8-byte parts first."""

    def __init__(self, fold, params, tensors: dict, dtype: str = "float32"):
        from ..dtypes import itemsize
        from ..writer import OutTensor

        self.fold, self.dtype = fold, dtype
        self.specs: dict[str, list] = {}
        for n, info in tensors.items():
            if info["action"] != "merge":
                continue
            shape = tuple(info["shape"])
            if fold.parts is None:
                self.specs[n] = [OutTensor(n, shape, dtype)]
            else:
                laid = fold.parts.layout(shape, params).items()
                parts = [OutTensor(f"{n}{PART_SEP}{p}", tuple(s), d) for p, (s, d) in laid]
                self.specs[n] = sorted(parts, key=lambda t: -itemsize(t.dtype))
        self.owner = {t.name: n for n, specs in self.specs.items() for t in specs}
        if len(self.owner) != sum(map(len, self.specs.values())):
            clash = next(n for n in self.specs if PART_SEP in n)
            raise UserError(f"tensor '{clash}' has '{PART_SEP}' in its name, so its state parts would clash with "
                            "another tensor's; this method cannot merge this model continually")

    def shards(self, limit: int = 2 * 10**9) -> list:
        from ..dtypes import itemsize
        from ..writer import plan_shards

        if self.fold.parts is None:  # as before parts existed
            return plan_shards([s[0] for s in self.specs.values()], limit)
        shards, used = [[]], 0
        for specs in self.specs.values():  # a tensor's parts stay together: one put writes them all
            size = sum(t.nbytes for t in specs)
            if shards[-1] and used + size > limit:
                shards.append([])
                used = 0
            shards[-1].extend(specs)
            used += size
        for shard in shards:
            offset = 0
            for t in shard:  # as plan_shards: every tensor aligned to its element size
                if offset % itemsize(t.dtype):
                    raise RuntimeError(f"state part '{t.name}' would be misaligned: its fold's layout must keep "
                                       "each tensor's parts a multiple of 8 bytes")
                offset += t.nbytes
        return [s for s in shards if s]

    def tensor_order(self, stored_order: list[str]) -> list[str]:
        return list(dict.fromkeys(self.owner[n] for n in stored_order))

    def stored(self, name: str, state):
        """What the sink writes for ``name``: the state tensor, or {stored name: part} in order."""
        if self.fold.parts is None:
            return state if self.dtype == "float32" else {name: state}  # float64: written as it is
        packed = self.fold.parts.pack(state)
        return {t.name: packed[t.name[len(name) + len(PART_SEP):]] for t in self.specs[name]}

    def load(self, reader: "_StateReader", name: str, task):
        if self.fold.parts is None:
            return reader.get(name)
        cut = len(name) + len(PART_SEP)
        return self.fold.parts.unpack({t.name[cut:]: reader.get(t.name) for t in self.specs[name]}, task)


class _StateReader:
    def __init__(self, d: Path):
        from ..sources.checkpoint import CheckpointSource

        self.src = CheckpointSource(str(d), "state")

    def get(self, name: str):
        return self.src.get(name)


def _state_params(op, st: "State") -> tuple:
    """The state's method parameters and each merged model's, as the operator's typed Params
    (state.json holds them as plain JSON)."""
    return (op.resolve_params(st.data["params"]),
            [op.resolve_model_params(e["params"], e["name"]) for e in st.data["history"]])


def accumulate_dtype(st: "State") -> str:
    """The dtype of a one-tensor state's running sum: float32, or float64 in a removable state."""
    return st.data.get("accumulate", "float32")


def _fold_form(op):
    """The operator's fold, which continual merging drives one model at a time."""
    if op.fold is None:
        raise UserError(f"method '{op.name}' has no streaming form for continual merging")
    if not op.fold.one_model_at_a_time:
        raise UserError(f"method '{op.name}' weighs each model against all the others (it reads every "
                        "model twice per tensor), so it cannot fold models in one at a time")
    return op.fold

