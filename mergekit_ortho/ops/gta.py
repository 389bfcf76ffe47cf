"""Generalized task arithmetic: ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear - one function, the methods rows of one table (:data:`VARIANTS`).

Spec: ../shared/specs/mergekit_compat.md M15 (mergekit 0.1.5's generalized task arithmetic, golden
numbers from mergekit), M13 (parameters and defaults), M27 (randomness); TIES from
magmax_opcm_baselines.md C3/D4; DARE arXiv 2311.03099, Model Breadcrumbs arXiv 2312.06795, DELLA
arXiv 2406.11617. mergekit-compatible: a mergekit recipe gives the same tensors (fp32). Per tensor,
for the task vectors tau_i of the non-base models:

1. sparsify each tau_i with its own density d_i (and gamma_i / epsilon_i) by the row's sparsifier
   (:mod:`.sparsify`: magnitude, random, magnitude_outliers, della_magprune);
2. ``rescale``: tau~_i *= |tau_i|_1 / |tau~_i|_1, the L1 ratio over the whole tensor, skipped when
   either norm is < 1e-7 - for every sparsifier, ties included (mergekit >= 0.1.0; <= 0.0.6
   divided by d or p);
3. weight: u_i = w_i tau~_i;
4. combine. With consensus: sigma = sign(sum_i u_i) per entry (a zero sum counts as +, a NaN one
   as -), m_i = [sign(u_i) = sigma] (zeros never count), mixed = sum_i m_i u_i, div = sum_i m_i w_i
   (0 -> 1). Without: mixed = sum_i u_i, div = sum_i w_i (|div| < 1e-8 -> 1);
5. ``normalize``: mixed /= div; then mixed *= lambda. The executor adds the base back.

| method           | sparsifier         | consensus | normalize | rescale | per model       |
|------------------|--------------------|-----------|-----------|---------|-----------------|
| ties             | magnitude          | yes       | true      | false   | weight, density |
| dare_ties        | random             | yes       | false     | true    | weight, density |
| dare_linear      | random             | no        | false     | true    | weight, density |
| breadcrumbs      | magnitude_outliers | no        | false     | false   | + gamma (0.01)  |
| breadcrumbs_ties | magnitude_outliers | yes       | false     | false   | + gamma (0.01)  |
| della            | della_magprune     | yes       | true      | true    | + epsilon (0.15)|
| della_linear     | della_magprune     | no        | false     | true    | + epsilon (0.15)|

``task_arithmetic`` is the row (no sparsifier, no consensus); it lives in :mod:`.linear` with a
streaming fold (there density and rescale have no effect, as in mergekit). Every method takes
``lambda`` (1), ``int8_mask`` (false: the mask's dtype in mergekit, no numeric effect here);
random rows take ``seed`` (0), ties ``trim_rule``.

Deliberate deviations from mergekit: ties at equal magnitudes are broken by flat index and NaN is
the largest magnitude (:mod:`.sparsify`); ``trim_rule: kthvalue`` reproduces the TIES reference
code (one more entry kept); random masks come from a generator seeded by (seed, tensor name,
model index) - the same keep probabilities as mergekit, not its draws (mergekit uses the global
RNG), and independent of processing order; della rows of length 1 keep with p = d (A5). Trimming
is per tensor (mergekit), not over the whole model as in the TIES reference code.

Speed: the operators work in place on the task vectors the executor hands them (``task.inputs``,
fresh for each call; an input passed twice or non-contiguous is copied first) and allocate no
full-size temporary: the L1 rescale is two chunked reductions, the sparsifiers and the
sign election are the kernels of :mod:`.kernels` (radix top-k, chunked DARE drop, bit-pattern
disjoint mean), tested bit-equal to the plain formulations (``*_plain``) in tests/test_kernels.py
and re-derived in tests/test_baselines.py and tests/test_gta.py. Large tensors (the n task vectors
together >= 256 MiB: embeddings, heads) of every row here (ties with trim_rule topk; della on 2+
dims) are merged by the executor in two passes over row blocks instead (:mod:`.gta_rows`,
bit-identical, one task vector in memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import sparsify as sp
from .kernels import sign_election
from .kernels._chunks import chunk_len
from .registry import Operator, Param, TensorTask, generator, register


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Variant:
    """One method of the family: a row of mergekit's table."""

    name: str
    sparsifier: str  # magnitude | random | magnitude_outliers | della_magprune
    consensus: bool
    normalize: bool  # the default of ``normalize``
    rescale: bool  # the default of ``rescale``
    summary: str
    paper: str


