"""`merge continual remove STATE NAME`: subtract one model's contribution from a linear or
task_arithmetic state exactly, and the sliding ``window`` built on it (issue 16).

Those folds keep the running sum ``S = sum_i w_i v_i`` (``v_i`` the model as read: the weight for
linear, ``x_i - base`` for task_arithmetic, after the recipe's ``dtype`` rounding), and their
``finish`` reads the weights from the history. Removing model j is ``S - w_j v_j`` with j's
entry dropped from the history: the model is read again from its recorded source (its sha256
must still match, else nothing changes) in one streaming pass, and the new version is committed
like an add. A removable state (``init --removable`` or ``--window N``) accumulates in float64,
so add-then-remove returns the previous sum to about 1e-16 relative (float32 sums would leave
~1e-7 of rounding; those states refuse removal). Other folds (magmax's selection, opcm's
projections, model_stock, ram) are not sums: they refuse and point to ``promote``.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..errors import UserError
from ..placement import refuse_if_interrupted
from . import versions
from .state import (STATE_FILE, VERSION_FILE, State, _fold_form, _lock, _state_params, _StateLayout, _StateReader,
                    _sweep, _write_json_atomic, accumulate_dtype)


def remove(state_dir: Path, name: str, lock_timeout: float = -1) -> dict:
    """Subtract model ``name`` (a history name, or ``#t`` for the t-th model) from the state."""
    from filelock import Timeout

    root = Path(state_dir)
    _removable(State.load(root))
    _index(State.load(root), name)  # a clear error before taking the lock
    try:
        with _lock(root).acquire(timeout=lock_timeout):
            return _remove_locked(root, _index(State.load(root), name))
    except Timeout:
        raise UserError(f"{root} is locked by another process; try again later") from None


def _index(st: State, name: str) -> int:
    hist = st.data["history"]
    if name.startswith("#") and name[1:].isdigit() and 1 <= int(name[1:]) <= len(hist):
        return int(name[1:]) - 1
    found = [i for i, h in enumerate(hist) if h["name"] == name]
    if not found:
        have = ", ".join(h["name"] for h in hist) or "none"
        raise UserError(f"{st.root}: no model named '{name}' is merged (merged: {have})")
    if len(found) > 1:
        raise UserError(f"{st.root}: {len(found)} merged models are named '{name}'; name one by its position, "
                        f"e.g. '#{found[-1] + 1}'")
    return found[0]


def _removable(st: State) -> None:
    from .reading import REMOVABLE

    if st.method not in REMOVABLE:
        raise UserError(f"method '{st.method}' cannot subtract a model from its state (its fold is not a sum); "
                        "roll back to a version before the model with `merge continual promote STATE VERSION`")
    if accumulate_dtype(st) != "float64":
        raise UserError(f"{st.root} accumulates in float32, where subtracting a model is not exact; create the "
                        "state with `merge continual init --removable` (or --window N), or roll back with "
                        "`merge continual promote`")


def _remove_locked(root: Path, index: int) -> dict:
    import torch

    from ..execute import Work, execute
    from ..inputs import stored
    from ..ops import registry
    from ..sinks import StateVersion
    from .reading import _tensor_hash_update, load_dtype, model_params, open_model

    st = State.load(root)
    _removable(st)
    _sweep(root, versions.keep_names(st.data))
    entry = st.data["history"][index]
    op = registry.get(st.method)
    fold = _fold_form(op)
    method_params, history_params = _state_params(op, st)
    w = float(history_params[index].weight)
    base, model = open_model(st, entry["source"], entry["name"], model_params(op, entry["params"], entry["name"]))
    rounding, f64 = load_dtype(st), torch.float64
    layout = _StateLayout(fold, method_params, st.data["tensors"], accumulate_dtype(st))
    reader = _StateReader(st.tensor_dir)
    history = [dict(h, t=i + 1) for i, h in enumerate(st.data["history"][:index] + st.data["history"][index + 1:])]
    version = versions.next_name(st.data)
    h = hashlib.sha256()
    try:
        def subtract(n: str):
            raw = model.source.get(n)
            _tensor_hash_update(h, n, raw)
            if rounding is not None and raw.is_floating_point() and raw.dtype != rounding:
                raw = raw.to(rounding)
            v = raw.to(f64)
            if op.reads == "deltas":
                v.sub_(stored(base, n, rounding).to(f64))
            return layout.stored(n, reader.get(n).add_(v, alpha=-w)), None

        sink = StateVersion(root, version, layout.shards(), {"format": "pt", "mergekit_ortho_state": st.method,
                                                               "t": str(len(history))})
        with sink:
            execute([Work(n) for n in layout.tensor_order(sink.order())], subtract, sink, check_finite=False)
            sink.finish()
            for n, info in st.data["tensors"].items():
                if info["action"] != "merge" and n in model.source.infos:
                    _tensor_hash_update(h, n, model.source.get(n))
            if h.hexdigest() != entry["sha256"]:
                raise UserError(f"{entry['source']} has changed since '{entry['name']}' was merged (sha256 "
                                f"{h.hexdigest()[:12]}…, was {entry['sha256'][:12]}…); it cannot be subtracted; "
                                "roll back with `merge continual promote`")
            data = dict(st.data, t=len(history), history=history, current=version)
            sink.write_json(VERSION_FILE, versions.sidecar(data))
            sink.commit()
        data = versions.with_new_version(data, version, len(history))
        refuse_if_interrupted()
        _write_json_atomic(root / STATE_FILE, data)  # the commit point
        _sweep(root, versions.keep_names(data))
        return {"removed": entry["name"], "version": version, "t": len(history),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    finally:
        base.source.close()
        model.source.close()
