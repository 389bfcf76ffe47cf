"""The golden inputs of ../shared/specs/adapters.md P0: base layers and adapter tensors from
g(shape; a, b, s)[k] = s * sin(a k^2 + b) over the row-major flat index, computed in float64."""
from __future__ import annotations

import math

import torch

# tensor name (PEFT or kohya/LyCORIS) -> (a, b, s)
PARAMS = {
    "lora_A": (1.3, 0.5, 0.5), "lora_down": (1.3, 0.5, 0.5),
    "lora_B": (0.9, 0.2, 0.5), "lora_up": (0.9, 0.2, 0.5),
    "lora_mid": (0.6, 0.8, 0.5),
    **{f"hada_{n}": (a, b, 0.5) for n, a, b in zip(
        ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"), (0.31, 0.47, 0.59, 0.71, 0.83, 0.97), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6))},
    **{f"lokr_{n}": (a, b, 0.5) for n, a, b in zip(
        ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"), (0.37, 0.41, 0.53, 0.61, 0.67, 0.79, 0.89),
        (0.7, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65))},
    "diff": (0.17, 0.3, 0.1), "diff_b": (0.5, 0.1, 0.1),
    "w_norm": (0.7, 0.2, 0.1), "b_norm": (0.9, 0.4, 0.1),
    "lora_B.bias": (0.4, 1.0, 1.0),
}


def g(shape, a: float, b: float, s: float) -> torch.Tensor:
    n = math.prod(shape)
    k = torch.arange(n, dtype=torch.float64)
    return (s * torch.sin(a * k * k + b)).reshape(tuple(shape))


def tensor(name: str, shape) -> torch.Tensor:
    return g(shape, *PARAMS[name])


BASES = {
    "lin": ((8, 6), (0.7, 0.3, 1.0)),
    "conv": ((6, 4, 3, 3), (0.37, 0.11, 1.0)),
    "lin16": ((16, 16), (0.31, 0.2, 1.0)),
    "lin8": ((8, 8), (0.53, 0.9, 1.0)),
}


def base(name: str) -> torch.Tensor:
    shape, p = BASES[name]
    return g(shape, *p)


def base_bias(name: str) -> torch.Tensor:
    out = BASES[name][0][0]
    if name in ("lin", "conv"):
        return torch.cos(0.5 * torch.arange(out, dtype=torch.float64))
    return torch.zeros(out, dtype=torch.float64)
