"""TSV-M: Task Singular Vectors merging of full task vectors (dense, full space).

Spec: ../shared/specs/widen_corespace.md Part B, the ``tsv`` row of the B2 rule table (the rule
itself), B8.5 (full-space TSV keeps floor(min(m, n)/T) triplets per task, the reference's choice)
and B10.6 (T = 1 returns the task vector). Paper: Gargiulo et al., "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025, arXiv 2412.00081. This module holds no
TSV math of its own: every matrix goes through :func:`mergekit_ortho.ops.core_space.merge_matrices`
(``"tsv"`` -> :func:`~mergekit_ortho.ops.core_space.tsv_keep_counts` +
:func:`~mergekit_ortho.ops.core_space.tsv_merge`), the same code the ``core_space`` operator runs on
its cores, so dense TSV on LoRA deltas *is* ``core_space.full_space_merge(factors, "tsv")``.

Reads task vectors tau_t = theta_t - theta_0 (needs the base), T models, per-model weight w_t.
Per tensor:

* **2-D** (m x n, PyTorch out x in): X_t = w_t tau_t; thin SVD X_t = U_t S_t V_t^T; keep each
  task's first c = floor(min(m, n)/T) triplets; U_cat = [U_1[:, :c], ..., U_T[:, :c]] (m x Tc),
  V_cat = [V_1[:, :c], ..., V_T[:, :c]]; P_U, P_V = the polar factors (U V^T of their own SVDs,
  i.e. the nearest matrices with orthonormal columns); merged delta
  ``lambda * P_U diag(S_1[:c], ..., S_T[:c]) P_V^T``.
* **Fused MoE expert stacks** (transformers 5 ``experts.gate_up_proj`` [E, 2I, H] /
  ``experts.down_proj`` [E, H, I], :mod:`.expert_stacks`): each expert's part is its own linear
  map, so the 2-D rule runs once per expert and part (E * parts SVD merges), exactly as on the
  per-expert 2-D layout of published checkpoints: both layouts give the same result, bit for bit.
* **Other 3-D and higher** (conv kernels out x in x kh x kw, ...): flattened to out x prod(rest),
  the 2-D rule, reshaped back (as WIDEN flattens them).
* **1-D and 0-D** (biases, norm weights, scalars): ``lambda * sum_t w_t tau_t / T``, the mean of
  the weighted task vectors (the TSV-M reference averages every non-matrix parameter).
* **Input embeddings** (name matches ``embedding_pattern``; default: Llama/Qwen/Mistral/OPT
  ``embed_tokens``, GPT-2 ``wte``, BERT/Bloom/Falcon ``word_embeddings``, GPT-NeoX ``embed_in``,
  ``tok_embeddings``, CLIP ``token_embedding``, T5 ``shared``): the same weighted mean. A
  vocab x hidden table is a lookup, not a linear map, so its singular vectors carry no task
  subspace, and its SVD would be the most expensive of the model. ``lm_head`` *is* a linear map
  and goes through the 2-D rule; an empty pattern sends every 2-D+ tensor through SVD.
* **Too many tasks for the matrix** (min(m, n) < T after flattening, so c = 0): the weighted
  mean too (toolkit decision: the floor rule would keep no triplet and silently return the
  base for that tensor).

Defaults: ``lambda`` 1.0 (the paper searches alpha on validation data; 1.0 is the plain rule,
applied once to every merged tensor, matrices and means alike), per-model ``weight`` 1.0
(multiplies tau_t before the rule, as in ``core_space``'s inner rules),
``embedding_pattern`` as above (the same default as ``widen``).

Decisions, all deliberate:

* precision: float32 (and bf16 / fp16) task vectors are converted to float64 for the SVDs, the
  polar factors and the rebuild (the spec's B8.8 rule for SVD-based merging); the result is
  cast back to the inputs' dtype (the compute dtype) at the end. float64 inputs stay float64.
  Memory: T float64 copies of the tensor plus the SVD factors, so about 3T x the float32 size of
  the largest matrix at peak; no streaming form exists (the polar factors need every task's
  singular vectors at once);
* keep rule: the reference's uniform floor(min(m, n)/T) per task, whatever the tasks' ranks.
  On LoRA deltas of rank r < floor(min(m, n)/T) that keeps zero-sigma triplets with arbitrary
  vectors, which perturb the polar factors (B8.5); ``core_space`` with ``inner_method: tsv``
  keeps exactly r instead, and the two agree when r = floor(min(m, n)/T);
* symmetry: the result does not depend on the order of the models (concatenation order only
  permutes the columns of U_cat / V_cat and the entries of S consistently);
* T = 1 keeps every triplet and the polar factors of orthonormal blocks are the blocks
  themselves, so a single model returns lambda * w * tau (up to float64 round-off).

Tests: tests/test_tsv.py (equality with ``full_space_merge``, T = 1, orthogonal supports sum,
means, order invariance, end to end through ``merge run``).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .core_space import merge_matrices
from .expert_stacks import blocks, matrix_shape, per_matrix
from .registry import Operator, Param, TensorTask, name_matches, register
from .widen import DEFAULT_EMBEDDING_PATTERN  # the same input-embedding tables


def is_embedding(name: str, pattern: str) -> bool:
    return name_matches(pattern, name)


def uses_svd(name: str, shape: tuple[int, ...], n_tasks: int, pattern: str = DEFAULT_EMBEDDING_PATTERN) -> bool:
    """True when a tensor of this name and shape goes through the SVD rule (else: weighted mean);
    a fused expert stack by the shape of one expert's matrix."""
    if len(shape) < 2 or is_embedding(name, pattern):
        return False
    per_expert = matrix_shape(name, shape)
    if per_expert is not None:
        return min(per_expert) >= n_tasks
    m = int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return min(m, n) >= n_tasks


