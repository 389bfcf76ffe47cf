"""How a continual command reads a model for a state: opened and checked against the state's
tensors (names, shapes; a LoRA as the full model it makes), its parameters resolved, each tensor
hashed as stored and rounded to the recipe's ``dtype`` (shared by add, remove and validation).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .state import State

REMOVABLE = ("linear", "task_arithmetic")  # folds that are sums: a model's term can be subtracted


def _tensor_hash_update(h, name: str, t) -> None:
    import torch

    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(list(t.shape)).encode())
    t = t.contiguous()
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def load_dtype(st: State):
    """The recipe's ``dtype`` as the torch dtype every input is rounded to when read (None: as stored)."""
    dtype = st.data["recipe"].get("dtype")
    if not dtype:
        return None
    import torch

    from ..dtypes import canonical

    return getattr(torch, canonical(dtype, "dtype"))


def open_model(st: State, model_ref: str, label: str, mparams):
    """(base, model) inputs for an add: a LoRA arrives as the full model it makes, base + scale * B @ A.
    Checked against the state's tensors (names, shapes): a mismatch is one line, nothing read."""
    from .. import plan as plan_mod

    ref = str(Path(model_ref).resolve()) if Path(model_ref).exists() else model_ref
    base = plan_mod.ModelInput("base", st.data["base_model"], plan_mod.open_source(st.data["base_model"], "base"), {})
    try:
        model = plan_mod.ModelInput(label, ref, plan_mod.open_source(ref, label), mparams)
    except BaseException:
        base.source.close()
        raise
    try:
        if model.is_lora:
            from ..adapters.experts import match_with_experts
            from ..adapters.matched import AppliedLora, MatchedLora

            infos = base.source.infos
            from ..planning import config_of_source

            src, match = match_with_experts(model.source, list(infos), {k: i.shape for k, i in infos.items()},
                                            config_of_source(base.source))
            model = plan_mod.ModelInput(label, ref, AppliedLora(MatchedLora(src, match), base.source),
                                        mparams)
        _check_compatible(st.data["tensors"], model)
    except BaseException:
        base.source.close()
        model.source.close()
        raise
    return base, model


def model_params(op, params: dict, label: str):
    """The model's parameters, resolved (a bad one is the user's mistake: one line)."""
    try:
        return op.resolve_model_params(params, label)
    except ValueError as e:
        raise UserError(str(e)) from None


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
