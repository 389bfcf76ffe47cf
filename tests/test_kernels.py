"""ops/kernels against the plain formulations they speed up: bit-equal, or to a stated tolerance."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.ops import gta, sparsify
from mergekit_ortho.ops.kernels import _chunks, convert, dare_drop, kmeans, randomized_svd, select, sign_election, topk
from mergekit_ortho.ops.registry import TensorTask

BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (the sign of zeros and NaN payload positions included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


def _vectors():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        yield f"randn-{dtype}", torch.randn(1001, generator=g).to(dtype)
        yield f"repeated-{dtype}", (torch.randint(-3, 4, (333,), generator=g) / 2).to(dtype)  # ties, zeros
    yield "signed-zeros", torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, 0.0])
    yield "all-zero", torch.zeros(17)
    yield "one", torch.tensor([-2.5])
    yield "odd-ties", torch.tensor([1.5, -1.5] * 20 + [0.25])
    yield "subnormal-inf-nan", torch.tensor([1e-45, -1e-40, 3e38, float("inf"), -float("inf"), float("nan"), 0.0, 2.0])


VECTORS = list(_vectors())


@pytest.fixture(params=[None, 7], ids=["default-chunk", "chunk7"])
def chunk(request, monkeypatch):
    if request.param:  # every chunked pass in many chunks, the last one partial
        monkeypatch.setattr(_chunks, "CHUNK", request.param)
    return request.param


# --- radix top-k == stable sort -------------------------------------------------------------------


@pytest.mark.parametrize("name,x", VECTORS, ids=[n for n, _ in VECTORS])
def test_radix_top_k_equals_the_stable_sort(chunk, monkeypatch, name, x):
    monkeypatch.setattr(topk, "PIVOT_MIN", 1)  # the pivot shortcut on any large-enough bucket too
    n = x.numel()
    for k in sorted({1, 2, n // 3 or 1, n // 2 or 1, n - 1 or 1, n}):  # k = n keeps everything
        got, want = x.clone(), x.clone()
        topk.keep_top_k_(got, k)
        sparsify.keep_top_k_plain_(want, k)
        assert bits_equal(torch.nan_to_num(got), torch.nan_to_num(want)), (name, k)
        assert torch.equal(got.isnan(), want.isnan())
    # k = 0 is not a kernel input: a trim to density 0 keeps max(int(0 * n), 1) = 1 entry
    assert int((sparsify.magnitude_trim(x, 0.0) != 0).sum()) <= 1


def test_radix_top_k_large_heavy_bucket_takes_the_pivot():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(300_001, generator=g) * 0.01).to(torch.bfloat16).float()  # bf16-delta-like
    for k in (1, 1234, 150_000, 300_001):
        got, want = x.clone(), x.clone()
        topk.keep_top_k_(got, k)
        sparsify.keep_top_k_plain_(want, k)
        assert bits_equal(got, want)


# --- sign election / disjoint mean == sign(sum) formulation ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights,normalize,lam", [
    ([1.0, 1.0, 1.0], True, 1.0), ([0.7, 1.3, -0.4], False, 0.8), ([0.3, 0.3], True, 1.5),
    ([2.0], True, 1.0), ([1.0, -1.0, 2.0], True, 1.0),
])
def test_sign_election_equals_the_plain_formulation(chunk, dtype, weights, normalize, lam):
    g = torch.Generator().manual_seed(len(weights))
    for n in (1, 5, 997):
        ds = [(torch.randint(-4, 5, (n,), generator=g) * w / 4).to(dtype) for w in weights]  # ties
        ds[0][::3] = 0.0
        ds[-1][1::4] = -0.0
        want = gta.disjoint_merge_plain([d.clone() for d in ds], weights, normalize, lam)
        got = sign_election.disjoint_merge_([d.clone() for d in ds], weights, normalize, lam)
        assert bits_equal(got, want), (n, dtype)


def test_sign_election_nan_only_differs_in_the_sign_of_zero():
    # the stated exception: an entry with a NaN and no agreeing value is -0.0 instead of +0.0
    ds = [torch.tensor([float("nan"), 1.0, float("nan")]), torch.tensor([1.0, -2.0, float("nan")])]
    want = gta.disjoint_merge_plain([d.clone() for d in ds], [1.0, 1.0], True, 1.0)
    got = sign_election.disjoint_merge_([d.clone() for d in ds], [1.0, 1.0], True, 1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# --- DARE drop == where(rand < density) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 1e-9, 0.3, 0.5, 0.9999999])
def test_dare_drop_equals_the_plain_formulation(chunk, dtype, density):
    x = torch.randn(1003, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[:3] = torch.tensor([0.0, -0.0, -1.0])
    for rescale in (True, False):
        want = sparsify.random_drop_plain(x, density, torch.Generator().manual_seed(4), rescale)
        got = dare_drop.random_drop_(x.clone(), density, torch.Generator().manual_seed(4), rescale)
        assert bits_equal(got, want), (dtype, density, rescale)


# --- chunked conversion == .to(dtype) - base ---------------------------------------------------------------


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fold_chunk", [None, 5])
def test_chunked_conversion_equals_to_dtype(monkeypatch, src, fold_chunk):
    if fold_chunk:
        monkeypatch.setattr(convert, "FOLD_CHUNK", fold_chunk)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 7, generator=g).to(torch.bfloat16)
    x = (base.float() + torch.randn(3, 7, generator=g)).to(src)
    for dt in (torch.float32, torch.float64):
        task = TensorTask("w", base, [], {}, [{}], dtype=dt, raw_inputs=True)
        want = x.to(dt) - base.to(dt)
        got = torch.cat([v.clone() for _, _, v in convert.fold_input_chunks(x, task)])
        assert bits_equal(got, want.reshape(-1)) and bits_equal(convert.fold_input(x.clone(), task), want)
        acc = torch.randn(3, 7, generator=g, dtype=dt)
        assert bits_equal(convert.add_converted_(acc.clone(), x, -0.5), acc.add(x.to(dt), alpha=-0.5))


def test_magmax_selection_equals_the_plain_where(monkeypatch):
    monkeypatch.setattr(convert, "FOLD_CHUNK", 4)
    g = torch.Generator().manual_seed(6)
    base = torch.randn(11, generator=g).to(torch.bfloat16)
    sel = torch.randn(11, generator=g)
    x = (base.float() + torch.randn(11, generator=g)).to(torch.bfloat16)  # raw weights as stored
    tau = x.float() - base.float()
    sel[:2] = tau[:2].neg()  # equal magnitudes: the later model (tau) wins
    want = torch.where(tau.abs() >= sel.abs(), tau, sel)
    task = TensorTask("w", base, [], {}, [{}], dtype=torch.float32, raw_inputs=True)
    assert bits_equal(select.keep_larger_magnitude_(sel.clone(), x, task), want)


# --- k-means in kernel form == explicit centroids (tolerance) ---------------------------------------------


def plain_lloyd(X, w, centres, iters):
    """Weighted Lloyd with explicit centres, as in the textbook; returns (labels, inertia)."""
    C = X[centres].clone()
    for _ in range(iters):
        labels = torch.cdist(X, C).square().argmin(1)
        C = torch.stack([(w[labels == t, None] * X[labels == t]).sum(0) / w[labels == t].sum()
                         for t in range(C.shape[0])])
    labels = torch.cdist(X, C).square().argmin(1)
    return labels, float((w * (X - C[labels]).square().sum(1)).sum())


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_kernel_form_matches_explicit_centroids(seed):
    # separated blobs (no near-ties): the same labels; inertia to 1e-9 relative (rounding differs)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 9, generator=g, dtype=torch.float64) * 10
    X = centres.repeat_interleave(7, 0) + torch.randn(28, 9, generator=g, dtype=torch.float64)
    w = torch.randint(1, 4, (28,), generator=g).double()
    init = [0, 7, 14, 21]
    res = kmeans.kmeans(X, 4, weights=w, init=init, tol=0.0, max_iter=50)
    labels, inertia = plain_lloyd(X, w, init, res.n_iter)
    assert torch.equal(res.labels, labels) and res.converged
    assert abs(res.inertia - inertia) <= 1e-9 * inertia
    # odd, tiny: one point, k clamped to the number of points
    one = kmeans.kmeans(X[:1], 3)
    assert one.k == 1 and one.labels.tolist() == [0] and one.inertia == 0.0


# --- randomised SVD == exact SVD (tolerance) ---------------------------------------------------------------


def test_randomized_svd_matches_the_exact_top_singular_values():
    g = torch.Generator().manual_seed(7)
    m, n, q = 300, 200, 24
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = 0.7 ** torch.arange(n, dtype=torch.float64)  # decaying spectrum
    A = (U * s) @ V.T
    u, sr, vh = randomized_svd.randomized_svd(A, q)
    exact = torch.linalg.svdvals(A)[:q]
    torch.testing.assert_close(sr[:8], exact[:8], rtol=1e-10, atol=0)  # the ranks lowrank keeps
    assert u.shape == (m, q) and vh.shape == (q, n)
    again = randomized_svd.randomized_svd(A, q)
    assert torch.equal(again[1], sr)  # seeded: the same every run


# --- radix rank band == stable sort (breadcrumbs) ------------------------------------------------------


@pytest.mark.parametrize("name,x", VECTORS, ids=[n for n, _ in VECTORS])
def test_radix_rank_band_equals_the_stable_sort(chunk, monkeypatch, name, x):
    monkeypatch.setattr(topk, "PIVOT_MIN", 1)
    n = x.numel()
    for lo, hi in sorted({(0, 1), (1, n), (n // 3, n // 2 + 1), (n // 4, n), (n - 1, n), (1, 2)}):
        if not 0 <= lo < hi <= n:
            continue
        got, want = x.clone(), x.clone()
        topk.keep_rank_band_(got, lo, hi)
        sparsify.keep_rank_band_plain_(want, lo, hi)
        assert bits_equal(torch.nan_to_num(got), torch.nan_to_num(want)), (name, lo, hi)
        assert torch.equal(got.isnan(), want.isnan())


# --- della's packed-key rank lookup == table[stable-sort ranks]; chunked della == della by the definition


def _della_rank_inputs(shape, g):
    xs = [torch.randn(shape, generator=g), (torch.randint(-3, 4, shape, generator=g) / 2).float()]
    dirty = (torch.randint(-3, 4, shape, generator=g) / 2).float()  # long runs of equal prefixes...
    dirty.view(-1)[::7] += 2.0 ** -20  # ...some holding entries with low bits below the prefix
    xs.append(dirty)
    bf = torch.randn(shape, generator=g).to(torch.bfloat16)  # a bf16 model's task vector: few dirty
    xs.append((bf.float() + 0.3 * torch.randn(shape, generator=g)).to(torch.bfloat16).float() - bf.float())
    return xs


@pytest.mark.parametrize("dirty_max", [0.0, 1 / 32, 1.0])  # 64-bit keys; the default; 32-bit keys always
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 5), (40, 333), (2, 4097), (1, 70000)])
def test_della_rank_lookup_equals_the_stable_sort(monkeypatch, shape, dirty_max):
    from mergekit_ortho.ops.kernels import della_drop
    import numpy as np

    monkeypatch.setattr(della_drop, "DIRTY_MAX", dirty_max)
    g = torch.Generator().manual_seed(shape[1])
    xs = _della_rank_inputs(shape, g)
    xs.append(torch.tensor([[float("nan"), 1.0, float("inf"), 0.0, 1e-45, -0.0, -float("nan"), -1.0]]))
    for x in xs:
        x.view(-1)[::11] = -0.0
        table = torch.rand(x.shape[1], generator=g)
        bits = x.view(torch.int32).numpy()
        cols = della_drop.sorted_columns(bits, np.empty(x.shape + (2,), dtype=np.int32),
                                         np.empty(x.shape, dtype=np.int32))
        got = della_drop.rank_lookup(cols, table, torch.empty(x.shape))
        assert bits_equal(got, table[sparsify.row_ranks_plain(x.abs())])
        # the strided bits of a (A, R, L) view, as della_drop_ hands them over
        y = x.reshape(x.shape[0], 1, -1).expand(-1, 2, -1).contiguous().transpose(1, 2)  # (A, L, 2)
        yb = y.contiguous().view(torch.int32).numpy().transpose(0, 2, 1).reshape(-1, x.shape[1])
        cols = della_drop.sorted_columns(yb, np.empty(yb.shape + (2,), dtype=np.int32),
                                         np.empty(yb.shape, dtype=np.int32))
        want = sparsify.row_ranks_plain(torch.from_numpy(yb.copy()).view(torch.float32).abs())
        assert bits_equal(della_drop.rank_lookup(cols, table, torch.empty(yb.shape)), table[want])


@pytest.mark.parametrize("shape", [(5,), (1,), (9, 1), (31, 17), (6, 5, 4), (3, 4, 2, 5)])
def test_della_equals_the_plain_formulation(chunk, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randint(-4, 5, shape, generator=g) / 4).float()  # equal magnitudes, zeros
    for d, eps in ((0.5, 0.15), (0.2, 0.19), (0.0, 0.1), (1.0, 0.1)):
        want = sparsify.della_plain(x, d, eps, torch.Generator().manual_seed(9))
        got = sparsify.della_(x.clone(), d, eps, torch.Generator().manual_seed(9))
        assert bits_equal(got, want), (shape, d)


@pytest.mark.parametrize("grain", [1, 1 << 15])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_della_in_many_blocks_equals_the_plain_formulation(monkeypatch, threads, grain):
    from mergekit_ortho.ops.kernels import della_drop

    monkeypatch.setattr(_chunks, "CHUNK", 64)  # 2-row blocks, the last one partial
    monkeypatch.setattr(della_drop, "GRAIN", grain)  # torch steps of one row each, or whole blocks
    monkeypatch.setattr(della_drop, "workers", lambda: threads)  # serial path, and blocks on the pool
    g = torch.Generator().manual_seed(5)
    for x in (torch.randn(37, 32, generator=g), (torch.randint(-2, 3, (9, 16, 3), generator=g) / 2).float()):
        want = sparsify.della_plain(x, 0.4, 0.2, torch.Generator().manual_seed(3))
        got = sparsify.della_(x.clone(), 0.4, 0.2, torch.Generator().manual_seed(3))
        assert bits_equal(got, want)


# --- SCE's erase and merge on the bit patterns == the definition ---------------------------------


def _sce_inputs():
    g = torch.Generator().manual_seed(11)
    yield [torch.randn(1001, generator=g) for _ in range(3)]
    rep = [(torch.randint(-2, 3, (333,), generator=g) / 2).float() for _ in range(4)]  # zeros, ties
    rep[1][::5] = -0.0
    for t in rep:
        t[:7] = -0.0  # a -0.0 sum: the plain form's result there is -0.0
    yield rep
    yield [torch.tensor([1.0, -2.0, float("inf"), 0.5, -0.0]), torch.tensor([-1.0, 2.0, 1.0, float("nan"), -0.0])]
    yield [torch.tensor([3e38, -1.0, 2.0]), torch.tensor([3e38, 1.0, -3.0])]  # the sum overflows
    yield [torch.randn(50, generator=g)]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("omega", [None, (0.5, 0.3, 0.2, 0.0), (float("nan"),) * 4])
def test_sce_energy_merge_equals_the_plain_formulation(chunk, case, omega):
    from mergekit_ortho.ops import sce

    taus = list(_sce_inputs())[case]
    weights = list(omega[:len(taus)]) if omega else [1.0 / len(taus)] * len(taus)
    if omega and omega[0] == omega[0]:
        weights[-1] = 0.0 if len(taus) > 1 else weights[-1]  # a zero weight (an all-zero tau)
    want = sce.erase_merge_plain([t.clone() for t in taus], weights)
    got = sign_election.energy_merge_([t.clone() for t in taus], weights)
    if omega and omega[0] == omega[0] and len(taus) > 1:  # zero weight: zero results may differ in sign
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)) and torch.equal(got.isnan(), want.isnan())
    else:
        assert bits_equal(got, want)
