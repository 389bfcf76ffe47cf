"""A merged LoRA on expert parameters written back in PEFT's ``target_parameters`` form.

The merge works on per-expert base tensors (``adapters.experts``): each ``experts.{e}.<part>``
weight gets canonical factors (A [r_p, in], B [rows_p, r_p], scale folded, so ΔW = B @ A). For
PEFT each targeted parameter ``P`` [E, out, in] needs one ``lora_A`` [r*E, in] and one ``lora_B``
[out, r*E] (``adapters.experts``: expert e's A in rows ``e*r ..``, its B in columns ``e, e+E, ..``)
with one rank r for every expert. Per expert, the parts (gate then up of a fused ``gate_up_proj``)
are joined exactly: when they share A (one LoRA, or a concatenating merge of several), A is kept
and the Bs stacked by rows (rank r_p); otherwise A = [A_gate; A_up] and B block-diagonal (rank
r_gate + r_up). Experts of lower rank are padded with zero rows of A and zero columns of B, which
adds nothing. The output has scale 1: ``rank_pattern`` / ``alpha_pattern`` give a parameter whose
rank differs from the file's ``r`` alpha = its rank. Nesting (``<module>.base_layer.lora_A``) is
kept from the input, since PEFT nests the wrappers of one module in the module's parameter order.

Spec: ../shared/specs/adapters.md P24; issue 15 (expert LoRAs to PEFT, where exact).
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence


def _virtuals(sources) -> dict[str, object]:
    """{base key: experts.Virtual} over the matched sources (the first source naming a key wins)."""
    out: dict[str, object] = {}
    for src in sources:
        virtual = getattr(src, "virtual", None) or {}
        for key, module in src.by_base.items():
            v = virtual.get(module)
            if v is not None and key not in out:
                out[key] = v
    return out


def _join(parts: list[tuple[tuple[int, int], object, object]], rows: int):
    """(A, B) of one expert's whole parameter from its parts' (rows, A, B)."""
    import torch

    As = [a for _, a, _ in parts]
    if all(a.shape == As[0].shape and torch.equal(a, As[0]) for a in As):
        A = As[0]
        B = torch.zeros(rows, A.shape[0], dtype=torch.float32)
        for (lo, hi), _, b in parts:
            B[lo:hi] = b
        return A, B
    A = torch.cat(As, 0)
    B = torch.zeros(rows, A.shape[0], dtype=torch.float32)
    at = 0
    for (lo, hi), a, b in parts:
        B[lo:hi, at:at + a.shape[0]] = b
        at += a.shape[0]
    return A, B


def split_expert_modules(modules: Mapping[str, tuple], sources: Sequence, dtype):
    """(the other modules, PEFT tensors of the expert parameters, their config fields).

    ``modules``: {base key: (A, B)} as the LoRA sink collected them; the per-expert base keys of
    expert LoRAs are taken out and packed per parameter."""
    import torch

    virtual = _virtuals(sources)
    mine = {k: v for k, v in virtual.items() if k in modules}
    if not virtual:
        return dict(modules), {}, {}
    groups: dict[str, list] = {}
    for key, v in mine.items():
        groups.setdefault(v.param, []).append((key, v))
    every = {}
    for v in virtual.values():
        every.setdefault(v.param, v)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for param, members in sorted(groups.items()):
        v0 = members[0][1]
        experts = v0.experts
        rows = max(v.rows[1] for _, v in members)
        cols = modules[members[0][0]][0].shape[1]
        per: list[list] = [[] for _ in range(experts)]
        for key, v in members:
            A, B = modules[key]
            if A.shape[0]:
                per[v.expert].append((v.rows, A.to(torch.float32), B.to(torch.float32)))
        joined = [_join(sorted(p, key=lambda t: t[0]), rows) if p else None for p in per]
        r = max((a.shape[0] for a in (j[0] for j in joined if j is not None)), default=0)
        if r == 0:
            continue
        lora_a = torch.zeros(r * experts, cols, dtype=torch.float32)
        lora_b = torch.zeros(rows, r * experts, dtype=torch.float32)
        for e, j in enumerate(joined):
            if j is None:
                continue
            A, B = j
            lora_a[e * r:e * r + A.shape[0]] = A
            lora_b[:, e:e + experts * A.shape[0]:experts] = B
        stem = v0.wrapper
        tensors[f"{stem}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{stem}.lora_B.weight"] = lora_b.to(dtype).contiguous()
        ranks[param] = r
    names = sorted({t for s in sources for t in ((getattr(s, "config", None) or {}).get("target_parameters") or [])})
    rest = {k: m for k, m in modules.items() if k not in mine}
    return rest, tensors, {"ranks": ranks, "target_parameters": names or sorted(every)}


def merge_config(cfg: dict, expert_cfg: dict, had_plain: bool) -> dict:
    """The config of ``lora_out.to_peft`` with the expert parameters added (scale 1 throughout)."""
    if not expert_cfg:
        return cfg
    ranks = expert_cfg["ranks"]
    cfg = dict(cfg)
    if not had_plain and ranks:
        counts = Counter(ranks.values())
        r0 = max(counts, key=lambda r: (counts[r], r))
        cfg["r"] = cfg["lora_alpha"] = r0
        cfg["target_modules"] = None  # PEFT accepts none when target_parameters are set
        cfg["rank_pattern"], cfg["alpha_pattern"] = {}, {}
    rp, ap = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    for param, r in sorted(ranks.items()):
        if r != cfg["r"]:
            rp[param] = r
        if r != cfg["lora_alpha"]:
            ap[param] = r
    cfg.update({"rank_pattern": rp, "alpha_pattern": ap, "target_parameters": expert_cfg["target_parameters"],
                "lora_dropout": 0.0, "fan_in_fan_out": False})
    return cfg

