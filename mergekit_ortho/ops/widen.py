"""WIDEN: merging by per-column ranks of magnitude and direction divergences.

Spec: ../shared/specs/widen_corespace.md Part A (A2 exact math, A4 defaults, A5 tensors, A8
pitfalls, A10 golden numbers) and its "Design decisions for this toolkit". Reference semantics
are ``MergingMethod.widen_merging`` of yule-BUAA/MergeLLM; parameter names are ours:
``threshold`` = ``above_average_value_ratio`` (t), ``calibration`` = ``score_calibration_value``
(s), ``temperature`` = tau (the reference has none; 1.0 matches it).

Reads task vectors delta_n = theta_n - theta_0 and the base theta_0 (needs_base). Per tensor:

* **2-D** (out x in): a unit ("column") is an input feature, j = 0..d-1, d = in.
  ``dM[n, j] = | ||W_n[:, j]|| - ||W_0[:, j]|| |`` and ``dD[n, j] = 1 - cos(W_n[:, j], W_0[:, j])``
  (norms over dim 0, the output axis; W_n = W_0 + delta_n). Within each model, a stable ascending
  sort gives rank k/d (ties to the lower column index; divisor d, not d-1). Scores:
  ``S = softmax_over_models(R / temperature)``, then ``S[n, j] = calibration`` wherever
  ``R[n, j] > threshold * mean_j R[n, :]`` -- no renormalisation. Weights
  ``w = (S^M + S^D) / 2`` and merged delta ``= sum_n w[n, j] * delta_n[:, j]``.
* **Input embedding** (name matches ``embedding_pattern``; default covers Llama/Qwen/Mistral/OPT
  ``embed_tokens``, GPT-2 ``wte``, BERT/Bloom/Falcon ``word_embeddings``, GPT-NeoX ``embed_in``,
  ``tok_embeddings``, CLIP ``token_embedding`` and T5 ``shared``): treated as transposed, so a unit
  is one token's row and the ranking runs over the vocabulary. ``lm_head`` is NOT transposed (A2,
  A8.2). ``transpose_pattern`` (empty by default) applies the same row-unit rule to other tensors
  stored in x out, e.g. GPT-2 ``Conv1D`` weights (A8.1) -- names alone cannot tell GPT-2's
  ``c_attn`` (Conv1D) from GPT-BigCode's (Linear), so this is opt-in.
* **1-D** (biases, norm weights) and 0-D scalars (as length-1 vectors): elementwise, unranked
  (A2): ``a = |delta_n|``, ``S = softmax_over_models(a / temperature)``, ``S = calibration``
  where ``a[n, i] > threshold * mean_i a[n, :]``; merged delta ``= sum_n S * delta_n``.
* **3-D and higher** (e.g. conv kernels out x in x kh x kw; the reference asserts these never
  occur): flattened to out x prod(rest), so a unit is one (in, kh, kw, ...) position and norms
  run over the output channels -- the Linear rule applied to the flattened kernel.

Numerics. Column norms, dot products, ranks and scores are computed in float64 (accumulated over
row chunks, so memory stays ~ a few tensor-sized float64 chunks plus (N x d) statistics); the
weighted sum runs in the inputs' dtype promoted to at least float32. The cosine clamps each norm at
eps = 1e-8 like ``torch.cosine_similarity``, so zero columns give cos = 0 instead of NaN (the
reference divides by a zero norm first and would produce NaN). A column whose task vector is exactly
zero gets dM = dD = 0 exactly, so unchanged columns tie and are ordered by index (A8.7) instead of
by rounding noise in 1 - cos.

Consequences the tests pin down (A8.6, A10): N = 1 returns the model; zero task vectors return the
base; the result is symmetric in the models; identical models with s = 1 are NOT returned unchanged
(per-column multipliers on delta are 1, (1 + N s)/2 or N s; {1, 1.5, 2} for N = 2).

No streaming form: the ranks need every model's statistics before any delta can be weighted.
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch

from .registry import Operator, Param, TensorTask, register

DEFAULT_EMBEDDING_PATTERN = (
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|token_embedding|shared)\.weight$"
)
COS_EPS = 1e-8
_CHUNK_ELEMENTS = 1 << 22  # float64 elements per row chunk when accumulating column statistics


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> "re.Pattern[str] | None":
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"widen: invalid regular expression {pattern!r}: {exc}") from None


def _matches(pattern: str, name: str) -> bool:
    rx = _compiled(pattern)
    return bool(rx is not None and rx.search(name))


# -- ranks and scores (A2), on (N, d) statistics ------------------------------------------------


def rank01(signal: torch.Tensor) -> torch.Tensor:
    """Within-model rank: stable ascending sort of each row, position k -> k / d (float64)."""
    signal = signal.to(torch.float64)
    n, d = signal.shape
    order = torch.argsort(signal, dim=1, descending=False, stable=True)
    ranks = torch.arange(d, dtype=torch.float64, device=signal.device).div_(d).expand(n, d)
    return torch.empty_like(signal).scatter_(1, order, ranks)


def importance_scores(
    signal: torch.Tensor, temperature: float = 1.0, threshold: float = 1.0, calibration: float = 1.0
) -> torch.Tensor:
    """softmax over models (dim 0) of signal / temperature, then calibration (no renormalisation).

    ``signal`` is the rank matrix for 2-D tensors and the raw |delta| for 1-D tensors; the
    calibration test ``signal > threshold * mean over the model's own units`` uses the unscaled
    signal.
    """
    signal = signal.to(torch.float64)
    scores = torch.softmax(signal / temperature, dim=0)
    mask = signal > signal.mean(dim=1, keepdim=True) * threshold
    scores[mask] = calibration
    return scores


# -- divergences -----------------------------------------------------------------------------------


def column_divergences(
    base2: torch.Tensor, deltas2: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dM, dD), each (N, d) float64, for 2-D views whose units are the columns (dim 1).

    Norms and dot products run over dim 0 in float64, accumulated over row chunks.
    """
    rows, d = base2.shape
    n = len(deltas2)
    f64 = torch.float64
    dev = base2.device
    sq0 = torch.zeros(d, dtype=f64, device=dev)
    sqn = torch.zeros(n, d, dtype=f64, device=dev)
    dot = torch.zeros(n, d, dtype=f64, device=dev)
    changed = torch.zeros(n, d, dtype=torch.bool, device=dev)
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for r0 in range(0, rows, step):
        b = base2[r0 : r0 + step].to(f64)
        sq0 += (b * b).sum(0)
        for k, delta in enumerate(deltas2):
            dk = delta[r0 : r0 + step].to(f64, copy=True)  # never mutate the input
            changed[k] |= (dk != 0).any(0)
            w = dk.add_(b)  # W_n = W_0 + delta_n
            dot[k] += (w * b).sum(0)
            sqn[k] += w.square_().sum(0)
    m0 = sq0.sqrt()
    mn = sqn.sqrt()
    d_mag = (mn - m0).abs_()
    cos = dot / (mn.clamp_min(COS_EPS) * m0.clamp_min(COS_EPS))
    d_dir = 1.0 - cos
    d_mag[~changed] = 0.0
    d_dir[~changed] = 0.0
    return d_mag, d_dir


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _unit_view(x: torch.Tensor, rows_are_units: bool) -> torch.Tensor:
    """A 2-D view of x whose columns are the units (no copy for contiguous x)."""
    if x.dim() == 2:
        return x.t() if rows_are_units else x
    return x.reshape(x.shape[0], -1)


