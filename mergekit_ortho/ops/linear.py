"""Weighted averaging and task arithmetic.

Spec: ../shared/specs/magmax_opcm_baselines.md Part C1 (weighted / simple averaging) and C2
(task arithmetic). Recipe semantics follow mergekit's ``linear`` and ``task_arithmetic`` so that
mergekit recipes for these methods give the same tensors (fp32 compute):

* ``linear``: theta = sum_i w_i theta_i / sum_i w_i (``normalize: true``, the default) or
  sum_i w_i theta_i (``normalize: false``). Reads weights; needs no base model.
* ``task_arithmetic``: theta = theta_0 + lambda * sum_i w_i tau_i, with ``normalize`` (default
  false, as mergekit) dividing the sum by sum_i w_i (left undivided when |sum_i w_i| < 1e-8). It is
  the no-sparsifier, no-consensus row of generalized task arithmetic (:mod:`.gta`,
  mergekit_compat.md M15): like mergekit it accepts per-model ``density`` (1) and ``rescale``
  (false) / ``int8_mask`` (false), which have no effect without a sparsifier.

Both are linear, so each has an exact streaming fold: one model tensor in memory at a time.
"""
from __future__ import annotations

from .kernels.convert import fold_input, fold_input_chunks
from .registry import Fold, LoraResult, LoraTask, Operator, Param, TensorTask, register

_WEIGHT = Param("weight", float, 1.0, "per-model weight")


def _divisor(weights: list[float]) -> float:
    total = float(sum(weights))
    # mergekit leaves near-zero weight sums undivided instead of blowing up
    return 1.0 if abs(total) < 1e-8 else total


def _weights(task: TensorTask) -> list[float]:
    return [mp.weight for mp in task.model_params]


def _average_divisor(weights: list[float], name: str) -> float:
    """Sum of the weights of a weighted average. Weights that cancel are refused: mergekit divides
    by the zero sum and writes inf/NaN (its Appendix A9)."""
    total = float(sum(weights))
    if abs(total) < 1e-8:
        from ..errors import UserError

        raise UserError(f"linear: the weights of tensor '{name}' sum to {total:g}, and the weighted average "
                        "divides by that sum; give weights that do not cancel, or normalize: false")
    return total


# -- streaming folds: the running weighted sum, scaled at the end -------------------------------


def _sum_start(task: TensorTask):
    return None


def _sum_step(acc, x, i, task: TensorTask):
    w = task.model_params[i].weight
    if acc is None:  # x is ours (see Fold): it becomes the accumulator
        acc = fold_input(x, task)
        return acc.mul_(w) if w != 1.0 else acc
    a = acc.view(-1)
    for lo, hi, v in fold_input_chunks(x, task):  # raw bf16 weights: no full-size fp32 copy
        a[lo:hi].add_(v, alpha=w)
    return acc


def _linear_finish(acc, task: TensorTask):
    if task.params.normalize:
        acc = acc.div_(_average_divisor(_weights(task), task.name))
    return acc


def _ta_finish(acc, task: TensorTask):
    if task.params.normalize:
        acc = acc.div_(_divisor(_weights(task)))
    lam = task.params["lambda"]
    return acc.mul_(lam) if lam != 1.0 else acc


def _fold_all(task: TensorTask, finish):
    acc = _sum_start(task)
    for i, x in enumerate(task.inputs):
        acc = _sum_step(acc, x, i, task)
    return finish(acc, task)


def linear(task: TensorTask):
    """Weighted average of the models' weights (C1)."""
    return _fold_all(task, _linear_finish)


def task_arithmetic(task: TensorTask):
    """Merged delta lambda * sum_i w_i tau_i (C2), optionally normalised by sum_i w_i."""
    return _fold_all(task, _ta_finish)


# -- exact low-rank forms on LoRA inputs: concatenate the ranks -----------------------------------


def _lora_concat(task: LoraTask, coefficients: list[float]) -> LoraResult:
    """sum_i c_i B_i A_i = [c_1 B_1 | ... | c_n B_n] @ [A_1; ...; A_n]: exact, rank = sum of ranks."""
    import torch

    keep = [(A, B * c) for (A, B), c in zip(task.factors, coefficients) if c != 0.0 and A.shape[0] > 0]
    if not keep:
        A0, B0 = task.factors[0]
        return LoraResult(A=A0[:0], B=B0[:, :0], report={"rank": 0})
    A = torch.cat([a for a, _ in keep], dim=0)
    B = torch.cat([b for _, b in keep], dim=1)
    return LoraResult(A=A, B=B, report={"rank": int(A.shape[0])})


def linear_lora(task: LoraTask) -> LoraResult:
    from ..errors import UserError

    weights = [mp.weight for mp in task.model_params]
    if not task.params.normalize:
        raise UserError("linear with normalize: false scales the base weights by the sum of the weights; "
                        "it has no LoRA form - use output format full or task_arithmetic")
    d = _average_divisor(weights, task.name)
    return _lora_concat(task, [w / d for w in weights])


def task_arithmetic_lora(task: LoraTask) -> LoraResult:
    weights = [mp.weight for mp in task.model_params]
    d = _divisor(weights) if task.params.normalize else 1.0
    lam = task.params["lambda"]
    return _lora_concat(task, [lam * w / d for w in weights])


register(
    Operator(
        name="linear",
        aliases=("average",),
        summary="Weighted average of the models' weights",
        spec="magmax_opcm_baselines.md C1",
        fn=linear,
        reads="weights",
        needs_base=False,
        base_input=True,
        params=(Param("normalize", bool, True, "divide by the sum of the weights"),),
        model_params=(_WEIGHT,),
        fold=Fold(_sum_start, _sum_step, _linear_finish, raw_weights=True),
        elementwise=True,
        lora_fn=linear_lora,
        details="theta = sum w_i theta_i / sum w_i. Equal weights give the plain mean. "
        "mergekit-compatible; no base model needed. A base_model is one of the inputs, listed or not "
        "(mergekit's rule; give it a weight under the top-level parameters); with LoRA inputs it is the "
        "model the LoRAs apply to.",
    )
)

register(
    Operator(
        name="task_arithmetic",
        summary="Base plus lambda times the weighted sum of task vectors",
        spec="magmax_opcm_baselines.md C2",
        fn=task_arithmetic,
        params=(
            Param("lambda", float, 1.0, "scale applied to the summed task vector"),
            Param("normalize", bool, False, "divide the sum by the sum of the weights"),
            Param("rescale", bool, False, "accepted for mergekit compatibility; no effect "
                  "(task_arithmetic does not sparsify, so there is nothing to rescale)"),
            Param("int8_mask", bool, False, "accepted for mergekit compatibility; no effect (mergekit's mask dtype)"),
        ),
        model_params=(_WEIGHT, Param("density", float, 1.0, "accepted for mergekit compatibility; no effect "
                                     "(task_arithmetic does not sparsify; use ties or dare_linear to trim)",
                                     minimum=0.0, maximum=1.0)),
        fold=Fold(_sum_start, _sum_step, _ta_finish, raw_weights=True),
        elementwise=True,
        lora_fn=task_arithmetic_lora,
        details="theta = theta_0 + lambda * sum w_i (theta_i - theta_0). lambda = 1/T with unit "
        "weights equals simple averaging. mergekit-compatible.",
    )
)
