"""dtype names: recipe strings <-> torch dtypes <-> safetensors header names. No math."""
from __future__ import annotations

from .errors import UserError

# recipe spelling -> torch attribute name
_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}

# safetensors header name -> (torch attribute, bytes per element)
ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "C64": ("complex64", 8),
}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}
# float formats we merge; FP8 needs its scale tensors and is refused instead of averaged raw
MERGEABLE = {"float64", "float32", "float16", "bfloat16"}
FP8 = {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}


def canonical(name: str, what: str = "dtype") -> str:
    key = str(name).lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise UserError(f"{what} '{name}' is not one of float32, float16, bfloat16, float64")
    return _ALIASES[key]


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def itemsize(name: str) -> int:
    for attr, size in ST_DTYPES.values():
        if attr == name:
            return size
    raise KeyError(name)


class OutOfRange(UserError):
    """A finite result that the output dtype cannot hold (it would be written as inf)."""


def cast_checked(t, dtype, name: str):
    """``t`` cast to ``dtype``, refusing values the cast turns into inf: a merged tensor must be
    checked after the cast too, since a finite float32 result (``lambda: 1e8``) overflows float16.
    One reduction on the cast tensor is the common case; only a non-finite sum looks closer, and
    values that were already non-finite before the cast (a copied mask) are left alone."""
    import torch

    if t.dtype == dtype:
        return t
    from . import buffers

    out = buffers.like(t, dtype)  # a reused buffer: no page clearing
    if not out.is_floating_point() or bool(torch.isfinite(out.sum())):
        return out
    lost = torch.isfinite(t) & ~torch.isfinite(out)
    if bool(lost.any()):
        worst = float(t[lost].abs().max())
        limit = torch.finfo(out.dtype).max
        raise OutOfRange(f"tensor '{name}' has values up to {worst:.4g}, beyond the range of "
                         f"{str(out.dtype).removeprefix('torch.')} (largest {limit:.4g}); lower the method's "
                         "weights or lambda, or write a wider out_dtype (float32 or bfloat16)")
    return out
