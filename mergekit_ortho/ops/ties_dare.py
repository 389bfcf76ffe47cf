"""TIES and DARE (sparsify, elect a sign, disjoint merge).

Spec: ../shared/specs/magmax_opcm_baselines.md Part C3 (TIES) and D4 (golden numbers); DARE from
Yu et al. 2023 (arXiv 2311.03099). Recipe semantics are mergekit's generalized task arithmetic so
that a mergekit recipe gives the same tensors:

1. sparsify each task vector per tensor: ``ties`` keeps the ``density`` fraction of largest
   magnitudes; ``dare_*`` keeps each entry with probability ``density`` and (``rescale: true``)
   divides the survivors by ``density``;
2. weight: d_i = w_i * tau_i;
3. ``ties`` / ``dare_ties`` elect the sign of sum_i d_i per entry (a zero sum counts as positive,
   as mergekit) and keep only entries of that sign (zeros never count);
4. mixed = sum of kept d_i, divided by the sum of the kept weights when ``normalize``;
5. merged delta = lambda * mixed.

Deviations from mergekit, all deliberate:
* trimming keeps exactly k = int(density * n) entries, the k largest magnitudes; entries whose
  magnitude equals the k-th largest (the threshold) are kept lowest flat index first, so the
  kept set is fully determined (mergekit's argsort and ``torch.topk`` leave that choice
  unspecified). NaN counts as the largest magnitude. Large float tensors find the threshold by
  an exact radix select on the float bit patterns instead of a sort/topk (see
  :func:`magnitude_trim`); the result is the same set either way. The
  ``trim_rule: kthvalue`` option reproduces the TIES/MagMax reference code, which keeps every
  entry >= the k'-th smallest magnitude (int(n * density) + 1 entries, ties included; spec C3.2);
* a density that would keep no entry of a tiny tensor keeps one (mergekit asserts instead);
* DARE draws its masks from a generator seeded by (seed, tensor name, model index), so results do
  not depend on the order tensors are processed in (mergekit uses the global RNG).

Trimming is per tensor (mergekit), not global over the model as in the TIES reference code:
streaming one tensor at a time makes a global threshold a second pass we do not pay for.

Speed: the operators work in place on the task vectors the executor hands them (``task.inputs``,
which the executor computes afresh for each call; an input passed twice or non-contiguous is
copied first) and avoid full-size temporaries, whose page faults cost more than the arithmetic.
The fast forms live in :mod:`.kernels`: the top-k by radix select (:mod:`.kernels.topk`), the
DARE mask (:mod:`.kernels.dare_drop`), the sign election and disjoint mean on the float bit
patterns (:mod:`.kernels.sign_election`). The plain formulations below (``*_plain``) are the
definition; tests/test_kernels.py checks the kernels against them bit for bit, and
tests/test_baselines.py re-derives the operators, with the deterministic tie rule above as the
only change of the kept set.
"""
from __future__ import annotations

import torch

from .kernels import dare_drop, sign_election, topk
from .kernels._chunks import chunk_len
from .registry import Operator, Param, TensorTask, generator, register


# ----------------------------------------------------------------------------- plain formulations


def keep_top_k_plain_(flat: torch.Tensor, k: int) -> None:
    """Zero, in place, all but the k largest magnitudes of ``flat`` (1-D); equal magnitudes in
    increasing index order (a stable descending sort; NaN sorts as the largest). 1 <= k <= n."""
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    drop = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    drop[order[:k]] = False
    flat.masked_fill_(drop, 0)


