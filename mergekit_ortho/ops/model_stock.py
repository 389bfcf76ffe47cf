"""Model Stock: move from the base towards the models' mean by a step set by their angles.

Spec: ../shared/specs/mergekit_compat.md M21 (mergekit's ``model_stock``, golden numbers from
mergekit 0.1.5); paper: Jang et al. 2024, "Model Stock" (arXiv 2403.19522). mergekit-compatible.

With N >= 2 models besides the base and task vectors tau_i = theta_i - theta_0, per vector v
(the flat tensor; with ``filter_wise: true`` each row along the last dimension, a 1-D tensor
being one row and a 0-D scalar a row of one):

    c_ij = clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1)      for i < j
    c    = mean of the N(N-1)/2 pair cosines
    t    = N c / (1 + (N-1) c),   t = 0 (the base) where |1 + (N-1) c| < 1e-6
    theta = theta_0 + t * mean_i(tau_i)      (= t mean(theta_i) + (1-t) theta_0)

t is not clamped: c < 0 gives t < 0, a step away from the models (mergekit's formula, kept).
The direct form :func:`model_stock` computes every pair, as the spec states it.

Streaming (:data:`FOLD`, one read per model, one model tensor in memory at a time; raw weights:
each later model is prepared chunk by chunk from its weight as stored, twice - once for its norm
and its dot product with U, once to add it to both sums (a third time, for <T, tau_j>, only where
the guard's small side applies) - so no full-size float32 copy of the
weight, the base or tau_j is made; per-vector sums are float32 per chunk, float64 across chunks,
and filter_wise chunks hold whole rows; U lives in a :mod:`mergekit_ortho.buffers` buffer that the next
tensor reuses, so its pages are not faulted in afresh). The state holds two
full-size sums, T = sum tau_i and U = sum u_i with u_i = tau_i/|tau_i| (0 for a zero vector), and
per vector the running sum of the pair terms and the least and largest nonzero norm so far
(continual merging stores these parts between models as they are, float64 pair sums included).
Model j adds its pairs with every earlier model i in one dot product:

* every earlier product |tau_i||tau_j| >= 1e-6 ("large"): sum_i c_ij = <U, tau_j> / |tau_j|;
* every earlier product < 1e-6 ("small", the spec's guard): sum_i c_ij = <T, tau_j> / 1e-6;
* a zero tau_j (or no earlier model) adds 0, as the guard gives.

This equals the direct form up to float32 rounding, with two differences (both documented in
``details`` and tested):

1. **split vector**: at some step j the earlier nonzero norms lie on both sides of 1e-6/|tau_j|
   (needs N >= 3 and norms spanning the guard, e.g. 1, 1 and 1e-7). The guard's kernel
   min(1, |tau_i||tau_j|/1e-6) has no separable form, so an exact answer would keep every model.
   The fold then uses the unit cosines for all earlier pairs: the large pairs stay exact, each
   small pair's term is |cos| instead of |cos| * |tau_i||tau_j|/1e-6, an error below 1 per pair
   in the pair sum (the mean c moves by at most (small pairs)/(all pairs)). N = 2 never splits.
2. the per-pair clamp is applied to the mean instead (each |c_ij| <= 1 holds exactly, so this
   moves only rounding), and a c within rounding of the singular point may fall on the other
   side of the 1e-6 guard.

Deviations from mergekit: none in the formula. The result is formed as theta_0 + t mean(tau)
rather than t mean(theta) + (1-t) theta_0 (equal up to rounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BadParameters
from .. import buffers
from .kernels.convert import FOLD_CHUNK, fold_input, fold_input_chunks
from .registry import Fold, Operator, Param, StateParts, TensorTask, register

#: the pair guard max(|tau_i||tau_j|, GUARD) and the singular guard |1 + (N-1)c| < GUARD (mergekit)
GUARD = 1e-6


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors of one tensor as rows of a 2-D view: one row (flat), or the last dimension."""
    if not filter_wise or x.dim() == 0:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def _too_few(task: TensorTask, n: int) -> BadParameters:
    return BadParameters(f"model_stock: tensor '{task.name}' has {n} model(s) besides the base; it needs "
                         "at least 2 (base plus two or more others): add a model or pick another method")


def _step_size(pair_sum: torch.Tensor, n: int) -> torch.Tensor:
    """t per vector from the summed pair cosines (float64), with the singular guard."""
    c = (pair_sum / (n * (n - 1) / 2)).clamp_(-1.0, 1.0)
    denom = 1.0 + (n - 1) * c
    return torch.where(denom.abs() < GUARD, torch.zeros_like(c), n * c / denom)


def _apply(total: torch.Tensor, t: torch.Tensor, n: int, shape: torch.Size) -> torch.Tensor:
    """theta - theta_0 = t * mean(tau): ``total`` (rows view of sum tau, scaled in place)."""
    return total.mul_((t / n).to(total.dtype).unsqueeze(-1)).reshape(shape)


