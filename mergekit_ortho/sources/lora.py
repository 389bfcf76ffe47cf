"""LoRA adapters as lazy sources: format detection, canonical low-rank factors, base-key matching.

Spec: ../shared/specs/formats.md §4 (4a PEFT, 4b kohya-ss, 4c diffusers, 4d LyCORIS, 4e detection)
and §7; "Design decisions" of widen_corespace.md / lora_lego_rmm.md (fold the scale exactly once).

Formats read
------------
* ``"peft"``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, or
  ``adapter_model.bin`` read only with ``torch.load(weights_only=True)``), or a ``.safetensors``
  file whose keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (embedding
  LoRAs: ``.lora_embedding_A`` / ``.lora_embedding_B``). ``adapter_config.json`` beside the file
  is used when present; without it alpha = r is assumed (scale 1, a warning is recorded).
* ``"kohya"``: one ``.safetensors`` with ``lora_unet_*`` / ``lora_te_*`` / ``lora_te1_*`` /
  ``lora_te2_*`` / ``lora_te3_*`` modules and ``.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` tensors (SD1.5, SD2, SDXL, Flux; linear, conv 1x1 and conv kxk "LoCon").
* ``"diffusers"``: PEFT names with a component prefix (``unet.`` / ``text_encoder.`` /
  ``text_encoder_2.`` / ``transformer.``), e.g. ``pytorch_lora_weights.safetensors``; alphas from
  ``<module>.alpha`` tensors, else from the ``lora_adapter_metadata`` JSON metadata entry, else
  alpha = r.

Everything else that is a LoRA-like file (LoHa, LoKr, OFT/BOFT, Tucker ``lora_mid``, DoRA, GLoRA,
(IA)^3, LyCORIS full/norm, ``lora_bias``, ``modules_to_save`` tensors, non-LORA PEFT types, old
diffusers ``.lora.down.weight`` names) raises ``UserError`` (a ``ValueError``) with one line
``not supported yet: <what> in <file> (...)``.

Public API
----------
``detect_lora(path) -> "peft" | "kohya" | "diffusers" | None``
    Header-only (safetensors header JSON, ``adapter_config.json``); None = not a LoRA.
``LoraSource(path)``
    ``.format``, ``.path``, ``.file``, ``.config``, ``.metadata``, ``.modules`` (stored module names,
    e.g. ``base_model.model.model.layers.0.self_attn.q_proj`` or
    ``lora_unet_down_blocks_0_attentions_0_proj_in``), and per module ``rank(m)``, ``alpha(m)``,
    ``scale(m)``, ``layout(m)``, ``factor_shapes(m)``, ``factors(m)``, ``delta(m, shape)``.
    After ``match_to_base``: ``.base_map`` (module -> base key), ``.by_base`` (base key -> module),
    ``factors_for(base_key)``, ``delta_for(base_key)``.
``match_to_base(source, base_keys, base_shapes) -> {module: base_weight_key}``
``guess_architecture(source) -> "SD1.5" | "SD2" | "SDXL" | "Flux" | "SD3" | "LLM" | "unknown"``
``check_compatible(sources) -> str``  (raises UserError when families differ)
``describe_lora(path) -> dict``       (for ``merge inspect``)
``kohya_default_name(base_key) -> str``

Canonical factors (the contract with the engine and the operators)
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
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UserError
from ..io import safetensors as safetensors_io

PEFT_PREFIX = "base_model.model."
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")

# base-key prefix -> kohya module prefixes generated for it (tier 0); bare keys are tier 1.
_KOHYA_BASE_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model.diffusion_model.", ("lora_unet_",)),  # LDM/SGM single-file UNet, ComfyUI Flux
    ("diffusion_model.", ("lora_unet_",)),
    ("unet.", ("lora_unet_",)),
    ("transformer.", ("lora_unet_",)),
    ("cond_stage_model.transformer.", ("lora_te_",)),  # SD1.x single file (HF CLIP names)
    ("conditioner.embedders.0.transformer.", ("lora_te1_",)),  # SDXL single file, CLIP-L
    ("text_encoders.clip_l.transformer.", ("lora_te1_",)),  # ComfyUI
    ("text_encoders.t5xxl.transformer.", ("lora_te3_",)),
    ("text_encoder.", ("lora_te_", "lora_te1_")),  # diffusers pipeline components
    ("text_encoder_2.", ("lora_te2_", "lora_te3_")),
    ("text_encoder_3.", ("lora_te3_",)),
)
_KOHYA_BARE = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")

PEFT_VARIANT_KEYS = {  # adapter_config.json entries whose non-empty value we refuse
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "lora_bias",
    "use_qalora": "QALoRA (use_qalora)",
    "kasa_config": "KaSA (kasa_config)",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "arrow_config": "Arrow (arrow_config)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

# key substring -> algorithm (checked anywhere in a key; all are LoRA-only names)
_UNSUPPORTED_ANYWHERE = (
    ("hada_w1_a", "LoHa"), ("hada_w2_a", "LoHa"), ("hada_t1", "LoHa"),
    ("lokr_w1", "LoKr"), ("lokr_w2", "LoKr"), ("lokr_t2", "LoKr"),
    ("oft_blocks", "OFT/BOFT"), ("oft_diag", "OFT/BOFT"), ("boft_", "OFT/BOFT"),
    (".lora_mid.", "LoCon with Tucker core (lora_mid)"),
    (".dora_scale", "DoRA"), (".lora_magnitude_vector", "DoRA"),
    (".lora_B.bias", "lora_bias (bias on lora_B)"),
    (".lora.down.weight", "old diffusers LoRA names (.lora.down.weight)"),
    ("_lora.down.weight", "old diffusers attention-processor LoRA names (_lora.down.weight)"),
    (".lora_linear_layer.", "old diffusers LoRA names (lora_linear_layer)"),
)
# key suffix -> algorithm, only for keys under a kohya/LyCORIS prefix
_UNSUPPORTED_KOHYA_SUFFIX = (
    (".a1.weight", "GLoRA"), (".b1.weight", "GLoRA"),
    (".on_input", "(IA)^3"), (".diff", "LyCORIS full/diff"), (".diff_b", "LyCORIS full/diff"),
    (".w_norm", "LyCORIS norm"), (".b_norm", "LyCORIS norm"),
)

_PEFT_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_A.default.weight": "A", ".lora_B.default.weight": "B",
    ".lora_embedding_A": "eA", ".lora_embedding_B": "eB",
    ".alpha": "alpha",
}
_KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}


# --------------------------------------------------------------------------------------------
# header access


def read_header(file: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({key: (safetensors dtype, shape)}, metadata) from a validated header; no tensor data is read
    and the data section's size is not checked (detection must not depend on the tensor data)."""
    h = safetensors_io.read_header(file, check_size=False)
    return {k: (e.st_dtype, e.shape) for k, e in h.entries.items()}, dict(h.metadata)


