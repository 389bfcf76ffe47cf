"""LoRA Block Weight (LBW): the block a Stable Diffusion / Flux module belongs to, the block lists,
the presets, and a vector read as a map block -> weight.

Spec: ../shared/specs/adapters.md P20 (block lists of sd-webui-lora-block-weight b403cb7, its
presets, sd-scripts ``get_lbw_block_index``) and P25 ("LBW unlisted blocks"). Pure functions of
key names; :mod:`.strengths` applies them per module in the plan.

Blocks (LDM numbering; diffusers names are converted by the P19 rule, L = 2 resnets per level):

* BASE: every text-encoder module (both SDXL encoders); Flux: CLIP (CLIP-L) and T5;
* INnn = ``input_blocks.nn`` (diffusers ``down_blocks.i.{resnets,attentions}.j`` = IN(3i+j+1),
  ``down_blocks.i.downsamplers.0`` = IN(3i+3), ``conv_in`` = IN00); M00 = ``middle_block`` /
  ``mid_block``; OUTnn = ``output_blocks.nn`` (``up_blocks.i.{resnets,attentions}.j`` = OUT(3i+j),
  ``up_blocks.i.upsamplers.0`` = OUT(3i+2));
* Flux: ``double_blocks.N`` / diffusers ``transformer_blocks.N`` = D(N), ``single_blocks.N`` /
  ``single_transformer_blocks.N`` = S(N), the input embedders = IN, ``final_layer`` /
  ``norm_out`` / top-level ``proj_out`` = OUT.

A module in no block (``time_embed``, ``label_emb``, ``out``; in a full checkpoint also the VAE,
``first_stage_model.*`` / ``vae.*`` / a bare VAE file's ``encoder.*`` / ``decoder.*``, and EMA copies)
keeps weight 1, as in the extension, where such a module is never picked. A block that exists in the family but is not in a
short vector (an SD1 IN03 LoCon conv under a 17-vector) takes ``lbw_unlisted`` (default 0, the
extension's ``to26``; 1 is sd-scripts' ``svd_merge_lora --lbws``).

Text encoders, for the per-encoder strengths ``te1_weight`` / ``te2_weight`` (spec P20 pitfalls:
"offer te1/te2 overrides"): encoder 2 is SDXL's OpenCLIP-G (kohya ``lora_te2_``, diffusers
``text_encoder_2``, single file ``conditioner.embedders.1``) and Flux's T5 (kohya ``lora_te3_``,
diffusers ``text_encoder_2``); encoder 1 every other text-encoder module (CLIP-L, SD1/SD2's one).

The names are parsed as component paths (dots and kohya's underscores are the same separator), not
matched as substrings of A1111's internal names.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

BLOCKS26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
BLOCKS12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
BLOCKS20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BLOCKS_FLUX = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")

# the block lists a family accepts, by vector length
LISTS = {"sd1": {17: BLOCKS17, 26: BLOCKS26}, "sdxl": {12: BLOCKS12, 20: BLOCKS20}, "flux": {61: BLOCKS_FLUX}}
FAMILY_NAMES = {"sd1": "SD1/SD2", "sdxl": "SDXL", "flux": "Flux"}
# every block of a family (what a short vector leaves unlisted is the rest)
ALL_BLOCKS = {"sd1": BLOCKS26, "sdxl": BLOCKS20, "flux": BLOCKS_FLUX}

# the extension's default presets (17 entries, the 17-list order) and FLUXALL
_P = {
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}
PRESETS: dict[str, tuple[float, ...]] = {k: tuple(float(x) for x in v.split(",")) for k, v in _P.items()}
PRESETS.update({"NONE": (0.0,) * 17, "ALL": (1.0,) * 17, "ALL0.5": (0.5,) * 17, "FLUXALL": (1.0,) * 61})
# uniform presets mean the same for every family: they are spread over the family's own list [I]
UNIFORM = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}


def _norm(key: str) -> str:
    return "_" + re.sub(r"[.]", "_", key) + "_"


_TE = re.compile(r"_(lora_te\d?|text_model|text_encoder(?:_\d)?|text_encoders|conditioner_embedders|cond_stage_model|"
                 r"transformer_resblocks|clip_[lg]|t5xxl|te\d)_")
_TE2 = re.compile(r"_(lora_te2|text_encoder_2|conditioner_embedders_1|clip_g|te2)_")
_T5 = re.compile(r"_(lora_te3|text_encoder_2|t5xxl|te3)_|_encoder_block_\d+_layer_")
# VAE and EMA tensors of a full checkpoint: in no block, in no part (spec P20 applies to UNet / TE)
_OTHER = re.compile(r"^_(first_stage_model|vae|model_ema|encoder_(down|up|mid|conv|norm)|decoder_(down|up|mid|conv|norm)|"
                    r"(post_)?quant_conv)")
_IN = re.compile(r"_input_blocks_(\d+)_")
_OUT = re.compile(r"_output_blocks_(\d+)_")
_MID = re.compile(r"_(middle_block|mid_block)_")
_DOWN = re.compile(r"_down_blocks_(\d+)_(resnets|attentions|downsamplers)_(\d+)_")
_UP = re.compile(r"_up_blocks_(\d+)_(resnets|attentions|upsamplers)_(\d+)_")
_ATTN = re.compile(r"_(transformer_blocks|proj_in|proj_out|attn\d)_")
_FLUX = re.compile(r"_(double_blocks|single_blocks|single_transformer_blocks)_\d+_|_(img|txt)_(attn|mlp|mod)_")
_FLUX_D = re.compile(r"_(double_blocks|(?<!single_)transformer_blocks)_(\d+)_")
_FLUX_S = re.compile(r"_(single_blocks|single_transformer_blocks)_(\d+)_")
_FLUX_IN = re.compile(r"_(img_in|txt_in|time_in|vector_in|guidance_in|x_embedder|context_embedder|time_text_embed)_")
_FLUX_OUT = re.compile(r"_(final_layer|norm_out)_|^_(?:lora_unet_|transformer_|diffusion_model_)?proj_out_")


def is_text_encoder(key: str) -> bool:
    return _TE.search(_norm(key)) is not None


def is_other(key: str) -> bool:
    """A VAE or EMA tensor of a full SD checkpoint (``first_stage_model.``, ``vae.``, a bare VAE
    file's ``encoder.down...``): in neither part (text encoder / UNet) and in no block."""
    return _OTHER.search(_norm(key)) is not None


def part_of(key: str) -> str | None:
    """"te" (a text-encoder module), "unet" (the denoiser: UNet or Flux transformer) or None (VAE,
    EMA)."""
    if is_text_encoder(key):
        return "te"
    return None if is_other(key) else "unet"


def encoder_of(key: str, family: str) -> int | None:
    """Which text encoder a module belongs to (1 or 2, see the module docstring); None outside the
    text encoders. ``family`` "flux" reads T5 as encoder 2; any other family SDXL's OpenCLIP-G."""
    n = _norm(key)
    if _TE.search(n) is None:
        return None
    if family == "flux":
        return 2 if _T5.search(n) else 1
    return 2 if _TE2.search(n) else 1


def _unet_block(n: str) -> str | None:
    if (m := _IN.search(n)) is not None:
        return f"IN{int(m.group(1)):02d}"
    if (m := _OUT.search(n)) is not None:
        return f"OUT{int(m.group(1)):02d}"
    if _MID.search(n):
        return "M00"
    if (m := _DOWN.search(n)) is not None:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    if (m := _UP.search(n)) is not None:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    if re.search(r"_conv_in_", n):
        return "IN00"
    return None


def block_of(key: str, family: str) -> str | None:
    """The LBW block of module or base key ``key`` in ``family`` ("sd1" | "sdxl" | "flux"); None
    for a module in no block (its weight stays 1)."""
    n = _norm(key)
    if family == "flux":
        if _TE.search(n):
            return "T5" if _T5.search(n) else "CLIP"
        if (m := _FLUX_S.search(n)) is not None:
            return f"S{int(m.group(2)):02d}"
        if (m := _FLUX_D.search(n)) is not None:
            return f"D{int(m.group(2)):02d}"
        if _FLUX_IN.search(n):
            return "IN"
        if _FLUX_OUT.search(n):
            return "OUT"
        return None
    if _TE.search(n):
        return "BASE"
    if _OTHER.search(n):
        return None
    return _unet_block(n)


def families_of(keys: Iterable[str]) -> set[str]:
    """The families a set of module keys can be: {"flux"}, {"sdxl"}, {"sd1"}, or {"sd1", "sdxl"}
    when nothing tells them apart (a UNet LoRA on the blocks both share, a text-encoder LoRA)."""
    keys = list(keys)
    norms = [_norm(k) for k in keys]
    if any(_FLUX.search(n) for n in norms):
        return {"flux"}
    sdxl = sd1 = False
    for n in norms:
        if _OTHER.search(n) and not _TE.search(n):
            continue
        if _TE2.search(n):
            sdxl = True
            continue
        if _TE.search(n):
            continue
        b = _unet_block(n)
        if b is None:
            continue
        idx = int(b[-2:]) if b != "M00" else -1
        attn = _ATTN.search(n) is not None
        if (b.startswith("IN") and idx >= 9) or (b.startswith("OUT") and idx >= 9) or (attn and b in ("IN01", "IN02")):
            sd1 = True
        if attn and b in ("OUT00", "OUT01", "OUT02"):
            sdxl = True
        if re.search(r"_transformer_blocks_([2-9]|\d\d)_", n):
            sdxl = True
    if sd1 and not sdxl:
        return {"sd1"}
    if sdxl and not sd1:
        return {"sdxl"}
    return {"sd1", "sdxl"}


def _numbers(values: Sequence, where: str) -> tuple[float, ...]:
    out = []
    for v in values:
        if isinstance(v, str) and v.strip().upper() in ("R", "U", "X"):
            raise ValueError(f"{where}: the random/extra LBW values R, U and X are not supported (a merge must be "
                             "deterministic); give numbers")
        try:
            if isinstance(v, bool):
                raise ValueError
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: a block-weight vector holds numbers, got {v!r}") from None
        if x != x:
            raise ValueError(f"{where}: a block weight must be a number, got NaN")
        out.append(x)
    return tuple(out)


def parse_setting(value, where: str) -> tuple[str | None, tuple[float, ...]]:
    """A ``block_weights`` setting as (preset name or None, the numbers); ValueError when malformed."""
    if isinstance(value, str):
        name = value.strip()
        upper = {k.upper(): k for k in PRESETS}
        if name.upper() in upper:
            key = upper[name.upper()]
            return key, PRESETS[key]
        if "," not in name and not re.fullmatch(r"[-+0-9.eE]+", name):
            raise ValueError(f"{where}: unknown block-weight preset {name!r} (known: {', '.join(PRESETS)}; or give a "
                             "list of numbers)")
        return None, _numbers([x.strip() for x in name.split(",")], where)
    if isinstance(value, (list, tuple)) and value:
        return None, _numbers(value, where)
    raise ValueError(f"{where}: block_weights is a preset name, a comma-separated string or a list of numbers, "
                     f"got {value!r}")


def weights_for(value, families: set[str], unlisted: float, where: str,
                what: str = "LoRA") -> tuple[str, dict[str, float]]:
    """The family chosen and {block: weight} over all of its blocks for ``block_weights`` ``value``;
    ValueError when its length fits none of ``families``."""
    preset, nums = parse_setting(value, where)
    if preset in UNIFORM:
        fam = sorted(families)[0] if len(families) == 1 else "sd1"
        return fam, {b: UNIFORM[preset] for b in ALL_BLOCKS[fam]}
    fits = [f for f in sorted(families) if len(nums) in LISTS[f]]
    if not fits:
        allowed = " or ".join(f"{'/'.join(str(n) for n in LISTS[f])} ({FAMILY_NAMES[f]})" for f in sorted(families))
        vec = f"preset {preset}" if preset else "the block-weight vector"
        fam = " or ".join(FAMILY_NAMES[f] for f in sorted(families))
        raise ValueError(f"{where}: {vec} has {len(nums)} entries, but the {what} is {fam}, which takes {allowed} "
                         "entries")
    fam = fits[0]
    out = {b: float(unlisted) for b in ALL_BLOCKS[fam]}
    out.update(zip(LISTS[fam][len(nums)], nums))
    return fam, out
