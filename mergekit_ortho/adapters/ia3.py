"""IA3: a learned vector rescales the weight's output rows or input columns.

Spec: ../shared/specs/adapters.md P8 (PEFT ``ia3_l``), P18 (LyCORIS ``weight`` + ``on_input``),
P25 (PEFT stores the multiplier l, initialised to 1; LyCORIS stores an offset w, l = 1 + w).
Paper: Liu et al. 2022 "(IA)^3".

* PEFT, attention-type module (not in ``feedforward_modules``): W' = diag(l) W0 (rows; conv: output
  channels), **and the bias b' = l * b0** (``bias_delta``, exposed in ``extra["bias"]``).
  Feedforward module: W' = W0 diag(l) (columns; conv: input channels), bias unchanged.
  ``fan_in_fan_out`` (base ``[in, out]``): the same on the transposed weight. A module is
  feedforward as in PEFT: ``feedforward_modules`` a string -> ``re.fullmatch`` on the module name;
  a list -> the name ends with one of its entries.
* LyCORIS: W' = W0 * (1 + w) along the rows, or along the input channels when ``on_input`` is 1;
  the bias is untouched.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from .transform_math import f64, fail, require, require_base
from .types import AdapterType


def peft_is_feedforward(module: str, config: Mapping[str, Any]) -> bool:
    """PEFT's rule for ``feedforward_modules`` (P8), on the module name without ``base_model.model.``."""
    ff = config.get("feedforward_modules")
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(k) for k in ff)


def scale_axis(base, vector, axis: int, hp, what: str):
    """W0 * v along ``axis`` (0 = output rows, 1 = input channels); returns W' - W0 in float32."""
    import torch

    w = f64(base)
    v = f64(vector).reshape(-1)
    if v.numel() != w.shape[axis]:
        raise fail(hp, f"{what} has {v.numel()} entries but the base weight {tuple(w.shape)} has "
                       f"{w.shape[axis]} {'output units' if axis == 0 else 'input features'}")
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    return (w * (v.reshape(shape) - 1)).to(torch.float32)


def _peft_axis(base, l_shape, hp) -> int:
    """The weight axis that ``ia3_l`` scales, in the base's own layout."""
    cfg = hp.get("config") or {}
    feedforward = peft_is_feedforward(str(hp.get("module") or ""), cfg)
    fifo = bool(cfg.get("fan_in_fan_out")) and len(base.shape) == 2
    axis = 1 if feedforward else 0  # in torch layout [out, in, ...]
    if fifo:
        axis = 1 - axis
    # the stored shape says the same where it can: [out, 1] vs [1, in] for Linear
    if len(l_shape) == 2 and len(base.shape) == 2 and l_shape[0] != l_shape[1]:
        stored_axis = 0 if l_shape[1] == 1 else 1
        if fifo:
            stored_axis = 1 - stored_axis
        if stored_axis != axis:
            kind = "feedforward" if feedforward else "attention-type"
            raise fail(hp, f"ia3_l has shape {tuple(l_shape)}, which does not fit a {kind} module "
                           "(check feedforward_modules in adapter_config.json)")
    return axis


def materialise_peft_ia3(base, tensors, hp):
    """PEFT IA3 (P8): the weight delta (rows or columns scaled by l)."""
    w = require_base(base, hp, "IA3")
    l = require(tensors, "ia3_l", hp)
    return scale_axis(w, l, _peft_axis(w, tuple(l.shape), hp), hp, "ia3_l")


def bias_delta(bias, tensors, hp):
    """PEFT IA3's bias delta (P8): (l - 1) * b0 for an attention-type module, None for a feedforward one."""
    import torch

    cfg = hp.get("config") or {}
    if peft_is_feedforward(str(hp.get("module") or ""), cfg) or bias is None:
        return None
    b = f64(bias).reshape(-1)
    l = require(tensors, "ia3_l", hp).reshape(-1)
    if l.numel() != b.numel():
        raise fail(hp, f"ia3_l has {l.numel()} entries but the bias has {b.numel()}")
    return (b * (l - 1)).reshape(tuple(torch.as_tensor(bias).shape)).to(torch.float32)


def materialise_lycoris_ia3(base, tensors, hp):
    """LyCORIS IA3 (P18): W' = W0 * (1 + w) on the output rows, or the input channels when on_input."""
    w = require_base(base, hp, "IA3")
    offset = require(tensors, "weight", hp)
    on_input = tensors.get("on_input")
    axis = 1 if on_input is not None and bool(f64(on_input).reshape(-1)[0] != 0) else 0
    return scale_axis(w, 1 + offset, axis, hp, "IA3 weight")


ADAPTER_TYPES = [
    AdapterType(
        name="IA3", roles={".ia3_l": "ia3_l"}, required=frozenset({"ia3_l"}),
        materialise=materialise_peft_ia3, needs_base=True, formats=("peft",),
        notes="(IA)^3 (Liu et al. 2022); goldens from peft 0.21.2 merge_and_unload (spec P8)",
        extra={"bias": bias_delta},
    ),
    AdapterType(
        name="IA3 (LyCORIS)", roles={".weight": "weight", ".on_input": "on_input"},
        required=frozenset({"weight", "on_input"}), materialise=materialise_lycoris_ia3, needs_base=True,
        formats=("lycoris",), notes="LyCORIS IA3 (offset from 1); goldens from lycoris-lora 4.1.3 (spec P18)",
    ),
]