VARIANTS = {v.name: v for v in (
    Variant("ties", "magnitude", True, True, False,
            "TIES: trim to density, elect sign by mass, disjoint mean", "arXiv 2306.01708"),
    Variant("dare_ties", "random", True, False, True,
            "DARE random drop, L1 rescale, then TIES sign election", "arXiv 2311.03099"),
    Variant("dare_linear", "random", False, False, True,
            "DARE random drop, L1 rescale, then a weighted sum", "arXiv 2311.03099"),
    Variant("breadcrumbs", "magnitude_outliers", False, False, False,
            "Model Breadcrumbs: drop the largest gamma and the smallest entries, weighted sum", "arXiv 2312.06795"),
    Variant("breadcrumbs_ties", "magnitude_outliers", True, False, False,
            "Model Breadcrumbs sparsification, then TIES sign election", "arXiv 2312.06795"),
    Variant("della", "della_magprune", True, True, True,
            "DELLA: keep probability by magnitude rank, L1 rescale, TIES sign election", "arXiv 2406.11617"),
    Variant("della_linear", "della_magprune", False, False, True,
            "DELLA: keep probability by magnitude rank, L1 rescale, weighted sum", "arXiv 2406.11617"),
)}
RANDOM = ("random", "della_magprune")


# ----------------------------------------------------------------------------- plain formulation


def disjoint_merge_plain(ds: list[torch.Tensor], weights: list[float], normalize: bool, lam: float) -> torch.Tensor:
    """TIES steps 3-5 by the definition: elect sign(sum d_i) (zero: +), keep the agreeing
    nonzero entries, sum them, divide by the kept weights (1 where none) when ``normalize``."""
    positive = sum(ds[1:], ds[0]) >= 0  # NaN sums elect the negative sign
    kept = [torch.where(positive, d > 0, d < 0) for d in ds]
    mixed = sum(torch.where(k, d, 0.0) for k, d in zip(kept, ds))
    if normalize:
        div = sum(k.to(ds[0].dtype) * w for k, w in zip(kept, weights))
        mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    return mixed * lam


