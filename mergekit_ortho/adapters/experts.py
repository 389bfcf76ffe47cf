"""PEFT LoRAs on expert parameters (``target_parameters``): LoRA on an ``nn.Parameter``, e.g. the
fused MoE experts of transformers 5 (Mixtral / Qwen-MoE ``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]), seen as the deltas they are on the base's tensors.

What PEFT stores (peft 0.17+ ``lora.ParamWrapper``, checked against peft 0.21): one wrapper per
targeted parameter, named by the module that owns it; several parameters of one module nest, so
their keys read ``<module>.lora_A.weight``, ``<module>.base_layer.lora_A.weight``, ... (the key
does not name the parameter: the factor shapes do). For a 3-D parameter ``P`` [E, d1, d2] with
rank r: ``lora_A`` [r*E, in] holds expert e's A in rows ``e*r .. e*r+r``; ``lora_B`` [out, r*E]
holds expert e's B in columns ``e, e+E, e+2E, ...`` (PEFT reshapes B to [out, r, E]). The delta is

    ΔP[e] = s * B_e @ A_e              (in = d2, out = d1: PEFT's default for a 3-D parameter)
    ΔP[e] = s * (B_e @ A_e)^T          (in = d1, out = d2: modules marked ``is_transposed``)

with s = lora_alpha / r (rsLoRA: / sqrt(r)). The shapes tell the two apart; a square
parameter is read in the default orientation, as PEFT does for modules without the flag. A 2-D
parameter is a plain LoRA (ΔP = s * B @ A).

Against a base that stores experts **per expert** (``experts.{e}.w1/w3/w2`` or
``gate_proj/up_proj/down_proj``, how checkpoints are published), each base tensor gets exact
rank-r factors: rows ``j*I .. (j+1)*I`` of ``B_e`` for part j of a fused ``gate_up_proj`` (gate
then up, the rule of ``mergekit_ortho.experts``), so the LoRA merges like any plain LoRA and can
be written out as one (one module per expert). Against a base storing them **fused** (3-D
tensors), each parameter's delta is a dense [E, d1, d2] part: exact in a full merge, and no
LoRA output can hold it (refused with the usual line for parts that are not low-rank).

Spec: ../shared/specs/adapters.md P24 (kinds of parts); issue 15 (MoE expert LoRAs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import UserError
from .detect import PEFT_PREFIX
from .grouping import peft_pattern_key

TYPE_NAME = "LoRA on expert parameters (target_parameters)"


def targets(src) -> list[str]:
    cfg = getattr(src, "config", None) or {}
    return list(cfg.get("target_parameters") or []) if getattr(src, "format", "") == "peft" else []


def _path(stem: str) -> str:
    """The in-memory module path a stored module stem wraps (PEFT prefix and ``.base_layer``s off)."""
    p = stem[len(PEFT_PREFIX):] if stem.startswith(PEFT_PREFIX) else stem
    while p.endswith(".base_layer"):
        p = p[: -len(".base_layer")]
    return p.replace(".base_layer.", ".")


@dataclass(frozen=True)
class Virtual:
    """A delta on one base tensor from one stored wrapper: expert ``expert`` (None: all, fused),
    rows ``rows`` of it (None: all), ``transposed`` orientation."""
    wrapper: str
    param: str  # the parameter's in-memory path (``<module>.<name>``), PEFT's key for its patterns
    key: str
    experts: int
    rank: int
    expert: int | None
    rows: tuple[int, int] | None
    transposed: bool
    shape: tuple[int, ...]


class ExpertLora:
    """A LoraSource whose ``target_parameters`` wrappers are replaced by modules on base tensors.

    Modules named ``base_model.model.<base key minus .weight>``: plain rank-r factors on a
    per-expert base, a dense part on a fused one. Everything else is the source's."""

    kind = "lora"

    def __init__(self, source, base_shapes: Mapping[str, Sequence[int]]):
        self.source = source
        self.virtual: dict[str, Virtual] = {}
        groups: dict[str, list[str]] = {}
        for stem in source.modules:
            # a module whose weight the base has is a plain LoRA (target_modules), even when a bare
            # target_parameters name (``gate_up_proj``) would match its path too
            if self._is_target_path(_path(stem)) and (stem.endswith(".base_layer")
                                                      or _path(stem) + ".weight" not in base_shapes):
                groups.setdefault(_path(stem), []).append(stem)
        self.wrappers = {s for ss in groups.values() for s in ss}
        for path, stems in groups.items():
            self._bind(path, stems, base_shapes)
        self.modules = sorted((set(source.modules) - self.wrappers) | set(self.virtual))
        self._cache: tuple[str, object, object] | None = None

    # -- binding ------------------------------------------------------------------------------

    def _is_target_path(self, path: str) -> bool:
        for t in targets(self.source):
            mod = t.rpartition(".")[0]
            if path == mod or path.endswith("." + mod) or not mod:
                return True
        return False

    def _params(self, path: str) -> list[str]:
        out = []
        for t in targets(self.source):
            mod, _, param = t.rpartition(".")
            if path == mod or path.endswith("." + mod) or not mod:
                out.append(param)
        return sorted(set(out))

    def _rank(self, wrapper: str, key: str) -> int:
        cfg = self.source.config
        pats = cfg.get("rank_pattern") or {}
        k = peft_pattern_key(pats, key)
        return int(pats[k]) if k is not None else int(cfg.get("r") or 8)

    def _bind(self, path: str, stems: list[str], base_shapes) -> None:
        from ..experts import FUSED, _variants

        file = self.source.file
        fits: dict[str, list[tuple]] = {}
        for stem in stems:
            (ra, a_in), (b_out, rb) = self.source.stored_shapes(stem)
            fits[stem] = []
            for param in self._params(path):
                key = f"{path}.{param}"
                r = self._rank(stem, key)
                if ra % r or ra != rb:
                    continue
                experts = ra // r
                fused = next((v for v in _variants(key) if v in base_shapes), None)
                if fused is not None:
                    shape = tuple(base_shapes[fused])
                    if len(shape) == 2 and experts == 1 and shape == (b_out, a_in):
                        fits[stem].append((param, fused, r, 1, False, shape, None))
                    elif len(shape) == 3 and shape[0] == experts:
                        if (a_in, b_out) == (shape[2], shape[1]):
                            fits[stem].append((param, fused, r, experts, False, shape, None))
                        elif (a_in, b_out) == (shape[1], shape[2]):
                            fits[stem].append((param, fused, r, experts, True, shape, None))
                    continue
                per = _per_expert(path, param, experts, base_shapes, FUSED, _variants, file)
                if per is not None and per[0] == (b_out, a_in):
                    fits[stem].append((param, None, r, experts, False, None, per[1]))
                elif per is not None and per[0] == (a_in, b_out):
                    raise UserError(f"not supported yet: {file}: '{stem}' adapts '{key}' in the transposed orientation "
                                    "(is_transposed experts), which has no per-expert form; merge it into a base "
                                    "that stores the experts fused")
        done: dict[str, tuple] = {}
        while len(done) < len(stems):
            progress = False
            for stem in stems:
                if stem in done:
                    continue
                left = [f for f in fits[stem] if f[0] not in {d[0] for d in done.values()}]
                if len(left) == 1:
                    done[stem] = left[0]
                    progress = True
                elif not left:
                    self._unmatched(path, stem, base_shapes)
            if not progress:
                stem = next(s for s in stems if s not in done)
                raise UserError(f"{file}: LoRA module '{stem}' fits several expert parameters of '{path}' "
                                f"({', '.join(f[0] for f in fits[stem])}); cannot tell which it adapts")
        for stem, (param, fused, r, experts, transposed, shape, per) in done.items():
            if fused is not None:
                self.virtual[PEFT_PREFIX + fused] = Virtual(stem, f"{path}.{param}", fused, experts, r, None, None,
                                                            transposed, shape)
                continue
            for e, row in enumerate(per):
                at = 0
                for key in row:
                    rows = base_shapes[key][0]
                    self.virtual[PEFT_PREFIX + key[: -len(".weight")]] = Virtual(
                        stem, f"{path}.{param}", key, experts, r, e, (at, at + rows), False, tuple(base_shapes[key]))
                    at += rows

    def _unmatched(self, path: str, stem: str, base_shapes) -> None:
        (ra, a_in), (b_out, _) = self.source.stored_shapes(stem)
        params = self._params(path)
        near = [k for k in base_shapes if k.startswith(path.rsplit(".", 1)[0]) and "expert" in k][:2]
        raise UserError(
            f"{self.source.file}: expert LoRA module '{stem}' (A {ra}x{a_in}, B {b_out}x{ra}, r={self.source.config.get('r')}) "
            f"fits none of {', '.join(f'{path}.{p}' for p in params)} in the base"
            + (f" (the base has e.g. '{near[0]}' {list(base_shapes[near[0]])}; a different expert count or size?)"
               if near else " (the base has no such expert tensors)"))

    # -- delegation ---------------------------------------------------------------------------

    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cache = None
        self.source.close()

    def __repr__(self) -> str:
        return f"ExpertLora({self.source!r}, {len(self.virtual)} expert tensors)"

    # -- per-module facts ----------------------------------------------------------------------

    def is_factors(self, m: str) -> bool:
        v = self.virtual.get(m)
        return self.source.is_factors(m) if v is None else v.expert is not None or v.experts == 1

    def type_name(self, m: str) -> str:
        return TYPE_NAME if m in self.virtual else self.source.type_name(m)

    def dense_modules(self) -> list[str]:
        return sorted([m for m in self.virtual if not self.is_factors(m)] + list(self.source.dense_modules()))

    def one_dimensional(self, m: str) -> bool:
        # a fused [E, d1, d2] delta: nothing a LoRA output (2-D factors) can hold
        return not self.is_factors(m) if m in self.virtual else self.source.one_dimensional(m)

    def has_exact_factors(self, m: str) -> bool:
        return False if m in self.virtual else self.source.has_exact_factors(m)

    def optional(self, m: str) -> bool:
        return False if m in self.virtual else self.source.optional(m)

    def needs_base(self, m: str) -> bool:
        return False if m in self.virtual else self.source.needs_base(m)

    def rank(self, m: str) -> int:
        v = self.virtual.get(m)
        return self.source.rank(m) if v is None else v.rank

    def alpha(self, m: str) -> float:
        v = self.virtual.get(m)
        if v is None:
            return self.source.alpha(m)
        cfg = self.source.config
        pats = cfg.get("alpha_pattern") or {}
        k = peft_pattern_key(pats, v.param)
        if k is not None:
            return float(pats[k])
        return float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else float(v.rank)

    def uses_rslora(self, m: str) -> bool:
        return bool(self.source.config.get("use_rslora")) if m in self.virtual else self.source.uses_rslora(m)

    def scale(self, m: str) -> float:
        if m not in self.virtual:
            return self.source.scale(m)
        r, a = self.rank(m), self.alpha(m)
        return a / math.sqrt(r) if self.uses_rslora(m) else a / r

    def layout(self, m: str) -> str:
        if m not in self.virtual:
            return self.source.layout(m)
        return "linear" if self.is_factors(m) else "dense"

    def stored_shapes(self, m: str):
        v = self.virtual.get(m)
        if v is None:
            return self.source.stored_shapes(m)
        if self.is_factors(m):
            rows = v.rows[1] - v.rows[0] if v.rows else v.shape[0]
            return (v.rank, v.shape[1]), (rows, v.rank)
        return self.source.stored_shapes(v.wrapper)

    def factor_shapes(self, m: str, layout: str | None = None):
        v = self.virtual.get(m)
        if v is None:
            return self.source.factor_shapes(m, layout)
        if self.is_factors(m):
            return self.stored_shapes(m)
        rows, cols = v.shape[0], math.prod(v.shape[1:])
        return (min(rows, cols), cols), (rows, min(rows, cols))

    def num_params(self) -> int:
        return self.source.num_params()

    # -- tensors ------------------------------------------------------------------------------

    def _stored(self, wrapper: str):
        import torch

        if self._cache is None or self._cache[0] != wrapper:
            roles = self.source._keys[wrapper]
            a = self.source.read(roles["A"]).to(torch.float32)
            b = self.source.read(roles["B"]).to(torch.float32)
            self._cache = (wrapper, a, b)
        return self._cache[1], self._cache[2]

    def _expert_factors(self, v: Virtual):
        """(A_e [r, in], B_e [out, r]) of expert ``v.expert`` as stored (unscaled)."""
        a, b = self._stored(v.wrapper)
        e, r, n = v.expert or 0, v.rank, v.experts
        return a[e * r:(e + 1) * r], b[:, e::n]

    def factors(self, m: str, fold: str = "B", layout: str | None = None):
        v = self.virtual.get(m)
        if v is None:
            return self.source.factors(m, fold, layout)
        if not self.is_factors(m):
            raise RuntimeError(f"'{m}' of {self.source.file} is a dense expert delta, not LoRA factors")
        A, B = self._expert_factors(v)
        if v.rows is not None:
            B = B[v.rows[0]:v.rows[1]]
        A, B = A.contiguous(), B.contiguous()
        s = self.scale(m)
        if fold == "B":
            return A, B * s
        if fold == "sqrt":
            q = math.sqrt(abs(s))
            return A * q, B * (q if s >= 0 else -q)
        raise ValueError(f"fold must be 'B' or 'sqrt', not {fold!r}")

    def delta(self, m: str, shape: Sequence[int] | None = None, layout: str | None = None, base=None):
        v = self.virtual.get(m)
        if v is None:
            return self.source.delta(m, shape, layout, base)
        if self.is_factors(m):
            A, B = self.factors(m)
            d = B @ A
        else:
            a, b = self._stored(v.wrapper)
            n, r = v.experts, v.rank
            d = b.reshape(b.shape[0], r, n).permute(2, 0, 1) @ a.reshape(n, r, a.shape[1])  # [E, out, in]
            if v.transposed:
                d = d.transpose(1, 2)
            d = (d * self.scale(m)).contiguous()
        return d.reshape(tuple(shape)) if shape is not None else d


