"""FP8 output: the merged weights re-quantised with fresh block scales (``out_dtype: float8_e4m3fn``
or ``float8_e5m2``), in the layout FP8 checkpoints with block scales use (DeepSeek-V3/R1,
transformers' "fine-grained FP8").

Per 2-D weight ``W`` [rows, cols] and block [b0, b1] (the input's ``weight_block_size``, default
128 x 128), for each block B (the last ones may be partial):

    S[B] = amax(|W[B]|) / finfo(fmt).max        (1 for an all-zero block)
    codes[B] = fmt(W[B] / S[B])                  (round to nearest)

written as ``<name>`` (the FP8 codes, same shape as W) and ``<name>_scale_inv`` (float32
[ceil(rows/b0), ceil(cols/b1)]) next to it; despite its name the scale multiplies on read
(``fp8.DequantisedSource``: W ~= codes * S), so re-reading our output gives exactly the
quantise-dequantise of the merged float tensor, within FP8 precision of it (relative 2^-4 for
e4m3, 2^-3 for e5m2, plus the subnormal floor S * 2^-10 / 2^-17).

Only the 2-D weights an input stores FP8 (its scheme quantised them) are re-quantised; every other
tensor (embeddings, norms, the head, routers: what such checkpoints keep in high precision) is
written in bfloat16, and the plan says so. ``quantization_config`` in config.json is written to
match (``quant_method: fp8``, ``fmt``, ``weight_block_size``, dynamic activations: static
activation scales of the input are not carried; ``modules_to_not_convert`` names the modules of
the 2-D weights written in bf16), the config dtype is bfloat16.

Spec: ../shared/specs/formats.md §2.2 (dtype names; FP8 needs its scales); issue 15.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

# recipe spelling -> torch attribute name
FORMATS = {"float8_e4m3fn": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "e4m3": "float8_e4m3fn",
           "float8_e4m3": "float8_e4m3fn", "fp8": "float8_e4m3fn", "f8_e4m3": "float8_e4m3fn",
           "float8_e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2", "f8_e5m2": "float8_e5m2"}
SHORT = {"float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
SCALE_SUFFIX = "_scale_inv"


def requested(out_dtype: str | None) -> str | None:
    """The FP8 torch dtype name ``out_dtype`` asks for, else None."""
    if out_dtype is None:
        return None
    return FORMATS.get(str(out_dtype).lower().removeprefix("torch."))


@dataclass
class Fp8Output:
    """Which written weights are FP8 codes, their scales' names, the block and the format."""
    dtype: str
    block: tuple[int, int]
    weights: dict[str, str] = field(default_factory=dict)  # weight name -> its scale's name

    pending: dict[str, object] = field(default_factory=dict)  # scale name -> scales not written yet

    @property
    def scales(self) -> set[str]:
        return set(self.weights.values())

    def put(self, write, name: str, value) -> None:
        """Write the codes of weight ``name`` through ``write(name, tensor)``; keep its scales."""
        (_, codes), (scale, s) = self.encode(name, value)
        write(name, codes)
        self.pending[scale] = s

    def finish(self, write, shards) -> None:
        """Write the kept scales, in the order of their shards (the last ones of the plan)."""
        for shard in shards:
            for t in shard:
                if t.name in self.pending:
                    write(t.name, self.pending.pop(t.name))

    def encode(self, name: str, value) -> list[tuple[str, object]]:
        """[(name, FP8 codes), (scale name, float32 scales)] of the float tensor ``value``."""
        import torch

        from .fp8 import quantise_blocks

        if not bool(torch.isfinite(value).all()):
            raise UserError(f"merged tensor '{name}' contains NaN or Inf, which FP8 block scales cannot encode")
        codes, scale = quantise_blocks(value.detach().to("cpu", torch.float32), self.block, getattr(torch, self.dtype))
        return [(name, codes), (self.weights[name], scale.contiguous())]


