"""LoRA adapters as lazy sources: canonical low-rank factors with the scale folded once.

Spec: ../shared/specs/formats.md §4 and §7; "Design decisions" of widen_corespace.md /
lora_lego_rmm.md (fold the scale exactly once). Formats and detection: ``adapters.detect``;
matching modules to base tensors: ``adapters.keymap``.

``LoraSource(path)``
    ``.format``, ``.path``, ``.file``, ``.config``, ``.metadata``, ``.modules`` (stored module names,
    e.g. ``base_model.model.model.layers.0.self_attn.q_proj`` or
    ``lora_unet_down_blocks_0_attentions_0_proj_in``), and per module ``rank(m)``, ``alpha(m)``,
    ``scale(m)``, ``layout(m)``, ``factor_shapes(m)``, ``factors(m)``, ``delta(m, shape)``.
    Safetensors tensors are read with positioned reads (``io.safetensors``), never mapped.
A source bound to a base (``adapters.matched.MatchedLora``) adds ``factors_for(base_key)`` /
``delta_for(base_key)``.

Canonical factors (the contract with the executor and the operators)
-------------------------------------------------------------------
``factors(m)`` returns float32 ``(A, B)`` with ``A`` (r x cols) and ``B`` (rows x r), always in the
**layout of the base tensor**, flattened to 2-D: ``rows = base_shape[0]``,
``cols = prod(base_shape[1:])``. The LoRA scale s is folded in **exactly once, into B**
(``B = s * B_stored``; ``fold="sqrt"`` puts sqrt(s) into both instead). Hence, for every module:

    delta_for_base = (B @ A).reshape(base_shape)          # == s * B_stored @ A_stored, base layout

* linear: A = lora_A / lora_down ``[r, in]``, B = s * lora_B / lora_up ``[out, r]`` (4-D
  ``[r, in, 1, 1]`` linear LoRAs are squeezed);
* conv (1x1 or kh x kw): A = down.reshape(r, in*kh*kw), B = s * up.reshape(out, r); the delta
  ``(B @ A).reshape(out, in, kh, kw)`` is PEFT's / kohya's kernel delta (row-major flattening of
  ``(in, kh, kw)`` matches torch's layout). A dense operator works on ``W.reshape(out, -1)``;
* PEFT ``fan_in_fan_out`` (GPT-2 ``Conv1D``, base ``[in, out]``) and embedding LoRAs (delta is
  ``(B@A)^T``): the factors are swapped and transposed, A = lora_B^T, B = s * lora_A^T, so
  ``B @ A`` is already in the base layout. ``layout(m)`` says which case applies:
  ``"linear" | "conv" | "transposed" | "embedding"``; ``lora_out.to_peft`` undoes the swap.

A LoRA with the scale folded has effective scale 1: write it back with alpha = r.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..io import safetensors as safetensors_io
from .detect import PEFT_PREFIX, detect_lora, format_from_keys, load_json, weights_in_dir
from .grouping import peft_pattern_key as _peft_pattern_key

_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

class LoraSource:
    """A LoRA adapter opened lazily: the header up front, one module's tensors per ``factors`` call."""

    kind = "lora"

    def __init__(self, path: str | Path, label: str | None = None):
        p = Path(path)
        self.label = label or str(p)
        self.path = p
        self.warnings: list[str] = []
        fmt = detect_lora(p)
        if fmt is None:
            raise UserError(f"{p} is not a LoRA adapter (no adapter_config.json, no LoRA tensor names)")
        self.format = fmt
        self.config: dict[str, Any] = {}
        if p.is_dir():
            self.file = weights_in_dir(p)
            if (p / "adapter_config.json").is_file():
                self.config = load_json(p / "adapter_config.json")
        else:
            self.file = p
            if fmt == "peft" and (p.parent / "adapter_config.json").is_file():
                self.config = load_json(p.parent / "adapter_config.json")
        assert self.file is not None
        self._handle = None
        self._pickle: dict | None = None
        if self.file.suffix == ".safetensors":
            self._handle = safetensors_io.SafetensorsFile(self.file)
            self._entries = {k: (e.st_dtype, e.shape) for k, e in self._handle.entries.items()}
            self.metadata = dict(self._handle.metadata)
        else:
            self._pickle = _load_pickle(self.file)
            self.metadata = {}
            self._entries = {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in self._pickle.items()}
            fmt2 = format_from_keys(list(self._entries), self.file)
            if fmt2 is None:
                raise UserError(f"{self.file} holds no LoRA tensors (no *.lora_A.weight keys)")
        self._parse_keys()
        self._diffusers_meta = self._adapter_metadata() if fmt == "diffusers" else {}
        if fmt == "peft" and not self.config and not self._alpha_keys:
            self.warnings.append(f"{self.file}: no adapter_config.json beside it; assuming lora_alpha = r (scale 1)")
        init = str(self.config.get("init_lora_weights", "")).lower()
        if any(init.startswith(x) for x in _BASE_CHANGING_INITS):
            self.warnings.append(f"{self.label}: init_lora_weights={init!r} also changes the base weights "
                                 "unless it was converted to plain LoRA when saved")
        for w in self.warnings:
            warnings.warn(w, stacklevel=2)

    # -- keys ---------------------------------------------------------------------------------

    def _parse_keys(self) -> None:
        from .grouping import group_keys

        lora, parts, alpha, self.base_copies = group_keys(self._entries, self.format, self.config, self.file)
        for m, roles in lora.items():
            a = roles.get("A") or roles.get("eA")
            b = roles.get("B") or roles.get("eB")
            sa, sb = self._entries[a][1], self._entries[b][1]
            if len(sa) not in (2, 4) or len(sb) not in (2, 4) or sb[1] != sa[0]:
                raise UserError(f"LoRA file {self.file}: module '{m}' has factors of incompatible shapes "
                                f"{list(sa)} (A/down) and {list(sb)} (B/up)")
            if len(sb) == 4 and tuple(sb[2:]) != (1, 1):
                raise UserError(f"not supported yet: a {sb[2]}x{sb[3]} up/B kernel for '{m}' in {self.file}")
            if m in alpha:
                roles["alpha"] = alpha[m]
        self._keys: dict[str, dict[str, str]] = lora  # every LoRA weight part (scale, rank, alpha)
        self._parts = parts  # every other part, by module id (``adapters.typed``)
        self._alpha_keys: dict[str, str] = alpha
        self.modules: list[str] = sorted(set(lora) | set(parts))

    def _adapter_metadata(self) -> dict[str, dict]:
        raw = self.metadata.get("lora_adapter_metadata")
        if not raw:
            return {}
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError):
            return {}
        if not isinstance(d, dict):
            return {}
        out: dict[str, dict] = {}
        if "r" in d or "lora_alpha" in d:
            out[""] = d
        for k, v in d.items():
            if "." in k:
                comp, field = k.split(".", 1)
                out.setdefault(comp, {})[field] = v
        return out

    # -- tensor access --------------------------------------------------------------------------

    def _read(self, key: str):
        if self._pickle is not None:
            return self._pickle[key]
        return self._handle.read(key)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # the header stays parsed: a closed source reopens on the next read
        self._pickle = None

    def __enter__(self) -> "LoraSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rank(self, module: str) -> int:
        if module in self._parts:
            from .typed import part_rank

            return part_rank(self, module)
        return self.stored_shapes(module)[0][0]

    def _check(self, module: str) -> dict[str, str]:
        try:
            return self._keys[module]
        except KeyError:
            raise KeyError(f"no LoRA module '{module}' in {self.file}") from None

    # -- module kinds (``adapters.typed`` materialises the parts that are not plain factors) ---------

    def is_factors(self, module: str) -> bool:
        """True for a plain LoRA module (exact factors), False for a part materialised dense."""
        if module in self._parts:
            return False
        self._check(module)
        return True

    def type_name(self, module: str) -> str:
        from .typed import type_name

        return type_name(self, module)

    def dense_modules(self) -> list[str]:
        """The modules that are not plain LoRA factors (materialised to dense deltas)."""
        return sorted(self._parts)

    def one_dimensional(self, module: str) -> bool:
        """A bias / norm delta or a replacement tensor: nothing a LoRA output can hold."""
        p = self._parts.get(module)
        if p is None:
            return False
        from .typed import part_shapes

        return (p.target == "bias" or p.type.name == "replacement"
                or all(len(s) <= 1 for s in part_shapes(self, module).values()))

    def has_exact_factors(self, module: str) -> bool:
        """A part that is not plain LoRA but has an exact low-rank form (Tucker LoCon, LoHa, LoKr)."""
        from .typed import has_exact_factors

        return has_exact_factors(self, module)

    def exact_factors(self, module: str, shape=None):
        from .typed import exact_factors

        return exact_factors(self, module, shape)

    def optional(self, module: str) -> bool:
        """A part that exists only where the base has its tensor (IA3's bias change)."""
        p = self._parts.get(module)
        return p is not None and bool(p.type.extra.get("optional"))

    def needs_base(self, module: str) -> bool:
        return module in self._parts and self._parts[module].needs_base

    # -- per-module facts ---------------------------------------------------------------------------

    def stored_shapes(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the stored (A/down, B/up) tensors, as in the file (every stored tensor of a
        part that is not plain factors)."""
        if module in self._parts:
            from .typed import part_shapes

            return tuple(part_shapes(self, module).values())
        roles = self._check(module)
        a = roles.get("A") or roles["eA"]
        b = roles.get("B") or roles["eB"]
        return self._entries[a][1], self._entries[b][1]

    def layout(self, module: str) -> str:
        """"linear" | "conv" | "transposed" (fan_in_fan_out) | "embedding", as the file and config
        say; matching to a base may decide otherwise per module (see ``MatchedLora``)."""
        if module in self._parts:
            return "dense"
        roles = self._check(module)
        if "eA" in roles:
            return "embedding"
        sa, _ = self.stored_shapes(module)
        if len(sa) == 4 and tuple(sa[2:]) != (1, 1):
            return "conv"
        if len(sa) == 4:
            return "conv"  # 1x1: flattened the same way; a 2-D base accepts it too
        if self.format == "peft" and self.config.get("fan_in_fan_out"):
            return "transposed"
        return "linear"

    def _peft_name(self, module: str) -> str:
        if self.format == "peft":
            return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        return module.split(".", 1)[1] if "." in module else module

    def _config_for(self, module: str) -> dict:
        if self.format == "diffusers":
            comp = module.split(".", 1)[0]
            return self._diffusers_meta.get(comp) or self._diffusers_meta.get("") or {}
        return self.config

    def alpha(self, module: str) -> float:
        """The module's alpha: kohya/diffusers ``.alpha`` tensor, PEFT lora_alpha / alpha_pattern;
        alpha = rank when none is stored."""
        self._check(module)
        if module in self._alpha_keys:
            return float(self._read(self._alpha_keys[module]).float().reshape(-1)[0])
        cfg = self._config_for(module)
        if cfg:
            pats = cfg.get("alpha_pattern") or {}
            k = _peft_pattern_key(pats, self._peft_name(module))
            if k is not None:
                return float(pats[k])
            if cfg.get("lora_alpha") is not None:
                return float(cfg["lora_alpha"])
        return float(self.rank(module))

    def uses_rslora(self, module: str) -> bool:
        return bool(self._config_for(module).get("use_rslora")) and module not in self._alpha_keys

    def scale(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA (r from the tensor shapes)."""
        r = self.rank(module)
        a = self.alpha(module)
        return a / math.sqrt(r) if self.uses_rslora(module) else a / r

    def scale_rule(self) -> str:
        if self.format == "kohya":
            return "alpha/r per module (.alpha tensor; missing alpha -> alpha = r)"
        if self._alpha_keys:
            return "alpha/r per module (.alpha tensors; missing alpha -> alpha = r)"
        cfg = self.config if self.format == "peft" else (self._diffusers_meta.get("") or
                                                          next(iter(self._diffusers_meta.values()), {}))
        if not cfg:
            return "alpha = r assumed (no config / metadata): scale 1"
        rule = "lora_alpha/sqrt(r) (rsLoRA)" if cfg.get("use_rslora") else "lora_alpha/r"
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            rule += " with rank_pattern/alpha_pattern overrides"
        return rule

    def factor_shapes(self, module: str, layout: str | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """((r, cols), (rows, r)) of the canonical factors, from the header only; ``layout``
        overrides ``layout(module)``."""
        if module in self._parts:
            from .typed import delta_shape

            rows, cols = delta_shape(self, module)
            return (min(rows, cols), cols), (rows, min(rows, cols))
        sa, sb = self.stored_shapes(module)
        r = sa[0]
        if (layout or self.layout(module)) in ("transposed", "embedding"):
            return (r, sb[0]), (sa[1], r)
        return (r, math.prod(sa[1:])), (sb[0], r)

    def factors(self, module: str, fold: str = "B", layout: str | None = None):
        """Canonical float32 (A, B) in the base tensor's 2-D layout with the scale folded in once.

        fold="B": B carries s; fold="sqrt": A and B each carry sqrt(|s|) (sign of s on B)."""
        import torch

        if module in self._parts:
            raise RuntimeError(f"'{module}' of {self.file} is a {self.type_name(module)} module, not LoRA factors")
        roles = self._check(module)
        a = self._read(roles.get("A") or roles["eA"]).to(torch.float32)
        b = self._read(roles.get("B") or roles["eB"]).to(torch.float32)
        r = a.shape[0]
        if (layout or self.layout(module)) in ("transposed", "embedding"):
            A, B = b.reshape(b.shape[0], r).t().contiguous(), a.reshape(r, -1).t().contiguous()
        else:
            A, B = a.reshape(r, -1).contiguous(), b.reshape(b.shape[0], r).contiguous()
        s = self.scale(module)
        if fold == "B":
            B = B * s
        elif fold == "sqrt":
            q = math.sqrt(abs(s))
            A, B = A * q, B * (q if s >= 0 else -q)
        else:
            raise ValueError(f"fold must be 'B' or 'sqrt', not {fold!r}")
        return A, B

    def delta(self, module: str, shape: Sequence[int] | None = None, layout: str | None = None, base=None):
        """s * B @ A in the base layout, float32, reshaped to ``shape`` (the base tensor's shape); a
        part that is not plain factors is materialised by its type (``base``: the base tensor, for
        the types that need it)."""
        if module in self._parts:
            from .typed import materialise

            return materialise(self, module, shape, base)
        A, B = self.factors(module, layout=layout)
        d = B @ A
        return d.reshape(tuple(shape)) if shape is not None else d

    def num_params(self) -> int:
        return sum(math.prod(s) for m in self.modules for s in self.stored_shapes(m))

    def read(self, key: str):
        """One stored tensor, as stored."""
        return self._read(key)

    def __repr__(self) -> str:
        return f"LoraSource({self.label!r}, format={self.format}, modules={len(self.modules)})"


def _load_pickle(f: Path) -> dict:
    import torch

    from ..io.pickles import load_weights_only

    sd = load_weights_only(f)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{f} is not a state dict of tensors")
    return sd
