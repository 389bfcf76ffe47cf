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

Numerics. Column norms, dot products, ranks and scores are computed in float64, accumulated over
blocks of whole rows in three reused 2 MiB float64 buffers, plus (N x d) statistics (kept as
||W_0||^2, <delta_n, W_0> and ||delta_n||^2, see :class:`_UnitStats`); the weighted sum runs in
the inputs' dtype promoted to at least float32. The cosine clamps each norm at
eps = 1e-8 like ``torch.cosine_similarity``, so zero columns give cos = 0 instead of NaN (the
reference divides by a zero norm first and would produce NaN). A column whose task vector is exactly
zero gets dM = dD = 0 exactly, so unchanged columns tie and are ordered by index (A8.7) instead of
by rounding noise in 1 - cos.

Consequences the tests pin down (A8.6, A10): N = 1 returns the model; zero task vectors return the
base; the result is symmetric in the models; identical models with s = 1 are NOT returned unchanged
(per-column multipliers on delta are 1, (1 + N s)/2 or N s; {1, 1.5, 2} for N = 2).

Streaming, in two passes (``Fold.gather``): the ranks need every model's statistics
before any delta can be weighted, so pass 1 reads each model once for its per-unit statistics
(O(N x units) memory) and pass 2 reads each again to add its weighted task vector into one
accumulator. Peak memory is the base, one model tensor and the accumulator whatever N is, at
the price of reading every input twice. Both passes walk blocks of whole rows of the tensor;
the batch form runs the very same fold, so the two agree bit for bit.
"""
from __future__ import annotations


from dataclasses import replace

import torch

from .kernels.convert import fold_input, fold_input_chunks
from .errors import BadParameters, MissingBase, NoInputs, ShapeMismatch
from .registry import Fold, Operator, Param, TensorTask, name_matches, register

DEFAULT_EMBEDDING_PATTERN = (
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|token_embedding|shared)\.weight$"
)
COS_EPS = 1e-8
_CHUNK_ELEMENTS = 1 << 18  # entries per block of rows (float64 temporaries of 2 MiB)


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


class _UnitStats:
    """Running float64 statistics of W_n = W_0 + delta_n against W_0 for every unit (A2).

    A tensor is seen as a row-major 2-D matrix (out x prod(rest)) and fed row blocks; the units
    are its columns (reductions over rows, accumulated block by block) or, when
    ``rows_are_units`` (input embeddings, transpose_pattern), its rows (each block holds whole
    units). One instance serves the batch and the streaming form, so both give identical bits.

    Per unit it keeps ||W_0||^2, <delta_n, W_0> and ||delta_n||^2 (products of float32 values are
    exact in float64), from which ||W_n||^2 = ||W_0||^2 + 2<delta_n, W_0> + ||delta_n||^2 and
    <W_n, W_0> = ||W_0||^2 + <delta_n, W_0>. The magnitude divergence is then taken as
    (2<delta_n, W_0> + ||delta_n||^2) / (||W_n|| + ||W_0||), which equals | ||W_n|| - ||W_0|| |
    without the cancellation of subtracting two nearly equal norms; a unit is unchanged exactly
    when ||delta_n||^2 == 0.
    """

    def __init__(self, n_models: int, units: int, rows_are_units: bool, device):
        f64 = torch.float64
        self.rows_are_units = rows_are_units
        self.sq0 = torch.zeros(units, dtype=f64, device=device)
        self.db = torch.zeros(n_models, units, dtype=f64, device=device)
        self.dd = torch.zeros(n_models, units, dtype=f64, device=device)
        self._scratch: list[torch.Tensor] = []  # three float64 block buffers, reused

    def _buffers(self, shape) -> list[torch.Tensor]:
        # fresh large allocations cost page faults (and huge-page zeroing) on every block
        numel = shape[0] * shape[1]
        if not self._scratch or self._scratch[0].numel() < numel:
            self._scratch = [torch.empty(numel, dtype=torch.float64, device=self.sq0.device) for _ in range(3)]
        return [t[:numel].view(shape) for t in self._scratch]

    def _into(self, acc: torch.Tensor, r0: int, r1: int, values: torch.Tensor) -> None:
        if self.rows_are_units:
            acc[r0:r1] += values.sum(1)
        else:
            acc += values.sum(0)

    def add_block(self, k: int, r0: int, base_rows: torch.Tensor, delta_rows: torch.Tensor) -> None:
        """Rows r0.. of model k: ``base_rows`` (any float dtype) and its task vector rows."""
        r1 = r0 + base_rows.shape[0]
        b, dk, prod = self._buffers(tuple(base_rows.shape))
        b.copy_(base_rows)
        dk.copy_(delta_rows)  # a float64 copy: the input is never modified
        if k == 0:
            self._into(self.sq0, r0, r1, torch.mul(b, b, out=prod))
        self._into(self.db[k], r0, r1, torch.mul(dk, b, out=prod))
        self._into(self.dd[k], r0, r1, dk.square_())

    def divergences(self) -> tuple[torch.Tensor, torch.Tensor]:
        m0 = self.sq0.sqrt()
        mn = (self.sq0 + 2 * self.db + self.dd).clamp_min_(0.0).sqrt_()
        total = mn + m0
        d_mag = (2 * self.db + self.dd).abs_().div_(total.where(total > 0, torch.ones_like(total)))
        cos = (self.sq0 + self.db) / (mn.clamp_min(COS_EPS) * m0.clamp_min(COS_EPS))
        d_dir = 1.0 - cos
        unchanged = self.dd == 0
        d_mag[unchanged] = 0.0
        d_dir[unchanged] = 0.0
        return d_mag, d_dir


def _rows2(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def column_divergences(
    base2: torch.Tensor, deltas2: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dM, dD), each (N, d) float64, for 2-D tensors whose units are the columns (dim 1).

    Norms and dot products run over dim 0 in float64, accumulated over blocks of rows."""
    rows, d = base2.shape
    stats = _UnitStats(len(deltas2), d, False, base2.device)
    step = _block_rows(d)
    for k, delta in enumerate(deltas2):
        for r0 in range(0, rows, step):
            stats.add_block(k, r0, base2[r0:r0 + step], delta[r0:r0 + step])
    return stats.divergences()


