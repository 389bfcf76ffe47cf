"""Full checkpoints as lazy tensor sources: one tensor read at a time, headers only up front.

Accepted (spec: formats.md §1-§3):
* a Hugging Face model directory: ``model.safetensors.index.json`` + shards, ``model.safetensors``,
  a directory holding exactly one other ``*.safetensors``, or legacy ``pytorch_model*.bin``
  (with or without ``pytorch_model.bin.index.json``);
* a single ``.safetensors`` file, or a single ``.bin`` / ``.pt`` / ``.ckpt`` pickle;
* a hub id ``org/name[@revision]`` (resolved through ``sources.hub``).

Pickles are only ever read with ``torch.load(weights_only=True)`` (``io.pickles``): no code from a
model file runs. Corrupt or truncated files fail with one line naming the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io.safetensors import SafetensorsFile
from .paths import contained, require_regular

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # torch attribute name, e.g. "bfloat16"
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        from ..dtypes import itemsize

        return self.numel * itemsize(self.dtype)


def _read_index(path: Path) -> dict[str, str]:
    from ..io.json_files import read_object

    data = read_object(path, "shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{path}: 'weight_map' must map tensor names to shard file names")
    return weight_map


class CheckpointSource:
    """A full model checkpoint. ``infos`` comes from headers; ``get`` reads one tensor."""

    kind = "checkpoint"

    def __init__(self, ref: str, label: str | None = None):
        self.ref = ref
        self.label = label or ref
        self.path, self.directory = _locate(ref)
        self.format = ""
        self._files: list[Path] = []
        self._handles: dict[Path, object] = {}
        self._pickle_cache: tuple[Path, dict] | None = None
        self.infos: dict[str, TensorInfo] = {}
        self._scan()

    # -- discovery ---------------------------------------------------------------------------

    def _scan(self) -> None:
        p = self.path
        if p.is_file():
            files, self.format = [p], ("safetensors" if p.suffix == ".safetensors" else "pickle")
            weight_map = None
        else:
            files, weight_map, self.format = _weight_files(p)
        self._files = files
        if self.format == "pickle":
            for f in files:
                state = self._load_pickle(f)
                for key, t in state.items():
                    self._add_info(key, TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), f))
        else:
            for f in files:
                h = self._handle(f)
                for key, e in h.entries.items():
                    self._add_info(key, TensorInfo(e.shape, e.dtype, f))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise UserError(
                    f"{self.path}: the shard index lists {len(missing)} tensor(s) no shard holds, e.g. '{missing[0]}'"
                )
        if not self.infos:
            raise UserError(f"{self.ref}: holds no tensors")

    def _add_info(self, key: str, info: TensorInfo) -> None:
        if key in self.infos:  # two copies: which one is meant cannot be told, so neither is used
            raise UserError(f"{self.path}: tensor '{key[:120]}' is stored in both {self.infos[key].file.name} and "
                            f"{info.file.name}; re-export the checkpoint")
        self.infos[key] = info

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            from .hub_remote import remote_size

            h = SafetensorsFile(f, remote_size=remote_size(f))
            h = self._handles.setdefault(f, h)  # items merged on two threads open a file once
        return h

    def _load_pickle(self, f: Path) -> dict:
        if self._pickle_cache and self._pickle_cache[0] == f:
            return self._pickle_cache[1]
        import torch

        from ..io.pickles import load_weights_only

        state = load_weights_only(f)
        if isinstance(state, dict) and set(state) == {"state_dict"} or (
            isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict)
            and not any(hasattr(v, "shape") for v in state.values())
        ):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{f}: expected a state dict of tensors")
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._pickle_cache = (f, state)  # one shard mapped at a time
        return state

    # -- access ------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str):
        info = self.infos[key]
        if self.format == "pickle":
            # a copy: the memory-mapped original must never be written, and callers own what
            # get() returns (operators work in place on their inputs)
            return self._load_pickle(info.file)[key].clone()
        return self._handle(info.file).read(key)

    def reads_rows(self, key: str) -> bool:
        """Whether :meth:`get_rows` can read ``key`` (a safetensors tensor of at least one dim)."""
        info = self.infos.get(key)
        return self.format == "safetensors" and info is not None and len(info.shape) >= 1

    def get_rows(self, key: str, lo: int, hi: int):
        """Rows lo..hi (dim 0) of tensor ``key`` as stored, a fresh buffer (:meth:`reads_rows`)."""
        return self._handle(self.infos[key].file).read_rows(key, lo, hi)

    def metadata(self) -> dict[str, str]:
        if self.format != "safetensors" or not self._files:
            return {}
        return dict(self._handle(self._files[0]).metadata)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._pickle_cache = None


def _locate(ref: str) -> tuple[Path, Path | None]:
    """Return (weights path, directory holding config/tokenizer files or None)."""
    from . import hub

    p = Path(ref).expanduser()
    if p.exists():
        if p.is_dir():
            return p, p
        if p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES:
            return require_regular(p, "checkpoint"), None
        raise UserError(f"{p}: not a checkpoint (expected a directory, .safetensors or .bin file)")
    if hub.looks_like_hub_id(ref):
        folder = hub.resolve(ref)
        return folder, folder
    raise UserError(f"path not found: {ref}")


def _weight_files(d: Path) -> tuple[list[Path], dict | None, str]:
    files, wm, fmt = _find_weight_files(d)
    return [contained(d, f, "weight file") for f in files], wm, fmt


def _indexed_shards(d: Path, index: Path) -> tuple[list[Path], dict]:
    """The shards a shard index names (each inside ``d`` and present) and its weight map."""
    wm = _read_index(contained(d, index, "shard index"))
    files = sorted({d / v for v in wm.values()})
    for f in files:
        contained(d, f, f"shard named by {index.name}")
        if not f.is_file():
            raise UserError(f"{index}: shard '{f.name}' is missing from {d}")
    return files, wm


def _find_weight_files(d: Path) -> tuple[list[Path], dict | None, str]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return (*_indexed_shards(d, index), "safetensors")
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"], None, "safetensors"
    singles = [f for f in sorted(d.glob("*.safetensors")) if not f.name.startswith("adapter_model")]
    if len(singles) == 1:
        return singles, None, "safetensors"
    if len(singles) > 1:
        raise UserError(f"{d}: several .safetensors files and no model.safetensors.index.json; pass one file")
    bindex = d / "pytorch_model.bin.index.json"
    if bindex.is_file():
        return (*_indexed_shards(d, bindex), "pickle")
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"], None, "pickle"
    raise UserError(
        f"{d}: no weights found (expected model.safetensors, a sharded index, or pytorch_model.bin)"
    )
