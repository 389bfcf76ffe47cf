"""FP8 checkpoints seen as the float tensors they stand for: dequantised on read, one tensor at a time.

An FP8 weight is meaningless without its scales; a merge of raw FP8 codes (or of codes with
different scales) is garbage, so FP8 tensors are only ever read through their scale here.
Schemes (the scale tensor sits beside the weight, ``<name>_scale_inv`` or ``<name>_scale``):

* **block scales** (DeepSeek-V3/R1, Qwen3-FP8; transformers' "fine-grained FP8"):
  ``W`` (e4m3/e5m2, ``[out, in]``) and ``W_scale_inv`` (float32, or e8m0 for MX-style scales,
  ``[ceil(out/b0), ceil(in/b1)]``) with the block ``[b0, b1]`` from the config's
  ``quantization_config.weight_block_size`` (default 128 x 128). Despite its name the scale
  multiplies: ``W_real[i, j] = W[i, j] * S[i // b0, j // b1]``.
* **tensor / channel scales** (compressed-tensors, FBGEMM): ``W_scale`` of shape ``[]``, ``[1]``,
  ``[out]`` or ``[out, 1]``: ``W_real = W * S`` broadcast over rows. Static activation scales
  (``input_scale``) describe the quantised runtime only and are dropped with the quantisation.

The dequantised tensors present themselves with dtype ``bfloat16`` (so a merge of FP8 models is
written in bf16 unless ``out_dtype`` says otherwise) and are returned in float32, which holds
every product of an FP8 code and its scale exactly. The output config loses its
``quantization_config``.
"""
from __future__ import annotations

import math

from .dtypes import FP8
from .errors import UserError
from .sources.checkpoint import TensorInfo

SCALE_SUFFIXES = ("_scale_inv", "_scale")
_ACTIVATION_SCALES = (".input_scale", ".k_scale", ".v_scale", ".output_scale")


def _block_size(config: dict | None) -> tuple[int, int]:
    q = (config or {}).get("quantization_config") or {}
    bs = q.get("weight_block_size")
    if bs is None:
        return 128, 128
    if (not isinstance(bs, (list, tuple)) or len(bs) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)):
        raise UserError(f"quantization_config.weight_block_size is {bs!r}; expected two positive integers")
    return int(bs[0]), int(bs[1])


class DequantisedSource:
    """A checkpoint source with FP8 weights and their scales replaced by the weights they encode."""

    def __init__(self, source, config: dict | None):
        self.source = source
        self.block = _block_size(config)
        self.scale_of: dict[str, str] = {}
        self.dropped: list[str] = []
        infos = dict(source.infos)
        for name, info in source.infos.items():
            if info.dtype not in FP8 or name.endswith(SCALE_SUFFIXES):
                continue
            scale = next((name + s for s in SCALE_SUFFIXES if name + s in infos), None)
            if scale is None:
                raise UserError(f"{info.file}: tensor '{name}' is {info.dtype} without its scale "
                                f"('{name}_scale_inv' or '{name}_scale'); an FP8 weight cannot be merged "
                                "without its scales - use the checkpoint as published, with its scale tensors")
            self._check_scale(name, info, scale, infos[scale])
            self.scale_of[name] = scale
        for name, scale in self.scale_of.items():
            del infos[scale]
            i = source.infos[name]
            infos[name] = TensorInfo(i.shape, "bfloat16", i.file)
        for name in list(infos):
            if name.endswith(_ACTIVATION_SCALES):
                del infos[name]
                self.dropped.append(name)
        self.infos = infos
        self.scheme = self._scheme()

    def _check_scale(self, name: str, info: TensorInfo, scale: str, sinfo: TensorInfo) -> None:
        shape = sinfo.shape
        if scale.endswith("_scale_inv"):
            if len(info.shape) != 2:
                raise UserError(f"{info.file}: FP8 tensor '{name}' has shape {list(info.shape)}; block scales "
                                "are defined for 2-D weights only")
            b0, b1 = self.block
            want = (math.ceil(info.shape[0] / b0), math.ceil(info.shape[1] / b1))
            if tuple(shape) != want:
                raise UserError(f"{sinfo.file}: scale '{scale}' has shape {list(shape)}, but {list(info.shape)} in "
                                f"{b0}x{b1} blocks needs {list(want)}; check quantization_config.weight_block_size")
        else:
            rows = info.shape[0] if info.shape else 1
            if shape not in ((), (1,), (rows,), (rows, 1)):
                raise UserError(f"{sinfo.file}: scale '{scale}' has shape {list(shape)}; a tensor or channel scale "
                                f"of '{name}' {list(info.shape)} is [], [1], [{rows}] or [{rows}, 1]")

    def _scheme(self) -> str:
        if not self.scale_of:
            return ""
        dtypes = sorted({self.source.infos[n].dtype for n in self.scale_of})
        kinds = sorted({"block" if s.endswith("_scale_inv") else "tensor/channel" for s in self.scale_of.values()})
        block = f" {self.block[0]}x{self.block[1]}" if "block" in kinds else ""
        return f"FP8 ({', '.join(dtypes)}), {' + '.join(kinds)} scales{block}, {len(self.scale_of)} tensors"

    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def get(self, key: str):
        import torch

        scale = self.scale_of.get(key)
        if scale is None:
            return self.source.get(key)
        w = self.source.get(key).to(torch.float32)
        s = self.source.get(scale).to(torch.float32)
        if scale.endswith("_scale_inv"):
            b0, b1 = self.block
            s = s.repeat_interleave(b0, 0)[: w.shape[0]].repeat_interleave(b1, 1)[:, : w.shape[1]]
            return w.mul_(s)
        if s.dim() == 1 and s.numel() > 1:
            s = s.reshape(-1, *([1] * (w.dim() - 1)))
        return w.mul_(s)

    def close(self) -> None:
        self.source.close()


def dequantised(source, config: dict | None):
    """``source`` itself, or a :class:`DequantisedSource` when it holds FP8 tensors."""
    if not any(i.dtype in FP8 for i in source.infos.values()):
        return source
    return DequantisedSource(source, config)


def quantise_blocks(w, block: tuple[int, int] = (128, 128), dtype=None):
    """``w`` (2-D float) -> (FP8 codes, float32 ``scale_inv`` per block): the largest magnitude of
    each block maps to the format's largest finite value. The inverse of :meth:`DequantisedSource.get`
    up to FP8 rounding; test fixtures and a re-quantised output use it."""
    import torch

    dtype = dtype or torch.float8_e4m3fn
    fmax = torch.finfo(dtype).max
    b0, b1 = block
    rows, cols = w.shape
    r, c = math.ceil(rows / b0), math.ceil(cols / b1)
    padded = torch.zeros(r * b0, c * b1, dtype=torch.float32)
    padded[:rows, :cols] = w.to(torch.float32)
    blocks = padded.reshape(r, b0, c, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    codes = (blocks / scale[:, None, :, None]).reshape(r * b0, c * b1)[:rows, :cols].to(dtype)
    return codes, scale
