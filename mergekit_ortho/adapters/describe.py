"""What ``merge inspect`` reports for an adapter (header plus the scalar ``.alpha`` tensors)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from .arch import guess_architecture
from .lora import LoraSource
from .naming import lora_naming


def describe_lora(path: str | Path) -> dict[str, Any]:
    """Facts for ``merge inspect`` (reads only the header plus the scalar .alpha tensors)."""
    from .experts import describe as describe_experts

    with LoraSource(path) as src:
        experts = describe_experts(src)
        wrapped = set(experts["wrappers"]) if experts else set()
        lora = [m for m in src.modules if src.is_factors(m) and m not in wrapped]
        ranks = Counter(src.rank(m) for m in lora)
        alphas = Counter(src.alpha(m) for m in lora)
        scales = Counter(round(src.scale(m), 6) for m in lora)
        layouts = Counter(src.layout(m) for m in lora)
        types = Counter(src.type_name(m) for m in src.modules)
        targets = Counter(_kohya_target(m) if src.format == "kohya" else m.rsplit(".", 1)[-1]
                          for m in src.modules)
        keep = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "ss_network_args", "modelspec.architecture", "ss_output_name")
        return {
            "kind": "lora",
            "path": str(src.path),
            "file": str(src.file),
            "format": src.format,
            "architecture": guess_architecture(src),
            "modules": len(src.modules),
            "ranks": dict(sorted(ranks.items())),
            "alphas": dict(sorted(alphas.items())),
            "scales": dict(sorted(scales.items())),
            "scale_rule": src.scale_rule(),
            "layouts": dict(layouts),
            "targets": dict(targets.most_common()),
            "naming": lora_naming(src.modules),
            "parameters": src.num_params(),
            "base_model_name_or_path": src.config.get("base_model_name_or_path"),
            "metadata": {k: src.metadata[k] for k in keep if k in src.metadata},
            "types": dict(sorted(types.items())),
            "hyperparameters": _type_hyperparameters(src),
            "warnings": list(src.warnings),
            "experts": ({k: v for k, v in experts.items() if k != "wrappers"} | {"wrappers": len(wrapped)}
                        if experts else None),
        }


def _type_hyperparameters(src: LoraSource) -> dict[str, dict[str, Any]]:
    """Per type other than plain LoRA: its module count, ranks, alphas, targets and what needs the base."""
    from .typed import part_alpha, part_rank

    out: dict[str, dict[str, Any]] = {}
    for m in src.dense_modules():
        name = src.type_name(m)
        d = out.setdefault(name, {"modules": 0, "ranks": Counter(), "alphas": Counter(), "targets": Counter(),
                                  "needs_base": src.needs_base(m), "notes": src._parts[m].type.notes})
        d["modules"] += 1
        r, a = part_rank(src, m), part_alpha(src, m)
        if r is not None:
            d["ranks"][r] += 1
        if a is not None:
            d["alphas"][a] += 1
        d["targets"][src._parts[m].target] += 1
    for d in out.values():
        for k in ("ranks", "alphas", "targets"):
            d[k] = dict(sorted(d[k].items()))
    if src.format == "peft" and src.config.get("peft_type", "LORA") != "LORA":
        for d in out.values():
            d["peft_type"] = src.config.get("peft_type")
    return out


_KOHYA_TARGET_RE = re.compile(
    r"(to_q|to_k|to_v|to_out_0|proj_in|proj_out|ff_net_0_proj|ff_net_2|q_proj|k_proj|v_proj|out_proj|"
    r"fc1|fc2|conv1|conv2|conv_shortcut|conv|img_attn_qkv|img_attn_proj|txt_attn_qkv|txt_attn_proj|"
    r"linear1|linear2|img_mlp_0|img_mlp_2|txt_mlp_0|txt_mlp_2|modulation_lin|img_mod_lin|txt_mod_lin)$")


def _kohya_target(m: str) -> str:
    hit = _KOHYA_TARGET_RE.search(m)
    return hit.group(1) if hit else m.rsplit("_", 1)[-1]
