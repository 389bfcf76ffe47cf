"""The one streaming pass of `merge analyze`: a plan's merged items, tensor by tensor.

Each item's task vectors come through :mod:`..inputs` (the only place stored things become float
inputs: dtype conversion, the recipe's ``dtype`` rounding, LoRA / LyCORIS / DoRA deltas,
vocabulary alignment), float32, the base subtracted; at most the base plus one tensor per model
are held at once, as in a merge step. Statistics (:mod:`.stats`) are kept per tensor and summed
per layer, per module kind (:mod:`.names`) and over the whole model. A model that is the base
itself (mergekit lists the base among a linear merge's inputs) has a zero task vector and is
left out.

Top-energy share of a 2-D tensor: its q = max(1, min(top_rank, min(m, n) // 8)) largest singular
directions (:func:`top_directions`).

Density of the TIES statistics: the recipe's resolved per-tensor, per-model ``density`` where the
recipe sets one, else :data:`.stats.DEFAULT_DENSITY`; weights likewise (default 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from . import stats
from .names import group_of, layer_key, layer_sort_key


@dataclass
class Totals:
    """Additive sums over a set of tensors: squared norms, dot products, TIES counts, energies."""

    sq: dict = field(default_factory=dict)  # label -> sum ||t||^2
    dots: dict = field(default_factory=dict)  # (a, b) -> sum <t_a, t_b>
    conflict: stats.Conflict = field(default_factory=stats.Conflict)
    top: dict = field(default_factory=dict)  # label -> energy in the top-q directions (2-D tensors)
    total2d: dict = field(default_factory=dict)  # label -> energy of the 2-D tensors
    tensors: int = 0

    def add(self, o: "Totals") -> None:
        for d, od in ((self.sq, o.sq), (self.dots, o.dots), (self.top, o.top), (self.total2d, o.total2d)):
            for k, v in od.items():
                d[k] = d.get(k, 0.0) + v
        self.conflict.add(o.conflict)
        self.tensors += o.tensors

    def summary(self, labels: list[str]) -> dict:
        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
        c = self.conflict
        return {
            "tensors": self.tensors,
            "norm": {m: math.sqrt(self.sq[m]) for m in labels if m in self.sq},
            "cosine": {f"{a}|{b}": stats.cosine(self.dots[(a, b)], self.sq[a], self.sq[b])
                       for a, b in pairs if (a, b) in self.dots},
            "sign_conflict": c.rate,
            "dropped_mass": c.dropped_mass,
            "mask_overlap": {f"{a}|{b}": _ratio(c.inter.get((a, b)), c.union.get((a, b))) for a, b in pairs
                             if (a, b) in c.union},
            "top_energy": {m: _ratio(self.top.get(m), self.total2d.get(m)) for m in labels if m in self.total2d},
        }


def _ratio(a, b):
    return a / b if a is not None and b else None


def analyze_plan(plan, density: float | None = None, top_rank: int = stats.DEFAULT_TOP_RANK,
                 on_tensor: Callable[[str, int], None] | None = None) -> dict:
    """Stream every merged item of ``plan``; returns the statistics (JSON-ready)."""
    import torch

    loras = plan.lora_models
    if plan.base is None and any(not m.is_lora for m in plan.models):
        raise UserError(f"merge analyze needs a base model: task vectors are relative to it "
                        f"(set base_model in the recipe, or --base); method '{plan.op.name}' was planned without one")
    labels = [m.label for m in plan.models if plan.base is None or m.source is not plan.base.source]
    skipped = [m.label for m in plan.models if m.label not in labels]
    set_density = _recipe_sets(plan.recipe, "density")
    set_weight = _recipe_sets(plan.recipe, "weight")
    per_tensor, by_layer, by_kind, overall = [], {}, {}, Totals()
    names = plan.module_keys if plan.module_mode else [n for n, i in plan.items.items() if i.action == "merge"]
    with torch.no_grad():
        for name in names:
            vectors, params = _task_vectors(plan, name, labels)
            dens = [density if density is not None else
                    (float(p.get("density", stats.DEFAULT_DENSITY)) if set_density else stats.DEFAULT_DENSITY)
                    for p in params.values()]
            weights = [p.get("weight", 1.0) if set_weight else 1.0 for p in params.values()]
            t = _tensor_totals(vectors, dens, weights, top_rank)
            shape = list(next(iter(vectors.values())).shape) if vectors else []
            del vectors
            row = {"name": name, "layer": layer_key(name), "kind": group_of(name), "shape": shape,
                   "density": sorted(set(dens)), **t.summary(labels)}
            per_tensor.append(row)
            for key, groups in ((row["layer"], by_layer), (row["kind"], by_kind)):
                groups.setdefault(key, Totals()).add(t)
            overall.add(t)
            if on_tensor:
                on_tensor(name, plan.items[name].read_bytes if name in plan.items else 0)
    return {
        "models": labels,
        "left_out": skipped,
        "density": density if density is not None else ("recipe" if set_density else stats.DEFAULT_DENSITY),
        "top_rank": top_rank,
        "overall": overall.summary(labels),
        "by_layer": {k: by_layer[k].summary(labels) for k in sorted(by_layer, key=layer_sort_key)},
        "by_kind": {k: v.summary(labels) for k, v in by_kind.items()},
        "tensors": per_tensor,
        "loras": lora_facts(plan) if loras else {},
    }


def _recipe_sets(recipe, name: str) -> bool:
    from ..recipe import parameter_levels

    return any(name in (mp or {}) for _, mp, _ in parameter_levels(recipe))


def _tensor_totals(vectors: dict, densities: list[float], weights: list[float], top_rank: int) -> Totals:
    t = Totals(tensors=1)
    labels = list(vectors)
    ts = [vectors[m].reshape(-1) for m in labels]
    g = stats.gram(ts)
    for i, a in enumerate(labels):
        t.sq[a] = g[i][i]
        for j in range(i + 1, len(labels)):
            t.dots[(a, labels[j])] = g[i][j]
    c = stats.sign_conflict(ts, densities, weights)
    c.inter = {(labels[i], labels[j]): v for (i, j), v in c.inter.items()}
    c.union = {(labels[i], labels[j]): v for (i, j), v in c.union.items()}
    t.conflict = c
    if top_rank > 0:
        for m in labels:
            x = vectors[m]
            if x.dim() == 2 and min(x.shape) > 1:
                t.top[m], t.total2d[m] = stats.top_energy(x, top_directions(x.shape, top_rank))
    return t


def top_directions(shape, top_rank: int) -> int:
    """q of a 2-D tensor's top-energy share: ``top_rank``, at most an eighth of its rank bound
    (at least 1), so that the share stays informative on small matrices."""
    return max(1, min(top_rank, min(shape) // 8))


def _task_vectors(plan, name: str, labels: list[str]):
    """{label: task vector (float32)} of item ``name`` and {label: its model parameters}."""
    import torch

    from ..inputs import aligned_inputs, base_tensor, model_tensor
    from ..planning import TIED_HEADS, VOCABULARY_TENSORS

    cdt = torch.float32
    given = plan.params_for(name)
    if plan.module_mode:
        shape = plan.module_shapes[name]
        base = plan.base.source.get(name).to(cdt) if plan.base is not None else None
        out, params = {}, {}
        for m, p in zip(plan.models, given.models):
            if m.label not in labels:
                continue
            if m.is_lora:
                mod = m.source.by_base.get(name)
                x = (m.source.delta_for(name, shape, base=base).to(cdt) if mod is not None else torch.zeros(shape))
            else:
                x = m.source.get(name).to(cdt) - base
            out[m.label], params[m.label] = x.reshape(shape[0], -1), p
        return out, params
    item = plan.items[name]
    base_source, sources = plan.sources_of(name)
    if base_source is None:  # the operator does not read the base (linear): the analysis does
        bname = name if name in plan.base.source.infos else next(
            (e for e in TIED_HEADS.get(name, ()) if e in plan.base.source.infos), None)
        if bname is None:
            raise UserError(f"tensor '{name}' is missing from the base model {plan.base.ref}")
        base_source = (plan.base, bname)
    chosen = [(k, s) for k, s in enumerate(sources) if s[0].label in labels]
    params = {s[0].label: given.models[k] for k, s in chosen}
    if plan.vocab is not None and name in VOCABULARY_TENSORS:
        base, weights = aligned_inputs(plan, name, base_source, [s for _, s in chosen], cdt)
        return {s[0].label: w for (_, s), w in zip(chosen, weights(True))}, params
    base = base_tensor(plan, base_source, cdt)
    out = {m.label: model_tensor(m, n, item.shape, base, "deltas", cdt, plan.device, load_dtype=plan.load_dtype)
           for _, (m, n) in chosen}
    return out, params


def lora_facts(plan) -> dict:
    """Per LoRA input: rank and scale counts, total delta energy, and the mean share of each
    module's energy in its largest singular direction (exact, from the factors)."""
    from collections import Counter

    out = {}
    for m in plan.lora_models:
        src = m.source
        ranks, scales, energy, top, n, other = Counter(), Counter(), 0.0, 0.0, 0, Counter()
        for key, mod in src.by_base.items():
            if not src.is_factors(mod):
                other[src.type_name(mod)] += 1
                continue
            A, B = src.factors_for(key)  # the scale folded into B
            facts = stats.lora_module(A, B, 1.0)
            ranks[facts.rank] += 1
            scales[round(float(src.scale(mod)), 6)] += 1
            energy += facts.energy
            top += facts.top_energy
            n += 1
        out[m.label] = {"modules": n, "ranks": {str(k): v for k, v in sorted(ranks.items())},
                        "scales": {str(k): v for k, v in sorted(scales.items())}, "energy": energy,
                        "norm": math.sqrt(energy), "mean_top1_energy": top / n if n else None,
                        "other_types": dict(other)}
    return out
