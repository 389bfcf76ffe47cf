"""Arcee Fusion: keep the model's changes whose importance is an outlier, the base elsewhere.

Spec: ../shared/specs/mergekit_compat.md M23 (mergekit's ``arcee_fusion``, golden numbers from
mergekit 0.1.5), M27 and Appendix A10 (exact quantiles). mergekit-compatible.

b is the base, m the one other model, per tensor:

1. importance I = |m - b| * KL_row, KL_row = sum p log(p / q) along the last dimension (a 1-D
   tensor is one row), p = softmax(m) + 1e-8, q = softmax(b) + 1e-8 (the row's KL broadcast
   over its entries);
2. threshold tau = Q(0.5) + 1.5 (Q(0.75) - Q(0.25)), Q(q) = sorted(I)[floor(q (n - 1))];
3. result b + (m - b) [I >= tau].

Deliberate deviation (A10): the quantiles are always exact order statistics of all n importances.
mergekit sorts a random sample of 10^6 entries (drawn with its global generator) when n > 10^6;
for n <= 10^6 the two are identical, and ours is deterministic for every n. The order
statistics come from ``kthvalue`` (linear time) rather than a full sort; the index
floor(q (n - 1)) is integer arithmetic (mergekit's float32 product is exact for n <= 10^6).

No parameters. Reads weights; needs the base and exactly one other model.
"""
from __future__ import annotations

import torch

from .errors import ShapeMismatch
from .registry import Operator, TensorTask, register

#: added to both softmaxes before the log (mergekit)
SOFTMAX_EPS = 1e-8
#: tau = median + IQR_FACTOR * (Q3 - Q1): Tukey's outlier fence
IQR_FACTOR = 1.5


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """I = |m - b| times the KL divergence of the rows' softmaxes (last dimension)."""
    p = torch.softmax(model, dim=-1).add_(SOFTMAX_EPS)
    q = torch.softmax(base, dim=-1).add_(SOFTMAX_EPS)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    return (model - base).abs_().mul_(kl)


def order_statistic(flat: torch.Tensor, q_num: int, q_den: int) -> torch.Tensor:
    """sorted(flat)[floor(q (n - 1))] for q = q_num / q_den, exactly (no sampling)."""
    k = (q_num * (flat.numel() - 1)) // q_den
    return torch.kthvalue(flat, k + 1).values  # kthvalue counts from 1


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """tau = Q(0.5) + 1.5 (Q(0.75) - Q(0.25)) over every entry of ``scores``."""
    flat = scores.reshape(-1)
    median = order_statistic(flat, 1, 2)
    q1, q3 = order_statistic(flat, 1, 4), order_statistic(flat, 3, 4)
    return median + IQR_FACTOR * (q3 - q1)


def arcee_fusion(task: TensorTask) -> torch.Tensor:
    (model,) = task.inputs  # the plan guarantees one model besides the base (Operator.model_count)
    base = task.base
    if model.shape != base.shape:
        raise ShapeMismatch(f"arcee_fusion: tensor '{task.name}' has shape {tuple(model.shape)} in the model "
                            f"and {tuple(base.shape)} in the base")
    if model.numel() == 0:
        return model
    scores = importance(model, base)
    keep = scores >= threshold(scores)
    delta = model.sub_(base)  # the input is ours: it becomes m - b, masked, then b + it
    return delta.mul_(keep).add_(base)


register(
    Operator(
        name="arcee_fusion",
        summary="Arcee Fusion: the model's entries where |m - b| * row KL is an outlier, the base elsewhere",
        spec="mergekit_compat.md M23, M27, A10",
        fn=arcee_fusion,
        reads="weights",
        needs_base=True,
        model_count=1,
        details="I = |m - b| * KL(softmax(m) + 1e-8 || softmax(b) + 1e-8), the KL per row along the "
        "last dimension (a 1-D tensor is one row); tau = Q(0.5) + 1.5 (Q(0.75) - Q(0.25)) with "
        "Q(q) = sorted(I)[floor(q (n-1))]; result b + (m - b) [I >= tau]. No parameters; the base "
        "and exactly one other model. mergekit-compatible, except that the quantiles are always "
        "exact (mergekit samples 10^6 entries at random when a tensor has more; identical below).",
    )
)
