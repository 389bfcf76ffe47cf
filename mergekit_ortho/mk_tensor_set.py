"""Which tensors mergekit 0.1.5 would not write, for the architectures it lists by name.

Spec: ../shared/specs/mergekit_compat.md M5 (the per-family tensor lists) and Appendix A8.
mergekit writes exactly its architecture file's tensors: a checkpoint's other tensors (Llama
``*_proj.bias`` under ``attention_bias: true``, ``rotary_emb.inv_freq``, ``score.weight``, a
Gemma ``lm_head``, layers past ``num_hidden_layers``) are dropped without a word. The decision
here (README, "mergekit recipes"): keep them, merged by the same rules as every other tensor,
so mergekit's tensors stay identical and nothing a model needs is lost; :func:`notes` says so in
one line per group of such tensors (the layer index written as N), for the families of M5's
table (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text). Other architectures: nothing is
claimed (mergekit infers their lists).
"""
from __future__ import annotations

import re

_LLAMA = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
          "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight")
_QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_GEMMA2 = _LLAMA + ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
_HEAD = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
#: architecture -> (per-layer suffixes, tensors outside the layers)
FAMILIES = {
    "LlamaForCausalLM": (_LLAMA, _HEAD),
    "MistralForCausalLM": (_LLAMA, _HEAD),
    "Qwen2ForCausalLM": (_LLAMA + ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), _HEAD),
    "Qwen3ForCausalLM": (_LLAMA + _QK_NORM, _HEAD),
    "GemmaForCausalLM": (_LLAMA, _HEAD[:2]),
    "Gemma2ForCausalLM": (_GEMMA2, _HEAD),
    "Gemma3ForCausalLM": (_GEMMA2 + _QK_NORM, _HEAD),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
MAX_LINES = 6


def not_written(config: dict, names) -> dict[str, list[str]]:
    """mergekit's drops among ``names``: group pattern (layer index as N) -> the names; empty
    for an architecture outside :data:`FAMILIES`."""
    archs = config.get("architectures") or []
    family = FAMILIES.get(archs[0]) if len(archs) == 1 else None
    if family is None:
        return {}
    per_layer, outside = set(family[0]), set(family[1])
    layers = config.get("num_hidden_layers")
    groups: dict[str, list[str]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            if m.group(2) in per_layer and (not isinstance(layers, int) or int(m.group(1)) < layers):
                continue
            key = f"model.layers.N.{m.group(2)}" if m.group(2) not in per_layer else "model.layers.N (past num_hidden_layers)"
        elif n in outside:
            continue
        else:
            key = n
        groups.setdefault(key, []).append(n)
    return groups


def notes(config: dict, names) -> list[str]:
    """One line per group of written tensors that mergekit 0.1.5 would drop (at most
    :data:`MAX_LINES`, then one line counting the rest)."""
    groups = not_written(config, names)
    arch = (config.get("architectures") or ["?"])[0]
    out = [f"kept: '{g}' ({len(ns)} tensor(s)) is outside mergekit 0.1.5's {arch} tensor list; mergekit drops it, "
           "it is merged here like every other tensor" for g, ns in list(groups.items())[:MAX_LINES]]
    if len(groups) > MAX_LINES:
        rest = list(groups.values())[MAX_LINES:]
        out.append(f"kept: {len(rest)} more group(s), {sum(map(len, rest))} tensor(s), outside mergekit 0.1.5's "
                   f"{arch} tensor list (mergekit drops them)")
    return out
