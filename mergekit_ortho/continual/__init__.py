"""Continual merging: a persistent, crash-safe state that models are folded into one at a time.

The package: :mod:`.state` (``state.json``, lock, tensor layout), :mod:`.service` (init, add,
export, status through the one executor), :mod:`.versions` (retention, promote, tags),
:mod:`.gate` (the norm gate and evaluation command), :mod:`.queue` (the persistent job queue of
`merge serve`), :mod:`.local` (the shell's add through the queue), :mod:`.watch` (an inbox poller), :mod:`.server` (the HTTP API; optional extra).
The names below are the public API (``from mergekit_ortho import continual``).
"""
from __future__ import annotations

from .gate import GateRefused
from .local import queued_add
from .removal import remove
from .reading import _check_compatible, _tensor_hash_update
from .service import _add_locked, add, export, init, status, validate
from .state import (DEFAULT_RETAIN, FORMAT_VERSION, PART_SEP, STATE_FILE, State, _check_state, _fold_form, _lock,
                    _state_params, _StateLayout, _StateReader, _sweep, _write_json_atomic)
from .versions import list_versions, promote, tag
from .watch import _entry_signature, _incomplete_reason, poster, watch

__all__ = ["State", "init", "add", "export", "status", "validate", "watch", "poster", "list_versions", "promote",
           "tag", "remove", "queued_add", "GateRefused", "FORMAT_VERSION", "PART_SEP", "STATE_FILE", "DEFAULT_RETAIN"]