def _per_expert(path: str, param: str, experts: int, base_shapes, fused_table, variants, file):
    """((rows, cols) of the stacked per-expert matrix, [[base key per part] per expert]) for the
    fused parameter ``path.param`` in a per-expert base, else None. The expert count must agree."""
    if not path.endswith(".experts") or param not in fused_table:
        return None
    prefix = path[: -len(".experts")]
    for variant in variants(prefix):
        for parts in fused_table[param]:
            first = [f"{variant}.experts.0.{p}.weight" for p in parts]
            if not all(k in base_shapes for k in first):
                continue
            count = 0
            while f"{variant}.experts.{count}.{parts[0]}.weight" in base_shapes:
                count += 1
            if count != experts:
                raise UserError(f"{file}: expert count mismatch: the LoRA on '{path}.{param}' has {experts} experts but the "
                                f"base has {count} under '{variant}.experts'; is this LoRA for this base model?")
            names = [[f"{variant}.experts.{e}.{p}.weight" for p in parts] for e in range(experts)]
            shapes = [tuple(base_shapes[k]) for row in names for k in row]
            if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
                return None
            rows = sum(base_shapes[k][0] for k in names[0])
            if any(sum(base_shapes[k][0] for k in row) != rows for row in names):
                return None
            return (rows, shapes[0][1]), names
    return None