def random_drop_plain(x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool) -> torch.Tensor:
    """DARE by the definition: keep x where its float32 draw is < density (density < 1)."""
    u = torch.rand(x.shape, generator=gen, dtype=torch.float32, device=x.device)
    y = torch.where(u < density, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return y / density if rescale and density > 0 else y


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


# ----------------------------------------------------------------------------- TIES and DARE


def _keep_top_k_(flat: torch.Tensor, k: int) -> None:
    if topk.applies(flat):
        topk.keep_top_k_(flat, k)  # radix select: the same set, no sort of a large tensor
    else:
        keep_top_k_plain_(flat, k)


def _trim_(x: torch.Tensor, density: float, rule: str) -> torch.Tensor:
    """:func:`magnitude_trim` in place on x (contiguous); returns x."""
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x
    flat = x.view(-1)
    if rule == "kthvalue":
        # reference semantics: threshold at the k'-th smallest magnitude, keep |x| >= thr
        kth = n - int(n * density)
        if kth <= 0:
            return x
        mags = flat.abs()
        thr = mags.kthvalue(kth).values
        keep = mags >= thr
        del mags
        flat.masked_fill_(keep.logical_not_(), 0)
        return x
    _keep_top_k_(flat, max(int(density * n), 1))
    return x


def magnitude_trim(x: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    """Zero all but the largest-magnitude ``density`` fraction of x (a new tensor; x is untouched).

    ``rule="topk"`` keeps exactly k = max(int(density * n), 1) entries: all entries whose
    magnitude exceeds the k-th largest magnitude t, and then those with magnitude exactly t in
    increasing flat (row-major) index order until k are kept - so among equal magnitudes at the
    threshold the lowest indices win, deterministically. +0 and -0 are equal magnitudes; NaN
    counts as larger than any number. Large float tensors find t with an exact radix select
    (:mod:`.kernels.topk`) instead of a sort; same set either way.

    ``rule="kthvalue"`` keeps every entry with magnitude >= the k'-th smallest, k' = n - int(n *
    density) (the TIES reference code; one more entry, ties all kept).
    """
    if density >= 1.0 or x.numel() == 0:
        return x.clone()
    return _trim_(x.clone(memory_format=torch.contiguous_format), density, rule)


def _drop_(x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool) -> torch.Tensor:
    """:func:`random_drop` in place on x (contiguous): :func:`random_drop_plain` without its
    full-size draws and mask (the same draws from ``gen``)."""
    return x if density >= 1.0 else dare_drop.random_drop_(x, density, gen, rescale)


def random_drop(
    x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; divide survivors by it if ``rescale``.

    Draws ``torch.rand(x.shape, generator=gen, dtype=float32)`` and keeps the entries whose draw
    is below ``density`` (a new tensor; x is untouched)."""
    if density >= 1.0:
        return x.clone()
    return _drop_(x.clone(memory_format=torch.contiguous_format), density, gen, rescale)


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


def _sparsify(task: TensorTask, sparsify: str) -> list[torch.Tensor]:
    """Sparsified, weighted task vectors, computed in place in ``task.inputs``."""
    out = []
    for i, (x, mp) in enumerate(zip(_owned(task.inputs), task.model_params)):
        d = mp.density
        if sparsify == "magnitude":
            y = _trim_(x, d, task.params.trim_rule)
        else:
            gen = generator(task.params.seed, f"{task.name}\x00{i}")
            y = _drop_(x, d, gen, task.params.rescale)
        w = mp.weight
        if w != 1.0:
            yf = y.view(-1)
            step = chunk_len(yf)
            for lo in range(0, yf.numel(), step):
                yf[lo:lo + step].mul_(w)
        out.append(y)
    return out


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


def ties(task: TensorTask) -> torch.Tensor:
    """TIES merge of one tensor. Like every operator here it may modify ``task.inputs`` (the
    task vectors, which the executor computes fresh for each call) in place and may return one of
    them as the result; pass copies if the inputs must survive."""
    return _mix(task, _sparsify(task, "magnitude"), consensus=True)


def dare_ties(task: TensorTask) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election; may modify ``task.inputs`` in place."""
    return _mix(task, _sparsify(task, "random"), consensus=True)


def dare_linear(task: TensorTask) -> torch.Tensor:
    """DARE drop-and-rescale, then a weighted sum; may modify ``task.inputs`` in place."""
    return _mix(task, _sparsify(task, "random"), consensus=False)


_MODEL_PARAMS = (
    Param("weight", float, 1.0, "per-model weight"),
    Param("density", float, 1.0, "fraction of entries kept", minimum=0.0, maximum=1.0),
)
_LAMBDA = Param("lambda", float, 1.0, "scale applied to the merged task vector")
_INT8 = Param("int8_mask", bool, False, "accepted for mergekit compatibility; masks are boolean here")
_SEED = Param("seed", int, 0, "DARE seed; masks depend on (seed, tensor name, model index)")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the sum of the weights that took part")


register(
    Operator(
        name="ties",
        summary="TIES: trim to density, elect sign by mass, disjoint mean",
        spec="magmax_opcm_baselines.md C3, D4",
        fn=ties,
        params=(
            _LAMBDA,
            _normalize(True),
            Param("rescale", bool, False, "accepted for mergekit compatibility (no effect on magnitude trimming)"),
            Param("trim_rule", str, "topk", "topk: keep exactly int(density*n) (mergekit); "
                  "kthvalue: keep |x| >= k'-th smallest (TIES reference, one more entry)",
                  choices=("topk", "kthvalue")),
            _INT8,
        ),
        model_params=_MODEL_PARAMS,
        details="Per tensor: keep the top density fraction of |tau_i|, weight, elect sign(sum), "
        "average the agreeing entries (normalize: true) or sum them (false), times lambda.",
    )
)

for _name, _fn, _consensus in (("dare_ties", dare_ties, True), ("dare_linear", dare_linear, False)):
    register(
        Operator(
            name=_name,
            summary=f"DARE random drop-and-rescale, then {'TIES sign election' if _consensus else 'a weighted sum'}",
            spec="magmax_opcm_baselines.md C3 (sign election); DARE arXiv 2311.03099",
            fn=_fn,
            params=(
                _LAMBDA,
                _normalize(False),
                Param("rescale", bool, True, "divide kept entries by density"),
                _SEED,
                _INT8,
            ),
            model_params=_MODEL_PARAMS,
            details="Each entry of tau_i survives with probability density (rescaled by 1/density), "
            "seeded per (seed, tensor, model) so the result does not depend on processing order.",
        )
    )
