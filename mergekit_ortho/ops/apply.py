"""An operator on one tensor: its fold over the models' inputs, or its function on all of them.

Shared by the executor (``execute.merge_tensor``) and the block path (``blockwise.py``); knows no
files: ``inputs()`` yields the tensors.
"""
from __future__ import annotations

from typing import Any, Callable

from .registry import Operator, TensorTask


def apply_dense(op: Operator, task: TensorTask, inputs: Callable[[], Any]) -> Any:
    """Run a dense operator on one tensor; ``inputs()`` yields the models' tensors in order, read
    afresh at each call (a two-pass fold reads them twice; folds hold one at a time)."""
    fold = op.fold
    if fold is not None and op.merges_one_tensor_alone:
        if fold.gather is not None:
            task.stats = _fold(fold.gather, None, inputs(), task)
        state = _fold(fold.step, fold.start(task), inputs(), task)
        return fold.finish(state, task)
    task.inputs = list(inputs())
    try:
        return op.fn(task)
    finally:
        task.inputs = []


def _fold(step, state, inputs, task):
    # no enumerate(): its cached result tuple would keep the folded input alive while the next
    # one is read (one full-size tensor more at peak)
    i = 0
    for x in inputs:
        state = step(state, x, i, task)
        del x
        i += 1
    return state
