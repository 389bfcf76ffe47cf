"""Tensor names -> the groups statistics are aggregated over (names only, no tensors).

* module kind: the name with every layer index replaced by ``*``
  (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``); the
  continual gate groups its norms the same way.
* layer: ``stack.index`` of a layer tensor (:func:`..layout.layer_of`), else ``other``.
"""
from __future__ import annotations

import re

_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")
OTHER = "other"


def group_of(name: str) -> str:
    return _LAYER.sub("*", name)


def layer_key(name: str) -> str:
    from ..layout import layer_of

    got = layer_of(name)
    return OTHER if got is None else f"{got[0]}.{got[1]}"


def layer_sort_key(key: str):
    if key == OTHER:
        return (1, "", 0)
    stack, _, idx = key.rpartition(".")
    return (0, stack, int(idx))
