"""`merge resize`: a LoRA re-factorised to a fixed or a dynamic rank, with sd-scripts' rules.

Spec: ../shared/specs/adapters.md P21 (``resize_lora.py``), P25 (resize dynamic rank), P10/P11
(kohya layout), P24 (outputs); the one-alpha rule of ``lora_out`` (issue 19).

Math, per module (streamed: one module's factors in memory at a time)
--------------------------------------------------------------------
D = s * B_stored @ A_stored is the module's delta (canonical factors of ``adapters.lora``: conv
kernels flattened to ``[out, in*kh*kw]``). Its SVD is computed exactly from the factors (QR of each
factor, SVD of the r x r core, float64), never by densifying. The singular values kohya ranks are
those of the *unscaled* product M = D / s, padded with zeros to min(out, in*kh*kw) as kohya's full
SVD of M gives them. The new rank k (kohya's rules exactly, P21):

* fixed ``--rank R``: k = R (``--conv-rank`` for every module whose stored down is 4-D, 1x1 too);
* dynamic: idx = #{S_i > S_0/t} (``sv_ratio``), searchsorted_left(cumsum(S)/sum S, t) + 1
  (``sv_cumulative``), searchsorted_left(cumsum(S^2)/sum S^2, t^2) + 1 (``sv_fro``); idx is clamped
  to [1, len(S) - 1] and k = idx + 1, capped at ``--rank`` / ``--conv-rank`` when given;
* S_0 <= 1e-6 (a zero module): k = 1.

One deviation, which changes no delta: k is also capped at the module's input rank r (kohya pads
such a module with zero singular values; a module with k = r keeps its own factors, so resizing to
a rank >= the input rank is exact). Output factors as kohya writes them: up = U_k diag(S_k),
down = V_k^T (conv: down ``[k, in, kh, kw]``, up ``[out, k, 1, 1]``), alpha = s * k, so the module's
effective scale is unchanged. With ``alpha_mode="uniform"`` (the default) the file gets one alpha,
the most common of those, and the other modules carry alpha_m / alpha in their factors
(``lora_out.fold_alpha``): exact, and what diffusers needs (``lora_out``'s docstring). PEFT inputs
give a PEFT output with the scale folded (alpha = r per module through rank/alpha patterns).

Report per module: rank in -> out, alpha, the retained Frobenius fraction ||S_:k|| / ||S|| and the
relative error ||S_k:|| / ||S|| (both exact: they come from the same SVD).
Metadata (kohya output): the input's, with ``ss_training_comment`` prefixed as sd-scripts does,
``ss_network_dim`` / ``ss_network_alpha`` updated, and the ``sshs_*`` hashes recomputed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from ..errors import UserError

RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # kohya: a module whose largest singular value is below this becomes rank 1


@dataclass(frozen=True)
class ResizeOptions:
    rank: int | None = None
    rule: str | None = None
    threshold: float | None = None
    conv_rank: int | None = None
    alpha_mode: str = "uniform"  # "uniform" (one alpha, factors folded) | "kohya" (alpha = s * k per module)
    out_dtype: str | None = None  # default: the input's

    def check(self) -> None:
        for name, v in (("--rank", self.rank), ("--conv-rank", self.conv_rank)):
            if v is not None and v <= 0:
                raise UserError(f"{name} must be a positive integer, not {v}")
        if self.rule is None:
            if self.rank is None:
                raise UserError("resize needs --rank R or --rule sv_ratio|sv_fro|sv_cumulative --threshold X")
            if self.threshold is not None:
                raise UserError("--threshold goes with --rule; with --rank alone the rank is fixed")
            return
        if self.rule not in RULES:
            raise UserError(f"--rule must be one of {', '.join(RULES)}, not '{self.rule}'")
        if self.threshold is None or not math.isfinite(self.threshold):
            raise UserError(f"--rule {self.rule} needs --threshold X (a finite number)")
        if self.rule == "sv_ratio" and self.threshold <= 0:
            raise UserError(f"--threshold for sv_ratio must be > 0 (keep S_i > S_0 / t), not {self.threshold}")
        if self.rule != "sv_ratio" and not 0 < self.threshold <= 1:
            raise UserError(f"--threshold for {self.rule} must be in (0, 1], not {self.threshold}")
        if self.alpha_mode not in ("uniform", "kohya"):
            raise UserError(f"alpha mode must be uniform or kohya, not '{self.alpha_mode}'")


def select_rank(S, cap: int | None, rule: str | None, threshold: float | None) -> int:
    """kohya's new rank for singular values ``S`` (descending, float, all min(out, in) of them)."""
    import torch

    S = torch.as_tensor(S, dtype=torch.float64)
    if S.numel() == 0 or float(S[0]) <= MIN_SV:
        return 1
    if rule is None:
        assert cap is not None
        return int(cap)
    n = S.numel()
    if rule == "sv_ratio":
        idx = int((S > S[0] / threshold).sum())
    elif rule == "sv_cumulative":
        c = torch.cumsum(S, 0) / S.sum()
        idx = int(torch.searchsorted(c, torch.tensor([float(threshold)], dtype=torch.float64))[0]) + 1
    elif rule == "sv_fro":
        s2 = S * S
        c = torch.cumsum(s2, 0) / s2.sum()
        idx = int(torch.searchsorted(c, torch.tensor([float(threshold) ** 2], dtype=torch.float64))[0]) + 1
    else:
        raise ValueError(rule)
    k = min(max(idx, 1), max(n - 1, 1)) + 1
    return min(k, cap) if cap is not None else k


