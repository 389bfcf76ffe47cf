"""Which merged tensors take the two-pass row-block path of :mod:`.ops.gta_rows` (issue 17).

The TIES family's large tensors (n_models x numel x itemsize of the compute dtype >=
``gta_rows.STREAM_MIN_BYTES``, 256 MiB: TinyLlama-1.1B's embeddings and head with 3 models, not its
138 MB MLP matrices) are merged in two passes over row blocks, one task vector in memory instead
of all, bit-identical to the in-memory operator. Needed: a method of generalized task arithmetic
whose sparsifier is in :data:`.ops.gta_rows.SPARSIFIERS` (:func:`.ops.gta_rows.applies`), full checkpoints only (no LoRA inputs), the CPU,
no vocabulary alignment, a base, and every input a safetensors tensor of the item's shape
(:func:`readable`; wrapped sources such as renamed or dequantised ones are merged in memory).
The executor (:func:`.execute.merge_tensor`) and the plan's peak-memory estimate
(:attr:`.planning.Plan.peak_bytes`) ask the same :func:`by_rows`. Reads headers only.
"""
from __future__ import annotations


def readable(sources, shape) -> bool:
    """Whether every ``(model input, tensor name)`` of ``sources`` can be read by row ranges and
    holds a tensor of ``shape``."""
    for m, n in sources:
        reads = getattr(m.source, "reads_rows", None)
        if m.is_lora or reads is None or not reads(n) or tuple(m.source.infos[n].shape) != tuple(shape):
            return False
    return True


def by_rows(plan, name: str):
    """``(task, shape)`` when the dense merge of ``name`` takes the row-block path (``task``: the
    operator's view, with no inputs and no base), else None."""
    import torch

    from .ops import gta_rows
    from .ops.registry import TensorTask

    op = plan.op
    if (op.input_kind == "lora" or op.reads != "deltas" or op.fold is not None or plan.lora_models
            or str(plan.device) != "cpu" or plan.vocab is not None):
        return None
    base_source, sources = plan.sources_of(name)
    if base_source is None:
        return None
    cdt = getattr(torch, plan.compute_dtype)
    shape = tuple(plan.items[name].shape)
    given = plan.params_for(name)
    task = TensorTask(name=name, base=None, inputs=[], params=given.method, model_params=list(given.models),
                      model_names=[m.label for m, _ in sources], dtype=cdt)
    if not gta_rows.applies(op.name, task, shape, cdt) or not readable([base_source, *sources], shape):
        return None
    return task, shape
