"""DoRA (weight-decomposed low-rank adaptation): a magnitude vector re-weights W0 + dW per unit.

Spec: ../shared/specs/adapters.md P2 (PEFT ``lora_magnitude_vector``), P14 (LyCORIS ``dora_scale``),
P25 (where they disagree). Paper: Liu et al. 2024, "DoRA", §4.3 (detached norm, training only).

Math. With V = W0 + dW (dW the un-normalised delta, scale applied) and m the stored magnitude,
indexed by one axis of the weight (the "unit" axis), every unit u is rescaled to norm m[u]:

    W'[u] = m[u] / (||V[u]|| + eps) * V[u]          ||.|| over every other axis of V

and the delta is W' - W0 (full rank in general; it depends on W0).

* PEFT (P2): unit = output row (Linear ``[out]``, Conv ``[1, out, 1, 1]``, norm over
  (in, kh, kw)); ``fan_in_fan_out`` (base ``[in, out]``): unit = stored column; Embedding
  (base ``[num, dim]``, magnitude ``[dim]``): unit = column, norm over the vocabulary. No eps.
* LyCORIS (P14): ``dora_scale`` ``[out, 1(, 1, 1)]`` = output axis (``wd_on_output``, the default
  since 3.2.0) or ``[1, in(, 1, 1)]`` = input axis (older files; norm per input channel over
  (out, kh, kw)); the axis is told by shape. eps = finfo(float32).eps.

Composition with a LyCORIS algorithm (for the adapter source): materialise the algorithm's own
delta dW (LoCon/LoHa/LoKr at strength 1, its scale applied), then
``lycoris_dora_delta(base, dW, dora_scale, hp)`` returns the DoRA delta. The LyCORIS strength
rule (P14/P25) is not applied here: this returns the library's merge at multiplier 1.
"""
from __future__ import annotations

from typing import Any, Mapping

from .transform_math import f64, fail, require, require_base
from .types import AdapterType

LYCORIS_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps


def dora_delta(base, delta, magnitude, axis: int, eps: float = 0.0, hp: Mapping[str, Any] | None = None):
    """W' - W0 for W' = (m / (||W0 + dW|| + eps)) * (W0 + dW), unit axis ``axis`` (0 = rows, 1 = columns).

    ``base`` and ``delta`` share the base's shape; ``magnitude`` has one entry per unit (any shape
    with that many entries). Float64 inside, float32 out. A wrong length raises ``UserError``.
    """
    import torch

    hp = hp or {}
    w = f64(base)
    d = f64(delta)
    if tuple(d.shape) != tuple(w.shape):
        raise fail(hp, f"DoRA delta shape {tuple(d.shape)} does not match the base weight {tuple(w.shape)}")
    m = f64(magnitude).reshape(-1)
    units = w.shape[axis]
    if m.numel() != units:
        raise fail(hp, f"DoRA magnitude has {m.numel()} entries but the base weight {tuple(w.shape)} "
                       f"has {units} {'rows' if axis == 0 else 'columns'}; the adapter was made for another model")
    v = w + d
    other = tuple(i for i in range(v.dim()) if i != axis)
    norm = torch.linalg.vector_norm(v, dim=other, keepdim=True)
    shape = [1] * v.dim()
    shape[axis] = units
    new_w = v * (m.reshape(shape) / (norm + eps))
    return (new_w - w).to(torch.float32)


def lycoris_dora_axis(base_shape, dora_scale_shape) -> int | None:
    """0 (output axis) or 1 (input axis) for a LyCORIS ``dora_scale`` of this shape, else None."""
    out, inp = base_shape[0], base_shape[1]
    n = 1
    for x in dora_scale_shape:
        n *= x
    if len(dora_scale_shape) >= 1 and dora_scale_shape[0] == out and n == out:
        return 0
    if len(dora_scale_shape) >= 2 and dora_scale_shape[0] == 1 and dora_scale_shape[1] == inp and n == inp:
        return 1
    return None