def _block_rows(cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(cols, 1))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rows_are_units(task: TensorTask) -> bool:
    return task.base.dim() == 2 and (
        name_matches(task.params.embedding_pattern, task.name)
        or name_matches(task.params.transpose_pattern, task.name)
    )


def _check(task: TensorTask, x: torch.Tensor, i: int) -> None:
    if task.base is None:
        raise MissingBase(f"widen: tensor '{task.name}' needs the base model (theta_0)")
    if x.shape != task.base.shape:
        raise ShapeMismatch(
            f"widen: tensor '{task.name}' has shape {tuple(x.shape)} in model {i}, base has {tuple(task.base.shape)}"
        )
    if task.params.temperature <= 0:
        raise BadParameters("widen: temperature must be > 0")


def _n_models(task: TensorTask) -> int:
    return len(task.model_params)


# -- the fold: pass 1 gathers statistics, pass 2 sums the weighted task vectors ---------------------


def _gather(stats, x: torch.Tensor, i: int, task: TensorTask):
    """Model i's statistics: per-unit sums (2-D and up) or |delta| (1-D / 0-D)."""
    _check(task, x, i)
    base = task.base
    if base.dim() <= 1:
        signal = stats if stats is not None else [None] * _n_models(task)
        signal[i] = fold_input(x, task).reshape(-1).to(torch.float64, copy=True).abs_()
        return signal
    base2 = _rows2(base)
    rows, cols = base2.shape
    if stats is None:
        stats = _UnitStats(_n_models(task), rows if _rows_are_units(task) else cols, _rows_are_units(task),
                           base.device)
    block = _block_rows(cols)
    for lo, hi, v in fold_input_chunks(x, task, chunk=block * cols):
        r0 = lo // cols
        stats.add_block(i, r0, base2[r0:hi // cols], v.view(-1, cols))
    return stats


def stats_tensors(stats) -> dict[str, torch.Tensor]:
    """The gathered statistics (pass 1) as named tensors, for `merge sweep`'s cache (issue 18):
    they read the inputs, the base, ``task.dtype`` and the unit rule (``embedding_pattern`` /
    ``transpose_pattern``) only, not ``threshold``, ``calibration`` or ``temperature``."""
    if isinstance(stats, list):
        return {f"signal.{i}": t for i, t in enumerate(stats)}
    return {"sq0": stats.sq0, "db": stats.db, "dd": stats.dd,
            "rows_are_units": torch.tensor([stats.rows_are_units])}


def stats_from_tensors(tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`stats_tensors` (the same values, bit for bit)."""
    if "sq0" not in tensors:
        return [tensors[f"signal.{i}"] for i in range(len(tensors))]
    stats = _UnitStats(0, 0, bool(tensors["rows_are_units"][0]), tensors["sq0"].device)
    stats.sq0, stats.db, stats.dd = tensors["sq0"], tensors["db"], tensors["dd"]
    return stats


def _start(task: TensorTask):
    """Per-unit weights (N x units) from the statistics, and a zero accumulator."""
    p = task.params
    stats = task.stats
    cdt = task.dtype if task.dtype is not None else _compute_dtype(task.base)
    if task.base.dim() <= 1:
        signal = torch.stack(stats)  # (N, d)
        weights = importance_scores(signal, p.temperature, p.threshold, p.calibration).to(cdt)
    else:
        d_mag, d_dir = stats.divergences()
        s_mag = importance_scores(rank01(d_mag), p.temperature, p.threshold, p.calibration)
        s_dir = importance_scores(rank01(d_dir), p.temperature, p.threshold, p.calibration)
        weights = ((s_mag + s_dir) * 0.5).to(cdt)
    return weights, torch.zeros(task.base.shape, dtype=cdt, device=task.base.device)


def _step(state, x: torch.Tensor, i: int, task: TensorTask):
    weights, out = state
    _check(task, x, i)
    if task.base.dim() <= 1:
        out.view(-1).addcmul_(fold_input(x, task).reshape(-1).to(out.dtype), weights[i])
        return state
    out2 = _rows2(out)
    rows, cols = out2.shape
    rows_units = _rows_are_units(task)
    w = weights[i]
    for lo, hi, v in fold_input_chunks(x, task, chunk=_block_rows(cols) * cols):
        r0, r1 = lo // cols, hi // cols
        scale = w[r0:r1].unsqueeze(1) if rows_units else w.unsqueeze(0)
        out2[r0:r1].addcmul_(v.view(-1, cols).to(out.dtype), scale)
    return state


def _finish(state, task: TensorTask) -> torch.Tensor:
    return state[1]


def widen(task: TensorTask) -> torch.Tensor:
    """Merged delta for one tensor (A2): the two-pass fold over ``task.inputs`` (not modified)."""
    if not task.inputs:
        raise NoInputs(f"widen: no input models for tensor '{task.name}'")
    if task.base is None:
        raise MissingBase(f"widen: tensor '{task.name}' needs the base model (theta_0)")
    if len(task.model_params) != len(task.inputs):
        raise BadParameters(f"widen: tensor '{task.name}': {len(task.model_params)} model parameter sets "
                            f"for {len(task.inputs)} models")
    t = replace(task, dtype=task.dtype or _compute_dtype(task.inputs[0]), stats=None)
    stats = None
    for i, x in enumerate(task.inputs):
        stats = _gather(stats, x, i, t)
    t.stats = stats
    state = _start(t)
    for i, x in enumerate(task.inputs):
        state = _step(state, x, i, t)
    return _finish(state, t)


register(
    Operator(
        name="widen",
        summary="WIDEN: per-column weights from within-model ranks of magnitude/direction change",
        spec="widen_corespace.md A2-A10",
        fn=widen,
        needs_base=True,
        fold=Fold(_start, _step, _finish, raw_weights=True, gather=_gather),
        params=(
            Param("threshold", float, 1.0, "t (above_average_value_ratio): calibrate units whose "
                  "rank exceeds t * the model's mean rank"),
            Param("calibration", float, 1.0, "s (score_calibration_value): score given to calibrated units"),
            Param("temperature", float, 1.0, "softmax temperature across models (1.0 = reference)",
                  minimum=1e-6),
            Param("embedding_pattern", str, DEFAULT_EMBEDDING_PATTERN,
                  "regex (re.search on the tensor name) for input-embedding tables, whose rows "
                  "(tokens) are the units", regex=True),
            Param("transpose_pattern", str, "",
                  "regex for other 2-D tensors stored in x out (e.g. GPT-2 Conv1D), rows are units",
                  regex=True),
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