def model_stock(task: TensorTask) -> torch.Tensor:
    """The direct form: every pair cosine, as the spec states it."""
    n = len(task.inputs)
    if n == 0:  # the base alone gives the base (mergekit)
        return torch.zeros_like(task.base)
    if n < 2:
        raise _too_few(task, n)
    shape = task.inputs[0].shape
    fw = task.params.filter_wise
    vs = [_rows(x, fw) for x in task.inputs]
    norms = [torch.linalg.vector_norm(v, dim=-1) for v in vs]
    pair_sum = torch.zeros(vs[0].shape[0], dtype=torch.float64, device=vs[0].device)
    for i in range(n):
        for j in range(i + 1, n):
            dot = torch.linalg.vecdot(vs[i], vs[j], dim=-1)
            cos = (dot / (norms[i] * norms[j]).clamp(min=GUARD)).clamp(-1.0, 1.0)
            pair_sum += cos.double()
    t = _step_size(pair_sum, n)
    total = vs[0]  # the inputs are ours and every pair is done: the first becomes the sum
    for v in vs[1:]:
        total.add_(v)
    return _apply(total, t, n, shape)


# -- the one-pass fold ----------------------------------------------------------------------------


@dataclass
class _Stock:
    """The fold's state for one tensor (rows view: R vectors of length L)."""

    shape: torch.Size
    total: torch.Tensor  # (R, L) sum of tau_i
    units: torch.Tensor  # (R, L) sum of tau_i / |tau_i| over nonzero vectors
    pair_sum: torch.Tensor  # (R,) float64, sum of the pair terms so far
    lo: torch.Tensor  # (R,) least nonzero norm so far (inf: none yet)
    hi: torch.Tensor  # (R,) largest norm so far (0: none nonzero yet)
    count: int
    split: int = 0  # vectors where some step split (difference 1 of the module docstring)
    # units is a :mod:`mergekit_ortho.buffers` buffer, handed back at finish (not once packed: stored parts)
    pooled: bool = False


def _dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products as one batched matrix product (no full-size temporary)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).reshape(-1)


