"""A LoRA bound to a base model: read-only views over a LoraSource and a match.

``MatchedLora(source, match, base=None)``: ``.base_map`` (module -> base key), ``.by_base`` (base
key -> module), ``factors_for(base_key)``, ``delta_for(base_key)``; the source is not modified.
``base`` (a checkpoint source) is read for the modules whose type needs W0 (DoRA, OFT, ...,
``modules_to_save`` replacements), unless the caller passes the base tensor itself.
``AppliedLora(matched, base)``: the full checkpoint base + delta, for paths that take checkpoints.
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

    __slots__ = ("source", "base_map", "by_base", "_layouts", "_shapes", "base")

    def __init__(self, source: LoraSource, base_map: Mapping[str, str], base=None):
        set_ = object.__setattr__
        set_(self, "source", source)
        set_(self, "base_map", MappingProxyType(dict(sorted(base_map.items()))))
        set_(self, "by_base", MappingProxyType({v: k for k, v in self.base_map.items()}))
        set_(self, "_layouts", MappingProxyType(dict(getattr(base_map, "layouts", {}))))
        set_(self, "_shapes", MappingProxyType(dict(getattr(base_map, "shapes", {}))))
        set_(self, "base", base)

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (copy/pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.source, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"MatchedLora is read-only (cannot set {name!r})")

    def layout(self, module: str) -> str:
        if not self.source.is_factors(module):  # a dense part: the base tensor's own layout
            shape = self._shapes.get(module)
            return "conv" if shape is not None and len(shape) == 4 else "linear"
        return self._layouts.get(module) or self.source.layout(module)

    def factor_shapes(self, module: str, layout: str | None = None):
        shape = self._shapes.get(module)
        if shape is not None and not self.source.is_factors(module):
            rows, cols = shape[0], math.prod(shape[1:])
            return (min(rows, cols), cols), (rows, min(rows, cols))
        return self.source.factor_shapes(module, layout or self.layout(module))

    def factors(self, module: str, fold: str = "B", layout: str | None = None):
        return self.source.factors(module, fold, layout or self.layout(module))

    def delta(self, module: str, shape: Sequence[int] | None = None, layout: str | None = None, base=None):
        if not self.source.is_factors(module):
            if base is None and self.source.needs_base(module) and self.base is not None:
                base = self.base.get(self.base_map[module])
            return self.source.delta(module, shape or self._shapes.get(module), base=base)
        return self.source.delta(module, shape, layout or self.layout(module))

    def factors_for(self, base_key: str, fold: str = "B"):
        return self.factors(self._module_for(base_key), fold)

    def delta_for(self, base_key: str, shape: Sequence[int] | None = None, base=None):
        """The module's delta on ``base_key``; ``base``: that base tensor, when the caller has it."""
        return self.delta(self._module_for(base_key), shape, base=base)

    def is_factors_for(self, base_key: str) -> bool:
        return self.source.is_factors(self._module_for(base_key))

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
