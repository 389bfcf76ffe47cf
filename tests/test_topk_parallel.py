"""The radix top-k kernel (ops/kernels/topk.py) on the worker pool: every path (gather, pivot,
masked level 2, float64 levels) with 1, 2 and 3 workers and tiny chunks gives exactly the stable
sort's kept set, and ``radix_threshold``'s (t, m, n_eq, c) equals the one read off the sort, as
does ``partition_threshold``'s (the CPU's select: ``keep_top_k_`` goes through it).
Property tests (hypothesis) on ties at the threshold with many equal magnitudes, half
precision, signed and all zeros, subnormals and infinities."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mergekit_ortho.ops import sparsify
from mergekit_ortho.ops.kernels import _chunks, topk

BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def by_sort(x: torch.Tensor, k: int) -> tuple[int, int, int, int | None]:
    """(t, m, n_eq, c) of radix_threshold, read off a stable descending sort of the magnitudes'
    bit patterns (float32/float64, NaN-free or not: patterns order NaN above inf)."""
    mag = _mag_bits(x)
    order = np.argsort(-mag, kind="stable")
    t = int(mag[order[k - 1]])
    eq = np.flatnonzero(mag == t)
    m = k - int(np.count_nonzero(mag > t))
    return t, m, eq.size, (int(eq[m - 1]) + 1 if m < eq.size else None)


def _mag_bits(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.float32:
        return x.view(torch.int32).numpy().astype(np.int64) & 0x7FFFFFFF
    return x.view(torch.int64).numpy() & 0x7FFFFFFFFFFFFFFF


@pytest.fixture(params=[2, 3], ids=["2-workers", "3-workers"])  # 1 worker: the hypothesis tests
def workers(request, monkeypatch):
    monkeypatch.setattr(_chunks, "workers", lambda: request.param)
    return request.param


PATHS = {  # (chunk, PIVOT_MIN, MASKED_MIN_SHARE): which way a bucket is resolved
    "default": (None, 1 << 16, 1 / 32),
    "gather-chunk13": (13, 1 << 30, 2.0),  # never a pivot test, never masked
    "pivot-chunk13": (13, 1, 2.0),  # any bucket of >= n/32 entries is tested as a pivot first
    "masked-chunk13": (13, 1 << 30, 0.0),  # every float32 bucket by the masked pass
}


@pytest.fixture(params=list(PATHS), ids=list(PATHS))
def path(request, monkeypatch):
    chunk, pivot_min, masked_shift = PATHS[request.param]
    if chunk:
        monkeypatch.setattr(_chunks, "CHUNK", chunk)
    monkeypatch.setattr(topk, "PIVOT_MIN", pivot_min)
    monkeypatch.setattr(topk, "MASKED_MIN_SHARE", masked_shift)
    return request.param


def _cases():
    g = torch.Generator().manual_seed(3)
    for dt, n in ((torch.float32, 300), (torch.float64, 60)):  # float64: 4 levels, a smaller n
        yield f"randn-{dt}", torch.randn(n + 1, generator=g).to(dt)
        # many equal magnitudes, both signs: every k cuts through a tie group
        yield f"ties-{dt}", ((torch.randint(0, 5, (n,), generator=g) - 2) * 0.375).to(dt)
        yield f"one-value-{dt}", torch.where(torch.rand(n - 1, generator=g) < 0.5, 0.75, -0.75).to(dt)
        yield f"bucket-spread-{dt}", (1.0 + torch.randint(0, 4, (n,), generator=g) * 2.0 ** -20).to(dt)
    yield "all-zero", torch.zeros(64)
    yield "signed-zeros", torch.tensor([0.0, -0.0] * 30 + [2.0, -2.0])
    yield "subnormal-inf", torch.tensor([1e-45, -1e-45, 1e-40, -3e38, float("inf"), -float("inf"), 0.0, -0.0] * 9)
    yield "bf16-delta", (torch.randn(600, generator=g) * 0.01).to(torch.bfloat16).float()


CASES = list(_cases())


@pytest.mark.parametrize("name,x", CASES, ids=[n for n, _ in CASES])
def test_threshold_and_kept_set_equal_the_stable_sort_on_every_path(workers, path, name, x):
    n = x.numel()
    for k in sorted({1, 7, n // 3, n - 1, n} - {0}):
        assert topk.radix_threshold(x, k) == by_sort(x, k), (name, k)
        assert topk.partition_threshold(x, k) == by_sort(x, k), (name, k)
        got, want = x.clone(), x.clone()
        topk.keep_top_k_(got, k)
        sparsify.keep_top_k_plain_(want, k)
        assert bits_equal(got, want), (name, k)


def test_the_paths_are_taken(monkeypatch):
    """A test that cannot fail is a defect: the fixtures above must reach the masked pass, the
    gather, the pivot and the split over workers."""
    calls = {"masked": 0, "gather": 0, "pivot": 0, "split": 0}
    for name, attr in (("masked", "_level2_counts32"), ("gather", "_gather_bucket"), ("pivot", "pivot_threshold")):
        real = getattr(topk, attr)
        monkeypatch.setattr(topk, attr, lambda *a, _r=real, _n=name: (calls.__setitem__(_n, calls[_n] + 1), _r(*a))[1])
    real_split = _chunks.split_map

    def counting_split(fn, n, step):
        out = real_split(fn, n, step)
        calls["split"] += len(out) > 1
        return out
    monkeypatch.setattr(topk, "split_map", counting_split)
    monkeypatch.setattr(_chunks, "workers", lambda: 2)
    monkeypatch.setattr(_chunks, "CHUNK", 7)
    x = CASES[3][1]  # bucket-spread float32 (300 entries): one level-1 bucket, several values
    monkeypatch.setattr(topk, "PIVOT_MIN", 1)
    topk.radix_threshold(x, 150)  # the pivot fails (its first value is not the 600th), then masked
    monkeypatch.setattr(topk, "PIVOT_MIN", 1 << 30)
    monkeypatch.setattr(topk, "MASKED_MIN_SHARE", 2.0)
    topk.radix_threshold(x, 150)  # gathered
    assert all(calls.values()), calls


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 2.0 ** -130, -(2.0 ** -130), 3e38]),
                min_size=1, max_size=300),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       st.floats(0.0, 1.0), st.sampled_from([1, 2, 3]), st.sampled_from([0.0, 1 / 32, 2.0]))
def test_property_many_equal_magnitudes_any_dtype(values, dtype, frac, nworkers, masked_share):
    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    n = x.numel()
    k = min(n, max(1, int(frac * n)))
    old = (_chunks.workers, _chunks.CHUNK, topk.PIVOT_MIN, topk.MASKED_MIN_SHARE)
    try:
        _chunks.workers, _chunks.CHUNK = (lambda: nworkers), 5
        topk.PIVOT_MIN, topk.MASKED_MIN_SHARE = 1, masked_share
        got, want = x.clone(), x.clone()
        topk.keep_top_k_(got, k)
        sparsify.keep_top_k_plain_(want, k)
        assert bits_equal(got, want)
        if dtype in (torch.float32, torch.float64):
            assert topk.radix_threshold(x, k) == by_sort(x, k)
            assert topk.partition_threshold(x, k) == by_sort(x, k)
    finally:
        _chunks.workers, _chunks.CHUNK, topk.PIVOT_MIN, topk.MASKED_MIN_SHARE = old


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 2000), st.floats(0.0, 1.0), st.sampled_from([1, 2, 3]))
def test_property_random_float32_patterns_nan_free(seed, n, frac, nworkers):
    g = torch.Generator().manual_seed(seed)
    # raw bit patterns (every exponent, subnormals, infinities), NaNs replaced by +-inf; few
    # distinct high halves so that buckets are shared and large
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    bits = (bits & ~0x7FFF0000) | (torch.randint(0x3F00, 0x3F04, (n,), generator=g) << 16)
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.where(x.isnan(), torch.full_like(x, float("inf")), x)
    k = min(n, max(1, int(frac * n)))
    old = (_chunks.workers, _chunks.CHUNK, topk.PIVOT_MIN, topk.MASKED_MIN_SHARE)
    try:
        _chunks.workers, _chunks.CHUNK = (lambda: nworkers), 97
        for pivot_min, masked_share in ((1, 1 / 32), (1 << 30, 0.0), (1 << 30, 2.0)):
            topk.PIVOT_MIN, topk.MASKED_MIN_SHARE = pivot_min, masked_share
            assert topk.radix_threshold(x, k) == by_sort(x, k)
        assert topk.partition_threshold(x, k) == by_sort(x, k)
    finally:
        _chunks.workers, _chunks.CHUNK, topk.PIVOT_MIN, topk.MASKED_MIN_SHARE = old


def test_cpu_select_is_the_partition_and_both_cut_kinds_occur(monkeypatch):
    """keep_top_k_ on the CPU takes the partition select, and the fixtures reach both of its
    endings: every entry equal to t kept (c None) and a cut inside the equal ones."""
    seen = []
    real = topk.partition_threshold
    monkeypatch.setattr(topk, "partition_threshold", lambda *a: seen.append(real(*a)) or seen[-1])
    for name, x in CASES:
        if x.dtype == torch.float32:
            for k in (1, x.numel() // 3):
                topk.keep_top_k_(x.clone(), k)
    assert any(r[3] is None for r in seen) and any(r[3] is not None for r in seen)


def test_split_map_ranges_are_whole_chunks_in_order(monkeypatch):
    monkeypatch.setattr(_chunks, "workers", lambda: 3)
    got = _chunks.split_map(lambda a, b: (a, b), 23, 4)  # 6 chunks -> 3 ranges of 2 chunks
    assert got == [(0, 8), (8, 16), (16, 23)]
    assert _chunks.split_map(lambda a, b: (a, b), 3, 4) == [(0, 3)]  # one chunk: serial
    assert _chunks.split_map(lambda a, b: (a, b), 0, 4) == [(0, 0)]
    monkeypatch.setattr(_chunks, "workers", lambda: 2)
    nested = _chunks.split_map(lambda a, b: _chunks.split_map(lambda c, d: (c, d), 8, 4), 16, 4)
    assert nested == [[(0, 8)], [(0, 8)]]  # inside a pool thread: serial, no nested waits
