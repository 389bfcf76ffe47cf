"""Continual merging's commands through the one executor: ``init``, ``add`` (fold one model into a
new version, committed by ``state.json``), ``export`` (a normal model directory) and ``status``.

``add`` reads each model tensor through :func:`..inputs.stored`, so a recipe's ``dtype:`` rounds
the inputs (model and base) exactly as `merge run` does; the sha256 recorded in the history is of
the tensors as stored. Commit protocol (see :mod:`.state`): the version directory (with its
``version.json``) is put in place, ``writer.refuse_if_interrupted`` is checked, then ``state.json``
is replaced atomically; only then are versions past the retention swept (:mod:`.versions`). The
gate (:mod:`.gate`) reads the task-vector norms gathered in the same pass and refuses before the
version is in place; its optional command runs on the candidate's export before the commit point.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..writer import refuse_if_interrupted
from . import gate as gate_mod
from . import versions
from .state import (FORMAT_VERSION, STATE_FILE, VERSION_FILE, State, _fold_form, _lock, _state_params, _StateLayout,
                    _StateReader, _sweep, _write_json_atomic, accumulate_dtype)

from .reading import REMOVABLE, _tensor_hash_update, load_dtype, model_params, open_model

# --- init ------------------------------------------------------------------------------------------


def _scalar_params(op, r) -> dict:
    """The recipe's method parameters for a continual state: scalars only. A state folds each
    tensor with one set of parameters, so per-layer settings (gradient lists, ``filter``
    conditionals) and per-model defaults under the top-level ``parameters`` are refused in one
    line naming the key (they work in `merge run`)."""
    per_model = {p.name for p in op.model_params}
    for key, value in (r.parameters or {}).items():
        if key in per_model:
            raise UserError(f"continual merging: '{key}' under the top-level parameters is a per-model "
                            f"default; give it on each model (models[].parameters.{key}, or `merge continual add "
                            "--weight` for the weight)")
        if isinstance(value, (list, dict)):
            raise UserError(f"continual merging: parameters.{key} is a per-layer setting (a gradient or "
                            "filter list); a continual state takes one value per parameter - use a scalar, "
                            "or `merge run` for per-layer parameters")
    for e in r.models:
        for key, value in (e.parameters or {}).items():
            if isinstance(value, (list, dict)):
                raise UserError(f"continual merging: the parameter '{key}' of model {e.model} is a per-layer "
                                "setting (a gradient or filter list); use a scalar, or `merge run`")
    try:
        return op.resolve_params(r.parameters)
    except ValueError as e:
        raise UserError(str(e)) from None


def init(state_dir: Path, recipe_path: Path, on_model: Callable[[dict], None] | None = None,
         force: bool = False, retain: int | None = None, gate: dict | None = None,
         removable: bool = False, window: int | None = None) -> State:
    """Create a state from a recipe (method, base, parameters); fold in the recipe's models
    (``force``: also models whose tensors equal one already merged). ``retain``: how many versions
    to keep (tagged ones aside); ``gate``: ``{max_norm_ratio, command}`` (:mod:`.gate`);
    ``removable`` / ``window`` (linear, task_arithmetic): a float64 running sum from which
    `remove` subtracts a model exactly, and the last ``window`` models kept (:mod:`.removal`)."""
    from .. import recipe as recipe_mod
    from ..ops import registry
    from ..writer import AtomicDirectory

    r = recipe_mod.load(recipe_path, require_models=False)
    # the recipe's retain / window / gate, unless a flag of `continual init` says otherwise
    retain = r.retain if retain is None and r.retain is not None else (retain or versions.DEFAULT_RETAIN)
    window = window if window is not None else r.window
    gate = {**(r.gate or {}), **(gate or {})}
    if retain < 1:
        raise UserError(f"retain must be at least 1, got {retain}")
    gate = gate_mod.check_config(gate)
    op = registry.get(r.merge_method)
    if not op.folds_one_model_at_a_time:
        able = ", ".join(o.name for o in registry.all_operators() if o.folds_one_model_at_a_time)
        raise UserError(f"continual merging supports the methods that fold one model at a time ({able}); "
                        f"'{op.name}' is not one of them")
    if not r.base_model:
        raise UserError("continual merging needs 'base_model' in the recipe")
    if window is not None and window < 1:
        raise UserError(f"--window must be at least 1, got {window}")
    removable = removable or window is not None
    if removable and op.name not in REMOVABLE:
        raise UserError(f"method '{op.name}' cannot subtract a model from its state, so it has no --removable or "
                        f"--window (only {', '.join(sorted(REMOVABLE))}); roll back with `merge continual promote`")
    base_ref = recipe_mod.resolve_ref(r, r.base_model)
    from ..plan import ModelInput, open_source, plan_items

    base = ModelInput("base", base_ref, open_source(base_ref, "base"), {})
    from ..plan import output_dtype

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
        "params": _scalar_params(op, r),
        "recipe": raw,
        "base_model": raw["base_model"],
        "t": 0,
        "scalars": {},
        "history": [],
        "current": None,
        "tensors": {n: {"shape": list(i.shape), "dtype": i.in_dtype, "out_dtype": i.out_dtype, "action": i.action}
                    for n, i in items.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "retain": retain,
        "versions": [],
        "tags": {},
        "next_version": 1,
        "gate": gate,
        "accumulate": "float64" if removable else "float32",
        "window": window,
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
        params: dict | None = None, lock_timeout: float = -1, job: str | None = None,
        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Fold one model into the state; returns its history entry. Serialised by the state's lock.
    ``job``: the queue's job id, recorded in the entry (a restarted server sees the job committed);
    ``on_progress(bytes_done, bytes_total)`` after each tensor."""
    from filelock import Timeout

    root = Path(state_dir)
    State.load(root)  # clear error before taking the lock
    try:
        with _lock(root).acquire(timeout=lock_timeout):
            return add_locked(root, model_ref, name, force, params or {}, job, on_progress)
    except Timeout:
        raise UserError(f"{root} is locked by another process; try again later") from None


