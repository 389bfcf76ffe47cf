"""Output files: streaming sharded safetensors, index, model files, model card.

Knows no merge math. Two pieces:

* ``ShardedWriter`` writes safetensors shards *tensor by tensor*. The plan knows every output
  tensor's name, dtype and shape before it computes any of them (the plan), so each shard's
  header is written first and the tensor bytes are appended as they arrive: no shard is ever held
  in memory. ``safetensors.torch.save_file`` needs a whole file's tensors at once, which is why
  this writer lays out the (simple, documented) format itself; tests read every output back with
  ``safe_open``. Tensors inside a shard are ordered by descending element size, then name, like
  the reference writer, so every tensor is aligned to its element size. Each shard is an
  ``io.durable.DurableFile``: direct writes overlapping the compute, on disk when it is closed.
* ``copy_model_files`` / ``write_model_card``: the non-tensor files of an output model.

Where the files land (atomically, never over a user's directory) is ``placement.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import TORCH_TO_ST, itemsize
from .io.durable import DurableFile

# --- streaming safetensors ---------------------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch attribute name

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[OutTensor], shard_size: int) -> list[list[OutTensor]]:
    """Greedy fill in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    used = 0
    for t in tensors:
        if current and used + t.nbytes > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(t)
        used += t.nbytes
    if current:
        shards.append(current)
    return [sorted(s, key=lambda t: (-itemsize(t.dtype), t.name)) for s in shards]


def shard_names(n: int, prefix: str = "model") -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def shard_header(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    """The exact header bytes (length prefix included) the writer puts before a shard's data."""
    return _header(tensors, metadata)


def _header(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)  # data starts 8-byte aligned, as the reference writer
    return struct.pack("<Q", len(raw)) + raw


def write_index(directory: Path, shards: list[list[OutTensor]], names: list[str], prefix: str = "model") -> None:
    """``PREFIX.safetensors.index.json`` of planned ``shards`` stored under ``names``."""
    total = sum(t.nbytes for shard in shards for t in shard)
    params = sum(t.nbytes // itemsize(t.dtype) for shard in shards for t in shard)
    weight_map = {t.name: names[si] for si, shard in enumerate(shards) for t in shard}
    index = {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class ShardedWriter:
    """Writes planned shards into ``directory``; tensors must arrive in ``order()``. ``names``: the
    shards' file names (default: numbered over ``shards``; a unit of a sharded run passes its
    shards' names in the whole output); ``index``: write the index (several shards only)."""

    def __init__(self, directory: Path, shards: list[list[OutTensor]], metadata: dict[str, str] | None = None,
                 prefix: str = "model", names: list[str] | None = None, index: bool = True):
        self.directory = Path(directory)
        self.shards = shards
        self.metadata = metadata or {}
        self.names = names if names is not None else shard_names(len(shards), prefix)
        self.prefix = prefix
        self._index = index
        self._queue = [(si, t) for si, shard in enumerate(shards) for t in shard]
        self._pos = 0
        self._fh = None  # the open shard (io.durable.DurableFile)
        self._shard = -1

    def order(self) -> list[OutTensor]:
        return [t for _, t in self._queue]

    def write(self, name: str, tensor) -> None:
        import torch

        si, spec = self._queue[self._pos]
        if name != spec.name:
            raise RuntimeError(f"writer expected tensor '{spec.name}', got '{name}'")
        if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            raise RuntimeError(f"tensor '{name}': planned {spec.dtype}{list(spec.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if si != self._shard:
            self._open(si)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._pos += 1
        if self._pos == len(self._queue) or self._queue[self._pos][0] != si:
            self._close_current()

    def _open(self, si: int) -> None:
        self._close_current()
        self._shard = si
        self._fh = DurableFile(self.directory / self.names[si])
        self._fh.write(_header(self.shards[si], self.metadata))

    def _close_current(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()  # on disk when this returns

    def finish(self) -> None:
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer finished after {self._pos} of {len(self._queue)} tensors")
        self._close_current()
        if self._index and len(self.shards) > 1:
            write_index(self.directory, self.shards, self.names, self.prefix)

    def abort(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.abort()


# --- output safety: containment, ownership, atomic replacement ------------------------------------


# --- model files and card ----------------------------------------------------------------------

_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json",
)


# written by an aligned vocabulary instead of copied (generation_config.json too: it names token ids)
TOKENIZER_FILES = tuple(n for n in _MODEL_FILES if n not in ("config.json", "preprocessor_config.json",
                                                              "processor_config.json", "video_preprocessor_config.json"))


REMOVE = object()  # a config_updates value: the field is dropped from config.json


def copy_model_files(donor: Path | None, out: Path, out_dtype: str | None,
                     config_updates: dict | None = None, skip=()) -> list[str]:
    """Copy config/tokenizer/generation files from the donor; update the dtype in config.json and
    the fields the merge changed (``config_updates``: layer count, layer_types, tied head)."""
    from .sources.paths import contained

    copied: list[str] = []
    if donor is None or not donor.is_dir():
        return copied
    for name in _MODEL_FILES:
        if name in skip:
            continue
        src = donor / name
        if not (src.exists() or src.is_symlink()):
            continue
        contained(donor, src, "model file")  # inside the donor, a regular file
        if not src.is_file():
            continue
        if name == "config.json" and (out_dtype or config_updates):
            from .io.json_files import read_object

            cfg = read_object(src, "model config")
            if out_dtype:
                keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
                for k in keys:
                    cfg[k] = out_dtype
            for k, v in (config_updates or {}).items():
                target = cfg.get("text_config") if k not in cfg and isinstance(cfg.get("text_config"), dict) else cfg
                if v is REMOVE:
                    target.pop(k, None)
                elif callable(v):  # a rewrite of a field the donor has (a per-layer list), else nothing
                    if k in target:
                        target[k] = v(target[k])
                else:
                    target[k] = v
            (out / name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, out / name)
        copied.append(name)
    return copied


def write_model_card(out: Path, method: str, base: str | None, models: list[tuple[str, str]], recipe_yaml: str,
                     extra: str = "") -> None:
    from . import __version__

    lines = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit-ortho", f"- {method}"]
    if base and not Path(base).exists():
        lines += [f"base_model: {base}"]
    lines += ["---", "", f"# Merged model ({method})", "",
              f"Produced by mergekit-ortho {__version__} with the `{method}` method.", ""]
    if base:
        lines += [f"**Base model:** `{base}`", ""]
    lines += ["**Merged models:**", ""] + [f"- `{name}`: `{ref}`" for name, ref in models] + [""]
    if extra:
        lines += [extra, ""]
    lines += ["## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
