"""Which adapter format a path holds, from adapter_config.json and the safetensors header only.

Spec: ../shared/specs/formats.md §4e (detection), §4a-§4d.

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

Modules of every registered type (``adapters.families``: LyCORIS LoCon/LoHa/LoKr/full/norm, PEFT
LoHa/LoKr, ``lora_bias``, ``modules_to_save``, trained biases, and the families installed beside
them) are classified per module from their key suffixes (adapters.md P10, P26); PEFT directories
dispatch on ``peft_type``. Types not supported yet (GLoRA, VeRA, FourierFT, unknown peft types,
old diffusers ``.lora.down.weight`` names, ...) raise ``UserError`` (a ``ValueError``) with one
line ``not supported yet: <what> in <file> (...)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..io import safetensors as safetensors_io

PEFT_PREFIX = "base_model.model."
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")

PEFT_VARIANT_KEYS = {  # adapter_config.json entries whose non-empty value we refuse
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "kasa_config": "KaSA (kasa_config)",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "arrow_config": "Arrow (arrow_config)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# key substring -> what it is (old diffusers names, refused with the conversion to do)
_UNSUPPORTED_ANYWHERE = (
    (".lora.down.weight", "old diffusers LoRA names (.lora.down.weight)"),
    ("_lora.down.weight", "old diffusers attention-processor LoRA names (_lora.down.weight)"),
    (".lora_linear_layer.", "old diffusers LoRA names (lora_linear_layer)"),
)
KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lycoris_")
# suffixes that full checkpoints use too: adapter evidence only under a kohya/LyCORIS prefix
_GENERIC_SUFFIXES = {"weight", "bias", "alpha", "diff", "diff_b", "w_norm", "b_norm", "on_input", "scale", "rescale"}
_HINT = "merge it into its base with the library that made it, or convert it to a plain LoRA, then merge that"


def read_header(file: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({key: (safetensors dtype, shape)}, metadata) from a validated header; no tensor data is read
    and the data section's size is not checked (detection must not depend on the tensor data)."""
    h = safetensors_io.read_header(file, check_size=False)
    return {k: (e.st_dtype, e.shape) for k, e in h.entries.items()}, dict(h.metadata)


def raise_unsupported(algo: str, file: Path, detail: str = "") -> None:
    raise UserError(f"not supported yet: {algo} in {file}" + (f" ({detail})" if detail else ""))


def format_from_keys(keys: Sequence[str], file: Path) -> str | None:
    """"peft" | "kohya" | "diffusers" from the key names, or None when no key is an adapter tensor."""
    from . import families

    for k in keys:
        for sub, what in _UNSUPPORTED_ANYWHERE:
            if sub in k:
                raise_unsupported(what, file, f"key '{k}'; {_HINT}")
    adapter = []
    for k in keys:
        sp = families.split_key(k)
        if sp is None or (sp[1] in _GENERIC_SUFFIXES and not k.startswith(KOHYA_PREFIXES)):
            continue
        adapter.append(k)
    if not adapter:
        return None
    if any(k.startswith(KOHYA_PREFIXES) for k in adapter):
        return "kohya"
    if all(k.startswith(PEFT_PREFIX) for k in adapter):
        return "peft"
    if all(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in adapter):
        return "diffusers"
    return "peft"  # bare PEFT names (no base_model.model.); matched against the base as-is


def check_modules(entries: dict, fmt: str, config: dict, file: Path) -> None:
    """Classify every module (header only): refuses unsupported types and incomplete modules."""
    from .grouping import group_keys

    group_keys(entries, fmt, config, file)


def peft_config_check(cfg: dict, file: Path) -> None:
    from . import families

    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype not in families.peft_types():
        raise_unsupported(ptype, file, f"peft_type {ptype}; {_HINT}")
    for key, what in PEFT_VARIANT_KEYS.items():
        v = cfg.get(key)
        if key == "use_dora" and any("lora_magnitude_vector" in families.roles_of(t) for t in families.all_types()):
            continue
        if v not in (None, False, [], {}, ""):
            raise_unsupported(what, file, f"adapter_config.json has {key}={json.dumps(v)}; {_HINT}")


def weights_in_dir(d: Path) -> Path | None:
    from ..sources.paths import contained

    for name in ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors"):
        if (d / name).is_file() or (d / name).is_symlink():
            return contained(d, d / name, "adapter weight file")
    return None


def detect_lora(path: str | Path) -> str | None:
    """"peft" / "kohya" / "diffusers", or None for a path that is not a LoRA (a full checkpoint).

    Reads only adapter_config.json and the safetensors header. Raises UserError for LoRA-like
    files of unsupported types (``not supported yet: <type> in <file> (...)``)."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "adapter_config.json"
        if cfg_file.is_file():
            cfg = load_json(cfg_file)
            peft_config_check(cfg, cfg_file)
            w = weights_in_dir(p)
            if w is None:
                raise UserError(f"PEFT adapter directory {p} has adapter_config.json but no "
                                "adapter_model.safetensors / adapter_model.bin")
            if w.suffix == ".safetensors":
                entries, _ = read_header(w)
                fmt = format_from_keys(list(entries), w)
                if fmt is None:
                    raise UserError(f"{w} holds no adapter tensors (no *.lora_A.weight keys or other adapter names)")
                check_modules(entries, "peft", cfg, w)
            return "peft"
        w = p / "pytorch_lora_weights.safetensors"
        if w.is_file():
            return detect_lora(w)
        return None
    if not p.exists():
        return None
    if p.suffix == ".safetensors":
        entries, _ = read_header(p)
        fmt = format_from_keys(list(entries), p)
        cfg: dict = {}
        if fmt == "peft" and (p.parent / "adapter_config.json").is_file():
            cfg = load_json(p.parent / "adapter_config.json")
            peft_config_check(cfg, p.parent / "adapter_config.json")
        if fmt is not None:
            check_modules(entries, fmt, cfg, p)
        return fmt
    if p.name == "adapter_model.bin" and (p.parent / "adapter_config.json").is_file():
        peft_config_check(load_json(p.parent / "adapter_config.json"), p.parent / "adapter_config.json")
        return "peft"
    return None


# the adapter_config.json fields we read, with the types PEFT writes
ADAPTER_CONFIG_FIELDS = {
    "peft_type": str, "r": int, "lora_alpha": (float, type(None)), "use_rslora": (bool, type(None)),
    "target_modules": (list, str, type(None)), "rank_pattern": (dict, type(None)),
    "alpha_pattern": (dict, type(None)), "fan_in_fan_out": (bool, type(None)),
    "modules_to_save": (list, type(None)), "bias": (str, type(None)), "task_type": (str, type(None)),
    "base_model_name_or_path": (str, type(None)), "init_lora_weights": (bool, str, type(None)),
}


def load_json(f: Path) -> dict:
    from ..io.json_files import check_fields, read_object
    from ..sources.paths import contained

    contained(f.parent, f, "adapter config")
    d = read_object(f, "adapter config")
    check_fields(d, ADAPTER_CONFIG_FIELDS, f)
    for key in ("rank_pattern", "alpha_pattern"):
        for name, v in (d.get(key) or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"{f}: field '{key}' maps '{str(name)[:60]}' to {str(v)[:40]!r}, not a number")
    return d
