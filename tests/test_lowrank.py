"""ops/lowrank.py: exact truncation of a factored product and dense-delta factorisation."""
from __future__ import annotations

import torch

from mergekit_ortho.ops import lowrank


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, 60, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 60, generator=g, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(60, dtype=torch.float64)
    return ((U * s) @ V.T + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


def test_randomized_factorisation_is_near_optimal_reports_its_true_error_and_is_reproducible():
    delta = _decaying(1300, 1100, 1)
    k = 20
    A, B, err = lowrank.factorize(delta, k)  # 4 * (20 + 16) <= 1100: the randomised path
    assert A.shape == (k, 1100) and B.shape == (1300, k) and A.dtype == torch.float32
    s = torch.linalg.svdvals(delta.double())
    optimal = float((s[k:] ** 2).sum() / (s ** 2).sum()) ** 0.5
    actual = float(torch.linalg.norm(delta.double() - B.double() @ A.double()) / torch.linalg.norm(delta.double()))
    assert abs(err - actual) <= 1e-4 * max(actual, 1e-6) + 1e-7  # the error it reports is the real one
    assert actual <= optimal * (1 + 1e-3)  # Eckart-Young optimum, to 0.1 %
    A2, B2, err2 = lowrank.factorize(delta, k)
    assert torch.equal(A, A2) and torch.equal(B, B2) and err == err2


def test_exact_factorisation_of_small_or_high_rank_requests():
    delta = _decaying(300, 200, 2)
    for k in (5, 150, 200, 500):
        A, B, err = lowrank.factorize(delta, k)
        s = torch.linalg.svdvals(delta.double())
        kk = min(k, 200)
        want = float((s[kk:] ** 2).sum() / (s ** 2).sum()) ** 0.5
        assert A.shape[0] == kk and abs(err - want) < 1e-6
        actual = float(torch.linalg.norm(delta.double() - B.double() @ A.double()) / torch.linalg.norm(delta.double()))
        assert abs(actual - want) < 1e-5


def test_truncate_equals_the_svd_of_the_product():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(12, 40, generator=g), torch.randn(30, 12, generator=g)
    A2, B2, err = lowrank.truncate(A, B, 5)
    u, s, vh = torch.linalg.svd((B @ A).double())
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close((B2 @ A2).double(), best, rtol=1e-5, atol=1e-5)
    assert abs(err - float((s[5:] ** 2).sum() / (s ** 2).sum()) ** 0.5) < 1e-6
    assert lowrank.truncate(A, B, 12) == (A, B, 0.0)