def _unsupported_in_keys(keys: Iterable[str]) -> tuple[str, str] | None:
    for k in keys:
        for sub, algo in _UNSUPPORTED_ANYWHERE:
            if sub in k:
                return algo, k
        if k.startswith(("lora_unet_", "lora_te", "lycoris_")):
            for suf, algo in _UNSUPPORTED_KOHYA_SUFFIX:
                if k.endswith(suf):
                    return algo, k
    return None


def _raise_unsupported(algo: str, file: Path, detail: str = "") -> None:
    raise UserError(f"not supported yet: {algo} in {file}" + (f" ({detail})" if detail else ""))


def _format_from_keys(keys: Sequence[str], file: Path) -> str | None:
    hit = _unsupported_in_keys(keys)
    if hit:
        _raise_unsupported(hit[0], file, f"key '{hit[1]}'")
    peft_like = [k for k in keys if k.endswith((".lora_A.weight", ".lora_A.default.weight", ".lora_embedding_A"))]
    if peft_like:
        if all(k.startswith(PEFT_PREFIX) for k in peft_like):
            return "peft"
        if all(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in peft_like):
            return "diffusers"
        return "peft"  # bare PEFT names (no base_model.model.); matched against the base as-is
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    return None


def _peft_config_check(cfg: dict, file: Path) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        _raise_unsupported(ptype, file, "only plain LoRA adapters are supported")
    for key, what in PEFT_VARIANT_KEYS.items():
        v = cfg.get(key)
        if v not in (None, False, [], {}, ""):
            _raise_unsupported(what, file, f"adapter_config.json has {key}={json.dumps(v)}")