class _Only:
    """``src`` with only ``modules`` shown, for matching the plain modules by name."""

    def __init__(self, src, modules):
        self._src, self.modules = src, modules

    def __getattr__(self, name):
        return getattr(self._src, name)


def match_with_experts(source, base_keys: Sequence[str], base_shapes: Mapping[str, Sequence[int]],
                       config: Mapping | None = None):
    """(source to bind, BaseMatch): ``keymap.match_to_base`` for every LoRA; a LoRA with
    ``target_parameters`` is first seen as an :class:`ExpertLora` whose expert modules map to
    the base tensors they change (fused or per expert)."""
    from collections import Counter

    from .keymap import BaseMatch, match_to_base

    if not targets(source):
        return source, match_to_base(source, base_keys, base_shapes, config)
    view = ExpertLora(source, base_shapes)
    plain = match_to_base(_Only(view, [m for m in view.modules if m not in view.virtual]), base_keys, base_shapes,
                          config)
    mapping = dict(plain)
    mapping.update({m: v.key for m, v in view.virtual.items()})
    rules = Counter(dict(plain.rules))
    rules["onto expert tensors (target_parameters)"] += len(view.virtual)
    shapes = dict(plain.shapes)
    shapes.update({m: tuple(base_shapes[v.key]) for m, v in view.virtual.items()})
    return view, BaseMatch(mapping, plain.layouts, plain.assemblies, plain.naming, rules, shapes)


