"""The issue-14 speed-ups of sce and model_stock change no bit: each new form against the form it
replaced (kept here as the reference), over chunk sizes, thread counts and edge cases; and the
reused buffers of buffers.py."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.ops import model_stock as ms
from mergekit_ortho.ops import registry, sce
from mergekit_ortho.ops import sparsify as sp
from mergekit_ortho.ops.kernels import topk
from mergekit_ortho.ops.kernels.convert import fold_input, fold_input_chunks
from mergekit_ortho.ops.registry import TensorTask


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- sce


def test_float64_sum_of_a_float32_chunk_is_torch_sum_with_dtype(threads):
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 1000, 4099, (1 << 18) - 1):
        for scale in (1e-30, 1e-3, 1.0, 1e30):
            x = (torch.randn(n, generator=g) * scale).square()
            x[::5] = 0.0
            d = torch.empty(n, dtype=torch.float64)
            assert float(d.copy_(x).sum()) == float(torch.sum(x, dtype=torch.float64))
    x = torch.tensor([1.0, float("inf"), 2.0])
    assert float(torch.empty(3, dtype=torch.float64).copy_(x).sum()) == float(torch.sum(x, dtype=torch.float64))


def _select_before(flats, kappa, step):
    """sce._select_ before the speed-up: keep_largest_ zeroes v, the mask is v != 0, and the sums
    are torch.sum(dtype=float64) of each chunk's squares."""
    v = sce.variance_plain(flats).view(-1) if kappa > 0 else None
    k = int(int(torch.count_nonzero(v)) * kappa) if v is not None else 0
    if k == 0:
        for f in flats:
            f.zero_()
        return None
    sp.keep_largest_(v, k)
    keep = v != 0
    sums = [0.0] * len(flats)
    for f in flats:
        f.masked_fill_(~keep, 0.0)
    for i, f in enumerate(flats):
        for lo in range(0, f.numel(), step):
            sums[i] += float(torch.sum(f[lo:lo + step].square(), dtype=torch.float64))
    return sums


def _sce_taus(n, size, seed, special):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(size, generator=g) for _ in range(n)]
    taus[0][::97] = 0.0
    for t in taus:  # many equal variances, so the cut falls inside a run of ties
        t[100:900] = torch.randint(-3, 4, (800,), generator=g).float()
    if special:
        taus[1][5] = float("inf")
        taus[-1][7] = float("nan")
        taus[0][11] = -0.0
    return taus


def _nan_eq(xs):
    return None if xs is None else [repr(x) for x in xs]  # nan == nan


@pytest.mark.parametrize("chunk", [7, 1000, (1 << 18) - 1])
@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.3, 0.5, 0.999, 1.5])
@pytest.mark.parametrize("special", [False, True])
def test_select_by_the_cut_equals_the_zeroing_select(monkeypatch, threads, chunk, kappa, special):
    monkeypatch.setattr(sce, "chunk_len", lambda t: chunk)
    monkeypatch.setattr(topk, "RADIX_MIN_NUMEL", 64)  # the cut (radix) path on a small tensor
    taus = _sce_taus(3, 5003, 11, special)
    want = [t.clone() for t in taus]
    want_sums = _select_before(want, kappa, chunk)
    got = [t.clone() for t in taus]
    got_sums = sce._select_(got, kappa)
    assert _nan_eq(got_sums) == _nan_eq(want_sums)
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("chunk", [7, (1 << 18) - 1])
def test_energy_sums_equal_the_float64_sums(monkeypatch, threads, chunk):
    monkeypatch.setattr(sce, "chunk_len", lambda t: chunk)
    taus = _sce_taus(3, 3001, 5, False)
    want = [float(sum(torch.sum(f[lo:lo + chunk].square(), dtype=torch.float64) for lo in range(0, f.numel(), chunk)))
            for f in taus]
    assert sce._energy_sums(taus) == want


def test_sce_leaves_the_variance_buffer_for_the_next_tensor():
    from mergekit_ortho import buffers

    buffers.release()
    op = registry.get("sce")
    g = torch.Generator().manual_seed(0)
    n = buffers.MIN_BYTES  # float32: four times the pool's smallest request
    taus = [torch.randn(n, generator=g) for _ in range(3)]
    task = TensorTask("w", torch.zeros(n), [t.clone() for t in taus], op.resolve_params({"select_topk": 0.5}),
                      [op.resolve_model_params({})] * 3)
    first = sce.sce(task)
    free = [s for s in buffers._pool if buffers._use_count(s) == 1 and s.nbytes() >= 4 * n]
    assert free and all(s.data_ptr() != first.untyped_storage().data_ptr() for s in free)
    task.inputs = [t.clone() for t in taus]
    assert torch.equal(_bits(sce.sce(task)), _bits(first))  # the reused buffer gives the same result


# ----------------------------------------------------------------------------- model_stock


def _row_sums_before(x, task, rows, length, others):
    flats = [None if o is None else o.view(-1) for o in others]
    sums = [torch.zeros(rows, dtype=torch.float64) for _ in flats]
    for lo, hi, v in fold_input_chunks(x, task, ms._chunk(rows, length)):
        if rows == 1:
            for acc, o in zip(sums, flats):
                acc[0] += float(torch.dot(v if o is None else o[lo:hi], v))
            continue
        r0, r1 = lo // length, hi // length
        vr = v.view(-1, length)
        for acc, o in zip(sums, flats):
            acc[r0:r1] += ms._dot_rows(vr if o is None else o[lo:hi].view(-1, length), vr)
    return sums