def _weights_in_dir(d: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors"):
        if (d / name).is_file():
            return d / name
    return None


def detect_lora(path: str | Path) -> str | None:
    """"peft" / "kohya" / "diffusers", or None for a path that is not a LoRA (a full checkpoint).

    Reads only adapter_config.json and the safetensors header. Raises UserError for LoRA-like
    files of unsupported types (``not supported yet: <type> in <file> (...)``)."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "adapter_config.json"
        if cfg_file.is_file():
            cfg = _load_json(cfg_file)
            _peft_config_check(cfg, cfg_file)
            w = _weights_in_dir(p)
            if w is None:
                raise UserError(f"PEFT adapter directory {p} has adapter_config.json but no "
                                "adapter_model.safetensors / adapter_model.bin")
            if w.suffix == ".safetensors":
                entries, _ = read_header(w)
                fmt = _format_from_keys(list(entries), w)
                if fmt is None:
                    raise UserError(f"{w} holds no LoRA tensors (no *.lora_A.weight keys)")
            return "peft"
        w = p / "pytorch_lora_weights.safetensors"
        if w.is_file():
            return detect_lora(w)
        return None
    if not p.exists():
        return None
    if p.suffix == ".safetensors":
        entries, _ = read_header(p)
        fmt = _format_from_keys(list(entries), p)
        if fmt == "peft" and (p.parent / "adapter_config.json").is_file():
            _peft_config_check(_load_json(p.parent / "adapter_config.json"), p.parent / "adapter_config.json")
        return fmt
    if p.name == "adapter_model.bin" and (p.parent / "adapter_config.json").is_file():
        _peft_config_check(_load_json(p.parent / "adapter_config.json"), p.parent / "adapter_config.json")
        return "peft"
    return None


def _load_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {f}: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{f} is not a JSON object")
    return d


def _peft_pattern_key(patterns: dict, name: str) -> str | None:
    """PEFT's get_pattern_key: first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


# --------------------------------------------------------------------------------------------
# the source


class LoraSource:
    """A LoRA adapter opened lazily: the header up front, one module's tensors per ``factors`` call."""

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
            self.file = _weights_in_dir(p)
            if (p / "adapter_config.json").is_file():
                self.config = _load_json(p / "adapter_config.json")
        else:
            self.file = p
            if fmt == "peft" and (p.parent / "adapter_config.json").is_file():
                self.config = _load_json(p.parent / "adapter_config.json")
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
            fmt2 = _format_from_keys(list(self._entries), self.file)
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
        self._layout_override: dict[str, str] = {}
        self.base_map: dict[str, str] = {}
        self.by_base: dict[str, str] = {}
        self._first_components: list[str] = []

    # -- keys ---------------------------------------------------------------------------------

    def _parse_keys(self) -> None:
        suffixes = _KOHYA_SUFFIXES if self.format == "kohya" else _PEFT_SUFFIXES
        mods: dict[str, dict[str, str]] = {}
        self.base_copies: dict[str, tuple[int, ...]] = {}
        modules_to_save = self.config.get("modules_to_save") or []
        for key in self._entries:
            for suf, role in suffixes.items():
                if key.endswith(suf):
                    mods.setdefault(key[: -len(suf)], {})[role] = key
                    break
            else:
                if self.format == "peft" and key.endswith(".base_layer.weight"):
                    # save_embedding_layers: a full copy of a (frozen) base tensor; checked against
                    # the base's shape in match_to_base, never applied
                    self.base_copies[key] = self._entries[key][1]
                    continue
                if modules_to_save:
                    _raise_unsupported("modules_to_save (full replacement tensors)", self.file, f"key '{key}'")
                if self.config.get("bias", "none") != "none" and key.endswith(".bias"):
                    _raise_unsupported(f"bias={self.config.get('bias')!r} (trained bias tensors)", self.file, f"key '{key}'")
                raise UserError(f"not supported yet: unrecognised tensor '{key}' in {self.file} "
                                f"(not a {self.format} LoRA factor)")
        self._keys: dict[str, dict[str, str]] = {}
        self._alpha_keys: dict[str, str] = {}
        for m, roles in mods.items():
            if set(roles) == {"alpha"}:
                raise UserError(f"LoRA file {self.file}: '{m}.alpha' has no matching down/up (A/B) tensors")
            a = roles.get("A") or roles.get("eA")
            b = roles.get("B") or roles.get("eB")
            if a is None or b is None:
                raise UserError(f"LoRA file {self.file}: module '{m}' has "
                                f"{'no A (down)' if a is None else 'no B (up)'} tensor")
            if ("eA" in roles) != ("eB" in roles):
                raise UserError(f"LoRA file {self.file}: module '{m}' mixes embedding and linear factor names")
            sa, sb = self._entries[a][1], self._entries[b][1]
            if len(sa) not in (2, 4) or len(sb) not in (2, 4) or sb[1] != sa[0]:
                raise UserError(f"LoRA file {self.file}: module '{m}' has factors of incompatible shapes "
                                f"{list(sa)} (A/down) and {list(sb)} (B/up)")
            if len(sb) == 4 and tuple(sb[2:]) != (1, 1):
                raise UserError(f"not supported yet: a {sb[2]}x{sb[3]} up/B kernel for '{m}' in {self.file}")
            self._keys[m] = roles
            if "alpha" in roles:
                self._alpha_keys[m] = roles["alpha"]
        self.modules: list[str] = sorted(self._keys)

    def _adapter_metadata(self) -> dict[str, dict]:
        raw = self.metadata.get("lora_adapter_metadata")
        if not raw:
            return {}
        try:
            d = json.loads(raw)
        except ValueError:
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

    def _check(self, module: str) -> dict[str, str]:
        try:
            return self._keys[module]
        except KeyError:
            raise KeyError(f"no LoRA module '{module}' in {self.file}") from None

    # -- per-module facts ---------------------------------------------------------------------------

    def stored_shapes(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the stored (A/down, B/up) tensors, as in the file."""
        roles = self._check(module)
        a = roles.get("A") or roles["eA"]
        b = roles.get("B") or roles["eB"]
        return self._entries[a][1], self._entries[b][1]

    def rank(self, module: str) -> int:
        return self.stored_shapes(module)[0][0]

    def layout(self, module: str) -> str:
        """"linear" | "conv" | "transposed" (fan_in_fan_out) | "embedding"."""
        if module in self._layout_override:
            return self._layout_override[module]
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

    def factor_shapes(self, module: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """((r, cols), (rows, r)) of the canonical factors, from the header only."""
        sa, sb = self.stored_shapes(module)
        r = sa[0]
        if self.layout(module) in ("transposed", "embedding"):
            return (r, sb[0]), (sa[1], r)
        return (r, math.prod(sa[1:])), (sb[0], r)

    def factors(self, module: str, fold: str = "B"):
        """Canonical float32 (A, B) in the base tensor's 2-D layout with the scale folded in once.

        fold="B": B carries s; fold="sqrt": A and B each carry sqrt(|s|) (sign of s on B)."""
        import torch

        roles = self._check(module)
        a = self._read(roles.get("A") or roles["eA"]).to(torch.float32)
        b = self._read(roles.get("B") or roles["eB"]).to(torch.float32)
        r = a.shape[0]
        if self.layout(module) in ("transposed", "embedding"):
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

    def delta(self, module: str, shape: Sequence[int] | None = None):
        """s * B @ A in the base layout, float32, reshaped to ``shape`` (the base tensor's shape)."""
        A, B = self.factors(module)
        d = B @ A
        return d.reshape(tuple(shape)) if shape is not None else d

    def factors_for(self, base_key: str, fold: str = "B"):
        return self.factors(self._module_for(base_key), fold)

    def delta_for(self, base_key: str, shape: Sequence[int] | None = None):
        return self.delta(self._module_for(base_key), shape)

    def _module_for(self, base_key: str) -> str:
        try:
            return self.by_base[base_key]
        except KeyError:
            raise KeyError(f"{self.label} has no LoRA module matched to '{base_key}' "
                           "(call match_to_base first)") from None

    def num_params(self) -> int:
        return sum(math.prod(s) for m in self.modules for s in self.stored_shapes(m))

    def __repr__(self) -> str:
        return f"LoraSource({self.label!r}, format={self.format}, modules={len(self.modules)})"


class AppliedLora:
    """A matched LoraSource seen as the full checkpoint it produces: ``get(key)`` = base + delta
    (float32, so the delta is not rounded to a bf16 base), the base tensor itself for keys the LoRA does not adapt. Lets
    full-checkpoint paths (continual merging) take LoRAs without knowing about them."""

    def __init__(self, lora: LoraSource, base):
        self.lora, self.base = lora, base
        self.infos = base.infos
        self.ref = str(lora.path)

    def get(self, key: str):
        import torch

        t = self.base.get(key)
        if key not in self.lora.by_base:
            return t
        return t.to(torch.float32) + self.lora.delta_for(key, t.shape)

    def close(self) -> None:
        self.lora.close()


def _load_pickle(f: Path) -> dict:
    import torch

    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"cannot read {f} (read with torch.load(weights_only=True)): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{f} is not a state dict of tensors")
    return sd


# --------------------------------------------------------------------------------------------
# matching LoRA modules to base tensors


def _strip_first(name: str) -> str | None:
    return name.split(".", 1)[1] if "." in name else None


def _candidates(src: LoraSource, base_module: str, tier: int) -> list[str]:
    """The LoRA module names a base module (key minus '.weight') would have, for one tier."""
    m = base_module
    out: list[str] = []
    if src.format == "kohya":
        if tier == 0:
            for bp, lps in _KOHYA_BASE_PREFIXES:
                if m.startswith(bp):
                    rest = m[len(bp):].replace(".", "_")
                    out += [lp + rest for lp in lps]
        elif tier == 1:
            out += [lp + m.replace(".", "_") for lp in _KOHYA_BARE]
        return out
    if src.format == "peft":
        pre = PEFT_PREFIX if all(x.startswith(PEFT_PREFIX) for x in src.modules) else ""
        if tier == 0:
            out.append(pre + m)
        elif tier == 1 and _strip_first(m):
            out.append(pre + _strip_first(m))
        elif tier == 2:
            out += [pre + c + "." + m for c in src._first_components]
        return out
    # diffusers: component prefix + module path of a single-component checkpoint
    if tier == 0:
        out.append(m)
    elif tier == 1:
        out += [c + "." + m for c in src._first_components]
    elif tier == 2 and _strip_first(m):
        out += [c + "." + _strip_first(m) for c in src._first_components]
    return out


def _fits(rows: int, cols: int, base_shape: Sequence[int], stored_a: Sequence[int]) -> bool:
    if len(base_shape) < 2 or base_shape[0] != rows or math.prod(base_shape[1:]) != cols:
        return False
    if len(stored_a) == 4 and len(base_shape) == 4 and tuple(stored_a[1:]) != tuple(base_shape[1:]):
        return False
    return True


def match_to_base(lora_source: LoraSource, base_keys: Sequence[str],
                  base_shapes: dict[str, Sequence[int]]) -> dict[str, str]:
    """{LoRA module (as stored) -> base weight key}, by generating LoRA names from the base keys.

    Tiers (first that matches wins; two base keys for one name is an error):
    PEFT: ``base_model.model.<key minus .weight>`` (``.base_layer`` dropped), then without the base
    key's first component, then with the LoRA's first component added (e.g. ``bert.``);
    kohya: known base prefixes (``model.diffusion_model.`` -> ``lora_unet_``,
    ``cond_stage_model.transformer.`` -> ``lora_te_``, ``conditioner.embedders.0.transformer.`` ->
    ``lora_te1_``, ``text_encoder[_2].`` -> ``lora_te[12]_``, ...) with dots -> underscores, then bare
    keys under every kohya prefix; diffusers: ``<component>.<key>``.
    Raises UserError naming the LoRA file for unmatched modules, ambiguous matches and shapes
    that do not fit the base tensor. Also sets ``lora_source.base_map`` / ``.by_base``."""
    src = lora_source
    src._first_components = sorted({(m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m).split(".", 1)[0]
                                    for m in src.modules})
    base_modules: dict[str, str] = {}
    for k in base_keys:
        if not k.endswith(".weight"):
            continue
        m = k[: -len(".weight")]
        base_modules.setdefault(m, k)
        if ".base_layer" in m:
            base_modules.setdefault(m.replace(".base_layer", ""), k)
    todo = set(src.modules)
    found: dict[str, str] = {}
    tiers = 2 if src.format == "kohya" else 3
    for tier in range(tiers):
        if not todo:
            break
        table: dict[str, set[str]] = {}
        for m, k in base_modules.items():
            for c in _candidates(src, m, tier):
                if c in todo:
                    table.setdefault(c, set()).add(k)
        for c, ks in table.items():
            if len(ks) > 1:
                raise UserError(f"LoRA module '{c}' in {src.file} matches several base tensors: "
                                f"{', '.join(sorted(ks))}")
            found[c] = next(iter(ks))
            todo.discard(c)
    for ck, cshape in src.base_copies.items():
        m = ck[: -len(".base_layer.weight")]
        m = m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m
        hits = [base_modules[x] for x in (m, _strip_first(m)) if x and x in base_modules]
        if not hits or tuple(base_shapes[hits[0]]) != tuple(cshape):
            raise UserError(
                f"not supported yet: {src.file} carries its own copy of base tensor '{ck}' {list(cshape)} "
                + (f"but the base has {list(base_shapes[hits[0]])} at '{hits[0]}'" if hits else "that the base lacks")
                + " (resized vocabulary?)")
    if todo:
        miss = sorted(todo)
        example = next(iter(base_modules), None)
        ex = _candidates(src, example, 0)[:1] if example else []
        raise UserError(
            f"{len(miss)} LoRA module(s) in {src.file} match no tensor of the base model: "
            + ", ".join(f"'{x}'" for x in miss[:5]) + (", ..." if len(miss) > 5 else "")
            + (f" (base key '{base_modules[example]}' would be '{ex[0]}')" if ex else "")
            + "; is this LoRA for this base model?")
    inv: dict[str, str] = {}
    for mod, key in found.items():
        if key in inv:
            raise UserError(f"LoRA modules '{inv[key]}' and '{mod}' in {src.file} both map to base tensor '{key}'")
        inv[key] = mod
        shape = tuple(base_shapes[key])
        (r, cols), (rows, _) = src.factor_shapes(mod)
        sa, _ = src.stored_shapes(mod)
        if not _fits(rows, cols, shape, sa):
            lay = src.layout(mod)
            alt = {"linear": "transposed", "transposed": "linear"}.get(lay)
            if src.format == "peft" and alt and len(shape) == 2:
                src._layout_override[mod] = alt  # PEFT auto-sets fan_in_fan_out per layer (Conv1D)
                (r, cols), (rows, _) = src.factor_shapes(mod)
                if _fits(rows, cols, shape, sa):
                    continue
                del src._layout_override[mod]
                (r, cols), (rows, _) = src.factor_shapes(mod)
            raise UserError(
                f"shape mismatch: LoRA module '{mod}' in {src.file} gives a delta of {rows}x{cols} "
                f"(A/down {list(sa)}) but base tensor '{key}' has shape {list(shape)}"
                " (a LoRA for a different model or model family, e.g. SDXL vs SD1.5?)")
    src.base_map = dict(sorted(found.items()))
    src.by_base = {v: k for k, v in src.base_map.items()}
    return src.base_map


def kohya_default_name(base_key: str) -> str:
    """The kohya module name for a base key when no template says otherwise."""
    m = base_key[: -len(".weight")] if base_key.endswith(".weight") else base_key
    for bp, lps in _KOHYA_BASE_PREFIXES:
        if m.startswith(bp):
            return lps[0] + m[len(bp):].replace(".", "_")
    if m.startswith("text_model."):
        return "lora_te_" + m.replace(".", "_")
    return "lora_unet_" + m.replace(".", "_")


# --------------------------------------------------------------------------------------------
# architecture


def _in_dim(src: LoraSource, m: str) -> int:
    return src.factor_shapes(m)[0][1]


def guess_architecture(lora_source: LoraSource) -> str:
    """"SD1.5" | "SD2" | "SDXL" | "Flux" | "SD3" | "LLM" | "unknown", from names, shapes, metadata."""
    src = lora_source
    mods = src.modules
    if any(("double_blocks" in m or "single_blocks" in m or "single_transformer_blocks" in m) for m in mods):
        return "Flux"
    if any("joint_blocks" in m for m in mods):
        return "SD3"
    for m in mods:  # cross-attention key projection: its input is the text-encoder width
        if m.endswith(("attn2_to_k", "attn2.to_k")):
            d = _in_dim(src, m)
            return {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}.get(d, "unknown")
    meta = src.metadata
    v = str(meta.get("ss_base_model_version", "")).lower()
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if v.startswith("sdxl") or "stable-diffusion-xl" in arch:
        return "SDXL"
    if v.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "SD1.5"
    if v.startswith("sd_v2") or "stable-diffusion-v2" in arch:
        return "SD2"
    if v.startswith("flux") or "flux" in arch:
        return "Flux"
    if any(m.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for m in mods):
        return "SDXL"
    for m in mods:
        if m.startswith(("lora_te_", "text_encoder.")) and m.endswith(("q_proj", "k_proj")):
            return {768: "SD1.5", 1024: "SD2"}.get(_in_dim(src, m), "unknown")
    if any("input_blocks" in m or "output_blocks" in m for m in mods):
        return "SDXL"
    if src.format == "peft":
        llm = re.compile(r"(^|[._])(layers|h|layer|blocks?)[._]\d+[._]")
        if any(llm.search(src._peft_name(m)) for m in mods) and not any(
                x in m for m in mods for x in ("down_blocks", "up_blocks", "mid_block", "attn1")):
            return "LLM"
    return "unknown"


def check_compatible(sources: Sequence[LoraSource]) -> str:
    """The common architecture of several LoRAs; UserError when two known families differ."""
    seen: dict[str, str] = {}
    for s in sources:
        seen.setdefault(guess_architecture(s), s.label)
    known = {a: lbl for a, lbl in seen.items() if a != "unknown"}
    if len(known) > 1:
        parts = ", ".join(f"{lbl} is {a}" for a, lbl in known.items())
        raise UserError(f"LoRAs for different model families cannot be merged together: {parts}")
    return next(iter(known), "unknown")


# --------------------------------------------------------------------------------------------
# inspect


def describe_lora(path: str | Path) -> dict[str, Any]:
    """Facts for ``merge inspect`` (reads only the header plus the scalar .alpha tensors)."""
    with LoraSource(path) as src:
        ranks = Counter(src.rank(m) for m in src.modules)
        alphas = Counter(src.alpha(m) for m in src.modules)
        scales = Counter(round(src.scale(m), 6) for m in src.modules)
        layouts = Counter(src.layout(m) for m in src.modules)
        targets = Counter(_kohya_target(m) if src.format == "kohya" else m.rsplit(".", 1)[-1]
                          for m in src.modules)
        keep = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "ss_network_args", "modelspec.architecture", "ss_output_name")
        return {
            "kind": "lora",
            "path": str(src.path),
            "file": str(src.file),
            "format": src.format,
            "architecture": guess_architecture(src),
            "modules": len(src.modules),
            "ranks": dict(sorted(ranks.items())),
            "alphas": dict(sorted(alphas.items())),
            "scales": dict(sorted(scales.items())),
            "scale_rule": src.scale_rule(),
            "layouts": dict(layouts),
            "targets": dict(targets.most_common()),
            "parameters": src.num_params(),
            "base_model_name_or_path": src.config.get("base_model_name_or_path"),
            "metadata": {k: src.metadata[k] for k in keep if k in src.metadata},
            "warnings": list(src.warnings),
        }


_KOHYA_TARGET_RE = re.compile(
    r"(to_q|to_k|to_v|to_out_0|proj_in|proj_out|ff_net_0_proj|ff_net_2|q_proj|k_proj|v_proj|out_proj|"
    r"fc1|fc2|conv1|conv2|conv_shortcut|conv|img_attn_qkv|img_attn_proj|txt_attn_qkv|txt_attn_proj|"
    r"linear1|linear2|img_mlp_0|img_mlp_2|txt_mlp_0|txt_mlp_2|modulation_lin|img_mod_lin|txt_mod_lin)$")


def _kohya_target(m: str) -> str:
    hit = _KOHYA_TARGET_RE.search(m)
    return hit.group(1) if hit else m.rsplit("_", 1)[-1]
