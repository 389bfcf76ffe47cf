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
* trimming uses ``topk`` (exactly k = int(density * n) entries) instead of a full argsort; the
  ``trim_rule: kthvalue`` option reproduces the TIES/MagMax reference code, which keeps every
  entry >= the k'-th smallest magnitude (int(n * density) + 1 entries, ties included; spec C3.2);
* a density that would keep no entry of a tiny tensor keeps one (mergekit asserts instead);
* DARE draws its masks from a generator seeded by (seed, tensor name, model index), so results do
  not depend on the order tensors are processed in (mergekit uses the global RNG).

Trimming is per tensor (mergekit), not global over the model as in the TIES reference code:
streaming one tensor at a time makes a global threshold a second pass we do not pay for.
"""
from __future__ import annotations

import torch

from .registry import Operator, Param, TensorTask, generator, register


def magnitude_trim(x: torch.Tensor, density: float, rule: str = "topk") -> torch.Tensor:
    """Zero all but the largest-magnitude ``density`` fraction of x (a new tensor)."""
    n = x.numel()
    if density >= 1.0 or n == 0:
        return x.clone()
    k = max(int(density * n), 1)
    flat = x.reshape(-1)
    mags = flat.abs()
    if rule == "kthvalue":
        # reference semantics: threshold at the k'-th smallest magnitude, keep |x| >= thr
        kth = n - int(n * density)
        if kth <= 0:
            return x.clone()
        thr = mags.kthvalue(kth).values
        return torch.where(mags >= thr, flat, torch.zeros((), dtype=x.dtype)).reshape(x.shape)
    idx = torch.topk(mags, k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(x.shape)


def random_drop(
    x: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; divide survivors by it if ``rescale``."""
    if density >= 1.0:
        return x.clone()
    keep = torch.rand(x.shape, generator=gen, dtype=torch.float32, device=x.device) < density
    out = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if rescale and density > 0:
        out.div_(density)
    return out


def _sparsify(task: TensorTask, sparsify: str) -> list[torch.Tensor]:
    out = []
    for i, (x, mp) in enumerate(zip(task.inputs, task.model_params)):
        d = mp["density"]
        if sparsify == "magnitude":
            y = magnitude_trim(x, d, task.params["trim_rule"])
        else:
            gen = generator(task.params["seed"], f"{task.name}\x00{i}")
            y = random_drop(x, d, gen, task.params["rescale"])
        w = mp["weight"]
        if w != 1.0:
            y.mul_(w)
        out.append(y)
    return out


def _mix(task: TensorTask, weighted: list[torch.Tensor], consensus: bool) -> torch.Tensor:
    weights = [mp["weight"] for mp in task.model_params]
    if consensus:
        total = weighted[0].clone()
        for d in weighted[1:]:
            total += d
        positive = total >= 0
        del total
        mixed = torch.zeros_like(weighted[0])
        divisor = torch.zeros_like(weighted[0])
        for d, w in zip(weighted, weights):
            agree = torch.where(positive, d > 0, d < 0)
            mixed += torch.where(agree, d, 0.0)
            divisor += agree.to(d.dtype) * w
        divisor[divisor == 0] = 1.0
    else:
        mixed = weighted[0].clone()
        for d in weighted[1:]:
            mixed += d
        total_w = float(sum(weights))
        divisor = 1.0 if abs(total_w) < 1e-8 else total_w
    if task.params["normalize"]:
        mixed /= divisor
    lam = task.params["lambda"]
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed


def ties(task: TensorTask) -> torch.Tensor:
    return _mix(task, _sparsify(task, "magnitude"), consensus=True)


def dare_ties(task: TensorTask) -> torch.Tensor:
    return _mix(task, _sparsify(task, "random"), consensus=True)


def dare_linear(task: TensorTask) -> torch.Tensor:
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
