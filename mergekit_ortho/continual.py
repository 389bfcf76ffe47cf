"""Persistent, crash-safe state for sequential (continual) merging.

Models arrive one at a time; each ``add`` folds one model into the state in a single streaming
pass (one tensor of the state, the base and the new model in memory at a time), so memory does
not grow with the number of models and earlier models are never re-read.

On disk (DESIGN.md "Continual state", with versioned tensor directories):

    STATE/
      state.json      format version, method, parameters, base reference, t, scalars, history
                      (name, source, sha256 of its tensors, time, per-model parameters), and
                      ``current``: the tensor directory in force
      v000003/        the running state tensors (safetensors, sharded): per merged tensor NAME,
                      ``NAME`` (a one-tensor state, float32) or ``NAME#part`` per part of a
                      fold's ``StateParts`` (model_stock, ram), in the dtypes the fold lays out
      lock            held (filelock) while a process updates the state

An ``add`` writes ``v000004/`` beside ``v000003/`` (fsynced), then atomically replaces
``state.json`` (write temp, fsync, rename). That rename is the commit point: a crash before it
leaves the old state (the orphan directory is swept by the next add), a crash after it leaves the
new one. Versioned directories instead of one ``merged/`` directory make the switch a single
rename of a small file.

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

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .writer import fsync_path, refuse_if_interrupted

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


def _check_state(data: dict, f: Path) -> None:
    from .io.json_files import check_fields
    from .ops import registry

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
        from .io.json_files import check_fields, read_object

        data = read_object(f, "continual state file")
        version = data.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise UserError(f"{f}: state format version {version!r} is newer than this mergekit-ortho "
                            f"understands ({FORMAT_VERSION}); upgrade mergekit-ortho")
        check_fields(data, _STATE_FIELDS, f, required=tuple(_STATE_FIELDS))
        _check_state(data, f)
        return cls(root, data)

    def recipe(self):
        from . import recipe as recipe_mod

        return recipe_mod.from_dict(self.data["recipe"], str(self.root / STATE_FILE), require_models=False)


def _lock(root: Path):
    from filelock import FileLock

    return FileLock(str(root / "lock"))


def _sweep(root: Path, keep: str | None) -> None:
    """Remove tensor directories that are not the current one (left by crashes or replaced)."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith("v") or p.name.startswith(".v")) and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


# --- init ------------------------------------------------------------------------------------------


