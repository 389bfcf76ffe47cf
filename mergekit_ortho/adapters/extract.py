"""`merge extract`: a LoRA from a fine-tune minus its base (sd-scripts' ``extract_lora_from_models``).

Spec: ../shared/specs/adapters.md P23 (extraction and the metadata it writes), P22 (the SVD and the
signed-quantile clamp it shares with ``svd_merge_lora``), P24 (outputs), P25 (clamp default none).

Math, streamed tensor by tensor (one base / fine-tune pair in memory at a time)
------------------------------------------------------------------------------
For each weight matrix W (2-D ``*.weight``; 4-D conv 1x1 at ``--rank``; conv k x k only with
``--conv-rank``), D = W_tuned - W_base in float32 (float64 when small), flattened to
[out, in*kh*kw]. Its truncated SVD U_k S_k V_k^T with k = min(rank, out, in*kh*kw) (exact thin SVD;
the seeded randomised range finder of ``ops.kernels.randomized_svd`` when k is far below a large
matrix's size, as ``ops.lowrank.factorize`` chooses) gives kohya's factors up = U_k S_k,
down = V_k^T, alpha = k (scale 1). Optional clamp (``clamp_quantile`` q, kohya's default 0.99,
ours none): hi = quantile_q of the *signed* entries of up and down together, both clamped to
[-hi, hi]. The reported relative error ||D - up @ down||_F / ||D||_F is measured on the factors
written (clamp included), before the output dtype's rounding.

Left out, and counted in the report: 1-D tensors (norms, biases), embedding tables (names holding
``embed``, ``wte``, ``wpe``: kohya's networks do not hold them), conv k x k without ``--conv-rank``,
non-float tensors, and matrices with max |D| <= ``min_diff`` (default 0: identical only). sd-scripts
caps a conv's rank at its *channel* count; here the cap is the flattened matrix's true size, so a
full-rank extraction is exact for every module.

Output: kohya (module names from ``keymap.kohya_default_name``, one alpha for every module, see
``lora_out``) or PEFT; metadata as P23 "What the toolkit should write".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from ..errors import UserError

_EMBEDDING_HINTS = ("embed", "wte.", "wpe.")


@dataclass(frozen=True)
class ExtractOptions:
    rank: int
    conv_rank: int | None = None
    format: str = "peft"
    clamp_quantile: float | None = None
    min_diff: float = 0.0
    out_dtype: str | None = None  # default: the fine-tune's dtype of the first extracted tensor

    def check(self) -> None:
        if self.rank is None or self.rank <= 0:
            raise UserError(f"--rank must be a positive integer, not {self.rank}")
        if self.conv_rank is not None and self.conv_rank <= 0:
            raise UserError(f"--conv-rank must be a positive integer, not {self.conv_rank}")
        if self.format not in ("peft", "kohya"):
            raise UserError(f"--format must be peft or kohya, not '{self.format}'")
        if self.clamp_quantile is not None and not 0 < self.clamp_quantile <= 1:
            raise UserError(f"--clamp-quantile must be in (0, 1], not {self.clamp_quantile}")
        if not (math.isfinite(self.min_diff) and self.min_diff >= 0):
            raise UserError(f"--min-diff must be a number >= 0, not {self.min_diff}")


def _kind(key: str, shape: tuple[int, ...], dtype: str, conv_rank: int | None) -> str:
    """"linear" | "conv1x1" | "conv" to extract, or why the tensor is left out."""
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        return "skipped: not float"
    if not key.endswith(".weight"):
        return "skipped: not a weight"
    if len(shape) == 2:
        return "skipped: embedding" if any(h in key for h in _EMBEDDING_HINTS) else "linear"
    if len(shape) == 4:
        if tuple(shape[2:]) == (1, 1):
            return "conv1x1"
        return "conv" if conv_rank else "skipped: conv kxk (pass --conv-rank)"
    return f"skipped: {len(shape)}-D"


def svd_factors(D, k: int):
    """kohya's factors of a dense 2-D D: (up = U_k S_k [out, k], down = V_k^T [k, cols])."""
    import torch

    from ..ops.kernels.randomized_svd import OVERSAMPLE, randomized_svd

    work = D.to(torch.float64) if D.numel() <= 4096 * 1024 else D.to(torch.float32)
    small = min(work.shape)
    if small >= 1024 and 4 * (k + OVERSAMPLE) <= small:
        U, S, Vh = randomized_svd(work, k + OVERSAMPLE)
    else:
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return (U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous()


def clamp_factors(up, down, q: float):
    """sd-scripts' clamp: hi = the q-quantile of the signed entries of both factors, both clipped
    to [-hi, hi]. Returns (up, down, number of entries changed)."""
    import torch

    vals = torch.cat([up.flatten(), down.flatten()]).to(torch.float64)
    if vals.numel() > 16_000_000:  # torch.quantile's limit: the exact order statistic instead
        srt = torch.sort(vals).values
        pos = q * (vals.numel() - 1)
        lo_i = int(math.floor(pos))
        hi_v = srt[lo_i] + (srt[min(lo_i + 1, vals.numel() - 1)] - srt[lo_i]) * (pos - lo_i)
    else:
        hi_v = torch.quantile(vals, q)
    hi = float(hi_v)
    up2, down2 = up.clamp(-hi, hi), down.clamp(-hi, hi)  # as sd-scripts (hi < 0 maps every entry to hi)
    n = int((up2 != up).sum() + (down2 != down).sum())
    return up2, down2, n


def extract_module(D, rank: int, clamp_quantile: float | None = None):
    """(A = down [k, cols], B = up [out, k], report) for one dense delta D (any shape, flattened)."""
    import torch

    D2 = D.reshape(D.shape[0], -1)
    k = min(int(rank), *D2.shape)
    up, down = svd_factors(D2, k)
    clamped = 0
    if clamp_quantile is not None:
        up, down, clamped = clamp_factors(up, down, clamp_quantile)
    work = D2.to(up.dtype)
    total = float(work.double().square().sum())
    err = float((work - up @ down).double().square().sum())
    report = {"rank_out": k, "rel_error": math.sqrt(err / total) if total > 0 else 0.0,
              "max_abs_diff": float(D2.abs().max())}
    if clamp_quantile is not None:
        report["clamped_entries"] = clamped
    return down.to(torch.float32), up.to(torch.float32), report


def _agreed_metadata(metas: list[dict[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in ("ss_base_model_version", "ss_v2"):
        vals = {m.get(k) for m in metas}
        if len(vals) == 1 and None not in vals:
            out[k] = vals.pop()
    keys = set().union(*(m.keys() for m in metas)) if metas else set()
    for k in sorted(x for x in keys if x.startswith("modelspec.")):
        if k in ("modelspec.title", "modelspec.hash_sha256", "modelspec.date"):
            continue
        vals = {m.get(k) for m in metas}
        if len(vals) == 1 and None not in vals:
            v = vals.pop()
            if k == "modelspec.architecture" and not v.endswith("/lora"):
                v = v + "/lora"
            out[k] = v
    return out


def extract(base: str | Path, finetune: str | Path, out: str | Path, opts: ExtractOptions, *,
            overwrite: bool = False, force_replace: bool = False,
            on_module: Callable[[str, dict], None] | None = None) -> dict:
    """Extract a LoRA of ``finetune - base`` into ``out``; returns the report (also written)."""
    import torch

    from ..dtypes import torch_dtype
    from ..lora_out import to_kohya, to_peft
    from ..sinks import Adapter, json_safe
    from ..sources.checkpoint import CheckpointSource
    from .detect import detect_lora
    from .resize import _write_json_atomic, report_path, summarize, tool_metadata

    opts.check()
    base, finetune, out = Path(base), Path(finetune), Path(out)
    for p in (base, finetune):
        if not p.exists():
            raise UserError(f"{p}: no such file or directory")
        if detect_lora(p) is not None:
            raise UserError(f"{p} is a LoRA adapter; extract needs two full checkpoints (base and fine-tune)")
    b_src, f_src = CheckpointSource(str(base)), CheckpointSource(str(finetune))
    plan: list[tuple[str, str]] = []
    skipped: dict[str, int] = {}
    for key in sorted(b_src.infos):
        info = b_src.infos[key]
        kind = _kind(key, info.shape, info.dtype, opts.conv_rank)
        if key not in f_src.infos:
            if kind.startswith("skipped"):
                continue
            raise UserError(f"{finetune}: has no tensor '{key}' of the base {base}; extract needs a fine-tune of this base")
        if f_src.infos[key].shape != info.shape:
            raise UserError(f"{finetune}: tensor '{key}' has shape {list(f_src.infos[key].shape)}, the base's is "
                            f"{list(info.shape)}; extract needs a fine-tune of this base")
        if kind.startswith("skipped"):
            skipped[kind[9:]] = skipped.get(kind[9:], 0) + 1
        else:
            plan.append((key, kind))
    if not plan:
        raise UserError(f"{base}: no weight matrix to extract (2-D weights, conv 1x1, conv kxk with --conv-rank)")
    if opts.out_dtype:
        dtype = torch_dtype(opts.out_dtype)
    else:
        dt = torch_dtype(f_src.infos[plan[0][0]].dtype)
        dtype = dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    shapes = {k: b_src.infos[k].shape for k, _ in plan}
    metas = [b_src.metadata(), f_src.metadata()]
    head = {"command": "extract", "base": str(base), "finetune": str(finetune), "format": opts.format,
            "rank": opts.rank, "conv_rank": opts.conv_rank, "clamp_quantile": opts.clamp_quantile,
            "min_diff": opts.min_diff}

    def pack(mods):
        if opts.format == "peft":
            from ..planning import config_of_source
            from .transformers5 import memory_names  # peft on transformers 5 needs its in-memory names

            layouts = {k: ("conv" if len(shapes[k]) == 4 else "linear") for k in mods}
            t, cfg = to_peft(mods, str(base), shapes=shapes, layouts=layouts, dtype=dtype,
                             names=memory_names(sorted(b_src.infos), config_of_source(b_src)))
            return t, {"format": "pt", **tool_metadata("extract")}, cfg
        extra = {"ss_training_comment": f"extracted by mergekit-ortho: {finetune.name} - {base.name}, rank {opts.rank}"
                 + (f", conv rank {opts.conv_rank}" if opts.conv_rank else "")}
        extra.update(_agreed_metadata(metas))
        extra.update(tool_metadata("extract"))
        t, meta = to_kohya(mods, shapes=shapes, dtype=dtype, metadata=extra, hashes=False)
        if opts.conv_rank:
            meta["ss_network_args"] = '{"conv_dim": "%d", "conv_alpha": "%s"}' % (opts.conv_rank, meta["ss_network_alpha"])
        else:
            meta["ss_network_args"] = "{}"
        from ..lora_out import kohya_hashes

        meta.update(kohya_hashes(t, meta))
        return t, meta, None

    sink = Adapter(out, opts.format, pack, report_head={**head, "skipped": skipped}, overwrite=overwrite,
                   inputs=[base, finetune], force_replace=force_replace)
    side = report_path(out) if sink.single_file else None
    if side is not None and side.exists() and not (overwrite or force_replace):
        raise UserError(f"{side} exists (the report of {out.name}); pass --overwrite to replace it")
    reports: dict[str, dict] = {}
    with sink:
        for key, kind in plan:
            D = f_src.get(key).to(torch.float32) - b_src.get(key).to(torch.float32)
            if float(D.abs().max()) <= opts.min_diff:
                skipped["unchanged"] = skipped.get("unchanged", 0) + 1
                continue
            rank = opts.conv_rank if kind == "conv" else opts.rank
            A, B, rep = extract_module(D, rank, opts.clamp_quantile)
            rep["kind"] = kind
            rep["rank_in"] = min(D.shape[0], math.prod(D.shape[1:]))  # the delta's size (its rank at most)
            reports[key] = rep
            sink.put(key, SimpleNamespace(A=A, B=B), rep)
            if on_module is not None:
                on_module(key, rep)
        b_src.close()
        f_src.close()
        if not reports:
            raise UserError(f"{finetune} does not differ from {base} in any weight matrix (max |delta| <= "
                            f"{opts.min_diff}); nothing to extract")
        target = sink.commit()
    report = {**head, "skipped": skipped, "output": str(target), "summary": summarize(reports), "modules": reports}
    if side is not None:
        _write_json_atomic(side, json_safe(report))
    return report