def lycoris_dora_delta(base, delta, dora_scale, hp: Mapping[str, Any] | None = None):
    """The LyCORIS DoRA epilogue (P14): ``delta`` is the wrapped algorithm's dW at strength 1."""
    hp = hp or {}
    w = require_base(base, hp, "DoRA (dora_scale)")
    axis = lycoris_dora_axis(tuple(w.shape), tuple(f64(dora_scale).shape))
    if axis is None:
        raise fail(hp, f"dora_scale of shape {tuple(f64(dora_scale).shape)} fits neither the output axis "
                       f"[{w.shape[0]}, 1] nor the input axis [1, {w.shape[1]}] of the base weight {tuple(w.shape)}")
    return dora_delta(w, delta, dora_scale, axis, eps=LYCORIS_EPS, hp=hp)


def peft_lora_scale(hp: Mapping[str, Any], rank: int) -> float:
    """The LoRA scale: ``hp["scale"]`` (alpha/r or rsLoRA, per module), else alpha/r, else 1."""
    if hp.get("scale") is not None:
        return float(hp["scale"])
    if hp.get("alpha") is not None:
        return float(hp["alpha"]) / rank
    return 1.0


def peft_lora_delta(tensors: Mapping[str, Any], hp: Mapping[str, Any], base_shape) -> tuple[Any, int]:
    """(dW in the base's layout, unit axis) for a PEFT LoRA module: Linear / Conv / fan_in_fan_out / Embedding."""
    import torch

    embedding = "lora_embedding_A" in tensors
    a = require(tensors, "lora_embedding_A" if embedding else "lora_A", hp)
    b = require(tensors, "lora_embedding_B" if embedding else "lora_B", hp)
    r = a.shape[0]
    if b.shape[1] != r:
        raise fail(hp, f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} have different ranks")
    s = peft_lora_scale(hp, r)
    prod = s * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))  # [out, in*kh*kw]
    fifo = bool((hp.get("config") or {}).get("fan_in_fan_out"))
    if embedding or fifo:
        delta, axis = prod.T, 1
    else:
        delta, axis = prod, 0
    n_base = 1
    for x in base_shape:
        n_base *= x
    if delta.numel() != n_base or delta.shape[0] != base_shape[0]:
        raise fail(hp, f"LoRA factors give a {tuple(delta.shape)} delta, which does not fit the base weight {tuple(base_shape)}")
    return delta.reshape(base_shape).to(torch.float64), axis


def materialise_peft_dora(base, tensors, hp):
    """PEFT LoRA + DoRA (P2): W' = m / ||W0 + s*B*A|| * (W0 + s*B*A) per output unit; returns W' - W0."""
    w = require_base(base, hp, "DoRA")
    delta, axis = peft_lora_delta(tensors, hp, tuple(w.shape))
    m = require(tensors, "lora_magnitude_vector", hp)
    return dora_delta(w, delta, m, axis, eps=0.0, hp=hp)


_NOTES = "DoRA (Liu et al. 2024); goldens from peft 0.21.2 merge_and_unload (spec P2)"

ADAPTER_TYPES = [
    AdapterType(
        name="DoRA",
        roles={".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
               ".lora_magnitude_vector": "lora_magnitude_vector"},
        required=frozenset({"lora_A", "lora_B", "lora_magnitude_vector"}),
        materialise=materialise_peft_dora, needs_base=True, formats=("peft",), notes=_NOTES,
    ),
    AdapterType(
        name="DoRA (embedding)",
        roles={".lora_embedding_A": "lora_embedding_A", ".lora_embedding_B": "lora_embedding_B",
               ".lora_magnitude_vector": "lora_magnitude_vector"},
        required=frozenset({"lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}),
        materialise=materialise_peft_dora, needs_base=True, formats=("peft",), notes=_NOTES,
    ),
]