def refuse_without_base(source) -> None:
    if targets(source):
        raise UserError(f"{source.file}: a LoRA on expert parameters (target_parameters) is matched to the expert "
                        "tensors of its base model; set base_model")


def expert_output_format(fmt: str, loras) -> str:
    """Expert LoRAs merge to full checkpoints by default (``auto`` becomes ``full``); a PEFT output
    (``target_parameters`` again, ``experts_out``) is written on request; kohya / bundle outputs
    have no form for them."""
    src = next((s for s in loras if targets(s)), None)
    if src is None:
        return fmt
    if fmt in ("kohya", "bundle"):
        raise UserError(f"output.format {fmt} has no form for {src.file}, a LoRA on expert parameters "
                        "(target_parameters); use output.format full or peft")
    return "full" if fmt == "auto" else fmt


def check_lora_output(loras, fmt: str) -> None:
    """A PEFT output needs per-expert factors: a base storing experts fused gives dense deltas."""
    if fmt != "peft":
        return
    for m in loras:
        virtual = getattr(m.source, "virtual", None) or {}
        dense = next((v for v in virtual.values() if v.expert is None and v.experts > 1), None)
        if dense is not None:
            raise UserError(f"not supported yet: output.format peft for {m.ref} on a base that stores the experts "
                            f"fused ('{dense.key}' {list(dense.shape)}): merge into the per-expert checkpoint the "
                            "model is published as, or use output.format full")


def describe(src) -> dict | None:
    """What `merge inspect` says of an adapter's expert modules (header only), else None: the
    targeted parameters, how many wrappers, experts per wrapper (rows of A / r), rank and scale."""
    names = targets(src)
    if not names:
        return None
    view = ExpertLora.__new__(ExpertLora)
    view.source = src
    wrappers = [m for m in src.modules if view._is_target_path(_path(m))]
    cfg = src.config
    r = int(cfg.get("r") or 8)
    alpha = float(cfg["lora_alpha"]) if cfg.get("lora_alpha") is not None else float(r)
    experts = sorted({src.stored_shapes(m)[0][0] // r for m in wrappers})
    return {"target_parameters": sorted(names), "wrappers": wrappers, "experts": experts, "rank": r,
            "scale": round(alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r, 6)}
