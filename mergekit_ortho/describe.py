"""`merge inspect`: what a checkpoint (or LoRA, or bundle) is, from headers only."""
from __future__ import annotations

from collections import Counter
from typing import Any


def describe(path: str) -> dict[str, Any]:
    from pathlib import Path

    from .sources.checkpoint import CheckpointSource
    from .adapters.describe import describe_lora
    from .adapters.detect import detect_lora

    p = Path(path)
    if p.is_dir() and (p / "rmm_manifest.json").is_file():
        return describe_bundle(p)
    if p.exists() and detect_lora(p):
        return describe_lora(p)
    src = CheckpointSource(path, path)
    try:
        model = _model_facts(src)
        dtypes = Counter()
        total = 0
        for info in src.infos.values():
            dtypes[info.dtype] += info.numel
            total += info.nbytes
        largest = sorted(src.infos.items(), key=lambda kv: -kv[1].numel)[:10]
        return {
            "kind": "checkpoint",
            "path": str(src.path),
            "format": src.format,
            "files": len({i.file for i in src.infos.values()}),
            "tensors": len(src.infos),
            "parameters": sum(dtypes.values()),
            "bytes": total,
            "dtypes": dict(dtypes),
            "largest": [(k, list(v.shape), v.dtype) for k, v in largest],
            **model,
            "naming": _naming(list(src.infos)),
        }
    finally:
        src.close()


def _model_facts(src) -> dict[str, Any]:
    """What the merge rules depend on: family (config.json), layer stacks, the vocabulary tensors
    and their rows, whether the head is tied and whether it is stored, and any FP8 scheme."""
    from .fp8 import dequantised
    from .layout import layer_counts
    from .planning import TIED_HEADS, VOCABULARY_TENSORS, _config_of

    cfg = _config_of(src.directory) if src.directory is not None else {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    vocab = {k: src.infos[k].shape[0] for k in sorted(VOCABULARY_TENSORS) if k in src.infos}
    heads_stored = [h for h in TIED_HEADS if h in src.infos]
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    try:
        scheme = getattr(dequantised(src, cfg), "scheme", "")
    except Exception as e:  # an FP8 file whose scales do not fit: say why instead of failing inspect
        scheme = f"FP8, unreadable: {e}"
    return {
        "family": ", ".join(cfg.get("architectures") or []) or cfg.get("model_type") or "unknown (no config.json)",
        "model_type": cfg.get("model_type"),
        "layers": layer_counts(src.infos),
        "config_layers": text.get("num_hidden_layers"),
        "vocabulary_tensors": vocab,
        "config_vocab_size": text.get("vocab_size"),
        "tied_head": tied,
        "head_stored": bool(heads_stored),
        "quantisation": scheme,
    }


def _naming(keys: list[str]) -> str | None:
    from .adapters.naming import detect_naming

    n = detect_naming(keys)
    return n.describe() if n.recognised else None


def describe_bundle(path) -> dict[str, Any]:
    from .bundle import read_bundle

    b = read_bundle(path)
    m = b.manifest
    errors = []
    for key, e in m["modules"].items():
        errors.append((key, e.get("p"), e.get("rank"), e.get("max_rel_error_delta")))
    return {"kind": "bundle", "path": str(path), "format_version": b.format_version, "tasks": b.tasks,
            "p": m["p"], "center": m["center"], "modules": len(m["modules"]),
            "storage_ratio": m.get("storage_ratio"), "base_model": m.get("base_model"), "errors": errors}


def render(info: dict[str, Any]) -> list[str]:
    lines = []
    if info["kind"] == "bundle":
        ratio = info["storage_ratio"]
        lines.append(f"{info['path']}: RMM bundle (format v{info['format_version']})")
        lines.append(f"tasks: {', '.join(info['tasks'])}")
        lines.append(f"p = {info['p']}  centred: {info['center']}  modules: {info['modules']}  storage ratio: "
                     + (f"{ratio:.4f}" if ratio is not None else "n/a") + " of keeping every adapter")
        if info["base_model"]:
            lines.append(f"base model: {info['base_model']}")
        lines.append("module  p  rank  worst relative squared delta error")
        for key, p, r, err in info["errors"]:
            lines.append(f"  {key}  {p}  {r}  " + (f"{err:.3e}" if err is not None else "-"))
        return lines
    if info["kind"] == "lora":
        lines.append(f"{info['path']}: LoRA ({info['format']}), base architecture guess: "
                     f"{info['architecture']}")
        lines.append(f"modules: {info['modules']}   parameters: {info['parameters']:,}")
        lines.append(f"module types: {info.get('types', {})}")
        if info["ranks"]:
            lines.append(f"LoRA ranks: {info['ranks']}   alphas: {info['alphas']}")
            lines.append(f"scale rule: {info['scale_rule']}   scales: {info['scales']}")
        for name, hp in (info.get("hyperparameters") or {}).items():
            lines.append(f"{name}: {hp['modules']} module(s)   ranks: {hp['ranks']}   alphas: {hp['alphas']}   "
                         f"targets: {hp['targets']}" + ("   needs the base model" if hp["needs_base"] else "")
                         + (f"   ({hp['notes']})" if hp.get("notes") else ""))
        lines.append(f"targets: {info['targets']}")
        if info.get("experts"):
            e = info["experts"]
            lines.append(f"expert parameters (target_parameters): {', '.join(e['target_parameters'])}   "
                         f"{e['wrappers']} wrapped, {'/'.join(map(str, e['experts']))} experts each, rank {e['rank']} "
                         f"per expert, scale {e['scale']}")
        if info.get("naming"):
            lines.append(f"module naming: {info['naming']}")
        if info.get("base_model_name_or_path"):
            lines.append(f"base_model_name_or_path: {info['base_model_name_or_path']}")
        for k, v in (info.get("metadata") or {}).items():
            lines.append(f"  {k}: {v}")
        for w in info.get("warnings") or []:
            lines.append(f"warning: {w}")
        return lines
    if info["kind"] == "checkpoint":
        lines.append(f"{info['path']}: full checkpoint ({info['format']}, {info['files']} file(s))")
        lines.append(f"tensors: {info['tensors']}   parameters: {info['parameters']:,}   bytes: {info['bytes']:,}")
        lines.append("dtypes: " + ", ".join(f"{k} ({v:,} params)" for k, v in info["dtypes"].items()))
        layers = ", ".join(f"{k}: {v}" for k, v in info["layers"].items()) or "none"
        lines.append(f"family: {info['family']}   layers: {layers} (config: {info['config_layers']})")
        vocab = ", ".join(f"{k} ({v} rows)" for k, v in info["vocabulary_tensors"].items()) or "none"
        lines.append(f"vocabulary tensors: {vocab}   config vocab_size: {info['config_vocab_size']}")
        lines.append(f"head: tied={info['tied_head']} stored={info['head_stored']}")
        if info["quantisation"]:
            lines.append(f"quantisation: {info['quantisation']} (read dequantised)")
        if info.get("naming"):
            lines.append(f"naming: {info['naming']}")
        lines.append("largest tensors:")
        for name, shape, dtype in info["largest"]:
            lines.append(f"  {name}  {'x'.join(map(str, shape)) or 'scalar'}  {dtype}")
    else:
        for k, v in info.items():
            lines.append(f"{k}: {v}")
    return lines