def init(state_dir: Path, recipe_path: Path, on_model: Callable[[dict], None] | None = None,
         force: bool = False) -> State:
    """Create a state from a recipe (method, base, parameters); fold in the recipe's models
    (``force``: also models whose tensors equal one already merged)."""
    from . import recipe as recipe_mod
    from .ops import registry
    from .writer import AtomicDirectory

    r = recipe_mod.load(recipe_path, require_models=False)
    op = registry.get(r.merge_method)
    if not op.folds_one_model_at_a_time:
        able = ", ".join(o.name for o in registry.all_operators() if o.folds_one_model_at_a_time)
        raise UserError(f"continual merging supports the methods that fold one model at a time ({able}); "
                        f"'{op.name}' is not one of them")
    if not r.base_model:
        raise UserError("continual merging needs 'base_model' in the recipe")
    base_ref = recipe_mod.resolve_ref(r, r.base_model)
    from .plan import ModelInput, open_source, plan_items

    base = ModelInput("base", base_ref, open_source(base_ref, "base"), {})
    from .plan import output_dtype

    items, _ = plan_items(base, [], r.include, r.exclude, output_dtype(r))
    base.source.close()
    raw = dict(r._raw or {})
    raw["base_model"] = str(Path(base_ref).resolve()) if Path(base_ref).exists() else base_ref
    initial = [(recipe_mod.resolve_ref(r, e.model), label, e.parameters)
               for e, label in zip(r.models, r.model_labels())]
    raw["models"] = []
    data = {
        "format_version": FORMAT_VERSION if op.fold.parts is not None else 1,
        "method": op.name,
        "params": op.resolve_params(r.parameters),
        "recipe": raw,
        "base_model": raw["base_model"],
        "t": 0,
        "scalars": {},
        "history": [],
        "current": None,
        "tensors": {n: {"shape": list(i.shape), "dtype": i.in_dtype, "out_dtype": i.out_dtype, "action": i.action}
                    for n, i in items.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the whole state, initial models included, is built in a temporary directory and renamed into
    # place at the end: a failure (a corrupt model, Ctrl-C) leaves no half-built state behind
    inputs = [recipe_path, base_ref] + [ref for ref, _, _ in initial]
    atomic = AtomicDirectory(Path(state_dir), overwrite=False, inputs=inputs)
    with atomic as tmp:
        _write_json_atomic(tmp / STATE_FILE, data)
        (tmp / "lock").touch()
        entries = []
        for ref, label, params in initial:
            entries.append(add(tmp, ref, name=label, params=params, force=force))
            if on_model:
                on_model(entries[-1])
        atomic.commit()
    return State.load(Path(state_dir))


# --- add -------------------------------------------------------------------------------------------


def add(state_dir: Path, model_ref: str, name: str | None = None, force: bool = False,
        params: dict | None = None, lock_timeout: float = -1) -> dict:
    """Fold one model into the state; returns its history entry. Serialised by the state's lock."""
    from filelock import Timeout

    root = Path(state_dir)
    State.load(root)  # clear error before taking the lock
    try:
        with _lock(root).acquire(timeout=lock_timeout):
            return _add_locked(root, model_ref, name, force, params or {})
    except Timeout:
        raise UserError(f"{root} is locked by another process; try again later") from None


def _tensor_hash_update(h, name: str, t) -> None:
    import torch

    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(list(t.shape)).encode())
    t = t.contiguous()
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def _add_locked(root: Path, model_ref: str, name: str | None, force: bool, params: dict) -> dict:
    import torch

    from . import plan as plan_mod
    from .execute import Work, execute
    from .inputs import operator_input
    from .ops import registry
    from .sinks import StateVersion

    st = State.load(root)
    _sweep(root, st.data.get("current"))
    op = registry.get(st.method)
    mparams = op.resolve_model_params(params, name or model_ref)
    ref = str(Path(model_ref).resolve()) if Path(model_ref).exists() else model_ref
    label = name or Path(model_ref.rstrip("/")).name or model_ref
    base = plan_mod.ModelInput("base", st.data["base_model"], plan_mod.open_source(st.data["base_model"], "base"), {})
    model = plan_mod.ModelInput(label, ref, plan_mod.open_source(ref, label), mparams)
    if model.is_lora:  # a LoRA arrives as the full model it makes: base + scale * B @ A
        from .adapters.keymap import match_to_base
        from .adapters.matched import AppliedLora, MatchedLora

        infos = base.source.infos
        match = match_to_base(model.source, list(infos), {k: i.shape for k, i in infos.items()})
        matched = MatchedLora(model.source, match)
        model = plan_mod.ModelInput(label, ref, AppliedLora(matched, base.source), mparams)
    try:
        tensors = st.data["tensors"]
        _check_compatible(tensors, model)
        fold_form = _fold_form(op)
        method_params, history_params = _state_params(op, st)
        layout = _StateLayout(fold_form, method_params, tensors)
        t_new = st.t + 1
        version = f"v{t_new:06d}"
        prev = _StateReader(st.tensor_dir) if st.tensor_dir else None
        history_params.append(mparams)
        h = hashlib.sha256()
        f32 = torch.float32

        def fold(n: str):
            raw = model.source.get(n)
            _tensor_hash_update(h, n, raw)
            b = base.source.get(n)  # as stored: raw_weights folds convert it chunk by chunk
            raw_mode = fold_form.raw_weights  # the weight as stored for folds that prepare it chunk by chunk
            if not raw_mode:
                b = b.to(f32)
            b_in = b if op.reads == "deltas" else None
            x = raw if raw_mode else operator_input(raw, b_in, f32)
            task = registry.TensorTask(n, b_in, [], method_params, history_params, dtype=f32,
                                       raw_inputs=raw_mode)
            old = layout.load(prev, n, task) if prev else None
            out = fold_form.step(old, x, st.t, task)
            state, stats = out if fold_form.reduce else (out, None)  # (state, stats) with a reduce
            return layout.stored(n, state), stats

        sink = StateVersion(root, version, layout.shards(), {"format": "pt", "mergekit_ortho_state": st.method,
                                                               "t": str(t_new)})
        with sink:
            execute([Work(n) for n in layout.tensor_order(sink.order())], fold, sink, check_finite=False)
            sink.finish()
            for n, info in tensors.items():  # hash the tensors that are not merged too
                if info["action"] != "merge" and n in model.source.infos:
                    _tensor_hash_update(h, n, model.source.get(n))
            digest = h.hexdigest()
            dup = next((e for e in st.data["history"] if e["sha256"] == digest), None)
            if dup is not None and not force:
                raise UserError(f"{model_ref} has the same tensors (sha256 {digest[:12]}…) as '{dup['name']}' "
                                "already merged; pass --force to merge it again")
            scalars = (fold_form.reduce(sink.stats, st.data["scalars"], t_new, method_params) if fold_form.reduce
                       else st.data["scalars"])
            sink.commit()
        entry = {"name": label, "source": ref, "sha256": digest, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "params": mparams, "t": t_new}
        data = dict(st.data)
        data.update(t=t_new, scalars=scalars, current=version, history=st.data["history"] + [entry])
        refuse_if_interrupted()
        _write_json_atomic(root / STATE_FILE, data)  # the commit point
        _sweep(root, version)
        return entry
    finally:
        base.source.close()
        model.source.close()


def _check_compatible(tensors: dict, model) -> None:
    for n, info in tensors.items():
        if info["action"] != "merge":
            continue
        other = model.source.infos.get(n)
        if other is None:
            raise UserError(f"tensor '{n}' of the state's base is missing from {model.ref}")
        if list(other.shape) != info["shape"]:
            raise UserError(f"tensor '{n}' has shape {list(other.shape)} in {model.ref}, the state has {info['shape']}")
    extra = sorted(set(model.source.infos) - set(tensors))
    if extra:
        raise UserError(f"tensor '{extra[0]}' is in {model.ref} but not in the state's base model")


class _StateLayout:
    """Where each merged tensor's state lives in a version directory: under the tensor's own name
    (a one-tensor state, float32: the layout of every state before parts existed), or, for a fold
    with ``parts``, as ``NAME#part`` entries kept together, 8-byte parts first."""

    def __init__(self, fold, params, tensors: dict):
        from .dtypes import itemsize
        from .writer import OutTensor

        self.fold = fold
        self.specs: dict[str, list] = {}
        for n, info in tensors.items():
            if info["action"] != "merge":
                continue
            shape = tuple(info["shape"])
            if fold.parts is None:
                self.specs[n] = [OutTensor(n, shape, "float32")]
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
        from .dtypes import itemsize
        from .writer import plan_shards

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
            return state
        packed = self.fold.parts.pack(state)
        return {t.name: packed[t.name[len(name) + len(PART_SEP):]] for t in self.specs[name]}

    def load(self, reader: "_StateReader", name: str, task):
        if self.fold.parts is None:
            return reader.get(name)
        cut = len(name) + len(PART_SEP)
        return self.fold.parts.unpack({t.name[cut:]: reader.get(t.name) for t in self.specs[name]}, task)


class _StateReader:
    def __init__(self, d: Path):
        from .sources.checkpoint import CheckpointSource

        self.src = CheckpointSource(str(d), "state")

    def get(self, name: str):
        return self.src.get(name)


def _state_params(op, st: "State") -> tuple:
    """The state's method parameters and each merged model's, as the operator's typed Params
    (state.json holds them as plain JSON)."""
    return (op.resolve_params(st.data["params"]),
            [op.resolve_model_params(e["params"], e["name"]) for e in st.data["history"]])


def _fold_form(op):
    """The operator's fold, which continual merging drives one model at a time."""
    if op.fold is None:
        raise UserError(f"method '{op.name}' has no streaming form for continual merging")
    if not op.fold.one_model_at_a_time:
        raise UserError(f"method '{op.name}' weighs each model against all the others (it reads every "
                        "model twice per tensor), so it cannot fold models in one at a time")
    return op.fold


# --- export, status --------------------------------------------------------------------------------


def export(state_dir: Path, out: Path, overwrite: bool = False, on_tensor=None, force_replace: bool = False,
           extra_inputs=()) -> Path:
    """Write the current merged model as a normal model directory (like `merge run`)."""
    import torch

    from . import plan as plan_mod
    from .execute import write_full_model
    from .ops import registry
    from .writer import AtomicDirectory, OutTensor, plan_shards

    root = Path(state_dir)
    st = State.load(root)
    guard = [root, st.data["base_model"], *extra_inputs]
    AtomicDirectory(Path(out), overwrite, inputs=guard, force_replace=force_replace).check()  # before the lock
    with _lock(root):
        st = State.load(root)
        if st.t == 0:
            raise UserError(f"{root} has no model merged yet; `merge continual add` one first")
        r = st.recipe()
        op = registry.get(st.method)
        base = plan_mod.ModelInput("base", st.data["base_model"],
                                   plan_mod.open_source(st.data["base_model"], "base"), {})
        reader = _StateReader(st.tensor_dir)
        try:
            fold_form = _fold_form(op)
            method_params, history_params = _state_params(op, st)
            layout = _StateLayout(fold_form, method_params, st.data["tensors"])
            items, _ = plan_mod.plan_items(base, [], r.include, r.exclude, plan_mod.output_dtype(r))
            specs = [OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()]
            plan = plan_mod.Plan(r, op, st.data["params"], base, [], items, plan_shards(specs, r.output.shard_size),
                                 "float32", "cpu")
            plan.models = [plan_mod.ModelInput(h["name"], h["source"], None, h["params"]) for h in st.data["history"]]
            f32 = torch.float32

            def finish(name: str):
                if items[name].action == "copy":
                    return base.source.get(name), None
                b = base.source.get(name).to(f32)
                task = registry.TensorTask(name, b, [], method_params, history_params, scalars=st.data["scalars"])
                merged = fold_form.finish(layout.load(reader, name, task), task)
                return (b + merged if op.reads == "deltas" else merged), None

            extra = f"Continual merge of {st.t} model(s); state scalars: {json.dumps(st.data['scalars'])}"
            return write_full_model(plan, Path(out), finish, card_extra=extra, on_tensor=on_tensor,
                                    overwrite=overwrite, inputs=[Path(p) for p in guard] + plan_mod.input_paths(plan),
                                    force_replace=force_replace)
        finally:
            base.source.close()


def status(state_dir: Path) -> dict:
    root = Path(state_dir)
    st = State.load(root)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {
        "state": str(root),
        "method": st.method,
        "parameters": st.data["params"],
        "base_model": st.data["base_model"],
        "models_merged": st.t,
        "scalars": st.data["scalars"],
        "history": st.data["history"],
        "disk_bytes": size,
        "format_version": st.data["format_version"],
    }


# --- watch -----------------------------------------------------------------------------------------


def _entry_signature(p: Path) -> tuple | None:
    """(total size, newest mtime) of a candidate checkpoint, or None if it is not one (yet)."""
    if p.name.startswith("."):
        return None
    if p.is_file():
        if p.suffix != ".safetensors":
            return None
        st = p.stat()
        return (st.st_size, st.st_mtime_ns)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        weights = [f for f in files if f.suffix == ".safetensors" or f.name.endswith(".index.json")]
        if not weights:
            return None
        return (sum(f.stat().st_size for f in files), max(f.stat().st_mtime_ns for f in files))
    return None


_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


def _incomplete_reason(p: Path) -> str | None:
    """Why ``p`` is not (yet) a whole checkpoint, or None when it is: headers readable, every shard
    of its index present, and no numbered shard (``-00002-of-00003``) without its siblings (a copy
    whose index arrives last looks like a complete single-file model until then)."""
    from .sources.checkpoint import CheckpointSource

    if p.is_dir():
        for f in p.glob("*.safetensors"):
            m = _SHARD_NAME.search(f.name)
            if m:
                total = int(m.group(2))
                stem = f.name[: m.start()]
                missing = [i for i in range(1, total + 1)
                           if not (p / f"{stem}-{i:05d}-of-{total:05d}.safetensors").is_file()]
                if missing:
                    return f"shard {missing[0]} of {total} has not arrived"
                if not (p / "model.safetensors.index.json").is_file() and stem == "model":
                    return "its shard index model.safetensors.index.json has not arrived"
    try:
        CheckpointSource(str(p), p.name).close()
        return None
    except UserError as e:
        return str(e)


def watch(state_dir: Path, inbox: Path, interval: float = 2.0, log: Callable[[str], None] = print,
          should_stop: Callable[[], bool] = lambda: False, max_polls: int | None = None,
          incomplete_timeout: float = 3600.0) -> int:
    """Merge each complete checkpoint that appears in ``inbox``, in arrival order.

    A checkpoint (a ``.safetensors`` file or a model directory) is taken once its total size and
    newest modification time are unchanged across two polls ``interval`` seconds apart and it is
    whole (``_incomplete_reason``). One that is still incomplete is waited for, with its reason
    logged whenever it changes, for up to ``incomplete_timeout`` seconds since it last changed;
    then it is given up with a log line. A checkpoint whose merge fails (a shape mismatch, a
    corrupt file) is logged and retried whenever its files change. Names already in the history
    (by source path) are skipped, so a restarted watcher never merges a model twice; a model whose
    tensors were already merged under another name is refused by the hash check and logged.
    Returns the number of models merged.
    """
    root, inbox = Path(state_dir), Path(inbox)
    if not inbox.is_dir():
        raise UserError(f"inbox {inbox} is not a directory")
    seen: dict[Path, tuple] = {}
    changed_at: dict[Path, float] = {}
    waiting: dict[Path, str] = {}  # the last reason logged for an incomplete checkpoint
    failed: dict[Path, tuple] = {}  # signature at the failed attempt: retried when it changes
    given_up: dict[Path, tuple] = {}
    done = {h["source"] for h in State.load(root).data["history"]}
    merged = polls = 0
    while not should_stop():
        candidates = []
        now = time.time()
        for p in inbox.iterdir():
            rp = p.resolve()
            if str(rp) in done:
                continue
            sig = _entry_signature(p)
            if sig is None or failed.get(rp) == sig or given_up.get(rp) == sig:
                continue
            if seen.get(rp) != sig:
                seen[rp], changed_at[rp] = sig, now
                continue  # changed since the last poll: still arriving
            why = _incomplete_reason(p)
            if why is None:
                waiting.pop(rp, None)
                candidates.append((sig[1], p))
            elif now - changed_at[rp] > incomplete_timeout:
                given_up[rp] = sig
                waiting.pop(rp, None)
                log(f"gave up on {p.name}: still incomplete after {incomplete_timeout:g}s without a change ({why}); "
                    "it is retried if its files change")
            elif waiting.get(rp) != why:
                waiting[rp] = why
                log(f"waiting for {p.name}: {why}")
        for _, p in sorted(candidates, key=lambda c: (c[0], c[1].name)):
            if should_stop():
                break
            rp = p.resolve()
            try:
                entry = add(root, str(p), name=p.name.removesuffix(".safetensors"))
                merged += 1
                done.add(str(rp))
                failed.pop(rp, None)
                log(f"merged {p.name} as model {entry['t']} (sha256 {entry['sha256'][:12]})")
            except UserError as e:
                failed[rp] = seen[rp]
                log(f"skipped {p.name}: {e} (retried if its files change)")
        polls += 1
        if max_polls is not None and polls >= max_polls:
            break
        end = time.time() + interval
        while time.time() < end and not should_stop():
            time.sleep(min(0.1, interval))
    return merged
