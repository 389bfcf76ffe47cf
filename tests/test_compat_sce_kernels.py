"""sce's chunked variance and selection sums (ops/sce.py) equal their plain forms bit for bit,
over several chunk sizes and with non-finite entries."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.ops import sce
from mergekit_ortho.ops.kernels import _chunks


def _taus(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(size, generator=g) * 10 ** float(torch.randint(-3, 3, (), generator=g)) for _ in range(n)]
    taus[0][::97] = 0.0
    if n > 1:
        taus[1][5] = float("inf")
        taus[-1][7] = float("nan")
    return taus


@pytest.mark.parametrize("chunk", [7, 1000, (1 << 18) - 1])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_variance_equals_the_definition(monkeypatch, chunk, n):
    monkeypatch.setattr(sce, "chunk_len", lambda t: chunk)
    taus = _taus(n, 4099, n)
    got, want = sce._variance([t.clone() for t in taus]), sce.variance_plain(taus)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@pytest.mark.parametrize("chunk", [7, (1 << 18) - 1])
def test_selection_sums_equal_the_masked_sums(monkeypatch, chunk):
    monkeypatch.setattr(sce, "chunk_len", lambda t: chunk)
    g = torch.Generator().manual_seed(9)
    taus = [torch.randn(3001, generator=g) for _ in range(3)]
    flats = [t.clone() for t in taus]
    sums = sce._select_(flats, 0.3)
    for f, s in zip(flats, sums):
        want = sum(float(torch.sum(f[lo:lo + chunk].square(), dtype=torch.float64)) for lo in range(0, f.numel(), chunk))
        assert s == want
    assert _chunks.CHUNK  # the default chunk is the kernels' one