def core_svd(A, B):
    """Exact thin SVD of B @ A from the factors: (U [rows, r], S [r], Vh [r, cols]), float64."""
    import torch

    qb, rb = torch.linalg.qr(B.to(torch.float64))
    qa, ra = torch.linalg.qr(A.to(torch.float64).t())
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    return qb @ u, s, vh @ qa.t()


@dataclass
class ModuleResize:
    """One module's result: canonical factors (A [k, cols], B [rows, k], scale folded into B) and
    the kohya alpha s * k (the stored product is then B @ A / s)."""
    A: object
    B: object
    scale: float
    report: dict


def resize_module(A, B, scale: float, cap: int | None, rule: str | None, threshold: float | None) -> ModuleResize:
    """Resize one module given its canonical factors (scale folded into B) and its scale s."""
    import torch

    r, cols = A.shape
    rows = B.shape[0]
    U, S, Vh = core_svd(A, B)
    full = min(rows, cols)
    S = S[:full]
    s_m = S / abs(scale) if scale != 0 else torch.zeros_like(S)  # kohya ranks M = up @ down (unscaled)
    padded = torch.cat([s_m, torch.zeros(max(full - S.numel(), 0), dtype=S.dtype)])
    k = min(select_rank(padded, cap, rule, threshold), r)
    total = float((S * S).sum())
    kept = float((S[:k] * S[:k]).sum())
    rest = float((S[k:] * S[k:]).sum())
    if k == r:  # nothing to cut: the module keeps its own factors (exact)
        A2, B2 = A.to(torch.float32), B.to(torch.float32)
        rest, kept = 0.0, total
    else:
        A2 = Vh[:k].to(torch.float32).contiguous()
        B2 = (U[:, :k] * S[:k]).to(torch.float32).contiguous()
    report = {
        "rank_in": int(r), "rank_out": int(k), "alpha_out": float(scale * k),
        "fro_retained": math.sqrt(kept / total) if total > 0 else 1.0,
        "rel_error": math.sqrt(rest / total) if total > 0 else 0.0,
    }
    return ModuleResize(A2, B2, float(scale), report)


def tool_metadata(command: str) -> dict[str, str]:
    """The marker that lets ``--overwrite`` replace our own output (``placement.written_by_us``)."""
    from .. import __version__

    return {"merge_tool": f"mergekit-ortho {__version__}", "merge_method": command}