def _merge_columns(task: TensorTask, rows_are_units: bool) -> torch.Tensor:
    p = task.params
    base, deltas = task.base, task.inputs
    cdt = _compute_dtype(deltas[0])
    base2 = _unit_view(base, rows_are_units)
    deltas2 = [_unit_view(x, rows_are_units) for x in deltas]
    d_mag, d_dir = column_divergences(base2, deltas2)
    s_mag = importance_scores(rank01(d_mag), p["temperature"], p["threshold"], p["calibration"])
    s_dir = importance_scores(rank01(d_dir), p["temperature"], p["threshold"], p["calibration"])
    weights = ((s_mag + s_dir) * 0.5).to(cdt)  # (N, d)
    out = torch.zeros(deltas[0].shape, dtype=cdt, device=deltas[0].device)
    out2 = _unit_view(out, rows_are_units)  # a view: writing into it fills `out`
    for k, delta in enumerate(deltas2):
        out2.addcmul_(delta.to(cdt), weights[k].unsqueeze(0))
    return out


def _merge_elementwise(task: TensorTask) -> torch.Tensor:
    p = task.params
    deltas = task.inputs
    cdt = _compute_dtype(deltas[0])
    flat = [x.reshape(1, -1) for x in deltas]
    signal = torch.cat([x.to(torch.float64).abs() for x in flat], dim=0)  # (N, d)
    scores = importance_scores(signal, p["temperature"], p["threshold"], p["calibration"]).to(cdt)
    out = torch.zeros(flat[0].shape, dtype=cdt, device=deltas[0].device)
    for k, x in enumerate(flat):
        out.addcmul_(x.to(cdt), scores[k].unsqueeze(0))
    return out.reshape(deltas[0].shape)