def _block_of(models) -> tuple[int, int]:
    for m in models:
        block = getattr(m.source, "block", None)
        if getattr(m.source, "scale_of", None) and block is not None:
            return tuple(block)
    return 128, 128


def refuse_for_adapters(recipe) -> None:
    if requested(recipe.out_dtype):
        raise UserError(f"out_dtype {recipe.out_dtype} (FP8 with block scales) is for full model outputs; "
                        "write the adapter in bfloat16 or float32")


def apply(plan, models, config: dict) -> None:
    """Turn a full-model plan whose recipe asks for FP8 into one writing FP8 codes and scales.

    ``models``: the inputs (base first when there is one); ``config``: the config.json the output
    copies (its ``quantization_config`` is the starting point)."""
    import math

    from .writer import OutTensor, plan_shards

    dtype = requested(plan.recipe.out_dtype)
    if dtype is None:
        return
    quantised = set()
    for m in models:
        quantised.update(n for n in (getattr(m.source, "scale_of", None) or {}))
    if not quantised:
        raise UserError(f"out_dtype {plan.recipe.out_dtype} re-quantises the weights an FP8 input stores with its "
                        "scales (block-scale FP8, e.g. DeepSeek-V3); no input is FP8 - write bfloat16 instead")
    block = _block_of(models)
    out = Fp8Output(dtype, block)
    from .dtypes import MERGEABLE

    specs, scales = [], []
    for item in plan.items.values():
        if item.out_dtype in MERGEABLE:
            item.out_dtype = "bfloat16"
        specs.append(OutTensor(item.name, item.shape, item.out_dtype))
        if item.name in quantised and len(item.shape) == 2:
            scale = item.name + SCALE_SUFFIX
            if scale in plan.items:
                raise UserError(f"tensor '{scale}' would be written twice (a tensor of that name and the scale of "
                                f"'{item.name}')")
            item.out_dtype = dtype
            specs[-1] = OutTensor(item.name, item.shape, dtype)
            out.weights[item.name] = scale
            scales.append(OutTensor(scale, (math.ceil(item.shape[0] / block[0]), math.ceil(item.shape[1] / block[1])),
                                    "float32"))
    # the scales go in shard(s) of their own after the weights: a shard's header lists 4-byte
    # tensors before 1-byte ones, and a scale is known only once its weight is merged, so the
    # (small) scales wait for the end instead of the weights waiting for their scales
    size = plan.recipe.output.shard_size
    plan.shards = plan_shards(specs, size) + plan_shards(scales, size)
    plan.fp8_out = out
    cfg = config or {}
    qc = dict(cfg.get("quantization_config") or {}) if (cfg.get("quantization_config") or {}).get(
        "quant_method") == "fp8" else {}
    # every other 2-D weight is written in bf16: name its module, so that a loader converting
    # linear layers to FP8 (transformers' fine-grained FP8) leaves it alone
    keep = {i.name[: -len(".weight")] for i in plan.items.values()
            if i.name not in out.weights and len(i.shape) == 2 and i.name.endswith(".weight")}
    keep |= set(qc.get("modules_to_not_convert") or [])
    qc.update({"quant_method": "fp8", "fmt": SHORT[dtype], "activation_scheme": "dynamic",
               "weight_block_size": list(block), "modules_to_not_convert": sorted(keep)})
    plan.config_updates["quantization_config"] = qc
    for k in ("torch_dtype", "dtype"):
        plan.config_updates[k] = lambda _old: "bfloat16"  # a field the donor has: the high-precision dtype
    others = sum(1 for i in plan.items.values() if i.name not in out.weights)
    plan.notes.append(f"FP8 output ({SHORT[dtype]}, {block[0]}x{block[1]} block scales as '<name>{SCALE_SUFFIX}'): "
                      f"{len(out.weights)} weight(s) the input scheme quantised re-quantised with fresh scales; "
                      f"{others} other tensor(s) written in bfloat16")
