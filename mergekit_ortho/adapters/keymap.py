"""Matching adapter modules to base tensors: a pure function of names and shapes.

``match_to_base(source, base_keys, base_shapes) -> BaseMatch`` ({module: base weight key}) reads
only the source's header facts and changes nothing; ``adapters.lora.MatchedLora(source, match)``
binds the result. ``kohya_default_name(base_key)`` names a module for kohya output.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from ..errors import UserError
from .detect import PEFT_PREFIX

if TYPE_CHECKING:
    from .lora import LoraSource

# base-key prefix -> kohya module prefixes generated for it (tier 0); bare keys are tier 1.
_KOHYA_BASE_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.diffusion_model.", ("lora_unet_",)),  # LDM/SGM single-file UNet, ComfyUI Flux
    ("diffusion_model.", ("lora_unet_",)),
    ("unet.", ("lora_unet_",)),
    ("transformer.", ("lora_unet_",)),
    ("cond_stage_model.transformer.", ("lora_te_",)),  # SD1.x single file (HF CLIP names)
    ("conditioner.embedders.0.transformer.", ("lora_te1_",)),  # SDXL single file, CLIP-L
    ("text_encoders.clip_l.transformer.", ("lora_te1_",)),  # ComfyUI
    ("text_encoders.t5xxl.transformer.", ("lora_te3_",)),
    ("text_encoder.", ("lora_te_", "lora_te1_")),  # diffusers pipeline components
    ("text_encoder_2.", ("lora_te2_", "lora_te3_")),
    ("text_encoder_3.", ("lora_te3_",)),
)
_KOHYA_BARE = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_")


def _strip_first(name: str) -> str | None:
    return name.split(".", 1)[1] if "." in name else None


def _candidates(src: LoraSource, base_module: str, tier: int, first_components: Sequence[str]) -> list[str]:
    """The LoRA module names a base module (key minus '.weight') would have, for one tier.
    ``first_components``: the first name components of the LoRA's modules (``bert``, ``unet``)."""
    m = base_module
    out: list[str] = []
    if src.format == "kohya":
        if tier == 0:
            for bp, lps in _KOHYA_BASE_PREFIXES:
                if m.startswith(bp):
                    rest = m[len(bp):].replace(".", "_")
                    out += [lp + rest for lp in lps]
        elif tier == 1:
            out += [lp + m.replace(".", "_") for lp in _KOHYA_BARE]
        return out
    if src.format == "peft":
        pre = PEFT_PREFIX if all(x.startswith(PEFT_PREFIX) for x in src.modules) else ""
        if tier == 0:
            out.append(pre + m)
        elif tier == 1 and _strip_first(m):
            out.append(pre + _strip_first(m))
        elif tier == 2:
            out += [pre + c + "." + m for c in first_components]
        return out
    # diffusers: component prefix + module path of a single-component checkpoint
    if tier == 0:
        out.append(m)
    elif tier == 1:
        out += [c + "." + m for c in first_components]
    elif tier == 2 and _strip_first(m):
        out += [c + "." + _strip_first(m) for c in first_components]
    return out


def _fits(rows: int, cols: int, base_shape: Sequence[int], stored_a: Sequence[int]) -> bool:
    if len(base_shape) < 2 or base_shape[0] != rows or math.prod(base_shape[1:]) != cols:
        return False
    if len(stored_a) == 4 and len(base_shape) == 4 and tuple(stored_a[1:]) != tuple(base_shape[1:]):
        return False
    return True