def widen(task: TensorTask) -> torch.Tensor:
    """Merged delta for one tensor (A2)."""
    if not task.inputs:
        raise ValueError(f"widen: no input models for tensor '{task.name}'")
    if task.base is None:
        raise ValueError(f"widen: tensor '{task.name}' needs the base model (theta_0)")
    shape = task.base.shape
    for i, x in enumerate(task.inputs):
        if x.shape != shape:
            raise ValueError(
                f"widen: tensor '{task.name}' has shape {tuple(x.shape)} in model {i}, base has {tuple(shape)}"
            )
    if task.params["temperature"] <= 0:
        raise ValueError("widen: temperature must be > 0")
    if task.base.dim() <= 1:
        return _merge_elementwise(task)
    rows_are_units = task.base.dim() == 2 and (
        _matches(task.params["embedding_pattern"], task.name)
        or _matches(task.params["transpose_pattern"], task.name)
    )
    return _merge_columns(task, rows_are_units)


register(
    Operator(
        name="widen",
        summary="WIDEN: per-column weights from within-model ranks of magnitude/direction change",
        spec="widen_corespace.md A2-A10",
        fn=widen,
        needs_base=True,
        params=(
            Param("threshold", float, 1.0, "t (above_average_value_ratio): calibrate units whose "
                  "rank exceeds t * the model's mean rank"),
            Param("calibration", float, 1.0, "s (score_calibration_value): score given to calibrated units"),
            Param("temperature", float, 1.0, "softmax temperature across models (1.0 = reference)",
                  minimum=1e-6),
            Param("embedding_pattern", str, DEFAULT_EMBEDDING_PATTERN,
                  "regex (re.search on the tensor name) for input-embedding tables, whose rows "
                  "(tokens) are the units"),
            Param("transpose_pattern", str, "",
                  "regex for other 2-D tensors stored in x out (e.g. GPT-2 Conv1D), rows are units"),
        ),
        details="theta = theta_0 + sum_n w_n * delta_n with per-unit weights "
        "w = (S^M + S^D)/2. 2-D: units are input columns (norms over dim 0); dM = |norm change|, "
        "dD = 1 - cos; rank within model (stable ascending, k/d); S = softmax over models of "
        "rank/temperature, set to `calibration` where rank > threshold * mean rank (no "
        "renormalisation). Input embeddings (embedding_pattern) and transpose_pattern tensors use "
        "rows as units; lm_head does not. 1-D/0-D: elementwise, softmax of raw |delta| with the same "
        "calibration on |delta|. 3-D+: flattened to out x prod(rest) columns. Statistics in float64; "
        "zero columns give cos = 0 (no NaN); an unchanged column has zero divergence. Identical "
        "models are not a fixed point with calibration = 1 (multipliers 1, (1+N)/2, N).",
    )
)