def _step_before(state, x, i, task):
    """model_stock's fold step before the speed-up (units a fresh tensor)."""
    fw = task.params.filter_wise
    if state is None:
        v = ms._rows(fold_input(x, task), fw)
        norm = torch.linalg.vector_norm(v, dim=-1)
        nonzero = norm > 0
        inv = torch.where(nonzero, 1.0 / norm, torch.zeros_like(norm))
        lo = torch.where(nonzero, norm, torch.full_like(norm, float("inf")))
        return ms._Stock(x.shape, v, v * inv.unsqueeze(-1), torch.zeros_like(norm, dtype=torch.float64), lo,
                         norm.clone(), 1)
    rows, length = state.total.shape
    sq, du = _row_sums_before(x, task, rows, length, (None, state.units))
    norm = sq.sqrt().to(state.hi.dtype)
    nonzero = norm > 0
    inv = torch.where(nonzero, 1.0 / norm, torch.zeros_like(norm))
    seen = state.hi > 0
    large = (state.lo * norm >= ms.GUARD) & seen
    small = (state.hi * norm < ms.GUARD) & seen
    active = nonzero & seen
    term = du * inv.double()
    if bool(small.any()):
        (dt,) = _row_sums_before(x, task, rows, length, (state.total,))
        term = torch.where(small, dt / ms.GUARD, term)
    state.pair_sum += torch.where(active, term, torch.zeros_like(term))
    state.split += int((active & ~large & ~small).sum())
    total, units = state.total.view(-1), state.units.view(-1)
    scale = inv.unsqueeze(-1)
    for lo_, hi_, v in fold_input_chunks(x, task, ms._chunk(rows, length)):
        total[lo_:hi_].add_(v)
        if rows == 1:
            units[lo_:hi_].addcmul_(v, scale[0])
        else:
            r0, r1 = lo_ // length, hi_ // length
            units[lo_:hi_].view(-1, length).addcmul_(v.view(-1, length), scale[r0:r1])
    state.lo = torch.where(nonzero, torch.minimum(state.lo, norm), state.lo)
    state.hi = torch.maximum(state.hi, norm)
    state.count += 1
    return state


def _finish_before(state, task):
    return ms._apply(state.total, ms._step_size(state.pair_sum, state.count), state.count, state.shape)


def _ms_task(base, n, fw, raw):
    op = registry.get("model_stock")
    t = TensorTask("w", base, [], op.resolve_params({"filter_wise": fw}), [op.resolve_model_params({})] * n)
    t.dtype, t.raw_inputs = torch.float32, raw
    return t


def _ms_inputs(shape, n, seed, tiny):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    ws = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(n)]
    if tiny:  # model 1 differs from the base by about 1e-7 in one entry: the guard's small side
        base.view(-1)[0] = 1e-7
        ws[1] = base.clone()
        ws[1].view(-1)[0] = 2e-7
    return base, ws


@pytest.mark.parametrize("chunk", [29, 100, 1 << 18])
@pytest.mark.parametrize("fw", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("tiny", [False, True])
def test_fold_with_pooled_units_equals_the_previous_fold(monkeypatch, threads, chunk, fw, n, raw, tiny):
    monkeypatch.setattr(ms, "FOLD_CHUNK", chunk)
    base, ws = _ms_inputs((37, 29), n, n, tiny)
    if raw:
        xs, b = ws, base
    else:
        xs, b = [w.float() - base.float() for w in ws], base.float()
    got_state, want_state = None, None
    packs = []
    for i, x in enumerate(xs):
        got_state = ms.FOLD.step(got_state, x.clone(), i, _ms_task(b, n, fw, raw))
        want_state = _step_before(want_state, x.clone(), i, _ms_task(b, n, fw, raw))
        packs.append((ms._pack(got_state), ms._pack(want_state)))
        for k, (a, w) in enumerate(zip(*(p.values() for p in packs[-1]))):
            assert torch.equal(a, w), k
        # an unpacked copy continues exactly (continual merging's round trip)
        got_state = ms._unpack({k: v.clone() for k, v in packs[-1][0].items()}, _ms_task(b, n, fw, raw))
    got = ms.FOLD.finish(got_state, _ms_task(b, n, fw, raw))
    want = _finish_before(want_state, _ms_task(b, n, fw, raw))
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("fw", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_fold_without_packing_equals_the_previous_fold(monkeypatch, threads, fw, n):
    monkeypatch.setattr(ms, "FOLD_CHUNK", 100)
    base, ws = _ms_inputs((41, 23), n, 7, False)
    got_state, want_state = None, None
    for i, w in enumerate(ws):
        got_state = ms.FOLD.step(got_state, w.clone(), i, _ms_task(base, n, fw, True))
        want_state = _step_before(want_state, w.clone(), i, _ms_task(base, n, fw, True))
    got = ms.FOLD.finish(got_state, _ms_task(base, n, fw, True))
    assert torch.equal(_bits(got), _bits(_finish_before(want_state, _ms_task(base, n, fw, True))))
