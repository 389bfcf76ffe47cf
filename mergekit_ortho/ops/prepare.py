"""Operators split into a prepare and an apply step, so that `merge sweep` (issue 18) can keep what
does not depend on the swept value and redo only the rest.

For a method listed in :data:`PREPARATIONS`, ``prepare(task)`` returns a dict of tensors (so a
result can be stored as safetensors) and reads every parameter except those named in ``skips``;
``apply(task, prepared)`` finishes the merge (it may modify ``prepared`` in place) and returns what
the operator returns. ``apply(task, prepare(task))`` is the operator, bit for bit:

* ``tsv``: the operator *is* ``tsv_apply(tsv_prepare(task))`` (:mod:`.tsv`). prepare: the whole
  lambda = 1 merge in float64 (the weighted mean for non-SVD tensors); apply: times lambda, cast.
  lambda only scales the result (spec widen_corespace.md B2, ``tsv`` row), so the per-task SVDs and
  the two polar SVDs run once per sweep.
* ``core_space``: the operator *is* ``core_space_apply(core_space_prepare(task))``
  (:mod:`.core_space`). prepare: the bases U_ref, V_ref and the merged (isotropized) core M*;
  apply: lambda * M*, folded into factors by one SVD of the small core.
* generalized task arithmetic (``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``, :mod:`.gta`):
  lambda is the last operation of the merge, one float multiply of the merged value (both the
  sign-election kernel and the plain sum multiply by lambda after the division and skip it at 1),
  so prepare is the merge at lambda = 1 and apply multiplies by lambda: the same rounding. Tested
  bit-equal in tests/test_sweep.py. DARE / DELLA masks are seeded by (seed, tensor, model), so
  the prepared merge is deterministic too.
* ``ties`` also has a per-model :class:`Part`: model i's trimming threshold at its density
  (trim_rule topk, tensors the radix kernel handles): the cut (t, c) of
  :func:`.kernels.topk.radix_threshold`, i.e. keep |x| > t, and |x| == t before flat index c
  (bit patterns of the magnitudes), the same set the kernel keeps. Reused when another model's
  density, a weight or a method parameter changes (``models[0].density=...`` sweeps), since it
  reads only that model's task vector, its density and ``trim_rule``.

Pure tensor functions: no file I/O here (the cache lives in :mod:`mergekit_ortho.sweep`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import core_space as cs_mod
from . import gta
from . import tsv as tsv_mod
from .kernels import topk
from .kernels._chunks import INT_OF, chunk_len
from .registry import Params, TensorTask


@dataclass(frozen=True)
class Part:
    """A per-model piece of prepare: ``compute(x, i, task) -> {name: tensor}`` ({} when there is
    nothing to keep) reads only model i's input x, its parameters ``model_reads`` and the method
    parameters ``reads``."""

    compute: Callable[[torch.Tensor, int, Any], dict[str, torch.Tensor]]
    reads: tuple[str, ...] = ()
    model_reads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preparation:
    """A method's split: ``prepare(task) -> {name: tensor}`` (reads every parameter but ``skips``),
    ``apply(task, prepared) -> the operator's result``. With a ``part``, prepare is called as
    ``prepare(task, parts)``, ``parts[i]`` being ``part.compute`` of model i (or None: computed
    inside when needed)."""

    prepare: Callable[..., dict[str, torch.Tensor]]
    apply: Callable[[Any, dict[str, torch.Tensor]], Any]
    skips: tuple[str, ...] = ("lambda",)
    part: Part | None = None

    def run(self, task: Any, parts: list | None = None) -> dict[str, torch.Tensor]:
        return self.prepare(task, parts) if self.part is not None else self.prepare(task)


def _at_lambda_one(task: TensorTask) -> TensorTask:
    params = Params({**task.params, "lambda": 1.0})
    return TensorTask(task.name, task.base, task.inputs, params, task.model_params, task.model_names,
                      task.dtype, task.raw_inputs, task.stats, task.scalars)


def ties_cut(x: torch.Tensor, i: int, task: TensorTask) -> dict[str, torch.Tensor]:
    """Model i's top-k cut {"cut": int64 [t, c]} at its density, or {} where ``magnitude_`` takes
    another path (trim_rule kthvalue, density 0 or 1, small or half-precision tensors)."""
    d = task.model_params[i].density
    flat = x.reshape(-1)
    if task.params.trim_rule != "topk" or not 0.0 < d < 1.0 or not x.is_contiguous() \
            or x.dtype not in (torch.float32, torch.float64) or not topk.applies(flat):
        return {}
    n = flat.numel()
    k = max(int(d * n), 1)  # magnitude_'s count
    if k >= n:
        return {}
    t, m, n_eq, c = topk.threshold(flat, k)
    return {"cut": torch.tensor([t, n if m == n_eq else c], dtype=torch.int64)}


def keep_cut_(flat: torch.Tensor, t: int, c: int) -> torch.Tensor:
    """Zero, in place, every entry of ``flat`` (contiguous 1-D float32/float64) outside the cut:
    kept are |x| > t, and |x| == t at flat indices below c (magnitudes as bit patterns)."""
    n = flat.numel()
    itype = INT_OF[flat.element_size()]
    mask = torch.iinfo(itype).max
    step = chunk_len(flat)
    drop = torch.empty(min(step, n), dtype=torch.bool, device=flat.device)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        mag = flat[lo:hi].view(itype).bitwise_and(mask)
        s = min(max(c - lo, 0), hi - lo)
        d = drop[:hi - lo]
        torch.lt(mag[:s], t, out=d[:s])
        torch.le(mag[s:], t, out=d[s:])
        flat[lo:hi].masked_fill_(d, 0)
    return flat


def _gta(variant: gta.Variant) -> Preparation:
    def prepare(task: TensorTask, parts: list | None = None) -> dict[str, torch.Tensor]:
        def trim(x: torch.Tensor, i: int) -> bool:
            cut = (parts[i] or {}).get("cut") if parts else None
            if cut is None:
                return False
            keep_cut_(x.view(-1), int(cut[0]), int(cut[1]))
            return True

        return {"merged": gta.merge(_at_lambda_one(task), variant, trim if parts else None)}

    def apply(task: TensorTask, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        lam = task.params["lambda"]
        merged = prepared["merged"]
        return merged.mul_(lam) if lam != 1.0 else merged

    part = Part(ties_cut, ("trim_rule",), ("density",)) if variant.sparsifier == "magnitude" else None
    if part is None:
        return Preparation(lambda task: prepare(task), apply)
    return Preparation(prepare, apply, part=part)


PREPARATIONS: dict[str, Preparation] = {
    "tsv": Preparation(tsv_mod.tsv_prepare, tsv_mod.tsv_apply),
    "core_space": Preparation(cs_mod.core_space_prepare, cs_mod.core_space_apply),
    **{name: _gta(v) for name, v in gta.VARIANTS.items()},
}


def preparation(method: str) -> Preparation | None:
    """The split of ``method`` (its canonical name), or None when it has none."""
    return PREPARATIONS.get(method)
