"""Which model family an adapter was trained for, from module names, factor shapes and metadata.

``guess_architecture(source) -> "SD1.5" | "SD2" | "SDXL" | "Flux" | "SD3" | "LLM" | "unknown"``;
``check_compatible(sources)`` refuses to merge LoRAs of two known families.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from .lora import LoraSource


def _in_dim(src: LoraSource, m: str) -> int:
    return src.factor_shapes(m)[0][1]


def guess_architecture(lora_source: LoraSource) -> str:
    """"SD1.5" | "SD2" | "SDXL" | "Flux" | "SD3" | "LLM" | "unknown", from names, shapes, metadata."""
    src = lora_source
    mods = src.modules
    if any(("double_blocks" in m or "single_blocks" in m or "single_transformer_blocks" in m) for m in mods):
        return "Flux"
    if any("joint_blocks" in m for m in mods):
        return "SD3"
    for m in mods:  # cross-attention key projection: its input is the text-encoder width
        if m.endswith(("attn2_to_k", "attn2.to_k")):
            d = _in_dim(src, m)
            return {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}.get(d, "unknown")
    meta = src.metadata
    v = str(meta.get("ss_base_model_version", "")).lower()
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if v.startswith("sdxl") or "stable-diffusion-xl" in arch:
        return "SDXL"
    if v.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "SD1.5"
    if v.startswith("sd_v2") or "stable-diffusion-v2" in arch:
        return "SD2"
    if v.startswith("flux") or "flux" in arch:
        return "Flux"
    if any(m.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for m in mods):
        return "SDXL"
    for m in mods:
        if m.startswith(("lora_te_", "text_encoder.")) and m.endswith(("q_proj", "k_proj")):
            return {768: "SD1.5", 1024: "SD2"}.get(_in_dim(src, m), "unknown")
    if any("input_blocks" in m or "output_blocks" in m for m in mods):
        return "SDXL"
    if src.format == "peft":
        llm = re.compile(r"(^|[._])(layers|h|layer|blocks?)[._]\d+[._]")
        if any(llm.search(src._peft_name(m)) for m in mods) and not any(
                x in m for m in mods for x in ("down_blocks", "up_blocks", "mid_block", "attn1")):
            return "LLM"
    return "unknown"


def check_compatible(sources: Sequence[LoraSource]) -> str:
    """The common architecture of several LoRAs; UserError when two known families differ."""
    seen: dict[str, str] = {}
    for s in sources:
        seen.setdefault(guess_architecture(s), s.label)
    known = {a: lbl for a, lbl in seen.items() if a != "unknown"}
    if len(known) > 1:
        parts = ", ".join(f"{lbl} is {a}" for a, lbl in known.items())
        raise UserError(f"LoRAs for different model families cannot be merged together: {parts}")
    return next(iter(known), "unknown")
