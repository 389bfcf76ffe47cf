"""Matching adapter modules to base tensors: a pure function of names and shapes.

``match_to_base(source, base_keys, base_shapes) -> BaseMatch`` ({module: base weight key}) reads
only the source's header facts and changes nothing; ``adapters.matched.MatchedLora(source, match)``
binds the result. ``kohya_default_name(base_key)`` names a module for kohya output.

Spec: ../shared/specs/adapters.md P10 (kohya prefixes), P19 (key maps). Besides each base key's
own spelling, the names of the base tensor in the other namings (``naming.base_aliases``) are
generated too; a base tensor that several LoRA modules feed (q/k/v into a fused ``in_proj`` /
``qkv`` / ``linear1``), or that takes rows of one fused module, is an ``Assembly`` of ``Piece``s,
and ``MatchedLora`` builds its delta and exact factors (A stacked, B block-diagonal: rank Σr).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from ..errors import UserError
from .detect import PEFT_PREFIX
from .naming import Alias, base_aliases, detect_naming

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


@dataclass(frozen=True)
class Piece:
    """One LoRA module's share of an assembled base tensor (P19): rows ``lora_rows`` of the
    module's delta (all: None), transposed first when ``transpose``, land on rows ``base_rows``
    of the base tensor (all: None)."""
    module: str
    base_rows: tuple[int, int] | None = None
    lora_rows: tuple[int, int] | None = None
    transpose: bool = False


@dataclass(frozen=True)
class Assembly:
    """A base tensor assembled from pieces of LoRA modules (fused q/k/v, a split fused module,
    swapped halves, a transpose): its 2-D shape and the pieces, in row order."""
    key: str
    rows: int
    cols: int
    pieces: tuple[Piece, ...]
    rule: str

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.module for p in self.pieces))

    @property
    def name(self) -> str:
        """The name the match gives it in place of a stored module name."""
        def one(p: Piece) -> str:
            rows = f"[{p.lora_rows[0]}:{p.lora_rows[1]}]" if p.lora_rows else ""
            at = f"->[{p.base_rows[0]}:{p.base_rows[1]}]" if p.base_rows else ""
            return p.module + rows + (".T" if p.transpose else "") + at
        return "+".join(one(p) for p in self.pieces)  # never a stored module's name


class BaseMatch(Mapping[str, str]):
    """{LoRA module (as stored) -> base weight key}, read-only, plus ``layouts``: the modules whose
    layout the base's shape decided against the config (PEFT sets fan_in_fan_out per layer for
    GPT-2 ``Conv1D``, so a config without it can still hold transposed modules).

    ``assemblies``: {name: Assembly} for base tensors built from pieces (P19); such a base key
    maps from the assembly's ``name`` (e.g. ``lora_te2_..._q_proj+lora_te2_..._k_proj``) instead of
    a stored module. ``naming``: the base's naming (``naming.BaseNaming``); ``rules``: how many
    LoRA modules each rule mapped ({"name": n, "rename": n, "fuse": n, "split": n, ...});
    ``shapes``: {module or assembly name -> its base tensor's shape}."""

    __slots__ = ("_map", "layouts", "assemblies", "naming", "rules", "shapes")

    def __init__(self, mapping: Mapping[str, str], layouts: Mapping[str, str] | None = None,
                 assemblies: Mapping[str, Assembly] | None = None, naming=None,
                 rules: Mapping[str, int] | None = None, shapes: Mapping[str, Sequence[int]] | None = None):
        self._map = dict(sorted(mapping.items()))
        self.layouts = MappingProxyType(dict(layouts or {}))
        self.assemblies = MappingProxyType(dict(assemblies or {}))
        self.naming = naming
        self.rules = MappingProxyType(dict(rules or {}))
        self.shapes = MappingProxyType({k: tuple(v) for k, v in (shapes or {}).items()})  # module -> base shape

    def __getitem__(self, module: str) -> str:
        return self._map[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"BaseMatch({self._map!r}, layouts={dict(self.layouts)!r})"

    def summary(self) -> str:
        """One line for the plan: the base naming and how many modules each rule mapped."""
        words = {"name": "by name", "rename": "through a naming rule", "fuse": "fused by rows into {t} tensor(s)",
                 "split": "split by rows over {t} tensor(s)", "swap": "with row halves swapped",
                 "transpose": "transposed", "transformers": "through the installed transformers' renames"}
        tensors = Counter(a.rule for a in self.assemblies.values())
        parts = [f"{n} {words.get(r, r).format(t=tensors.get(r, 0))}" for r, n in sorted(self.rules.items()) if n]
        naming = self.naming.describe() if self.naming is not None else "?"
        if self.rules.get("transformers") and (self.naming is None or not self.naming.recognised):
            from .transformers5 import version

            naming = f"module names that transformers {version()} renames at load (checkpoint vs in-memory)"
        return f"base naming: {naming}; LoRA modules mapped: " + ", ".join(parts)


def _scan(src: "LoraSource", base_modules: Mapping[str, str], aliases: Sequence[Alias], tiers: int,
          first_components: Sequence[str]) -> dict[str, list[Alias]]:
    """{LoRA module stem: the aliases it matched}, tier by tier (first tier that matches wins)."""
    from .grouping import stem_of

    todo = {stem_of(m)[0] for m in src.modules}  # a module's bias part matches through its weight
    found: dict[str, list[Alias]] = {}
    entries = [Alias(m, k, "name") for m, k in base_modules.items()] + list(aliases)
    for tier in range(tiers):
        if not todo:
            break
        table: dict[str, dict[tuple, Alias]] = {}
        for a in entries:
            for c in _candidates(src, a.module, tier, first_components):
                if c in todo:
                    spec = (a.key, a.base_rows, a.lora_rows, a.transpose)
                    table.setdefault(c, {}).setdefault(spec, a)
        for c, hits in table.items():
            hs = list(hits.values())
            keys = {a.key for a in hs}
            pieces = all(a.lora_rows is not None for a in hs)  # row blocks of one fused module
            if len(hs) > 1 and not pieces:
                raise UserError(f"LoRA module '{c}' in {src.file} matches several base tensors: "
                                f"{', '.join(sorted(keys))}")
            found[c] = hs
            todo.discard(c)
    return found


def _check_piece(src: "LoraSource", mod: str, a: Alias, shape: Sequence[int]) -> None:
    (_, cols), (rows, _) = src.factor_shapes(mod)
    if a.transpose:
        rows, cols = cols, rows
    want_rows = a.lora_total if a.lora_rows is not None else (
        a.base_rows[1] - a.base_rows[0] if a.base_rows is not None else shape[0])
    ok = cols == math.prod(shape[1:]) and (rows == want_rows if want_rows is not None else
                                            rows >= a.lora_rows[1])
    if not ok:
        raise UserError(
            f"shape mismatch: LoRA module '{mod}' in {src.file} gives a delta of {rows}x{cols} but its "
            f"{a.rule} rule onto base tensor '{a.key}' {list(shape)} needs "
            f"{want_rows if want_rows is not None else '>=' + str(a.lora_rows[1])}x{math.prod(shape[1:])}"
            " (a LoRA for a different model or model family?)")


def _assemble(src: "LoraSource", found: Mapping[str, list[Alias]],
              base_shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, str], dict[str, Assembly], Counter]:
    """Plain matches {module: key}, assemblies {name: Assembly} and the modules per rule."""
    by_key: dict[str, list[tuple[str, Alias]]] = {}
    rules: Counter = Counter()
    for mod, hits in found.items():
        rules[hits[0].rule] += 1
        for a in hits:
            by_key.setdefault(a.key, []).append((mod, a))
    plain: dict[str, str] = {}
    assemblies: dict[str, Assembly] = {}
    for key, hs in by_key.items():
        if len(hs) == 1 and hs[0][1].plain:
            plain[hs[0][0]] = key
            continue
        mods = {m for m, _ in hs}
        if any(a.plain for _, a in hs):
            raise UserError(f"LoRA modules {', '.join(sorted(repr(m) for m in mods))} in {src.file} all map to "
                            f"base tensor '{key}'")
        shape = tuple(base_shapes[key])
        spans = []
        for mod, a in hs:
            _check_piece(src, mod, a, shape)
            spans.append(a.base_rows or (0, shape[0]))
        spans.sort()
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            raise UserError(f"LoRA modules {', '.join(sorted(repr(m) for m in mods))} in {src.file} overlap "
                            f"on the rows of base tensor '{key}'")
        pieces = tuple(Piece(m, a.base_rows, a.lora_rows, a.transpose)
                       for m, a in sorted(hs, key=lambda h: (h[1].base_rows or (0, 0))))
        asm = Assembly(key, shape[0], math.prod(shape[1:]), pieces, hs[0][1].rule)
        assemblies[asm.name] = asm
    return plain, assemblies, rules


def match_to_base(lora_source: LoraSource, base_keys: Sequence[str],
                  base_shapes: Mapping[str, Sequence[int]], config: Mapping | None = None) -> BaseMatch:
    """{LoRA module (as stored) -> base weight key}, by generating LoRA names from the base keys.

    Tiers (first that matches wins; two base keys for one name is an error):
    PEFT: ``base_model.model.<key minus .weight>`` (``.base_layer`` dropped), then without the base
    key's first component, then with the LoRA's first component added (e.g. ``bert.``);
    kohya: known base prefixes (``model.diffusion_model.`` -> ``lora_unet_``,
    ``cond_stage_model.transformer.`` -> ``lora_te_``, ``conditioner.embedders.0.transformer.`` ->
    ``lora_te1_``, ``text_encoder[_2].`` -> ``lora_te[12]_``, ...) with dots -> underscores, then bare
    keys under every kohya prefix; diffusers: ``<component>.<key>``.
    Every tier also generates the names of each base tensor in the other namings of P19
    (``naming.base_aliases``: LDM <-> diffusers UNet, OpenCLIP <-> HF CLIP, Flux BFL <-> diffusers),
    so q/k/v LoRAs fuse into ``in_proj_weight`` / ``qkv`` / ``linear1`` and fused LoRAs split into
    q/k/v; those base keys map from an ``Assembly`` name (``BaseMatch.assemblies``). With the base's
    ``config`` (config.json), modules that match nothing are tried under the names the installed
    transformers 5 renames the base's modules to or from (``transformers5.aliases``: a PEFT adapter
    saved under transformers 5 on a checkpoint of the original names, and the reverse).
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
    naming = detect_naming(base_keys)
    aliases = base_aliases(base_keys, base_shapes, naming)
    tiers = 2 if src.format == "kohya" else 3
    found = _scan(src, base_modules, aliases, tiers, first_components)
    if config and src.format == "peft" and {stem_of(m)[0] for m in src.modules} - set(found):
        from .transformers5 import aliases as t5_aliases
        from .transformers5_fused import aliases as split_aliases  # row splits / fusions: block LoRAs

        extra = t5_aliases(base_keys, config) + split_aliases(base_keys, base_shapes, config)
        if extra:
            aliases = list(aliases) + extra
            found = _scan(src, base_modules, aliases, tiers, first_components)
    for ck, cshape in src.base_copies.items():
        m = ck[: -len(".base_layer.weight")]
        m = m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m
        hits = [base_modules[x] for x in (m, _strip_first(m)) if x and x in base_modules]
        if not hits or tuple(base_shapes[hits[0]]) != tuple(cshape):
            raise UserError(
                f"not supported yet: {src.file} carries its own copy of base tensor '{ck}' {list(cshape)} "
                + (f"but the base has {list(base_shapes[hits[0]])} at '{hits[0]}'" if hits else "that the base lacks")
                + " (resized vocabulary?)")
    miss = sorted({stem_of(m)[0] for m in src.modules} - set(found))
    if miss and config and src.format == "peft":
        from .transformers5_fused import unsupported

        why = unsupported(miss, base_keys, config)  # a conversion that is no row split: name it
        if why:
            raise UserError(f"{src.file}: {why}")
    if miss:
        example = next(iter(base_modules), None)
        ex = _candidates(src, example, 0, first_components)[:1] if example else []
        raise UserError(
            f"{len(miss)} LoRA module(s) in {src.file} match no tensor of the base model: "
            + ", ".join(f"'{x}'" for x in miss[:5]) + (", ..." if len(miss) > 5 else "")
            + (f" (base key '{base_modules[example]}' would be '{ex[0]}')" if ex else "")
            + f"; base naming: {naming.describe()}"
            + ("" if not config or src.format != "peft" else _t5_tried(config))
            + "; is this LoRA for this base model?")
    weights: dict[str, list] = {}  # weight modules -> their matches, for _assemble
    targets: dict[str, str] = {}  # other targets (biases) -> base key
    for mod in src.modules:
        stem, tgt = stem_of(mod)
        hits = found[stem]
        plain_hit = len(hits) == 1 and hits[0].plain
        if tgt == "weight":
            if not plain_hit and not src.is_factors(mod):
                raise UserError(f"not supported yet: {src.type_name(mod)} module '{mod}' in {src.file} maps onto "
                                f"part of base tensor '{hits[0].key}' ({hits[0].rule}); only plain LoRA factors "
                                "are assembled across fused tensors - merge into a base of the LoRA's own naming")
            weights[mod] = hits
            continue
        if not plain_hit:
            raise UserError(f"not supported yet: a {tgt} delta of '{stem}' in {src.file} onto a fused base tensor "
                            f"'{hits[0].key}' ({hits[0].rule})")
        key = hits[0].key[: -len("weight")] + tgt
        if key not in base_shapes:
            if src.optional(mod):
                continue
            raise UserError(f"{src.file}: module '{stem}' adapts '{key}', which the base model lacks "
                            f"(a {tgt} delta needs a base with that tensor)")
        targets[mod] = key
    plain, assemblies, rules = _assemble(src, weights, base_shapes)
    targets.update(plain)
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
    mapping = dict(targets)
    for name, asm in assemblies.items():
        if asm.key in inv:
            raise UserError(f"LoRA modules '{inv[asm.key]}' and {', '.join(repr(m) for m in asm.modules)} in "
                            f"{src.file} all map to base tensor '{asm.key}'")
        mapping[name] = asm.key
    return BaseMatch(mapping, layouts, assemblies, naming, rules, {m: base_shapes[k] for m, k in mapping.items()})


def _t5_tried(config: Mapping) -> str:
    from .transformers5 import version

    v = version()
    return (f" (transformers {v}'s renames for {config.get('model_type')} tried too)" if v
            else " (transformers 5 renames not tried: transformers >= 5 is not installed)")


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
