"""Serialise canonical LoRA factors as PEFT or kohya-ss tensors plus config / metadata (in memory).

Spec: ../shared/specs/formats.md §4a (PEFT), §4b (kohya, incl. §4b.4 metadata and hashes);
lora_lego_rmm.md "Design decisions" (outputs have scale 1).

Input everywhere: ``modules = {base_weight_key: (A, B)}`` with the canonical factors of
``adapters.lora``: A (r x cols), B (rows x r), scale already folded in, in the **base tensor's
layout** flattened to 2-D, so ``(B @ A).reshape(base_shape)`` is the delta to add to the base
tensor. Outputs therefore always have scale 1 (alpha = r). Nothing is written to disk here: the
caller places ``tensors`` in a ``.safetensors`` file (and ``adapter_config.json`` beside it for PEFT,
``metadata`` as the safetensors ``__metadata__`` for kohya). Modules of rank 0 are left out (they
add nothing).

Public API
----------
``to_peft(modules, base_model_name_or_path=None, *, shapes=None, layouts=None, dtype=torch.float32,
task_type=None, prefix="base_model.model.", extra_config=None) -> (tensors, adapter_config)``
    Keys ``<prefix><module>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
    ``.lora_embedding_A`` / ``.lora_embedding_B``), module = base key minus ``.weight``;
    ``lora_alpha = r`` with ``rank_pattern`` / ``alpha_pattern`` for modules whose rank differs
    from the most common one; ``target_modules`` = the module paths; ``fan_in_fan_out`` set when a
    ``"transposed"`` layout is present. ``layouts`` (base key -> ``"linear" | "conv" |
    "transposed" | "embedding"``, see ``layouts_of``) default from ``shapes``: 4-D -> conv.
``to_kohya(modules, template=None, *, shapes, dtype=torch.float32, sources=(), metadata=None,
merged_from=None, hashes=True) -> (tensors, metadata)``
    ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-d), names from
    ``template`` (a ``{base_key: kohya module name}`` dict, or MatchedLora(s) - so the output
    keeps the input's key layout), else ``kohya_default_name``;
    conv modules restored to ``[r, in, kh, kw]`` / ``[out, r, 1, 1]`` from ``shapes``. Metadata
    values are all ``str``. **One alpha for every module** (issue 19): diffusers 0.42 fails to match
    the alpha keys of attention and text-encoder modules and gives them the most common alpha, so
    a file whose modules have different alpha/rank ratios renders wrong there. The file's alpha is
    the most common rank; a module of another rank r carries the ratio r / alpha folded into its
    factors (``fold_alpha``), which is exact for every reader (kohya, A1111, ComfyUI, diffusers).
``common_alpha(alphas)``, ``fold_alpha(down, up, alpha, common)``: that rule, shared with
    ``adapters.resize`` / ``adapters.extract``.
``layouts_of(sources) -> {base_key: layout}``; ``kohya_hashes(tensors, metadata) -> dict``.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch

from .adapters.keymap import kohya_default_name
from .adapters.matched import MatchedLora
from .errors import UserError


class LoraFactorError(UserError):
    """Merged LoRA factors that cannot be written: wrong shapes, or two modules on one name."""

_PEFT_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "r": 8,
    "lora_alpha": 8,
    "target_modules": [],
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "use_dora": False,
    "lora_dropout": 0.0,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "inference_mode": True,
}


def _module_path(base_key: str) -> str:
    m = base_key[: -len(".weight")] if base_key.endswith(".weight") else base_key
    return m.replace(".base_layer", "")


def _rank(A: torch.Tensor, B: torch.Tensor, key: str) -> int:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise LoraFactorError(f"LoRA factors for '{key}' must be A (r x in) and B (out x r); got "
                              f"{list(A.shape)} and {list(B.shape)}")
    return int(A.shape[0])


def _default_layout(key: str, shapes: Mapping[str, Sequence[int]] | None) -> str:
    if shapes is not None and key in shapes and len(shapes[key]) == 4:
        return "conv"
    return "linear"


def _conv_shapes(key: str, A: torch.Tensor, B: torch.Tensor, shapes) -> tuple[tuple, tuple]:
    if shapes is None or key not in shapes:
        raise LoraFactorError(f"conv LoRA '{key}' needs the base tensor's 4-D shape (shapes=...)")
    shp = tuple(shapes[key])
    r = A.shape[0]
    if len(shp) != 4 or B.shape[0] != shp[0] or A.shape[1] != shp[1] * shp[2] * shp[3]:
        raise LoraFactorError(f"LoRA factors for '{key}' ({list(B.shape)} @ {list(A.shape)}) do not fit "
                              f"the base conv weight {list(shp)}")
    return (r, *shp[1:]), (shp[0], r, 1, 1)


def _out(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    from .dtypes import cast_checked

    return cast_checked(t.detach(), dtype, name).contiguous().clone()


def layouts_of(sources: MatchedLora | Iterable[MatchedLora]) -> dict[str, str]:
    """{base_key: layout} from matched LoRAs (first source wins), for ``to_peft``."""
    srcs = [sources] if isinstance(sources, MatchedLora) else list(sources)
    out: dict[str, str] = {}
    for s in srcs:
        for key, mod in s.by_base.items():
            out.setdefault(key, s.layout(mod))
    return out


def to_peft(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
            base_model_name_or_path: str | None = None, *,
            shapes: Mapping[str, Sequence[int]] | None = None,
            layouts: Mapping[str, str] | None = None,
            dtype: torch.dtype = torch.float32,
            task_type: str | None = None,
            prefix: str = "base_model.model.",
            extra_config: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT ``adapter_model.safetensors`` tensors and ``adapter_config.json`` dict, scale 1."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    any_transposed = False
    for key in sorted(modules):
        A, B = modules[key]
        r = _rank(A, B, key)
        if r == 0:
            continue
        path = _module_path(key)
        lay = (layouts or {}).get(key) or _default_layout(key, shapes)
        if lay in ("transposed", "embedding"):
            # canonical B@A is in the base layout; PEFT computes (B_p @ A_p)^T
            a_p, b_p = B.t(), A.t()
            if lay == "transposed":
                any_transposed = True
        elif lay == "conv":
            sa, sb = _conv_shapes(key, A, B, shapes)
            a_p, b_p = A.reshape(sa), B.reshape(sb)
        elif lay == "linear":
            a_p, b_p = A, B
        else:
            raise ValueError(f"unknown LoRA layout {lay!r} for '{key}'")
        if lay == "embedding":
            tensors[f"{prefix}{path}.lora_embedding_A"] = _out(a_p, dtype, f"{prefix}{path}.lora_embedding_A")
            tensors[f"{prefix}{path}.lora_embedding_B"] = _out(b_p, dtype, f"{prefix}{path}.lora_embedding_B")
        else:
            tensors[f"{prefix}{path}.lora_A.weight"] = _out(a_p, dtype, f"{prefix}{path}.lora_A.weight")
            tensors[f"{prefix}{path}.lora_B.weight"] = _out(b_p, dtype, f"{prefix}{path}.lora_B.weight")
        ranks[path] = r
    counts = Counter(ranks.values())
    r0 = max(counts, key=lambda r: (counts[r], r)) if counts else 8
    pattern = {p: r for p, r in sorted(ranks.items()) if r != r0}
    cfg = dict(_PEFT_DEFAULTS)
    cfg.update({
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": r0,
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "fan_in_fan_out": any_transposed,
    })
    if extra_config:
        cfg.update(extra_config)
    return tensors, cfg


def _names_from(template) -> dict[str, str]:
    if template is None:
        return {}
    if isinstance(template, Mapping):
        return dict(template)
    srcs = [template] if isinstance(template, MatchedLora) else list(template)
    names: dict[str, str] = {}
    for s in srcs:
        if s.format != "kohya":
            continue
        for key, mod in s.by_base.items():
            if mod not in s.assemblies:
                names.setdefault(key, mod)
    return names


def _unassemble(modules, names, shapes, template):
    """Base tensors that the inputs fed through a P19 assembly (q/k/v fused into ``in_proj_weight``,
    a transposed ``text_projection``, swapped adaLN halves) are written back as the inputs' own
    modules: module m gets ``down = A`` and ``up`` with ``up[lora_rows] = B[base_rows]`` (all-zero
    columns dropped), transposed pieces ``down = Bᵀ``, ``up = Aᵀ``: exact. Rows of one fused input
    module spread over several base tensors (a BFL ``qkv`` LoRA on a diffusers base) keep the
    base tensor's own name."""
    if template is None or isinstance(template, Mapping):
        return modules, names, shapes
    srcs = [template] if isinstance(template, MatchedLora) else list(template)
    asm = {}
    for s in srcs:
        if s.format == "kohya":
            for key, mod in s.by_base.items():
                if mod in s.assemblies:
                    asm.setdefault(key, s.assemblies[mod])
    if not asm:
        return modules, names, shapes
    modules, names, shapes = dict(modules), dict(names), dict(shapes or {})
    for key, a in asm.items():
        if key not in modules:
            continue
        A, B = modules[key]
        by_mod = {}
        for p in a.pieces:
            by_mod.setdefault(p.module, []).append(p)
        if any(p.lora_rows is not None and p.base_rows is None for p in a.pieces):
            continue  # a split: the base tensor is one row block of a fused input module
        del modules[key]
        shapes.pop(key, None)
        for m, ps in by_mod.items():
            if ps[0].transpose:
                down, up = B.t(), A.t()
            else:
                total = max(p.lora_rows[1] if p.lora_rows else p.base_rows[1] - p.base_rows[0] for p in ps)
                up = torch.zeros(total, B.shape[1], dtype=B.dtype)
                for p in ps:
                    up[slice(*p.lora_rows) if p.lora_rows else slice(None)] = B[slice(*p.base_rows)]
                down = A
            keep = up.abs().sum(0) != 0
            down, up = down[keep], up[:, keep]
            pseudo = f"{key}#{m}"
            modules[pseudo] = (down.contiguous(), up.contiguous())
            names[pseudo] = m
            shapes[pseudo] = (up.shape[0], down.shape[1])
    return modules, names, shapes