class BaseMatch(Mapping[str, str]):
    """{LoRA module (as stored) -> base weight key}, read-only, plus ``layouts``: the modules whose
    layout the base's shape decided against the config (PEFT sets fan_in_fan_out per layer for
    GPT-2 ``Conv1D``, so a config without it can still hold transposed modules)."""

    __slots__ = ("_map", "layouts", "shapes")

    def __init__(self, mapping: Mapping[str, str], layouts: Mapping[str, str] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None):
        self._map = dict(sorted(mapping.items()))
        self.layouts = MappingProxyType(dict(layouts or {}))
        self.shapes = MappingProxyType({k: tuple(v) for k, v in (shapes or {}).items()})  # module -> base shape

    def __getitem__(self, module: str) -> str:
        return self._map[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"BaseMatch({self._map!r}, layouts={dict(self.layouts)!r})"


def match_to_base(lora_source: LoraSource, base_keys: Sequence[str],
                  base_shapes: Mapping[str, Sequence[int]]) -> BaseMatch:
    """{LoRA module (as stored) -> base weight key}, by generating LoRA names from the base keys.

    Tiers (first that matches wins; two base keys for one name is an error):
    PEFT: ``base_model.model.<key minus .weight>`` (``.base_layer`` dropped), then without the base
    key's first component, then with the LoRA's first component added (e.g. ``bert.``);
    kohya: known base prefixes (``model.diffusion_model.`` -> ``lora_unet_``,
    ``cond_stage_model.transformer.`` -> ``lora_te_``, ``conditioner.embedders.0.transformer.`` ->
    ``lora_te1_``, ``text_encoder[_2].`` -> ``lora_te[12]_``, ...) with dots -> underscores, then bare
    keys under every kohya prefix; diffusers: ``<component>.<key>``.
    Raises UserError naming the LoRA file for unmatched modules, ambiguous matches and shapes
    that do not fit the base tensor. The source is not modified: bind the result with
    ``MatchedLora(source, match)``."""
    from .grouping import stem_of

    src = lora_source
    first_components = sorted({(m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m).split(".", 1)[0]
                               for m in src.modules})
    base_modules: dict[str, str] = {}
    for k in base_keys:
        if not k.endswith(".weight"):
            continue
        m = k[: -len(".weight")]
        base_modules.setdefault(m, k)
        if ".base_layer" in m:
            base_modules.setdefault(m.replace(".base_layer", ""), k)
    todo = {stem_of(m)[0] for m in src.modules}
    found: dict[str, str] = {}
    tiers = 2 if src.format == "kohya" else 3
    for tier in range(tiers):
        if not todo:
            break
        table: dict[str, set[str]] = {}
        for m, k in base_modules.items():
            for c in _candidates(src, m, tier, first_components):
                if c in todo:
                    table.setdefault(c, set()).add(k)
        for c, ks in table.items():
            if len(ks) > 1:
                raise UserError(f"LoRA module '{c}' in {src.file} matches several base tensors: "
                                f"{', '.join(sorted(ks))}")
            found[c] = next(iter(ks))
            todo.discard(c)
    for ck, cshape in src.base_copies.items():
        m = ck[: -len(".base_layer.weight")]
        m = m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m
        hits = [base_modules[x] for x in (m, _strip_first(m)) if x and x in base_modules]
        if not hits or tuple(base_shapes[hits[0]]) != tuple(cshape):
            raise UserError(
                f"not supported yet: {src.file} carries its own copy of base tensor '{ck}' {list(cshape)} "
                + (f"but the base has {list(base_shapes[hits[0]])} at '{hits[0]}'" if hits else "that the base lacks")
                + " (resized vocabulary?)")
    if todo:
        miss = sorted(todo)
        example = next(iter(base_modules), None)
        ex = _candidates(src, example, 0, first_components)[:1] if example else []
        raise UserError(
            f"{len(miss)} LoRA module(s) in {src.file} match no tensor of the base model: "
            + ", ".join(f"'{x}'" for x in miss[:5]) + (", ..." if len(miss) > 5 else "")
            + (f" (base key '{base_modules[example]}' would be '{ex[0]}')" if ex else "")
            + "; is this LoRA for this base model?")
    targets: dict[str, str] = {}
    for mod in src.modules:
        stem, tgt = stem_of(mod)
        key = found[stem] if tgt == "weight" else found[stem][: -len("weight")] + tgt
        if key not in base_shapes:
            if src.optional(mod):
                continue
            raise UserError(f"{src.file}: module '{stem}' adapts '{key}', which the base model lacks "
                            f"(a {tgt} delta needs a base with that tensor)")
        targets[mod] = key
    inv: dict[str, str] = {}
    layouts: dict[str, str] = {}
    for mod, key in targets.items():
        if key in inv:
            raise UserError(f"LoRA modules '{inv[key]}' and '{mod}' in {src.file} both map to base tensor '{key}'")
        inv[key] = mod
        shape = tuple(base_shapes[key])
        if not src.is_factors(mod):
            _check_part(src, mod, key, shape)
            continue
        (r, cols), (rows, _) = src.factor_shapes(mod)
        sa, _ = src.stored_shapes(mod)
        if not _fits(rows, cols, shape, sa):
            lay = src.layout(mod)
            alt = {"linear": "transposed", "transposed": "linear"}.get(lay)
            if src.format == "peft" and alt and len(shape) == 2:
                (_, alt_cols), (alt_rows, _) = src.factor_shapes(mod, alt)
                if _fits(alt_rows, alt_cols, shape, sa):
                    layouts[mod] = alt  # PEFT auto-sets fan_in_fan_out per layer (Conv1D)
                    continue
            raise UserError(
                f"shape mismatch: LoRA module '{mod}' in {src.file} gives a delta of {rows}x{cols} "
                f"(A/down {list(sa)}) but base tensor '{key}' has shape {list(shape)}"
                " (a LoRA for a different model or model family, e.g. SDXL vs SD1.5?)")
    return BaseMatch(targets, layouts, {m: base_shapes[k] for m, k in targets.items()})


def _check_part(src: "LoraSource", mod: str, key: str, shape: tuple[int, ...]) -> None:
    """A part that is not plain factors must give a delta of the base tensor's size (its type's
    shape rule also validates the stored factors against the base, e.g. LoKr's kron)."""
    from .typed import delta_shape

    rows, cols = delta_shape(src, mod, shape)
    want = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (math.prod(shape), 1)
    if (rows, cols) != want:
        raise UserError(f"shape mismatch: {src.type_name(mod)} module '{mod}' in {src.file} gives a delta of "
                        f"{rows}x{cols} but base tensor '{key}' has shape {list(shape)}"
                        " (an adapter for a different model or model family?)")


def kohya_default_name(base_key: str) -> str:
    """The kohya module name for a base key when no template says otherwise."""
    m = base_key[: -len(".weight")] if base_key.endswith(".weight") else base_key
    for bp, lps in _KOHYA_BASE_PREFIXES:
        if m.startswith(bp):
            return lps[0] + m[len(bp):].replace(".", "_")
    if m.startswith("text_model."):
        return "lora_te_" + m.replace(".", "_")
    return "lora_unet_" + m.replace(".", "_")
