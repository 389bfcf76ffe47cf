"""slerp's fold (kernels/arc.py: both weights as stored, converted chunk by chunk) against the
plain operator on float32 copies: bit-equal, across chunk boundaries, for bf16 and float32 inputs."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.errors import UserError
from mergekit_ortho.ops import registry
from mergekit_ortho.ops.kernels import convert
from mergekit_ortho.ops.registry import TensorTask


def _fold(base, x, t, out_dtype=None):
    op = registry.get("slerp")
    task = TensorTask("w", base, [], op.resolve_params({"t": t}), [{}], dtype=torch.float32, raw_inputs=True,
                      out_dtype=out_dtype)
    f = op.fold
    return f.finish(f.step(f.start(task), x, 0, task), task)


def _plain(base, x, t):
    op = registry.get("slerp")
    return op.fn(TensorTask("w", base.float(), [x.float()], op.resolve_params({"t": t}), [{}]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fold_chunk", [7, 64, 1 << 18])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_fold_is_bit_equal_to_the_plain_operator(monkeypatch, dtype, fold_chunk, t):
    monkeypatch.setattr(convert, "FOLD_CHUNK", fold_chunk)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g).to(dtype)
    x = (base.float() + 0.3 * torch.randn(37, 11, generator=g)).to(dtype)
    out = _fold(base, x, t)
    ref = _plain(base, x, t)
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fold_into_the_output_dtype_is_the_cast_of_the_float32_result(monkeypatch, dtype, out_dtype):
    monkeypatch.setattr(convert, "FOLD_CHUNK", 64)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(41, 13, generator=g).to(dtype)
    x = (base.float() + 0.3 * torch.randn(41, 13, generator=g)).to(dtype)
    out = _fold(base, x, 0.4, out_dtype)
    ref = _plain(base, x, 0.4).to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_fold_into_a_narrow_output_refuses_values_beyond_its_range():
    from mergekit_ortho.dtypes import OutOfRange

    base = torch.full((4, 5), 1e5)
    x = torch.full((4, 5), 1e5)
    x[2, 3] = 9e5  # beyond float16's 65504 wherever t moves towards it
    with pytest.raises(OutOfRange, match="tensor 'w'"):
        _fold(base, x, 0.5, torch.float16)


@pytest.mark.parametrize("case", ["colinear", "zero_base"])
def test_fold_edge_cases_match_the_plain_operator(case):
    base = torch.linspace(-1, 1, 50)
    x = 2 * base if case == "colinear" else base.clone()
    if case == "zero_base":
        base = torch.zeros(50)
    assert torch.equal(_fold(base, x, 0.4), _plain(base, x, 0.4))


def test_fold_refuses_a_second_model():
    op = registry.get("slerp")
    task = TensorTask("w", torch.ones(3), [], op.resolve_params({"t": 0.5}), [{}], dtype=torch.float32,
                      raw_inputs=True)
    state = op.fold.step(None, torch.zeros(3), 0, task)
    with pytest.raises(UserError, match="exactly one model"):
        op.fold.step(state, torch.zeros(3), 1, task)


def test_fold_is_the_same_whatever_the_thread_count():
    # MKL's dot product splits 2^13+ entries over threads and then rounds differently; the arc's
    # sums run on one thread, so --threads never changes the coefficients (nor the output)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(256, 512, generator=g).to(torch.bfloat16)
    x = (base.float() + 0.3 * torch.randn(256, 512, generator=g)).to(torch.bfloat16)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(_fold(base, x, 0.4))
            assert torch.get_num_threads() == threads  # restored after the fold
    finally:
        torch.set_num_threads(n)
    for out in outs[1:]:
        assert torch.equal(out.view(torch.int32), outs[0].view(torch.int32))
    assert torch.equal(outs[0].view(torch.int32), _plain(base, x, 0.4).view(torch.int32))