# metadata that describes the base model the LoRA is for (still true of a merge when the inputs
# agree); training records (ss_num_train_images, ss_tag_frequency, ...) and the network's own
# facts (dim, alpha, module, hashes, title) are not copied: the merged file has its own
_AGREED_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
                "ss_clip_skip", "modelspec.architecture", "modelspec.sai_model_spec", "modelspec.implementation",
                "modelspec.resolution", "modelspec.prediction_type")


def _agreed(sources: Sequence[MatchedLora], key: str) -> str | None:
    vals = {s.metadata[key] for s in sources if key in s.metadata}
    return vals.pop() if len(vals) == 1 else None


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' ``sshs_model_hash`` (SHA-256 of the data section) and ``sshs_legacy_hash``
    (first 8 hex of SHA-256 of 64 KiB at offset 1 MiB), computed as sd-scripts does: on the bytes
    of ``safetensors.torch.save(tensors, <ss_* metadata only>)``. They describe the file only if
    the writer lays the tensors out in safetensors' own order (``safetensors.torch.save_file``)."""
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = save(dict(tensors), metadata=ss)
    n = int.from_bytes(b[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(b[8 + n:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8],
    }


def common_alpha(alphas: Iterable[float]) -> float:
    """The alpha written for every module: the most common one (ties: the largest)."""
    counts = Counter(float(a) for a in alphas)
    if not counts:
        return 1.0
    return max(counts, key=lambda a: (counts[a], a))


def stored_alpha(alpha: float, dtype: torch.dtype) -> float:
    """``alpha`` as a reader sees it after it is stored in ``dtype`` (bf16 rounds 12.3 to 12.25)."""
    return float(torch.tensor(float(alpha), dtype=dtype).float())


def fold_alpha(down: torch.Tensor, up: torch.Tensor, alpha: float, common: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors that give under ``common`` the delta that (down, up) give under ``alpha``.

    The delta is (alpha / r) up @ down, so the stored product is multiplied by c = alpha / common,
    sqrt(|c|) into each factor (the sign of c into up) to keep their magnitudes comparable."""
    if common == 0:
        raise LoraFactorError("a kohya file cannot be written with alpha 0 for every module")
    c = float(alpha) / float(common)
    if c == 1.0:
        return down, up
    q = abs(c) ** 0.5
    return down * q, up * (q if c > 0 else -q)


def to_kohya(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
             template: Mapping[str, str] | MatchedLora | Iterable[MatchedLora] | None = None, *,
             shapes: Mapping[str, Sequence[int]] | None = None,
             dtype: torch.dtype = torch.float32,
             sources: Sequence[MatchedLora] = (),
             metadata: Mapping[str, Any] | None = None,
             merged_from: Sequence[str] | None = None,
             hashes: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya-ss LoRA tensors (one alpha for all modules, see the module docstring) and
    ``__metadata__`` (all values str).

    ``sources``: the input LoRAs whose ``ss_base_model_version`` / ``ss_v2`` /
    ``modelspec.architecture`` are copied when they agree (template MatchedLoras are used when
    ``sources`` is empty). ``metadata``: extra entries, applied last."""
    names = _names_from(template)
    if not sources and template is not None and not isinstance(template, Mapping):
        sources = [template] if isinstance(template, MatchedLora) else list(template)
    modules, names, shapes = _unassemble(modules, names, shapes, template)
    tensors: dict[str, torch.Tensor] = {}
    ranks: list[int] = []
    used: dict[str, str] = {}
    shaped: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    for key in sorted(modules):
        A, B = modules[key]
        r = _rank(A, B, key)
        if r == 0:
            continue
        name = names.get(key) or kohya_default_name(key)
        if name in used:
            raise LoraFactorError(f"base tensors '{used[name]}' and '{key}' would both be written as kohya module '{name}'")
        used[name] = key
        if shapes is not None and key in shapes and len(shapes[key]) == 4:
            sa, sb = _conv_shapes(key, A, B, shapes)
            down, up = A.reshape(sa), B.reshape(sb)
        else:
            if shapes is not None and key in shapes:
                shp = tuple(shapes[key])
                if len(shp) != 2 or shp != (B.shape[0], A.shape[1]):
                    raise LoraFactorError(f"LoRA factors for '{key}' ({list(B.shape)} @ {list(A.shape)}) do not fit "
                                          f"the base tensor {list(shp)}")
            down, up = A, B
        shaped.append((name, r, down, up))
        ranks.append(r)
    alpha = stored_alpha(common_alpha(ranks), dtype)  # scale 1 everywhere: each module's alpha is r
    for name, r, down, up in shaped:
        down, up = fold_alpha(down.float(), up.float(), r, alpha)
        tensors[f"{name}.lora_down.weight"] = _out(down, dtype, f"{name}.lora_down.weight")
        tensors[f"{name}.lora_up.weight"] = _out(up, dtype, f"{name}.lora_up.weight")
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    dims = set(ranks)
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dims.pop()) if len(set(ranks)) == 1 else "Dynamic",
        "ss_network_alpha": str(alpha),
    }
    srcs = list(sources)
    for k in _AGREED_KEYS:
        v = _agreed(srcs, k)
        if v is not None:
            meta[k] = v
    if merged_from:
        meta["modelspec.merged_from"] = ", ".join(str(x) for x in merged_from)
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    if hashes and tensors:
        meta.update(kohya_hashes(tensors, meta))
    return tensors, meta