def _owned(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs, cloned only where writing in place would be unsafe: a non-contiguous tensor
    or one sharing storage with an earlier input (the same tensor passed for two models)."""
    seen: set[int] = set()
    out = []
    for x in inputs:
        ptr = x.untyped_storage().data_ptr()
        if not x.is_contiguous() or ptr in seen:
            x = x.clone(memory_format=torch.contiguous_format)
            ptr = x.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(x)
    return out


# ----------------------------------------------------------------------------- the merge


def _sparsify_one(x: torch.Tensor, i: int, task: TensorTask, v: Variant, trim=None) -> torch.Tensor:
    """u_i = w_i * sparsified, rescaled tau_i in place (steps 1-3), x contiguous and owned.
    ``trim(x, i)``: trims x to model i's density in place the way ``magnitude_`` would (a cached
    threshold, `merge sweep`) and returns True, or returns False to let ``magnitude_`` do it."""
    mp = task.model_params[i]
    d = mp.density
    if d >= 1.0:  # every sparsifier leaves tau unchanged (and the L1 ratio would be 1)
        _scale_(x, 1.0, mp.weight)
        return x
    before = sp.l1_norm(x) if task.params.rescale else 0.0
    if v.sparsifier == "magnitude":
        if trim is None or not trim(x, i):
            sp.magnitude_(x, d, task.params.trim_rule)
    elif v.sparsifier == "magnitude_outliers":
        sp.outliers_(x, d, mp.gamma)
    else:
        gen = generator(task.params.seed, f"{task.name}\x00{i}", x.device)
        if v.sparsifier == "random":
            sp.random_(x, d, gen)
        else:
            sp.della_(x, d, mp.epsilon, gen)
    if task.params.rescale:
        _scale_(x, sp.rescale_factor(before, sp.l1_norm(x)), mp.weight)
    else:
        _scale_(x, 1.0, mp.weight)
    return x


def _scale_(x: torch.Tensor, s: float, w: float) -> None:
    """x *= s, then x *= w (two roundings, as mergekit: tau~ = rescaled mask, u = w tau~), in one
    chunked pass."""
    factors = [f for f in (s, w) if f != 1.0]
    if factors:
        xf = x.view(-1)
        step = chunk_len(xf)
        for lo in range(0, xf.numel(), step):
            for f in factors:
                xf[lo:lo + step].mul_(f)


def _check(task: TensorTask, v: Variant) -> None:
    if v.sparsifier == "della_magprune":  # before any tensor is touched
        for mp in task.model_params:
            sp.check_della(task.name, mp.density, mp.epsilon)


def merge(task: TensorTask, v: Variant, trim=None) -> torch.Tensor:
    """The merged delta of one tensor by variant ``v``. Like every operator here it may modify
    ``task.inputs`` (the task vectors, fresh for each call) in place and return one of them.
    ``trim``: see :func:`_sparsify_one`."""
    _check(task, v)
    weighted = [_sparsify_one(x, i, task, v, trim) for i, x in enumerate(_owned(task.inputs))]
    return _mix(task, weighted, v.consensus)


def _mix(task: TensorTask, weighted: list[torch.Tensor], consensus: bool) -> torch.Tensor:
    """Combine the weighted task vectors d_i (owned: they are overwritten; the result is d_0's
    storage).

    With ``consensus`` (TIES): elect sign(sum_i d_i) per entry (a zero sum counts as positive,
    a NaN one as negative), keep each d_i only where it is nonzero with that sign (NaN never),
    sum the kept entries in model order and, when ``normalize``, divide by the sum of the kept
    weights (1 where that is 0). Without: the plain sum, divided by the sum of the weights when
    ``normalize``. Then times lambda.

    The consensus is :func:`disjoint_merge_plain`, computed in place by
    :func:`.kernels.sign_election.disjoint_merge_`; the plain sum is chunked the same way.
    """
    weights = [mp.weight for mp in task.model_params]
    normalize = task.params.normalize
    lam = task.params["lambda"]
    mixed = weighted[0]
    n = mixed.numel()
    step = chunk_len(mixed)
    flats = [d.view(-1) for d in weighted]
    if consensus:
        sign_election.disjoint_merge_(flats, weights, normalize, lam)
        return mixed
    total_w = float(sum(weights))
    divisor = 1.0 if abs(total_w) < 1e-8 else total_w
    for lo in range(0, n, step):  # chunks stay in cache through the adds
        ds = [f[lo:lo + step] for f in flats]
        for d in ds[1:]:
            ds[0] += d
        if normalize:
            ds[0] /= divisor
        if lam != 1.0:
            ds[0].mul_(lam)
    return mixed


def _fn(v: Variant):
    def fn(task: TensorTask) -> torch.Tensor:
        return merge(task, v)

    fn.__name__ = fn.__qualname__ = v.name
    fn.__doc__ = f"{v.summary}; may modify ``task.inputs`` in place."
    return fn


ties = _fn(VARIANTS["ties"])
dare_ties = _fn(VARIANTS["dare_ties"])
dare_linear = _fn(VARIANTS["dare_linear"])

_LAMBDA = Param("lambda", float, 1.0, "scale applied to the merged task vector (after normalize)")
_INT8 = Param("int8_mask", bool, False, "accepted for mergekit compatibility; no effect (mergekit's mask dtype)")
_SEED = Param("seed", int, 0, "seed of the random masks; they depend on (seed, tensor name, model index)")
_TRIM = Param("trim_rule", str, "topk", "topk: keep exactly int(density*n) (mergekit); "
              "kthvalue: keep |x| >= k'-th smallest (TIES reference, one more entry)", choices=("topk", "kthvalue"))
_WEIGHT = Param("weight", float, 1.0, "per-model weight")
_DENSITY = Param("density", float, 1.0, "fraction of entries kept (1: no sparsification)", minimum=0.0, maximum=1.0)
_GAMMA = Param("gamma", float, 0.01, "fraction of the largest magnitudes dropped (ignored at density 1)", minimum=0.0)
_EPSILON = Param("epsilon", float, 0.15, "keep probabilities span density +/- epsilon by magnitude rank; "
                 "density +/- epsilon must lie in (0, 1)")
_DETAILS = {
    "magnitude": "keep the max(1, int(density*n)) largest |tau_i| of the whole tensor (density 0: none)",
    "random": "keep each entry of tau_i with probability density",
    "magnitude_outliers": "sort |tau_i| over the whole tensor, drop the int(gamma*n) largest, keep the next "
                          "int(density*n), drop the rest",
    "della_magprune": "keep each entry with probability density - epsilon + 2 epsilon r/(L-1), r its "
                      "ascending magnitude rank (0..L-1) along dim 1 (a 1-D tensor is one row)",
}

for _v in VARIANTS.values():
    register(
        Operator(
            name=_v.name,
            summary=_v.summary,
            spec="mergekit_compat.md M15" + (", magmax_opcm_baselines.md C3, D4" if _v.name == "ties" else ""),
            fn=_fn(_v),
            params=(
                _LAMBDA,
                Param("normalize", bool, _v.normalize, "divide by the sum of the weights that took part"),
                Param("rescale", bool, _v.rescale, "multiply each sparsified tau_i by |tau_i|_1 / |sparsified|_1"),
                *((_TRIM,) if _v.name == "ties" else ()),
                *((_SEED,) if _v.sparsifier in RANDOM else ()),
                _INT8,
            ),
            model_params=(_WEIGHT, _DENSITY)
            + ((_GAMMA,) if _v.sparsifier == "magnitude_outliers" else ())
            + ((_EPSILON,) if _v.sparsifier == "della_magprune" else ()),
            details=f"Per tensor: {_DETAILS[_v.sparsifier]}; rescale: true restores its L1 norm; weight; "
            + ("elect sign(sum w_i tau_i) and keep the agreeing entries; " if _v.consensus else "sum; ")
            + f"normalize: true divides by the weights that took part; times lambda. {_v.paper}; "
            "mergekit-compatible (masks seeded per (seed, tensor, model) where random).",
        )
    )
