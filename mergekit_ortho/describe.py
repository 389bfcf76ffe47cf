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
        }
    finally:
        src.close()


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
        lines.append("largest tensors:")
        for name, shape, dtype in info["largest"]:
            lines.append(f"  {name}  {'x'.join(map(str, shape)) or 'scalar'}  {dtype}")
    else:
        for k, v in info.items():
            lines.append(f"{k}: {v}")
    return lines
