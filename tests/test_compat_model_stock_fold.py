"""model_stock's raw-weights fold (ops/model_stock.py): inputs prepared chunk by chunk from the
weights as stored, whole rows per chunk under filter_wise. The chunk size must not change the
result beyond float32 rounding, and the raw path (bf16 weights minus a bf16 base, chunk by
chunk) must give what the task-vector path gives on the same values, bit for bit."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.execute import apply_dense
from mergekit_ortho.ops import model_stock as ms
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.registry import TensorTask

OP = registry.get("model_stock")


def _task(base, n, fw, raw):
    t = TensorTask("w", base, [], OP.resolve_params({"filter_wise": fw}), [OP.resolve_model_params({})] * n)
    t.dtype, t.raw_inputs = torch.float32, raw
    return t


def _weights(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    ws = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(n)]
    return base, ws


def _raw(base, ws, fw):
    return apply_dense(OP, _task(base, len(ws), fw, True), lambda: (w.clone() for w in ws))


def _deltas(base, ws, fw):
    taus = [w.float() - base.float() for w in ws]
    return apply_dense(OP, _task(base.float(), len(ws), fw, False), lambda: (t.clone() for t in taus))


@pytest.mark.parametrize("fw", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_raw_weights_equal_task_vectors_bit_for_bit(fw, n):
    base, ws = _weights((37, 29), n)
    assert torch.equal(_raw(base, ws, fw), _deltas(base, ws, fw))


@pytest.mark.parametrize("chunk", [1, 7, 29, 58, 100])
@pytest.mark.parametrize("fw", [False, True])
def test_chunk_size_changes_only_rounding(monkeypatch, chunk, fw):
    base, ws = _weights((37, 29), 3, seed=1)
    want = ms.model_stock(TensorTask("w", base.float(), [w.float() - base.float() for w in ws],
                                     OP.resolve_params({"filter_wise": fw}), [OP.resolve_model_params({})] * 3))
    monkeypatch.setattr(ms, "FOLD_CHUNK", chunk)  # many chunks; filter_wise: whole rows (>= 1) per chunk
    got = _raw(base, ws, fw)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    # and the chunked sums are the same whatever the chunk (float64 across chunks)
    monkeypatch.setattr(ms, "FOLD_CHUNK", 1 << 18)
    assert torch.allclose(_raw(base, ws, fw), got, rtol=1e-6, atol=1e-8)


def test_rows_never_split_under_filter_wise():
    assert ms._chunk(37, 29) % 29 == 0 and ms._chunk(37, 29) >= 29
    assert ms._chunk(1, 10**7) == ms.FOLD_CHUNK
    assert ms._chunk(5, 10**7) == 10**7  # a row longer than a chunk is one chunk


def test_a_zero_task_vector_and_a_shape_change():
    base, ws = _weights((6, 5), 3, seed=2)
    ws[1] = base.clone()  # tau = 0: contributes no pair and no unit vector
    assert torch.allclose(_raw(base, ws, False), _deltas(base, ws, False), rtol=0, atol=0)
    with pytest.raises(Exception, match="shape"):
        _raw(base, [ws[0], ws[1][:5]], False)
