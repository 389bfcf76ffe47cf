"""Elementwise methods merged block by block, straight into the output dtype (issue 17).

An elementwise operator (``Operator.elementwise``: linear, task_arithmetic, magmax's magnitude
selection) gives each merged entry from the same entry of every input and the base, so a tensor
can be merged one block of rows at a time: each model's stored rows are read into a cache-sized block, folded by the operator's own fold
(the same torch operations on every entry, so the same bits as the whole-tensor fold), and the block
is written into the output tensor in the output dtype. The whole-tensor fold makes about seven
passes over a float32 accumulator as large as the tensor (the first model converted, each further
model added, the division, the finite check, the cast, the cast's check): ~45 GB of memory traffic
for `linear` over three 1.1B models, where here the blocks stay in the cache and only the stored
inputs and the output cross memory, once. The float32 accumulator of the whole tensor is gone too.

Taken by ``execute.full_item`` (a full-model output) when :func:`applies`: an elementwise method with
a raw-weights fold, full safetensors checkpoints read by rows (``row_merge.readable``), the CPU, no
LoRA inputs, no vocabulary alignment of this tensor, no FP8 output, a tensor of at least
``MIN_ENTRIES``. Values past the output dtype's range are refused as ``dtypes.cast_checked`` does;
a NaN/Inf is left to the executor's finite check of the result.
"""
from __future__ import annotations

from . import buffers
from .ops.kernels.convert import add_converted_, store_checked_
from .ops.kernels.threads import serial

BLOCK_ENTRIES = 1 << 19  # entries per block (1 MiB of bf16 per model, 2 MiB of float32 state)
MIN_ENTRIES = 1 << 21  # smaller tensors take the whole-tensor fold (its per-call overhead is less)


def applies(plan, name: str) -> bool:
    from .dtypes import MERGEABLE
    from .planning import VOCABULARY_TENSORS
    from .row_merge import readable

    op, item = plan.op, plan.items[name]
    elementwise = op.elementwise(plan.params_for(name).method) if callable(op.elementwise) else op.elementwise
    if (not elementwise or op.fold is None or not op.fold.raw_weights or op.input_kind == "lora"
            or plan.lora_models or str(plan.device) != "cpu" or plan.fp8_out is not None
            or (plan.vocab is not None and name in VOCABULARY_TENSORS)):
        return False
    shape = tuple(item.shape)
    numel = 1
    for d in shape:
        numel *= d
    dtype = str(item.out_dtype)
    if not shape or numel < MIN_ENTRIES or dtype not in MERGEABLE:
        return False
    base_source, sources = plan.sources_of(name)
    inputs = ([base_source] if base_source is not None and op.reads_base else []) + sources
    return readable(inputs, shape)


def merge(plan, name: str):
    """Tensor ``name`` merged block by block into a tensor of its output dtype (:func:`applies`)."""
    import torch

    from .inputs import dense_task, stored_rows

    op, item = plan.op, plan.items[name]
    shape = tuple(item.shape)
    cdt, out_dtype = getattr(torch, plan.compute_dtype), getattr(torch, item.out_dtype)
    base_source, sources = plan.sources_of(name)
    use_base = base_source is not None and op.reads_base

    def read(source, r0, r1):
        return stored_rows(*source, r0, r1, plan.load_dtype)

    row = 1
    for d in shape[1:]:
        row *= d
    step = max(1, BLOCK_ENTRIES // max(row, 1))
    out = buffers.empty(shape, out_dtype)
    task = dense_task(plan, name, None)
    task.dtype, task.raw_inputs = cdt, True
    with serial():  # ~12 small ops a block: parallel regions would cost more than they share
        for r0 in range(0, shape[0], step):
            _block(op, task, out, read, base_source if use_base else None, sources, r0, min(r0 + step, shape[0]),
                   out_dtype, name)
    return out


def _block(op, task, out, read, base_source, sources, r0: int, r1: int, out_dtype, name: str) -> None:
    """Rows r0..r1 of every input folded by the operator, cast into the same rows of ``out``."""
    from .ops.apply import apply_dense

    base = read(base_source, r0, r1) if base_source is not None else None
    task.base = base
    got = apply_dense(op, task, lambda: (read(s, r0, r1) for s in sources))
    if op.reads == "deltas":
        got = add_converted_(got, base)
    store_checked_(out[r0:r1], got, name)  # values beyond the output's range: refused