def add_locked(root: Path, model_ref: str, name: str | None = None, force: bool = False, params: dict | None = None,
               job: str | None = None, on_progress=None) -> dict:
    """:func:`add` for a caller that holds the state's lock; the recipe's ``window`` applied after."""
    entry = _add_locked(root, model_ref, name, force, params or {}, job, on_progress)
    window = State.load(root).data.get("window")
    if window:
        from .removal import _remove_locked

        while State.load(root).t > window:  # each removal its own commit
            _remove_locked(root, 0)
    return entry


def validate(state_dir: Path, model_ref: str, name: str | None = None, params: dict | None = None) -> str:
    """Check a model against the state before it is queued (headers only); returns its label."""
    from ..ops import registry

    st = State.load(Path(state_dir))
    label = name or Path(model_ref.rstrip("/")).name or model_ref
    mparams = model_params(registry.get(st.method), params or {}, label)
    base, model = open_model(st, model_ref, label, mparams)
    base.source.close()
    model.source.close()
    return label


def _add_locked(root: Path, model_ref: str, name: str | None, force: bool, params: dict,
                job: str | None = None, on_progress=None) -> dict:
    import torch

    from ..dtypes import itemsize
    from ..execute import Work, execute
    from ..inputs import operator_input, stored
    from ..ops import registry
    from ..sinks import StateVersion

    st = State.load(root)
    _sweep(root, versions.keep_names(st.data))
    op = registry.get(st.method)
    mparams = model_params(op, params, name or model_ref)
    label = name or Path(model_ref.rstrip("/")).name or model_ref
    base, model = open_model(st, model_ref, label, mparams)
    rounding = load_dtype(st)
    gate = gate_mod.Gate(st.data.get("gate") or {}, st.data["history"])
    try:
        tensors = st.data["tensors"]
        fold_form = _fold_form(op)
        method_params, history_params = _state_params(op, st)
        layout = _StateLayout(fold_form, method_params, tensors, accumulate_dtype(st))
        acc = getattr(torch, accumulate_dtype(st))
        t_new = st.t + 1
        version = versions.next_name(st.data)
        prev = _StateReader(st.tensor_dir) if st.tensor_dir else None
        history_params.append(mparams)
        h = hashlib.sha256()
        f32 = torch.float32
        sink = StateVersion(root, version, layout.shards(), {"format": "pt", "mergekit_ortho_state": st.method,
                                                               "t": str(t_new)})
        order = layout.tensor_order(sink.order())
        sizes = {n: model.source.infos[n].numel * itemsize(model.source.infos[n].dtype) for n in order}
        total, done = sum(sizes.values()), [0]

        def fold(n: str):
            raw = model.source.get(n)
            _tensor_hash_update(h, n, raw)
            if rounding is not None and raw.is_floating_point() and raw.dtype != rounding:
                raw = raw.to(rounding)
            b = stored(base, n, rounding)  # as stored (rounded): raw_weights folds convert it chunk by chunk
            raw_mode = fold_form.raw_weights  # the weight as stored for folds that prepare it chunk by chunk
            if not raw_mode:
                b = b.to(f32)
            gate.observe(n, raw, b)
            b_in = b if op.reads == "deltas" else None
            x = raw if raw_mode else operator_input(raw, b_in, f32)
            task = registry.TensorTask(n, b_in, [], method_params, history_params, dtype=acc,
                                       raw_inputs=raw_mode)
            old = layout.load(prev, n, task) if prev else None
            out = fold_form.step(old, x, st.t, task)
            state, stats = out if fold_form.reduce else (out, None)  # (state, stats) with a reduce
            return layout.stored(n, state), stats

        def progress(n: str, _):
            done[0] += sizes.get(n, 0)
            if on_progress:
                on_progress(done[0], total)

        with sink:
            execute([Work(n) for n in order], fold, sink, check_finite=False, on_item=progress)
            sink.finish()
            for n, info in tensors.items():  # hash the tensors that are not merged too
                if info["action"] != "merge" and n in model.source.infos:
                    _tensor_hash_update(h, n, model.source.get(n))
            digest = h.hexdigest()
            dup = next((e for e in st.data["history"] if e["sha256"] == digest), None)
            if dup is not None and not force:
                raise UserError(f"{model_ref} has the same tensors (sha256 {digest[:12]}…) as '{dup['name']}' "
                                "already merged; pass --force to merge it again")
            gate.check(label)  # refused: nothing is in place, the state is untouched
            scalars = (fold_form.reduce(sink.stats, st.data["scalars"], t_new, method_params) if fold_form.reduce
                       else st.data["scalars"])
            entry = {"name": label, "source": model.ref, "sha256": digest,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": mparams, "t": t_new,
                     "version": version}
            if job:
                entry["job"] = job
            if gate.norms:
                entry["norms"] = gate.norms
            data = dict(st.data)
            data.update(t=t_new, scalars=scalars, current=version, history=st.data["history"] + [entry])
            sink.write_json(VERSION_FILE, versions.sidecar(data))
            sink.commit()
        if gate.command:
            _run_gate_command(root, data, gate, label, version)
        data = versions.with_new_version(data, version, t_new)
        refuse_if_interrupted()
        _write_json_atomic(root / STATE_FILE, data)  # the commit point
        _sweep(root, versions.keep_names(data))
        return entry
    finally:
        base.source.close()
        model.source.close()


