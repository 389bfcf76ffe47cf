"""PEFT LoRA options that add tensors besides the factors: ``lora_bias``, trained biases
(``bias: all | lora_only``) and ``modules_to_save``.

Spec: ../shared/specs/adapters.md P1 (math), P24 (representability).

* ``lora_bias``: b' = b0 + s * b_B, with b_B = ``<module>.lora_B.bias`` and s the module's LoRA
  scale (PEFT's merge fails when the base has no bias; so does ours, at plan time).
* ``modules_to_save`` tensors and trained biases are **replacements**: W' = stored, so the delta
  against the base is stored - W0 (it needs the base).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import UserError
from .types import AdapterType


def _lora_bias(base, t: Mapping[str, Any], hp: Mapping[str, Any]):
    import torch

    b = t["bias"].to(torch.float32).reshape(-1)
    if hp.get("scale") is None:
        raise UserError(f"lora_bias of module '{hp.get('module')}' in {hp.get('file')} has no LoRA scale")
    return b * float(hp["scale"])


def _replacement(base, t: Mapping[str, Any], hp: Mapping[str, Any]):
    import torch

    v = t["value"].to(torch.float32)
    if tuple(v.shape) != tuple(base.shape):
        raise UserError(f"{hp.get('file')}: saved tensor '{hp.get('key')}' has shape {list(v.shape)} but the base "
                        f"tensor has {list(base.shape)}")
    return v - base.to(torch.float32)


LORA_BIAS = AdapterType("lora_bias", {"lora_B.bias": "bias"}, frozenset({"bias"}), _lora_bias, formats=("peft",),
                        notes="PEFT LoraConfig(lora_bias=True) (P1)",
                        extra={"target": "bias", "shape": lambda s, hp: tuple(s["bias"]), "peft_type": "LORA"})
# not classified by suffix: the source builds it for modules_to_save tensors and trained biases
REPLACEMENT = AdapterType("replacement", {}, frozenset({"value"}), _replacement, needs_base=True,
                          formats=("peft",), notes="PEFT modules_to_save / bias: all | lora_only (P1): W' = stored",
                          extra={"shape": lambda s, hp: tuple(s["value"])})

ADAPTER_TYPES = [LORA_BIAS]
