"""A LoRA bound to a base model: read-only views over a LoraSource and a match.

``MatchedLora(source, match)``: ``.base_map`` (module -> base key), ``.by_base`` (base key ->
module), ``factors_for(base_key)``, ``delta_for(base_key)``; the source is not modified.
``AppliedLora(matched, base)``: the full checkpoint base + delta, for paths that take checkpoints.
"""
from __future__ import annotations

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

    __slots__ = ("source", "base_map", "by_base", "_layouts")

    def __init__(self, source: LoraSource, base_map: Mapping[str, str]):
        set_ = object.__setattr__
        set_(self, "source", source)
        set_(self, "base_map", MappingProxyType(dict(sorted(base_map.items()))))
        set_(self, "by_base", MappingProxyType({v: k for k, v in self.base_map.items()}))
        set_(self, "_layouts", MappingProxyType(dict(getattr(base_map, "layouts", {}))))

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (copy/pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self.source, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"MatchedLora is read-only (cannot set {name!r})")

    def layout(self, module: str) -> str:
        return self._layouts.get(module) or self.source.layout(module)

    def factor_shapes(self, module: str, layout: str | None = None):
        return self.source.factor_shapes(module, layout or self.layout(module))

    def factors(self, module: str, fold: str = "B", layout: str | None = None):
        return self.source.factors(module, fold, layout or self.layout(module))

    def delta(self, module: str, shape: Sequence[int] | None = None, layout: str | None = None):
        return self.source.delta(module, shape, layout or self.layout(module))

    def factors_for(self, base_key: str, fold: str = "B"):
        return self.factors(self._module_for(base_key), fold)

    def delta_for(self, base_key: str, shape: Sequence[int] | None = None):
        return self.delta(self._module_for(base_key), shape)

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
        return t.to(torch.float32) + self.lora.delta_for(key, t.shape)

    def close(self) -> None:
        self.lora.close()
        if self.owns_base:
            self.base.close()