def _run_gate_command(root: Path, data: dict, gate, label: str, version: str) -> None:
    """The candidate (the new version, in place but not committed) exported and judged by the
    user's command; anything but exit 0 removes the version (the state stays as it was)."""
    candidate = root / f".candidate-{version}"
    try:
        shutil.rmtree(candidate, ignore_errors=True)
        _export_state(State(root, data), candidate)
        gate.run_command(label, candidate)
    except BaseException:
        shutil.rmtree(root / version, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(candidate, ignore_errors=True)


# --- export, status --------------------------------------------------------------------------------


def export(state_dir: Path, out: Path, overwrite: bool = False, on_tensor=None, force_replace: bool = False,
           extra_inputs=(), version: str | None = None) -> Path:
    """Write the current merged model (or a kept ``version``: a name, number or tag) as a normal
    model directory (like `merge run`), atomically."""
    from ..writer import AtomicDirectory

    root = Path(state_dir)
    st = State.load(root)
    guard = [root, st.data["base_model"], *extra_inputs]
    AtomicDirectory(Path(out), overwrite, inputs=guard, force_replace=force_replace).check()  # before the lock
    with _lock(root):
        st = versions.state_at(State.load(root), version)
        if st.t == 0:
            raise UserError(f"{root} has no model merged yet; `merge continual add` one first")
        return _export_state(st, Path(out), overwrite, on_tensor, force_replace, guard)


def _export_state(st: State, out: Path, overwrite: bool = False, on_tensor=None, force_replace: bool = False,
                  guard=()) -> Path:
    """Export ``st`` (its tensor directory in place); the caller holds the lock."""
    import torch

    from .. import plan as plan_mod
    from ..execute import write_full_model
    from ..inputs import stored
    from ..ops import registry
    from ..writer import OutTensor, plan_shards

    r = st.recipe()
    op = registry.get(st.method)
    base = plan_mod.ModelInput("base", st.data["base_model"], plan_mod.open_source(st.data["base_model"], "base"), {})
    reader = _StateReader(st.tensor_dir)
    rounding = load_dtype(st)
    try:
        fold_form = _fold_form(op)
        method_params, history_params = _state_params(op, st)
        layout = _StateLayout(fold_form, method_params, st.data["tensors"], accumulate_dtype(st))
        items, _ = plan_mod.plan_items(base, [], r.include, r.exclude, plan_mod.output_dtype(r))
        specs = [OutTensor(i.name, i.shape, i.out_dtype) for i in items.values()]
        plan = plan_mod.Plan(r, op, st.data["params"], base, [], items, plan_shards(specs, r.output.shard_size),
                             "float32", "cpu")
        plan.models = [plan_mod.ModelInput(h["name"], h["source"], None, h["params"]) for h in st.data["history"]]
        f32 = torch.float32

        def finish(name: str):
            if items[name].action == "copy":
                return base.source.get(name), None
            b = stored(base, name, rounding).to(f32)
            task = registry.TensorTask(name, b, [], method_params, history_params, scalars=st.data["scalars"])
            merged = fold_form.finish(layout.load(reader, name, task), task)
            return (b + merged if op.reads == "deltas" else merged), None

        extra = f"Continual merge of {st.t} model(s); state scalars: {json.dumps(st.data['scalars'])}"
        return write_full_model(plan, out, finish, card_extra=extra, on_tensor=on_tensor, overwrite=overwrite,
                                inputs=[Path(p) for p in guard] + plan_mod.input_paths(plan),
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
        "current": st.data.get("current"),
        "retain": versions.retain_of(st.data),
        "gate": st.data.get("gate") or {},
    }