def _chunk(rows: int, length: int) -> int:
    """Entries per chunk: whole rows (filter_wise: each row's reductions stay in one chunk), about
    FOLD_CHUNK entries; a single row (the flat form) is cut at FOLD_CHUNK."""
    if rows == 1:
        return FOLD_CHUNK
    return max(1, FOLD_CHUNK // max(length, 1)) * length


def _row_sums(x: torch.Tensor, task: TensorTask, rows: int, length: int, others) -> list[torch.Tensor]:
    """One pass over model input x (tau), prepared chunk by chunk: per vector <o, tau> for each
    o of ``others`` (None: tau itself; else a full-size tensor of x's shape), float32 products
    per chunk, float64 across chunks."""
    flats = [None if o is None else o.view(-1) for o in others]
    sums = [torch.zeros(rows, dtype=torch.float64) for _ in flats]
    for lo, hi, v in fold_input_chunks(x, task, _chunk(rows, length)):
        if rows == 1:
            for acc, o in zip(sums, flats):
                acc[0] += float(torch.dot(v if o is None else o[lo:hi], v))
            continue
        r0, r1 = lo // length, hi // length
        vr = v.view(-1, length)
        for acc, o in zip(sums, flats):
            acc[r0:r1] += _dot_rows(vr if o is None else o[lo:hi].view(-1, length), vr)
    return sums


def _start(task: TensorTask) -> None:
    return None


def _step(state: _Stock | None, x: torch.Tensor, i: int, task: TensorTask) -> _Stock:
    """Model i: one pass for its norms and dot products with the sums so far, one pass adding it
    to both sums, each preparing x (a weight as stored, or a task vector) chunk by chunk: no
    full-size float32 copy of x, of the base or of tau_i (raw_weights)."""
    fw = task.params.filter_wise
    if state is None:
        v = _rows(fold_input(x, task), fw)  # the first task vector becomes the sum T
        norm = torch.linalg.vector_norm(v, dim=-1)
        nonzero = norm > 0
        inv = torch.where(nonzero, 1.0 / norm, torch.zeros_like(norm))
        # v * inv into pages kept from the last tensor (a fresh full-size buffer faults every page in)
        units = torch.mul(v, inv.unsqueeze(-1), out=buffers.empty(v.shape, v.dtype, v.device))
        lo = torch.where(nonzero, norm, torch.full_like(norm, float("inf")))
        return _Stock(x.shape, v, units, torch.zeros_like(norm, dtype=torch.float64), lo, norm.clone(), 1,
                      pooled=True)
    if _rows(x, fw).shape != state.total.shape:
        raise BadParameters(f"model_stock: tensor '{task.name}' has shape {tuple(x.shape)} in model {i}, "
                            f"expected {tuple(state.shape)}")
    rows, length = state.total.shape
    sq, du = _row_sums(x, task, rows, length, (None, state.units))
    norm = sq.sqrt().to(state.hi.dtype)
    nonzero = norm > 0
    inv = torch.where(nonzero, 1.0 / norm, torch.zeros_like(norm))
    seen = state.hi > 0  # an earlier nonzero vector exists
    # the same float32 products as the direct form's guard, so the same side is chosen
    large = (state.lo * norm >= GUARD) & seen
    small = (state.hi * norm < GUARD) & seen
    active = nonzero & seen
    by_units = du * inv.double()
    term = by_units
    if bool(small.any()):  # the guard's side: <T, tau_j> too, one more pass (tiny task vectors only)
        (dt,) = _row_sums(x, task, rows, length, (state.total,))
        term = torch.where(small, dt / GUARD, by_units)  # lo <= hi: never both small and large
    state.pair_sum += torch.where(active, term, torch.zeros_like(term))
    state.split += int((active & ~large & ~small).sum())
    total, units = state.total.view(-1), state.units.view(-1)
    scale = inv.unsqueeze(-1)
    for lo_, hi_, v in fold_input_chunks(x, task, _chunk(rows, length)):
        total[lo_:hi_].add_(v)
        if rows == 1:
            units[lo_:hi_].addcmul_(v, scale[0])
        else:
            r0, r1 = lo_ // length, hi_ // length
            units[lo_:hi_].view(-1, length).addcmul_(v.view(-1, length), scale[r0:r1])
    state.lo = torch.where(nonzero, torch.minimum(state.lo, norm), state.lo)
    state.hi = torch.maximum(state.hi, norm)
    state.count += 1
    return state


def _finish(state: _Stock | None, task: TensorTask) -> torch.Tensor:
    if state is None:  # the base alone gives the base (mergekit)
        return torch.zeros_like(task.base)
    n = state.count
    if n < 2:
        raise _too_few(task, n)
    if state.pooled:  # U is not needed after the last model: the next tensor reuses its pages
        state.pooled = False
        state.units = None  # its buffer goes back to the pool (buffers.py)
    return _apply(state.total, _step_size(state.pair_sum, n), n, state.shape)


def _layout(shape: tuple[int, ...], params) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = (1,) if not params.filter_wise or not shape else (math.prod(shape[:-1]),)
    # 4-byte parts in pairs (total/units, lo/hi): a multiple of 8 bytes, so stored parts stay aligned
    return {"pair_sum": (rows, "float64"), "count": ((), "int64"), "split": ((), "int64"),
            "total": (tuple(shape), "float32"), "units": (tuple(shape), "float32"),
            "lo": (rows, "float32"), "hi": (rows, "float32")}


def _pack(s: _Stock) -> dict[str, torch.Tensor]:
    s.pooled = False  # the parts leave the fold: never hand their buffer back
    return {"pair_sum": s.pair_sum, "count": torch.tensor(s.count), "split": torch.tensor(s.split),
            "total": s.total.reshape(s.shape), "units": s.units.reshape(s.shape), "lo": s.lo, "hi": s.hi}


def _unpack(parts: dict[str, torch.Tensor], task: TensorTask) -> _Stock:
    total, fw = parts["total"], task.params.filter_wise
    return _Stock(total.shape, _rows(total, fw), _rows(parts["units"], fw), parts["pair_sum"], parts["lo"],
                  parts["hi"], int(parts["count"]), int(parts["split"]))


# continual merging stores the state as its parts between models (an exact round trip)
FOLD = Fold(_start, _step, _finish, raw_weights=True, parts=StateParts(_layout, _pack, _unpack))

register(
    Operator(
        name="model_stock",
        summary="Model Stock: base + t * mean task vector, t from the mean pairwise cosine",
        spec="mergekit_compat.md M21, M6, M13",
        fn=model_stock,
        reads="deltas",
        needs_base=True,
        min_models=2,
        params=(Param("filter_wise", bool, False, "one t per row (last dimension) instead of per tensor"),),
        fold=FOLD,
        details="theta = theta_0 + t * mean(tau_i), t = N c / (1 + (N-1) c) with c the mean over pairs "
        "i < j of clamp(<tau_i, tau_j> / max(|tau_i||tau_j|, 1e-6), -1, 1); t = 0 where "
        "|1 + (N-1) c| < 1e-6. t is NOT clamped (c < 0 extrapolates away from the models). "
        "filter_wise: one c and t per row along the last dimension (a 1-D tensor is one row). "
        "Needs the base and at least 2 other models (mergekit: at least 3 inputs). "
        "Streams in one pass (sum of tau and of tau/|tau|): equal to the pairwise form up to float32 "
        "rounding, except a vector whose norms straddle the 1e-6 guard at some step (N >= 3, one "
        "model's |tau| tiny beside the others'): there the fold uses the true cosine for those pairs. "
        "Continual merging stores that state (the two sums and per-row scalars) between models. "
        "mergekit-compatible (0.1.5, with its singular guard); paper arXiv 2403.19522.",
    )
)
