"""MoE experts in either layout: per-expert 2-D tensors (checkpoints on the hub) or fused 3-D ones.

transformers 5 holds experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]) and converts them from and to the per-expert layout of
published checkpoints when it loads and saves (``experts.{e}.gate_proj`` / ``up_proj`` /
``down_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``). A state dict
saved as it is in memory therefore holds the fused layout. The rule, per transformers'
``conversion_mapping`` (tests check this table against it): stack the experts along a new dim 0,
and for ``gate_up_proj`` concatenate gate then up along dim 1; Mixtral-style families also
rename ``.block_sparse_moe.`` to ``.mlp.``.

:class:`ExpertLayoutSource` shows an input in the reference's layout: one expert's matrix is a
slice of a fused tensor (the fused tensor last read is kept, so a layer's experts are read once),
and a fused tensor is the stack of the input's per-expert matrices.
"""
from __future__ import annotations

from .errors import UserError
from .sources.checkpoint import TensorInfo

# fused name -> the per-expert parts it concatenates (in order), one tuple per naming
FUSED = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
RENAMES = ((".block_sparse_moe.", ".mlp."),)  # (per-expert checkpoints, fused/in-memory)


def _variants(prefix: str) -> list[str]:
    out = [prefix]
    for disk, memory in RENAMES:
        for a, b in ((memory, disk), (disk, memory)):
            if a in prefix + ".":
                out.append((prefix + ".").replace(a, b)[:-1])
    return out


def _fused_parts(name: str):
    """(prefix, fused kind) of ``<prefix>.experts.<gate_up_proj|down_proj>``, else None."""
    for kind in FUSED:
        suffix = f".experts.{kind}"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return None


def is_fused(names) -> bool:
    return any(_fused_parts(n) for n in names)


def _expert_names(prefix: str, kind: str, experts: int, present) -> tuple[tuple, list[list[str]]] | None:
    """The parts and the per-expert names (one row per expert) of a fused ``kind`` under ``prefix``,
    in the first naming whose every name is in ``present``; None when no naming fits."""
    for variant in _variants(prefix):
        for parts in FUSED[kind]:
            names = [[f"{variant}.experts.{e}.{p}.weight" for p in parts] for e in range(experts)]
            if all(x in present for row in names for x in row):
                return parts, names
    return None


class ExpertLayoutSource:
    """An input whose experts are stored in the other layout, seen in the reference's."""

    def __init__(self, source, reference_infos: dict):
        self.source = source
        ref = reference_infos
        self.split: dict[str, tuple[str, int, int, int]] = {}  # ref per-expert name -> (fused, e, part, parts)
        self.stack: dict[str, list[list[str]]] = {}  # ref fused name -> the input's per-expert names
        self.renamed: dict[str, str] = {}
        infos = {}
        own = source.infos
        for n, info in own.items():
            got = _fused_parts(n)
            if got is not None and n not in ref:  # input fused, reference per expert
                self._split(n, info, got, ref, infos)
            elif n in ref:
                infos[n] = info
            else:
                alias = next((v for v in _variants(n) if v in ref), None)
                if alias is not None:
                    infos[alias] = info
                    self.renamed[alias] = n
        for r, rinfo in ref.items():  # reference fused, input per expert
            got = _fused_parts(r)
            if got is None or r in infos:
                continue
            found = _expert_names(*got, rinfo.shape[0], own)
            if found is not None:
                parts, names = found
                first = own[names[0][0]]
                infos[r] = TensorInfo((len(names), first.shape[0] * len(parts), *first.shape[1:]),
                                      first.dtype, first.file)
                self.stack[r] = names
        self.infos = infos
        self._last: tuple[str, object] | None = None

    def _split(self, n, info, got, ref, infos) -> None:
        found = _expert_names(*got, info.shape[0], ref)
        if found is None:
            return
        parts, names = found
        rows = info.shape[1]
        if rows % len(parts):
            raise UserError(f"{info.file}: fused expert tensor '{n}' {list(info.shape)} does not split "
                            f"into {len(parts)} equal parts ({', '.join(parts)})")
        for e, row in enumerate(names):
            for j, x in enumerate(row):
                self.split[x] = (n, e, j, len(parts))
                infos[x] = TensorInfo((rows // len(parts), *info.shape[2:]), info.dtype, info.file)

    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def _fused(self, name: str):
        if self._last is None or self._last[0] != name:
            self._last = (name, self.source.get(name))
        return self._last[1]

    def get(self, key: str):
        import torch

        if key in self.split:
            fused, e, j, parts = self.split[key]
            return self._fused(fused)[e].chunk(parts, dim=0)[j].clone()
        if key in self.stack:
            return torch.stack([torch.cat([self.source.get(x) for x in row], dim=0) for row in self.stack[key]])
        return self.source.get(self.renamed.get(key, key))

    def describe(self) -> str:
        if self.split:
            return f"fused experts read as {len(self.split)} per-expert tensors"
        return f"per-expert tensors read as {len(self.stack)} fused expert tensors"

    def close(self) -> None:
        self._last = None
        self.source.close()


def needs_conversion(reference_names, names) -> bool:
    """One side stores fused experts and the other does not."""
    return is_fused(names) != is_fused(reference_names)
