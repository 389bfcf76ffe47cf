"""The contract between adapter formats on disk and the math that turns one module into a delta.

Spec: ../shared/specs/adapters.md (P1-P18, P24). Each family module (``lycoris``, ``dora``,
``orthogonal``, ``ia3``, ...) declares the module types it materialises as ``ADAPTER_TYPES``, a
list of :class:`AdapterType`; the adapter source detects a module's type from its stored key
suffixes and calls ``materialise``. No type knows about files, key prefixes or the executor.

``materialise(base, tensors, hp) -> delta``
    ``base``: the base tensor in float32 and in its own layout (``[out, in]``, conv
    ``[out, in, kh, kw]``), or None when ``needs_base`` is false. ``tensors``: the module's stored
    tensors by role name (float32, as stored). ``hp``: hyperparameters read by the source:
    ``format`` ("peft" | "lycoris"), ``config`` (adapter_config.json, {} for single files),
    ``module`` (the module's name without format prefixes), ``alpha`` (float or None), ``rank``
    (int or None), ``scale`` (the LoRA-style scale the format defines, or None), ``metadata``
    (the safetensors metadata). Returns the dense delta that the reference library's own merge
    adds to ``base``, float32, in the base's layout and shape.

Optional entries (backward compatible: every one may be absent)
    ``hp`` may also carry ``shape`` (the base tensor's shape when known, also for types that do
    not need the base), ``file`` and ``key`` (for error lines) and, for an epilogue, ``delta``.
    ``extra`` may carry ``target`` ("weight" default, or "bias": the part adapts the module's
    bias), ``shape`` (``fn(role -> stored shape, hp) -> delta shape``, checked against the base at
    plan time; may raise UserError), ``peft_type`` (the adapter_config.json peft_type(s) whose
    files hold this type), ``epilogue`` (True: the type re-weights another part's delta, which
    its materialise gets as ``hp['delta']``, and returns the new delta: DoRA) and ``factors``
    (True: plain LoRA, kept as exact factors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class AdapterType:
    name: str  # what `merge inspect` shows: "LoHa", "LoKr", "OFT", ...
    roles: Mapping[str, str]  # stored key suffix (after the module name) -> role name
    required: frozenset  # roles that must all be present
    materialise: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Any]
    needs_base: bool = False
    formats: tuple = ("peft", "lycoris")
    notes: str = ""  # one line: paper / reference library and version the goldens came from
    extra: Mapping[str, Any] = field(default_factory=dict)
