"""A LoRA bound to a base model: read-only views over a LoraSource and a match.

``MatchedLora(source, match, base=None)``: ``.base_map`` (module -> base key), ``.by_base`` (base
key -> module), ``factors_for(base_key)``, ``delta_for(base_key)``; the source is not modified.
``base`` (a checkpoint source) is read for the modules whose type needs W0 (DoRA, OFT, ...,
``modules_to_save`` replacements), unless the caller passes the base tensor itself.
``AppliedLora(matched, base)``: the full checkpoint base + delta, for paths that take checkpoints.

Assembled base tensors (spec adapters.md P19; ``keymap.Assembly``): a base key fed by pieces of
several modules (q/k/v into a fused ``in_proj_weight``), or by rows of one fused module (a BFL
``qkv`` LoRA into diffusers ``to_q``), maps from the assembly's name, which every per-module method
here accepts like a stored module: ``delta`` places each module's delta rows
(ΔW[base_rows] = ΔW_m[lora_rows], transposed first where the rule says), ``factors`` gives exact
factors: A = cat over the distinct modules of A_m (rank Σr), B [rows, Σr] with B_m[lora_rows] in
rows base_rows of module m's column block (block-diagonal for fused q/k/v; for a split, A shared
and B sliced by rows), so B @ A == delta exactly. Its scale is folded (alpha = rank, scale 1).
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Mapping, Sequence

from .lora import LoraSource


class MatchedLora:
    """A LoraSource bound to the base tensors its modules adapt (``keymap.match_to_base``'s map).

    Read-only: binding never changes the source, so one source can be matched to several bases
    and a match is an ordinary value. Adds ``base_map`` (module -> base key), ``by_base`` (base
    key -> module), ``factors_for(base_key)`` and ``delta_for(base_key)``; ``layout``,
    ``factor_shapes``, ``factors`` and ``delta`` follow the layouts the match decided. Everything
    else is the source's."""

    __slots__ = ("source", "base_map", "by_base", "_layouts", "assemblies", "match", "_shapes", "base")

    def __init__(self, source: LoraSource, base_map: Mapping[str, str], base=None):
        set_ = object.__setattr__
        set_(self, "source", source)
        set_(self, "base_map", MappingProxyType(dict(sorted(base_map.items()))))
        set_(self, "by_base", MappingProxyType({v: k for k, v in self.base_map.items()}))
        set_(self, "_layouts", MappingProxyType(dict(getattr(base_map, "layouts", {}))))
        set_(self, "assemblies", MappingProxyType(dict(getattr(base_map, "assemblies", {}))))
        set_(self, "match", base_map)  # the BaseMatch (naming, rules) or the plain map given
        set_(self, "_shapes", MappingProxyType(dict(getattr(base_map, "shapes", {}))))
        set_(self, "base", base)

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (copy/pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.source, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"MatchedLora is read-only (cannot set {name!r})")

    def layout(self, module: str) -> str:
        if module in self.assemblies:
            return "linear"
        if not self.source.is_factors(module):  # a dense part: the base tensor's own layout
            shape = self._shapes.get(module)
            return "conv" if shape is not None and len(shape) == 4 else "linear"
        return self._layouts.get(module) or self.source.layout(module)

    # -- per-module facts, for stored modules and assemblies alike --------------------------------

    def rank(self, module: str) -> int:
        asm = self.assemblies.get(module)
        if asm is None:
            return self.source.rank(module)
        return sum(self.source.rank(m) for m in asm.modules)

    def alpha(self, module: str) -> float:
        return float(self.rank(module)) if module in self.assemblies else self.source.alpha(module)

    def scale(self, module: str) -> float:
        return 1.0 if module in self.assemblies else self.source.scale(module)

    def stored_shapes(self, module: str):
        asm = self.assemblies.get(module)
        if asm is None:
            return self.source.stored_shapes(module)
        r = self.rank(module)
        return (r, asm.cols), (asm.rows, r)

    def factor_shapes(self, module: str, layout: str | None = None):
        if module in self.assemblies:
            return self.stored_shapes(module)
        shape = self._shapes.get(module)
        if shape is not None and not self.source.is_factors(module):
            rows, cols = shape[0], math.prod(shape[1:])
            return (min(rows, cols), cols), (rows, min(rows, cols))
        return self.source.factor_shapes(module, layout or self.layout(module))

    def factors(self, module: str, fold: str = "B", layout: str | None = None):
        asm = self.assemblies.get(module)
        if asm is None:
            return self.source.factors(module, fold, layout or self.layout(module))
        import torch

        As, cols = [], []
        for m in asm.modules:
            A, B = self.factors(m, fold)
            if any(p.transpose for p in asm.pieces if p.module == m):
                A, B = B.t().contiguous(), A.t().contiguous()  # (B A)^T = A^T B^T
            As.append((m, A, B))
        r = sum(A.shape[0] for _, A, _ in As)
        out_b = torch.zeros(asm.rows, r, dtype=torch.float32)
        at = 0
        for m, A, B in As:
            k = A.shape[0]
            for p in asm.pieces:
                if p.module == m:
                    src = B[slice(*p.lora_rows)] if p.lora_rows else B
                    out_b[slice(*p.base_rows) if p.base_rows else slice(None), at:at + k] = src
            cols.append(A)
            at += k
        return torch.cat(cols, 0), out_b

    def delta(self, module: str, shape: Sequence[int] | None = None, layout: str | None = None, base=None):
        asm = self.assemblies.get(module)
        if asm is not None:
            return self._assembled_delta(asm, shape)
        if not self.source.is_factors(module):
            if base is None and self.source.needs_base(module) and self.base is not None:
                base = self.base.get(self.base_map[module])
            return self.source.delta(module, shape or self._shapes.get(module), base=base)
        return self.source.delta(module, shape, layout or self.layout(module))

    def _assembled_delta(self, asm, shape):
        import torch

        d = torch.zeros(asm.rows, asm.cols, dtype=torch.float32)
        for m in asm.modules:
            dm = self.delta(m)
            dm = dm.reshape(dm.shape[0], -1)
            for p in asm.pieces:
                if p.module == m:
                    x = dm.t() if p.transpose else dm
                    d[slice(*p.base_rows) if p.base_rows else slice(None)] = x[slice(*p.lora_rows)] if p.lora_rows else x
        return d.reshape(tuple(shape)) if shape is not None else d

    # assemblies are built from plain LoRA factors only (keymap refuses other types there)
    def is_factors(self, module: str) -> bool:
        return module in self.assemblies or self.source.is_factors(module)

    def needs_base(self, module: str) -> bool:
        return module not in self.assemblies and self.source.needs_base(module)

    def type_name(self, module: str) -> str:
        return "LoRA" if module in self.assemblies else self.source.type_name(module)

    def factors_for(self, base_key: str, fold: str = "B"):
        return self.factors(self._module_for(base_key), fold)

    def delta_for(self, base_key: str, shape: Sequence[int] | None = None, base=None):
        """The module's delta on ``base_key``; ``base``: that base tensor, when the caller has it."""
        return self.delta(self._module_for(base_key), shape, base=base)

    def exact_factors_for(self, base_key: str):
        """(A, B) of a module with an exact low-rank form (LoRA factors, Tucker LoCon, LoHa, LoKr;
        adapters.md P24), else None."""
        mod = self._module_for(base_key)
        if self.is_factors(mod):
            return self.factors(mod)
        if not self.source.has_exact_factors(mod):
            return None
        return self.source.exact_factors(mod, self._shapes.get(mod))

    def is_factors_for(self, base_key: str) -> bool:
        return self.is_factors(self._module_for(base_key))

    def _module_for(self, base_key: str) -> str:
        try:
            return self.by_base[base_key]
        except KeyError:
            raise KeyError(f"{self.source.label} has no LoRA module matched to '{base_key}'") from None

    def __enter__(self) -> "MatchedLora":
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return f"MatchedLora({self.source!r}, {len(self.base_map)} base tensors)"


class AppliedLora:
    """A MatchedLora seen as the full checkpoint it produces: ``get(key)`` = base + delta
    (float32, so the delta is not rounded to a bf16 base), the base tensor itself for keys the LoRA does not adapt. Lets
    full-checkpoint paths (continual merging) take LoRAs without knowing about them."""

    def __init__(self, lora: MatchedLora, base, owns_base: bool = False):
        self.lora, self.base, self.owns_base = lora, base, owns_base
        self.infos = base.infos
        self.ref = str(lora.path)
        # config and tokenizer files are the model's (mergekit's model+lora keeps them)
        self.directory = getattr(base, "directory", None)
        self.path = getattr(base, "path", None)

    def get(self, key: str):
        import torch

        t = self.base.get(key)
        if key not in self.lora.by_base:
            return t
        t = t.to(torch.float32)
        return t + self.lora.delta_for(key, t.shape, base=t)

    def close(self) -> None:
        self.lora.close()
        if self.owns_base:
            self.base.close()