def _comment(opts: ResizeOptions, meta: dict) -> str:
    old = meta.get("ss_network_dim")
    comment = meta.get("ss_training_comment", "")
    if opts.rule is None:
        conv = "" if opts.conv_rank in (None, opts.rank) else f" (conv: {opts.conv_rank})"
        return f"dimension is resized from {old} to {opts.rank}{conv}; {comment}"
    return f"Dynamic resize with {opts.rule}: {opts.threshold} from {old}; {comment}"


def _kohya_pack(src, mods: dict, opts: ResizeOptions, dtype):
    """(tensors, metadata) for a kohya output: kohya's factors, one alpha (or kohya's per module)."""
    import torch

    from ..lora_out import _out, common_alpha, fold_alpha, kohya_hashes, stored_alpha

    alphas = {m: r.scale * r.A.shape[0] for m, r in mods.items()}
    common = stored_alpha(common_alpha(alphas.values()), dtype) if opts.alpha_mode == "uniform" else None
    if common == 0:  # every module has alpha 0 (a zero LoRA): keep kohya's per-module alphas
        common = None
    tensors: dict[str, torch.Tensor] = {}
    for m in sorted(mods):
        res = mods[m]
        k = res.A.shape[0]
        sa, sb = src.stored_shapes(m)
        up = res.B / res.scale if res.scale != 0 else torch.zeros_like(res.B)  # kohya: up @ down = M
        down = res.A
        alpha = alphas[m]
        if common is not None:
            down, up = fold_alpha(down, up, alpha, common)
            alpha = common
        if len(sa) == 4:
            down, up = down.reshape(k, *sa[1:]), up.reshape(sb[0], k, 1, 1)
        tensors[f"{m}.lora_down.weight"] = _out(down, dtype, f"{m}.lora_down.weight")
        tensors[f"{m}.lora_up.weight"] = _out(up, dtype, f"{m}.lora_up.weight")
        tensors[f"{m}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    meta = {k: v for k, v in src.metadata.items() if not k.startswith("sshs_")}
    meta.update(tool_metadata("resize"))
    meta["ss_training_comment"] = _comment(opts, src.metadata)
    if opts.rule is None:
        meta["ss_network_dim"] = str(opts.rank)
        last = alphas[sorted(mods)[-1]] if mods else 0.0
        meta["ss_network_alpha"] = str(float(common if common is not None else last))
    else:
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = str(float(common)) if common is not None else "Dynamic"
    meta.update(kohya_hashes(tensors, meta))
    return tensors, meta


def _peft_pack(src, mods: dict, dtype):
    from ..lora_out import to_peft
    from .detect import PEFT_PREFIX

    prefix = PEFT_PREFIX if all(m.startswith(PEFT_PREFIX) for m in mods) else ""
    keyed, shapes, layouts = {}, {}, {}
    for m, res in mods.items():
        key = m[len(prefix):] + ".weight"
        keyed[key] = (res.A, res.B)
        sa, sb = src.stored_shapes(m)
        layouts[key] = src.layout(m)
        if layouts[key] == "conv":
            shapes[key] = (sb[0], *sa[1:])
    cfg = src.config
    keep = {k: cfg[k] for k in ("task_type", "base_model_name_or_path", "revision") if k in cfg}
    tensors, config = to_peft(keyed, keep.get("base_model_name_or_path"), shapes=shapes, layouts=layouts, dtype=dtype,
                              task_type=keep.get("task_type"), prefix=prefix)
    if "revision" in keep:
        config["revision"] = keep["revision"]
    return tensors, {"format": "pt", **tool_metadata("resize")}, config


def report_path(target: Path) -> Path:
    """Where the report of a single-file output goes (directories hold merge_report.json)."""
    return target.with_suffix(".report.json")


def resize(adapter: str | Path, out: str | Path, opts: ResizeOptions, *, overwrite: bool = False,
           force_replace: bool = False, on_module: Callable[[str, dict], None] | None = None) -> dict:
    """Resize ``adapter`` into ``out`` (the input's format); returns the report (also written)."""
    from ..dtypes import torch_dtype
    from ..sinks import Adapter, json_safe
    from .detect import detect_lora
    from .lora import LoraSource

    opts.check()
    adapter, out = Path(adapter), Path(out)
    if not adapter.exists():
        raise UserError(f"{adapter}: no such file or directory")
    if detect_lora(adapter) is None:
        raise UserError(f"{adapter} is not a LoRA adapter (no adapter_config.json, no LoRA tensor names); "
                        "resize reads kohya and PEFT LoRA files")
    src = LoraSource(adapter)
    if src.format not in ("kohya", "peft"):
        raise UserError(f"{adapter}: resize reads kohya and PEFT LoRAs, not {src.format}-format files")
    first = src.stored_shapes(src.modules[0]) if src.modules else None
    if first is None:
        raise UserError(f"{adapter}: holds no LoRA modules")
    dtype = torch_dtype(opts.out_dtype) if opts.out_dtype else _stored_dtype(src)
    head = {"command": "resize", "input": str(adapter), "format": src.format, "rank": opts.rank,
            "rule": opts.rule, "threshold": opts.threshold, "conv_rank": opts.conv_rank,
            "alpha_mode": opts.alpha_mode if src.format == "kohya" else "folded (scale 1)"}
    mods: dict[str, ModuleResize] = {}

    def pack(_factors):
        if src.format == "kohya":
            t, meta = _kohya_pack(src, mods, opts, dtype)
            return t, meta, None
        return _peft_pack(src, mods, dtype)

    sink = Adapter(out, src.format, pack, report_head=head, overwrite=overwrite, inputs=[adapter],
                   force_replace=force_replace)
    side = report_path(out) if sink.single_file else None
    if side is not None and side.exists() and not (overwrite or force_replace):
        raise UserError(f"{side} exists (the report of {out.name}); pass --overwrite to replace it")
    reports: dict[str, dict] = {}
    with sink:
        for m in src.modules:
            sa, _ = src.stored_shapes(m)
            conv = len(sa) == 4
            cap = (opts.conv_rank or opts.rank) if conv else opts.rank
            A, B = src.factors(m)
            res = resize_module(A, B, src.scale(m), cap, opts.rule, opts.threshold)
            res.report["kind"] = "conv" if conv else "linear"
            mods[m] = res
            reports[m] = res.report
            sink.put(m, SimpleNamespace(A=res.A, B=res.B), res.report)
            if on_module is not None:
                on_module(m, res.report)
        src.close()
        target = sink.commit()
    report = {**head, "output": str(target), "summary": summarize(reports), "modules": reports}
    if side is not None:
        _write_json_atomic(side, json_safe(report))
    return report


def _stored_dtype(src):
    import torch

    from ..dtypes import torch_dtype

    m = src.modules[0]
    a_key = src._keys[m].get("A") or src._keys[m].get("eA")
    name = src._entries[a_key][0]
    table = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    name = table.get(name, name)
    try:
        dt = torch_dtype(name)
    except UserError:
        return torch.float32
    return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def summarize(reports: dict[str, dict]) -> dict:
    """Totals over the modules of a resize / extract report."""
    if not reports:
        return {"modules": 0}
    errs = [r["rel_error"] for r in reports.values()]
    ranks = [r["rank_out"] for r in reports.values()]
    return {"modules": len(reports), "rank_out_min": min(ranks), "rank_out_max": max(ranks),
            "rank_out_mean": sum(ranks) / len(ranks), "rel_error_max": max(errs),
            "rel_error_mean": sum(errs) / len(errs)}


def _write_json_atomic(path: Path, data) -> None:
    import json
    import os

    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
