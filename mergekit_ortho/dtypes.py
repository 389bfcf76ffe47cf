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
