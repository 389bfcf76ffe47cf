"""The one place where a stored tensor becomes an operator's float input.

Every path that feeds an operator (a merge run, a LoRA or bundle output, a continual add) reads
its inputs through these functions: dtype conversion, base subtraction, and a LoRA's delta
materialised as ``scale * B @ A`` (or its factors, for low-rank operators). New input kinds
(LyCORIS, DoRA, OFT, vocabulary alignment) belong here, so every method and every output sees them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import buffers
from .ops import registry

if TYPE_CHECKING:
    from .plan import ModelInput, Plan, Source


def operator_input(x, base, cdt):
    """A stored tensor as a dense operator's input: the task vector ``x - base`` (``base`` given)
    or the weight, in the compute dtype ``cdt``. ``x`` is a fresh buffer the caller owns; it is
    reused when it already has the compute dtype. (A mixed-dtype ``torch.sub(x, base)`` would
    save the conversion's buffer but runs slower than convert-then-subtract on CPU.)"""
    if x.dtype == cdt:
        return x if base is None else x.sub_(base)
    v = buffers.like(x, cdt)  # a reused buffer: no page clearing
    return v if base is None else v.sub_(base)


def stored(m: "ModelInput", name: str, load_dtype=None):
    """Model ``m``'s tensor ``name`` as stored, or rounded to ``load_dtype`` (a recipe's ``dtype``:
    mergekit loads every input in it, so masks and thresholds see the same values as there)."""
    x = m.source.get(name)
    return x.to(load_dtype) if load_dtype is not None and x.is_floating_point() and x.dtype != load_dtype else x


def stored_rows(m: "ModelInput", name: str, r0: int, r1: int, load_dtype=None):
    """Rows r0..r1 of model ``m``'s tensor ``name`` as stored, rounded to ``load_dtype`` as
    :func:`stored` rounds the whole tensor."""
    x = m.source.get_rows(name, r0, r1)
    return x.to(load_dtype) if load_dtype is not None and x.is_floating_point() and x.dtype != load_dtype else x


def model_tensor(m: "ModelInput", name: str, shape, base, space: str, cdt, device="cpu", raw: bool = False,
                 load_dtype=None):
    """Model ``m``'s tensor ``name`` as an operator input in ``space`` ("deltas" | "weights").

    A full checkpoint's tensor is read as stored (a fresh buffer: bf16 moves to the device at half
    the bytes of fp32) and converted; with ``raw`` it is handed over as stored, for folds that
    prepare it chunk by chunk. A LoRA gives ``scale * B @ A`` in the base layout, zero where it
    does not adapt the tensor, plus the base when the operator reads weights. ``base`` is the
    base tensor in ``cdt`` (or as stored with ``raw``), None when the space needs none."""
    import torch

    if m.is_lora:
        mod = m.source.by_base.get(name)
        # LoRA factors give scale * B @ A; other adapter types their materialised delta (against
        # the base tensor where the type needs it: DoRA, OFT, modules_to_save replacements)
        x = (m.source.delta_for(name, shape, base=base).to(device, cdt) if mod is not None
             else torch.zeros(shape, device=device, dtype=cdt))
        return x.add_(base) if space == "weights" else x
    x = stored(m, name, load_dtype).to(device)
    return x if raw else operator_input(x, base if space == "deltas" else None, cdt)


def aligned_inputs(plan: "Plan", name: str, base_source: "Source | None", sources: "list[Source]", cdt):
    """A vocabulary tensor's inputs re-indexed to the plan's output vocabulary (mergekit M10):
    the base in ``cdt`` (None when the operator does not read it) and ``weights(deltas)``, which
    yields each model's aligned rows in ``cdt`` (minus the base with ``deltas``: operator inputs,
    fresh buffers) one at a time, read afresh at each call like ``model_tensor``: at most one
    model's rows are held besides the base and the operator's state (the
    default rows, which look across models, are gathered first: vocab.Vocabulary.aligner)."""
    present = {}
    for m, n in ([base_source] if base_source is not None else []) + sources:
        present.setdefault(m.label, (m, n))

    def read(label):
        m, n = present[label]
        return stored(m, n, plan.load_dtype).to(plan.device)

    shapes = {k: tuple(m.source.infos[n].shape) for k, (m, n) in present.items()}
    aligned = plan.vocab.aligner(name, shapes, read, cdt, plan.device)
    base = None
    if base_source is not None:
        base = aligned(base_source[0].label, read(base_source[0].label)).to(cdt)

    def weights(deltas: bool = False):
        # no loop variable holds a yielded tensor: the consumer's ``del`` frees it before the next read
        for m, _ in sources:
            yield operator_input(aligned(m.label, read(m.label)), base if deltas else None, cdt)

    return base, weights


def row_inputs(plan: "Plan", base_source: "Source", sources: "list[Source]", shape, cdt):
    """Row-block readers of one tensor for the bounded-memory merge (:mod:`.ops.gta_rows`):
    ``rows(i, r0, r1)``, model i's task vector rows r0..r1 in ``cdt`` (:func:`operator_input` of
    its stored rows, rounded to the recipe's ``dtype`` as :func:`stored` does), and
    ``base_rows(r0, r1)``, the base's (the last block read is kept: every model reads it); on the
    CPU; every input read by rows (:func:`.row_merge.readable`). ``rows(..., out=t)`` writes
    into ``t`` (1-D, the block's size) instead of a fresh tensor. Safe to call from several
    threads at once (the kept base block is per thread)."""
    import torch

    load = plan.load_dtype

    def read(m, n, r0, r1):
        return stored_rows(m, n, r0, r1, load)

    import threading

    local = threading.local()  # each thread's last base block (gta_rows splits blocks over threads)

    def base_rows(r0: int, r1: int):
        last = local.__dict__
        if last.get("at") != (r0, r1):
            x = read(*base_source, r0, r1)
            buf = last.get("buf")
            if buf is None or buf.numel() < x.numel():
                buf = last["buf"] = buffers.empty((x.numel(),), cdt)
            last["x"] = buf[:x.numel()].view(x.shape).copy_(x)  # x.to(cdt), into one reused buffer
            last["at"] = (r0, r1)
        return last["x"]

    def rows(i: int, r0: int, r1: int, out=None):
        m, n = sources[i]
        x = read(m, n, r0, r1)
        if out is None:
            return operator_input(x, base_rows(r0, r1), cdt)
        return out.view(x.shape).copy_(x).sub_(base_rows(r0, r1))  # operator_input, into ``out``

    return rows, base_rows


def base_tensor(plan: "Plan", source: "Source", cdt=None):
    """The base input (a model and its tensor name) on the plan's device, in ``cdt`` (None: as stored)."""
    m, name = source
    t = stored(m, name, plan.load_dtype).to(plan.device)
    # the conversion in a reused buffer (no fresh pages to fault in and clear for every tensor)
    return t if cdt is None or t.dtype == cdt else buffers.like(t, cdt)


def lora_task(plan: "Plan", key: str, all_models: bool, errors: dict | None = None) -> registry.LoraTask:
    """One adapted module as a low-rank operator sees it: every LoRA's scale-folded factors
    (``all_models``: rank-0 factors for the models that do not adapt it, for exact low-rank forms
    of dense methods that weigh every model), with the base weight when the operator needs it.
    Modules that are not LoRA factors are truncated by SVD (:func:`approximated_factors`); their
    relative Frobenius errors go to ``errors`` ({model label: error}) when given."""
    import torch

    given = plan.params_for(key)
    factors, index, params, names = [], [], [], []
    shape = plan.module_shapes.get(key) or tuple(plan.items[key].shape)
    rows, cols = shape[0], math.prod(shape[1:])
    for i, m in enumerate(plan.models):
        mod = m.source.by_base.get(key)
        if mod is None:
            if not all_models:
                continue
            A, B = torch.zeros(0, cols), torch.zeros(rows, 0)
        elif not m.source.is_factors(mod) and exact_form(plan, m, mod):
            A, B = m.source.exact_factors_for(key)  # Tucker LoCon, LoHa, LoKr: exact (P24)
        elif not m.source.is_factors(mod):
            A, B, err = approximated_factors(plan, m, key, shape, given.method)
            if errors is not None:
                errors[m.label] = err
        else:
            A, B = m.source.factors_for(key, fold=plan.op.factor_fold)
        factors.append((A, B))
        index.append(i)
        params.append(given.models[i])
        names.append(m.label)
    base = None
    if plan.op.needs_base and plan.base is not None:
        base = plan.base.source.get(key).to(torch.float32)
    return registry.LoraTask(key, factors, given.method, params, index, names, base)


def approximated_factors(plan: "Plan", m: "ModelInput", key: str, shape, params: registry.Params):
    """An adapter module that is not LoRA factors (LoHa, LoKr, DoRA, OFT, ...) as a low-rank
    operator's input: its exact dense delta truncated by SVD to the operator's
    ``dense_rank_param`` (PT-SVD, as for full fine-tunes), else to ``output.rank``;
    :func:`approximations` reports it."""
    import torch

    from .errors import UserError
    from .ops import lowrank

    op = plan.op
    rank = params[op.dense_rank_param] if op.dense_rank_param else plan.recipe.output.rank
    if rank is None:
        raise UserError(f"{op.name}: '{key}' of {m.ref} is a {m.source.type_name(m.source.by_base[key])} module, not "
                        "LoRA factors; set " + (f"the method parameter {op.dense_rank_param}" if op.dense_rank_param
                                                else "output.rank") + " to approximate it by truncated SVD")
    base = plan.base.source.get(key).to(torch.float32) if plan.base is not None else None
    d = m.source.delta_for(key, shape, base=base).reshape(shape[0], -1)
    A, B = lowrank.factors_from_deltas([d], rank, key, op.name)[0]
    total = float(d.double().norm())
    err = float((d.double() - B.double() @ A.double()).norm()) / total if total > 0 else 0.0
    return A, B, err


def exact_form(plan: "Plan", m: "ModelInput", module: str) -> bool:
    """A non-LoRA module whose exact low-rank form a dense method's exact low-rank path
    (``lora_fn``: linear / task arithmetic concatenate the factors) uses as it is. Its scale sits
    in B, so only operators that fold the scale into B take it; LoRA-native operators keep the
    SVD truncation to their rank (reported), as for DoRA / OFT."""
    op = plan.op
    return (op.factor_fold == "B" and op.input_kind != "lora" and op.lora_fn is not None
            and m.source.has_exact_factors(module))


def approximations(plan: "Plan", key: str) -> dict:
    """{model label: type} of the inputs whose module ``key`` reaches a low-rank result by SVD."""
    out = {}
    for m in plan.models:
        if m.is_lora and key in m.source.by_base and not m.source.is_factors_for(key):
            mod = m.source.by_base[key]
            if not exact_form(plan, m, mod):
                out[m.label] = m.source.type_name(mod)
    return out


def svd_task(plan: "Plan", key: str) -> registry.LoraTask:
    """One module of full fine-tunes as a low-rank operator sees it (PT-SVD): every model's task
    vector truncated by SVD to the rank its ``dense_rank_param`` names, as factors."""
    base = None
    if plan.op.needs_base and plan.base is not None:
        import torch

        base = plan.base.source.get(key).to(torch.float32)
    given = plan.params_for(key)
    return lora_task_from_deltas(plan.op, key, task_vectors(plan, key), given.method,
                                 list(given.models), [m.label for m in plan.models], base)


def lora_task_from_deltas(op: registry.Operator, key: str, deltas: list, params: registry.Params,
                          model_params: list[registry.Params], model_names: list[str],
                          base=None) -> registry.LoraTask:
    """Dense task vectors (one per model, in model order) -> the LoraTask of a low-rank operator
    that takes full fine-tunes: each truncated by SVD (:func:`.ops.lowrank.factors_from_deltas`)
    to the rank given by the operator's ``dense_rank_param``."""
    from .errors import UserError
    from .ops import lowrank

    if op.dense_rank_param is None:
        raise RuntimeError(f"method '{op.name}' takes LoRA inputs only; the plan should have refused "
                           "full checkpoints")
    rank = params[op.dense_rank_param]
    if rank is None:
        raise UserError(f"{op.name}: tensor '{key}' comes from a full fine-tune; set the method parameter "
                        f"`{op.dense_rank_param}` (truncated-SVD rank of each task vector, PT-SVD)")
    factors = lowrank.factors_from_deltas(deltas, rank, key, op.name)
    return registry.LoraTask(key, factors, params, list(model_params), list(range(len(factors))),
                             list(model_names), base, svd_rank=rank)


def task_vectors(plan: "Plan", key: str) -> list:
    """Every model's task vector of ``key`` at once, float32 (full fine-tunes given to a low-rank
    operator: :func:`svd_task` extracts their factors)."""
    import torch

    base = plan.base.source.get(key).to(torch.float32)
    return [operator_input(m.source.get(key), base, torch.float32) for m in plan.models]


def dense_task(plan: "Plan", name: str, base) -> registry.TensorTask:
    """The operator's view of one tensor; its inputs are read separately (``model_tensor``)."""
    given = plan.params_for(name)
    _, sources = plan.sources_of(name)
    return registry.TensorTask(name=name, base=base, inputs=[], params=given.method,
                               model_params=list(given.models),
                               model_names=[m.label for m, _ in sources])
