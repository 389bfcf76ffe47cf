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

Everything else that is a LoRA-like file (LoHa, LoKr, OFT/BOFT, Tucker ``lora_mid``, DoRA, GLoRA,
(IA)^3, LyCORIS full/norm, ``lora_bias``, ``modules_to_save`` tensors, non-LORA PEFT types, old
diffusers ``.lora.down.weight`` names) raises ``UserError`` (a ``ValueError``) with one line
``not supported yet: <what> in <file> (...)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError
from ..io import safetensors as safetensors_io

PEFT_PREFIX = "base_model.model."
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")

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


def raise_unsupported(algo: str, file: Path, detail: str = "") -> None:
    raise UserError(f"not supported yet: {algo} in {file}" + (f" ({detail})" if detail else ""))


def format_from_keys(keys: Sequence[str], file: Path) -> str | None:
    hit = _unsupported_in_keys(keys)
    if hit:
        raise_unsupported(hit[0], file, f"key '{hit[1]}'")
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


def peft_config_check(cfg: dict, file: Path) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise_unsupported(ptype, file, "only plain LoRA adapters are supported")
    for key, what in PEFT_VARIANT_KEYS.items():
        v = cfg.get(key)
        if v not in (None, False, [], {}, ""):
            raise_unsupported(what, file, f"adapter_config.json has {key}={json.dumps(v)}")


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
        fmt = format_from_keys(list(entries), p)
        if fmt == "peft" and (p.parent / "adapter_config.json").is_file():
            peft_config_check(load_json(p.parent / "adapter_config.json"), p.parent / "adapter_config.json")
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