def _weights(task: TensorTask) -> list[float]:
    T, mps = len(task.inputs), task.model_params
    if len(mps) != T:
        raise UserError(f"tsv: tensor '{task.name}': {len(mps)} model parameter sets for {T} models")
    return [mp.weight for mp in mps]


def weighted_mean(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_t w_t x_t / T in the inputs' dtype (promoted to at least float32); inputs untouched."""
    dt = torch.promote_types(inputs[0].dtype, torch.float32)
    out = torch.zeros(inputs[0].shape, dtype=dt, device=inputs[0].device)
    for x, w in zip(inputs, weights):
        out.add_(x.to(dt), alpha=w)
    return out.div_(len(inputs))


def tsv(task: TensorTask) -> torch.Tensor:
    """Merged delta for one tensor (the rules in the module docstring). Inputs are not modified.
    ``tsv_apply(task, tsv_prepare(task))``: the split lets `merge sweep` reuse the unscaled merge."""
    return tsv_apply(task, tsv_prepare(task))


def tsv_prepare(task: TensorTask) -> dict[str, torch.Tensor]:
    """Everything but lambda: {"merged": the lambda = 1 merge before the cast (float64 for the SVD
    rule, shaped like the tensor; the weighted mean otherwise), "dtype": an empty tensor of the
    result's dtype}. Reads every parameter except ``lambda``."""
    xs = list(task.inputs)
    if not xs:
        raise UserError(f"tsv: no input models for tensor '{task.name}'")
    shape = xs[0].shape
    for i, x in enumerate(xs):
        if x.shape != shape:
            raise UserError(
                f"tsv: tensor '{task.name}' has shape {tuple(x.shape)} in model {i}, model 0 has {tuple(shape)}"
            )
    pattern = task.params.embedding_pattern
    w = _weights(task)
    T = len(xs)
    out_dtype = torch.promote_types(xs[0].dtype, torch.float32)
    like = torch.empty(0, dtype=out_dtype, device=xs[0].device)
    if not uses_svd(task.name, tuple(shape), T, pattern):
        return {"merged": weighted_mean(xs, w), "dtype": like}
    stack = blocks(task.name, tuple(shape))
    if stack is not None:  # one SVD merge per expert and part, as the per-expert layout gets
        def rule(mats):
            return merge_matrices([m.to(torch.float64) for m in mats], "tsv", weights=w, name=task.name,
                                  tsv_keep="uniform")
        return {"merged": per_matrix(rule, xs, stack, torch.float64), "dtype": like}
    # 2-D view (3-D+ flattened to out x prod(rest)), float64 for the SVDs
    mats = [x.reshape(shape[0], -1).to(torch.float64) for x in xs]
    merged = merge_matrices(mats, "tsv", weights=w, name=task.name, tsv_keep="uniform")
    return {"merged": merged.reshape(shape), "dtype": like}


def tsv_apply(task: TensorTask, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
    """lambda * the unscaled merge, cast to the result dtype (``prepared`` is consumed: scaled in place)."""
    lam = task.params["lambda"]
    merged = prepared["merged"]
    if lam != 1.0:
        merged = merged.mul_(lam)
    return merged.to(prepared["dtype"].dtype)


register(
    Operator(
        name="tsv",
        summary="TSV-M: per-task SVD, floor(min(m,n)/T) triplets each, orthogonalised U and V blocks",
        spec="widen_corespace.md B2 (tsv rule), B8.5, B10.6; Gargiulo et al., CVPR 2025",
        fn=tsv,
        needs_base=True,
        params=(
            Param("lambda", float, 1.0, "global scale alpha applied once to every merged tensor"),
            Param("embedding_pattern", str, DEFAULT_EMBEDDING_PATTERN,
                  "regex (re.search on the tensor name) for input-embedding tables, which get the "
                  "weighted mean instead of the SVD rule (empty: SVD for every 2-D+ tensor)", regex=True),
        ),
        model_params=(Param("weight", float, 1.0, "multiplies the model's task vector before the rule"),),
        details="Task Singular Vectors merging (TSV-M) of full task vectors. 2-D tensors (m x n): "
        "X_t = weight_t * tau_t; SVD of each X_t; keep each task's first floor(min(m,n)/T) "
        "singular triplets; concatenate the U blocks and the V blocks; replace each "
        "concatenation by its polar factor (U V^T of its SVD); merged delta = lambda * P_U "
        "diag(S) P_V^T. Fused MoE expert stacks (experts.gate_up_proj / down_proj, 3-D): the 2-D rule "
        "per expert and part, as on the per-expert layout. Other 3-D+ tensors: flattened to out x prod(rest), same rule, reshaped. "
        "Not SVD-merged, given lambda * the mean of the weighted task vectors "
        "(sum_t weight_t tau_t / T, the reference's rule for non-matrix parameters): 1-D and 0-D "
        "tensors (biases, norms), tensors matching embedding_pattern (input embeddings; lm_head "
        "is SVD-merged), and 2-D+ tensors with min(m, n) < T (floor would keep no triplet). "
        "SVDs, polar factors and rebuild in float64, cast back to the compute dtype. One model: "
        "lambda * weight * tau. On LoRA inputs this runs on the materialised deltas (full-space "
        "TSV); core_space with inner_method tsv keeps each LoRA's rank instead. Gargiulo et al., "
        "CVPR 2025, arXiv 2412.00081.",
    )
)
