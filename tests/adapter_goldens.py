"""The golden inputs of ../shared/specs/adapters.md P0 and a checker for the reported values."""
from __future__ import annotations

import numpy as np
import torch


def g(shape, a: float, b: float, s: float = 1.0) -> torch.Tensor:
    """P0's generator s*sin(a*k^2 + b) over the row-major flat index k, in float64."""
    k = np.arange(int(np.prod(shape)), dtype=np.float64)
    return torch.from_numpy(s * np.sin(a * k * k + b)).reshape(shape)


def bases() -> dict[str, torch.Tensor]:
    return {
        "lin": g([8, 6], 0.7, 0.3), "conv": g([6, 4, 3, 3], 0.37, 0.11),
        "lin16": g([16, 16], 0.31, 0.2), "lin8": g([8, 8], 0.53, 0.9),
    }


def bias(n: int) -> torch.Tensor:
    return torch.cos(0.5 * torch.arange(n, dtype=torch.float64))


def ramp(shape) -> torch.Tensor:
    """``lora_magnitude_vector`` / ``dora_scale`` = 1 + 0.1 k."""
    n = int(np.prod(shape))
    return (1 + 0.1 * torch.arange(n, dtype=torch.float64)).reshape(shape)


def check(delta, total=None, fro=None, row0=None, rtol=1e-6, atol=0.0):
    d = torch.as_tensor(delta).to(torch.float64)
    if total is not None:
        assert abs(float(d.sum()) - total) <= rtol * max(abs(total), 1.0) + atol * d.numel() ** 0.5, (float(d.sum()), total)
    if fro is not None:
        assert abs(float(d.norm()) - fro) <= rtol * abs(fro) + atol, (float(d.norm()), fro)
    if row0 is not None:
        got = d.reshape(d.shape[0], -1)[0, : len(row0)].numpy()
        np.testing.assert_allclose(got, np.array(row0), rtol=rtol, atol=max(atol, 1e-9))
