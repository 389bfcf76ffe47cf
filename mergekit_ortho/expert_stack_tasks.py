"""LoRA methods (``core_space``, ...) on a fused MoE expert stack: one method call per expert and part.

A base that stores the experts fused (transformers 5: ``mlp.experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) gets from an expert LoRA (peft ``target_parameters``) a dense
[E, d1, d2] delta whose expert-e block is ``s B_e A_e`` (``adapters.experts``). Each expert's part
is its own linear map, so a low-rank method runs once per (expert, part) matrix (the blocks of
:func:`mergekit_ortho.ops.expert_stacks.blocks`), on that block's exact factors: the thin SVD of
the block cut at its numerical rank (singular values above max(m, n) * eps * s_1, eps of the
delta's dtype, float32: the delta B_e A_e is formed in float32), B = U S^1/2, A = S^1/2 V^T. The merged blocks are assembled into the stack's
delta. So a fused base gives what the per-expert layout gives (each expert's own LoRA factors)
for the rules that do not depend on the factorisation gauge (core_space's task_arithmetic, mean,
tsv, isotropize, spec widen_corespace.md B8.4), up to float round-off; the entry-wise rules (ties,
dare_ties) see another gauge, as on any refactorised input. Full-model outputs only (a LoRA
output of a fused stack is refused elsewhere: no single LoRA holds E maps). Issue 15.
"""
from __future__ import annotations


def exact_factors(d):
    """(A, B) with B @ A == d up to d's rounding, rank = d's numerical rank at its dtype's precision
    (singular values above max(m, n) * eps(d.dtype) * s_1; at least 1)."""
    import torch

    eps = torch.finfo(d.dtype if d.dtype in (torch.float32, torch.float64) else torch.float32).eps
    x = d.to(torch.float64)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    tol = (S[0] * max(x.shape) * eps) if S.numel() else 0.0  # the rounding of the delta's own dtype
    k = max(int((S > tol).sum()), 1)
    root = S[:k].sqrt()
    return (root.unsqueeze(1) * Vh[:k]).to(torch.float32), (U[:, :k] * root).to(torch.float32)


def stack_result(plan, key: str):
    """The LoRA method's merged delta on a fused expert stack of a full-model output, block by
    block (module doc), as a ``LoraResult`` (``delta`` [E, d1 * d2]); None when ``key`` is no
    stack, the output is not a full model or no LoRA adapts it."""
    import torch

    from .ops import registry
    from .ops.expert_stacks import blocks

    if plan.out_format != "full" or not plan.lora_models or plan.base is None:
        return None
    shape = tuple(plan.items[key].shape) if key in plan.items else None
    where = blocks(key, shape) if shape is not None else None
    if where is None:
        return None
    given = plan.params_for(key)
    base = plan.base.source.get(key).to(torch.float32)
    deltas, index, params, names = [], [], [], []
    for i, m in enumerate(plan.models):
        if not m.is_lora or key not in m.source.by_base:
            continue
        deltas.append(m.source.delta_for(key, shape, base=base).to(torch.float32).reshape(shape))
        index.append(i)
        params.append(given.models[i])
        names.append(m.label)
    if not deltas:
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for e, rows in where:
        factors = [exact_factors(d[e, rows]) for d in deltas]
        task = registry.LoraTask(f"{key}[{e}, {rows.start}:{rows.stop}]", factors, given.method, params, index,
                                 names, base[e, rows].contiguous() if plan.op.needs_base else None)
        res = plan.op.fn(task)
        out[e, rows] = (res.delta if res.delta is not None else res.B.to(torch.float32) @ res.A.to(torch.float32)
                        ).reshape(rows.stop - rows.start, shape[2])
    return registry.LoraResult(delta=out.reshape(shape[0], -1),
                               report={"expert_stack": f"merged per expert and part ({len(where)} matrices)"})
