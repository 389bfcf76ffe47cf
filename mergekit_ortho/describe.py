"""`merge inspect`: what a checkpoint (or LoRA, or bundle) is, from headers only."""
from __future__ import annotations

from collections import Counter
from typing import Any


def describe(path: str) -> dict[str, Any]:
    from .sources.checkpoint import CheckpointSource

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


def render(info: dict[str, Any]) -> list[str]:
    lines = []
    if info["kind"] == "checkpoint":
        lines.append(f"[bold]{info['path']}[/bold]: full checkpoint ({info['format']}, {info['files']} file(s))")
        lines.append(f"tensors: {info['tensors']}   parameters: {info['parameters']:,}   bytes: {info['bytes']:,}")
        lines.append("dtypes: " + ", ".join(f"{k} ({v:,} params)" for k, v in info["dtypes"].items()))
        lines.append("largest tensors:")
        for name, shape, dtype in info["largest"]:
            lines.append(f"  {name}  {'x'.join(map(str, shape)) or 'scalar'}  {dtype}")
    else:
        for k, v in info.items():
            lines.append(f"{k}: {v}")
    return lines
