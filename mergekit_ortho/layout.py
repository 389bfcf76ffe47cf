"""Where each output tensor comes from: layer indices, the layer parameter t, and slices.

Spec: ../shared/specs/mergekit_compat.md M4 (t per layer), M5 (layer index rule), M7 (slices,
layer_range, frankenmerges). Names only: no tensors, no files.

* A tensor is a **layer tensor** when a dot-separated segment of its name is a number; the first
  such segment is the layer index and what precedes it the stack prefix
  (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers``, 3, ``mlp.up_proj.weight``).
* In a ``models:`` recipe the ℓ-th layer of an n-layer stack has t = ℓ/(n-1) (t = 1 when n = 1);
  every other tensor has t = 0 (mergekit).
* In a ``slices:`` recipe each slice lists sources with half-open ranges [a, b) of equal length;
  output layers are numbered from 0 across slices, offset ℓ of a slice merges source layer a_s+ℓ
  of every source s and has t = ℓ/(n-1) within its slice. Non-layer tensors come from the first
  slice (embeddings and everything before the layers) or the last one (final norm and head),
  at t = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

# non-layer tensors that follow the layers: taken from the last slice of a frankenmerge
_POST_HEADS = ("lm_head.", "score.", "classifier.", "embed_out.")
_POST_NORMS = {"norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f"}


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(stack prefix, layer index, rest of the name) of a layer tensor, else None."""
    parts = name.split(".")
    for j in range(1, len(parts) - 1):
        if parts[j].isdigit():
            return ".".join(parts[:j]), int(parts[j]), ".".join(parts[j + 1:])
    return None


def layer_counts(names) -> dict[str, int]:
    """Layers per stack prefix: the largest index + 1."""
    counts: dict[str, int] = {}
    for n in names:
        got = layer_of(n)
        if got is not None:
            counts[got[0]] = max(counts.get(got[0], 0), got[1] + 1)
    return counts


def position(offset: int, n: int) -> float:
    """t of the ``offset``-th of ``n`` layers: spread over [0, 1], and 1 for a single layer."""
    return 1.0 if n <= 1 else offset / (n - 1)


def t_of(name: str, counts: dict[str, int]) -> float:
    """t of a tensor of a ``models:`` recipe (its stack counted whole; non-layer tensors 0)."""
    got = layer_of(name)
    return 0.0 if got is None else position(got[1], counts[got[0]])


def is_post(name: str) -> bool:
    """A non-layer tensor that follows the layers (final norm, head): from the last slice."""
    if name.startswith(_POST_HEADS):
        return True
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in _POST_NORMS


@dataclass(frozen=True)
class LaidOut:
    """One output tensor of a slices recipe: its slice, t, and the input tensor name of each of
    that slice's sources (in source order)."""

    name: str
    slice: int
    t: float
    inputs: tuple[str, ...]
    source_layers: tuple[int, ...] = ()  # the layer each source contributes (layer tensors)


class LayoutError(ValueError):
    pass


def stack_prefix(names: list[str], where: str) -> str:
    stacks = sorted(layer_counts(names))
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise LayoutError(f"slices need a model with one stack of numbered layers; {where} has {found} "
                          "(models with several stacks, e.g. vision towers, are not sliced yet)")
    return stacks[0]


def frankenmerge(slices: list[list[tuple[int, int]]], names_of, sources_of) -> list[LaidOut]:
    """The output tensors of a slices recipe, in writing order (pre-weights, layers, post-weights).

    ``slices[k]`` lists each source's (a, b); ``sources_of(k)`` gives that slice's source ids;
    ``names_of(source_id)`` the tensor names of that source's model, in checkpoint order."""
    first, last = sources_of(0)[0], sources_of(len(slices) - 1)[0]
    prefix = stack_prefix(names_of(first), "slices[0].sources[0]")
    out: list[LaidOut] = []
    for name in names_of(first):
        if layer_of(name) is None and not is_post(name):
            out.append(LaidOut(name, 0, 0.0, tuple(name for _ in sources_of(0))))
    layer = 0
    for k, ranges in enumerate(slices):
        lengths = {b - a for a, b in ranges}
        if len(lengths) != 1:
            raise LayoutError(f"slices[{k}]: every source must span the same number of layers, got "
                              + ", ".join(f"[{a}, {b})" for a, b in ranges))
        n = lengths.pop()
        src = sources_of(k)
        templates = _layer_suffixes(names_of(src[0]), prefix)
        for s, (a, b) in zip(src, ranges):
            have = layer_counts(names_of(s)).get(prefix, 0)
            if b > have:
                raise LayoutError(f"slices[{k}]: layer_range [{a}, {b}) goes past the {have} layers of "
                                  f"{getattr(s, 'ref', s)}")
        for off in range(n):
            a0 = ranges[0][0] + off
            for rest in templates.get(a0, []):
                ins = tuple(f"{prefix}.{a + off}.{rest}" for a, _ in ranges)
                out.append(LaidOut(f"{prefix}.{layer}.{rest}", k, position(off, n), ins,
                                   tuple(a + off for a, _ in ranges)))
            layer += 1
    k = len(slices) - 1
    for name in names_of(last):
        if layer_of(name) is None and is_post(name):
            out.append(LaidOut(name, k, 0.0, tuple(name for _ in sources_of(k))))
    return out


def _layer_suffixes(names: list[str], prefix: str) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for n in names:
        got = layer_of(n)
        if got is not None and got[0] == prefix:
            by_layer.setdefault(got[1], []).append(got[2])
    return by_layer


def output_layers(slices: list[list[tuple[int, int]]]) -> list[int]:
    """For each output layer, the layer of the first source it comes from (for config arrays
    such as ``layer_types``)."""
    out = []
    for ranges in slices:
        a, b = ranges[0]
        out.extend(range(a, b))
    return out
