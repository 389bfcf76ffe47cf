"""Base-checkpoint namings and the rules between them, so a LoRA named for one merges into another.

Spec: ../shared/specs/adapters.md P19 (and P10 for the kohya prefixes). Pure functions of key
names and shapes; ``keymap.match_to_base`` generates the LoRA candidate names from every
``Alias`` of a base tensor as it does from the base key itself.

An ``Alias`` says: "the base tensor ``key`` would be called ``module`` in another naming", and
how the LoRA module of that name lands on it:

* rename (``rule="rename"``): the whole delta, as is (LDM ``input_blocks.4.1`` = diffusers
  ``down_blocks.1.attentions.0``; Flux BFL ``img_attn.proj`` = diffusers ``attn.to_out.0``);
* fuse: the module's delta fills rows ``base_rows`` of a fused base tensor (q/k/v -> OpenCLIP
  ``in_proj_weight``, BFL ``img_attn.qkv``, ``single_blocks.N.linear1``): ΔW = cat([ΔW_q; ΔW_k; ΔW_v]);
* split: rows ``lora_rows`` of a fused module's delta (whose rows number ``lora_total``) are
  the whole delta of this base tensor (a BFL ``qkv`` LoRA into diffusers ``to_q``/``to_k``/``to_v``);
* swap: two pieces exchanging the row halves (BFL ``final_layer.adaLN_modulation.1`` is
  (shift, scale), diffusers ``norm_out.linear`` (scale, shift));
* transpose: ΔP = ΔWᵀ (OpenCLIP ``text_projection`` used as x·P vs HF ``text_projection.weight``).

The UNet rule set (not a table): with L resnets per down block (SD1/SDXL: 2, found from the keys),
``down_blocks.i.{resnets,attentions}.j`` = ``input_blocks.((L+1)i+j+1).{0,1}``, downsamplers
``input_blocks.((L+1)i+L+1).0.op``; ``up_blocks.i.{resnets,attentions}.j`` =
``output_blocks.((L+1)i+j).{0,1}``, upsamplers ``output_blocks.((L+1)i+L).{1|2}.conv`` (``.1`` when
that up block has no attention); mid block resnets 0/1 = ``middle_block.0/2``, attention
``middle_block.1``; resnet inner names (``norm1`` = ``in_layers.0``, ``conv1`` = ``in_layers.2``, ...)
and the top-level layers by the small map ``_UNET_TOP``. Attention internals are identical.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

LDM_UNET = "model.diffusion_model."
FLUX_DIFFUSERS_PREFIX = "transformer."  # the component prefix diffusers LoRA files use
FLUX_BFL_PREFIX = "diffusion_model."    # kohya: -> lora_unet_; ComfyUI-style LoRAs use it as is


@dataclass(frozen=True)
class Alias:
    module: str  # the base tensor's module path in the other naming (no ``.weight``)
    key: str  # the real base key
    rule: str = "rename"  # "name" (the key itself) | "rename" | "fuse" | "split" | "swap" | "transpose"
    base_rows: tuple[int, int] | None = None  # rows of the base tensor this module fills (None: all)
    lora_rows: tuple[int, int] | None = None  # rows of the module's delta used (None: all)
    lora_total: int | None = None  # rows the module's delta must have when lora_rows is set
    transpose: bool = False

    @property
    def plain(self) -> bool:
        return self.base_rows is None and self.lora_rows is None and not self.transpose


# ---------------------------------------------------------------------------------------------
# SD UNet: LDM/SGM <-> diffusers

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
_UNET_TOP = (("input_blocks.0.0", "conv_in"), ("time_embed.0", "time_embedding.linear_1"),
             ("time_embed.2", "time_embedding.linear_2"), ("label_emb.0.0", "add_embedding.linear_1"),
             ("label_emb.0.2", "add_embedding.linear_2"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))


def _swap_prefix(path: str, pairs, reverse: bool) -> str | None:
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    return None


@dataclass(frozen=True)
class UNetShape:
    """What the rule needs to know of a UNet: resnets per down block, and which up blocks have attention."""
    layers: int = 2
    up_attention: frozenset = frozenset()  # diffusers up-block indices with attentions (diffusers -> LDM)

    @property
    def per(self) -> int:
        return self.layers + 1


_LDM_RE = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)(?:\.(\d+))?(?:\.(.*))?$")


def ldm_to_diffusers(path: str, shape: UNetShape = UNetShape()) -> str | None:
    """A UNet module path (after ``model.diffusion_model.``) in diffusers naming; None if no rule."""
    top = _swap_prefix(path, _UNET_TOP, reverse=False)
    if top is not None:
        return top
    m = _LDM_RE.match(path)
    if not m:
        return None
    kind, n, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4) or ""
    per = shape.per
    if kind == "middle_block":
        tail = ".".join(x for x in (sub, rest) if x)
        if n == 1:
            return f"mid_block.attentions.0.{tail}"
        if n in (0, 2):
            r = _swap_prefix(tail, _RESNET, reverse=False)
            return f"mid_block.resnets.{n // 2}.{r}" if r else None
        return None
    if sub is None or not rest:
        return None
    sub_i = int(sub)
    if kind == "input_blocks":
        if n == 0:
            return None
        i, j = (n - 1) // per, (n - 1) % per
        if j == per - 1:  # the downsampler slot
            return f"down_blocks.{i}.downsamplers.0.conv{rest[2:]}" if sub_i == 0 and rest.startswith("op") else None
        if sub_i == 0:
            r = _swap_prefix(rest, _RESNET, reverse=False)
            return f"down_blocks.{i}.resnets.{j}.{r}" if r else None
        return f"down_blocks.{i}.attentions.{j}.{rest}" if sub_i == 1 else None
    i, j = n // per, n % per
    if sub_i == 0:
        r = _swap_prefix(rest, _RESNET, reverse=False)
        return f"up_blocks.{i}.resnets.{j}.{r}" if r else None
    if rest == "conv" or rest.startswith("conv."):  # an upsampler holds only `conv`
        return f"up_blocks.{i}.upsamplers.0.{rest}" if j == per - 1 and sub_i in (1, 2) else None
    return f"up_blocks.{i}.attentions.{j}.{rest}" if sub_i == 1 else None


_DIFF_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def diffusers_to_ldm(path: str, shape: UNetShape = UNetShape()) -> str | None:
    """A diffusers UNet module path in LDM/SGM naming (without ``model.diffusion_model.``)."""
    top = _swap_prefix(path, _UNET_TOP, reverse=True)
    if top is not None:
        return top
    per = shape.per
    m = _MID_RE.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}" if j == 0 else None
        r = _swap_prefix(rest, _RESNET, reverse=True)
        return f"middle_block.{2 * j}.{r}" if r and j in (0, 1) else None
    m = _DIFF_RE.match(path)
    if not m:
        return None
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{per * i + per}.0.op{rest[4:]}" if rest.startswith("conv") and j == 0 else None
        n = per * i + j + 1
    else:
        if kind == "upsamplers":
            if not rest.startswith("conv") or j != 0:
                return None
            return f"output_blocks.{per * i + per - 1}.{2 if i in shape.up_attention else 1}.{rest}"
        n = per * i + j
    if kind == "resnets":
        r = _swap_prefix(rest, _RESNET, reverse=True)
        return f"{'input' if side == 'down_blocks' else 'output'}_blocks.{n}.0.{r}" if r else None
    if kind == "attentions":
        return f"{'input' if side == 'down_blocks' else 'output'}_blocks.{n}.1.{rest}"
    return None


def unet_shape_ldm(paths: Sequence[str]) -> UNetShape:
    """L from the first downsampler (``input_blocks.(L+1).0.op``); 2 when there is none."""
    ops = sorted(int(m.group(1)) for p in paths if (m := re.match(r"^input_blocks\.(\d+)\.0\.op\b", p)))
    return UNetShape(layers=ops[0] - 1 if ops and ops[0] > 1 else 2)


def unet_shape_diffusers(paths: Sequence[str]) -> UNetShape:
    js = [int(m.group(1)) for p in paths if (m := re.match(r"^down_blocks\.\d+\.resnets\.(\d+)\.", p))]
    ups = frozenset(int(m.group(1)) for p in paths if (m := re.match(r"^up_blocks\.(\d+)\.attentions\.", p)))
    return UNetShape(layers=max(js) + 1 if js else 2, up_attention=ups)


# ---------------------------------------------------------------------------------------------
# text encoders: OpenCLIP resblocks (fused in_proj) and HF CLIP

_OPENCLIP_TE = (  # single-file prefix of an OpenCLIP text tower -> the diffusers component it is
    ("conditioner.embedders.1.model.", "text_encoder_2."),  # SDXL OpenCLIP-G
    ("cond_stage_model.model.", "text_encoder."),  # SD2
)
_HF_TE = (  # single-file prefix of an HF CLIP text model -> diffusers component
    ("conditioner.embedders.0.transformer.text_model.", "text_encoder.text_model."),
    ("cond_stage_model.transformer.text_model.", "text_encoder.text_model."),
    ("text_encoders.clip_l.transformer.text_model.", "text_encoder.text_model."),  # ComfyUI Flux / SD3
    ("cond_stage_model.transformer.", "text_encoder.text_model."),  # very old SD1 files
)
_RESBLOCK = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
_RESBLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")


def _openclip_aliases(key: str, shape: Sequence[int]) -> list[Alias]:
    for pre, comp in _OPENCLIP_TE:
        if not key.startswith(pre):
            continue
        rest = key[len(pre):]
        if rest == "text_projection" and len(shape) == 2:
            return [Alias(comp + "text_projection", key, "transpose", transpose=True)]
        m = _RESBLOCK_RE.match(rest)
        if not m:
            return []
        hf = f"{comp}text_model.encoder.layers.{m.group(1)}."
        inner = m.group(2)
        if inner == "attn.in_proj_weight" and len(shape) == 2 and shape[0] == 3 * shape[1]:
            d = shape[1]
            return [Alias(hf + f"self_attn.{p}_proj", key, "fuse", base_rows=(i * d, (i + 1) * d))
                    for i, p in enumerate("qkv")]
        if inner.endswith(".weight"):
            r = _swap_prefix(inner[: -len(".weight")], _RESBLOCK, reverse=False)
            return [Alias(hf + r, key)] if r else []
        return []
    if key.endswith(".weight"):
        for pre, hf in _HF_TE:
            if key.startswith(pre):
                return [Alias(hf + key[len(pre): -len(".weight")], key)]
    return []


# ---------------------------------------------------------------------------------------------
# Flux: BFL <-> diffusers

_FLUX_DOUBLE = (  # BFL inside double_blocks.N -> diffusers inside transformer_blocks.N
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
)
_FLUX_SINGLE = (("linear2", "proj_out"), ("modulation.lin", "norm.linear"))
_FLUX_TOP = (("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
             ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
             ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
             ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
             ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
             ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
             ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"))
_FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")
_BFL_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.*)$")
_DFL_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$")


def _flux_bfl_aliases(key: str, path: str, shape: Sequence[int]) -> list[Alias]:
    """A BFL base tensor (``path`` without prefix and ``.weight``) as diffusers modules."""
    P = FLUX_DIFFUSERS_PREFIX
    if len(shape) != 2:
        return []
    rows, d = shape
    m = _BFL_RE.match(path)
    if m:
        kind, n, inner = m.groups()
        if kind == "double_blocks":
            blk = f"{P}transformer_blocks.{n}."
            if inner in _FUSED_QKV and rows == 3 * d:
                return [Alias(blk + t, key, "fuse", base_rows=(i * d, (i + 1) * d))
                        for i, t in enumerate(_FUSED_QKV[inner])]
            r = _swap_prefix(inner, _FLUX_DOUBLE, reverse=False)
            return [Alias(blk + r, key)] if r else []
        blk = f"{P}single_transformer_blocks.{n}."
        if inner == "linear1" and rows > 3 * d:
            cuts = [0, d, 2 * d, 3 * d, rows]
            return [Alias(blk + t, key, "fuse", base_rows=(cuts[i], cuts[i + 1])) for i, t in enumerate(_SINGLE_FUSED)]
        r = _swap_prefix(inner, _FLUX_SINGLE, reverse=False)
        return [Alias(blk + r, key)] if r else []
    if path == _ADALN[0] and rows % 2 == 0:
        h = rows // 2
        return [Alias(P + _ADALN[1], key, "swap", base_rows=(0, h), lora_rows=(h, rows), lora_total=rows),
                Alias(P + _ADALN[1], key, "swap", base_rows=(h, rows), lora_rows=(0, h), lora_total=rows)]
    r = _swap_prefix(path, _FLUX_TOP, reverse=False)
    return [Alias(P + r, key)] if r else []


def _flux_diffusers_aliases(key: str, path: str, shape: Sequence[int], pre: str,
                            shapes: Mapping[str, Sequence[int]]) -> list[Alias]:
    """A diffusers Flux base tensor as (a row block of) a BFL module."""
    P = FLUX_BFL_PREFIX
    if len(shape) != 2:
        return []
    rows, d = shape
    m = _DFL_RE.match(path)
    if m:
        kind, n, inner = m.groups()
        if kind == "transformer_blocks":
            blk = f"{P}double_blocks.{n}."
            for fused, parts in _FUSED_QKV.items():
                if inner in parts:
                    i = parts.index(inner)
                    return [Alias(blk + fused, key, "split", lora_rows=(i * rows, (i + 1) * rows), lora_total=3 * rows)]
            r = _swap_prefix(inner, _FLUX_DOUBLE, reverse=True)
            return [Alias(blk + r, key)] if r else []
        blk = f"{P}single_blocks.{n}."
        if inner in _SINGLE_FUSED:
            mlp = shapes.get(f"{pre}single_transformer_blocks.{n}.proj_mlp.weight")
            total = 3 * d + mlp[0] if mlp is not None and len(mlp) == 2 else None
            i = _SINGLE_FUSED.index(inner)
            lo = i * d
            return [Alias(blk + "linear1", key, "split", lora_rows=(lo, lo + rows), lora_total=total)]
        r = _swap_prefix(inner, _FLUX_SINGLE, reverse=True)
        return [Alias(blk + r, key)] if r else []
    if path == _ADALN[1] and rows % 2 == 0:
        h = rows // 2
        return [Alias(P + _ADALN[0], key, "swap", base_rows=(0, h), lora_rows=(h, rows), lora_total=rows),
                Alias(P + _ADALN[0], key, "swap", base_rows=(h, rows), lora_rows=(0, h), lora_total=rows)]
    r = _swap_prefix(path, _FLUX_TOP, reverse=True)
    return [Alias(P + r, key)] if r else []


# ---------------------------------------------------------------------------------------------
# the base checkpoint's naming, and every alias of its tensors


@dataclass(frozen=True)
class BaseNaming:
    unet: str | None  # "ldm" | "diffusers" | None
    flux: str | None  # "bfl" | "diffusers" | None
    openclip: bool  # an OpenCLIP text tower with fused in_proj
    unet_prefix: str = ""
    flux_prefix: str = ""

    @property
    def recognised(self) -> bool:
        return bool(self.unet or self.flux or self.openclip)

    def describe(self) -> str:
        parts = []
        if self.unet == "ldm":
            parts.append("UNet in LDM/SGM names (model.diffusion_model.input_blocks...)")
        elif self.unet == "diffusers":
            parts.append("UNet in diffusers names (down_blocks...)")
        if self.flux == "bfl":
            parts.append("Flux in BFL names (double_blocks.N.img_attn.qkv fused)")
        elif self.flux == "diffusers":
            parts.append("Flux in diffusers names (transformer_blocks.N.attn.to_q...)")
        if self.openclip:
            parts.append("OpenCLIP text encoder (fused attn.in_proj_weight)")
        return "; ".join(parts) or "no diffusion-model naming recognised (names used as they are)"


def _strip(key: str, prefixes: Sequence[str]) -> tuple[str, str] | None:
    for p in prefixes:
        if key.startswith(p):
            return p, key[len(p):]
    return None


def detect_naming(keys: Sequence[str]) -> BaseNaming:
    unet = flux = None
    unet_prefix = flux_prefix = ""
    for k in keys:
        if unet is None:
            s = _strip(k, (LDM_UNET, "unet.", ""))
            if s and re.match(r"^(input_blocks|output_blocks|middle_block)\.\d+\.", s[1]) and s[0] != "unet.":
                unet, unet_prefix = "ldm", s[0]
            elif s and re.match(r"^(down_blocks|up_blocks)\.\d+\.(resnets|attentions)\.", s[1]) and s[0] != LDM_UNET:
                unet, unet_prefix = "diffusers", s[0]
        if flux is None:
            s = _strip(k, (LDM_UNET, FLUX_BFL_PREFIX, "transformer.", ""))
            if s and re.match(r"^(double_blocks|single_blocks)\.\d+\.", s[1]):
                flux, flux_prefix = "bfl", s[0]
            elif s and re.match(r"^single_transformer_blocks\.\d+\.", s[1]):  # SD3 has transformer_blocks only
                flux, flux_prefix = "diffusers", s[0]
    openclip = any(k.endswith("attn.in_proj_weight") and any(k.startswith(p) for p, _ in _OPENCLIP_TE) for k in keys)
    return BaseNaming(unet, flux, openclip, unet_prefix, flux_prefix)


def base_aliases(keys: Sequence[str], shapes: Mapping[str, Sequence[int]],
                 naming: BaseNaming | None = None) -> list[Alias]:
    """Every alias of every base tensor: its names in the other namings P19 defines."""
    nm = naming or detect_naming(keys)
    out: list[Alias] = []
    unet_paths = [k[len(nm.unet_prefix):] for k in keys if k.startswith(nm.unet_prefix)] if nm.unet else []
    ushape = (unet_shape_ldm(unet_paths) if nm.unet == "ldm" else unet_shape_diffusers(unet_paths)) if nm.unet else None
    for k in keys:
        shape = tuple(shapes[k])
        out += _openclip_aliases(k, shape)
        if not k.endswith(".weight"):
            continue
        mod = k[: -len(".weight")]
        if nm.unet and mod.startswith(nm.unet_prefix):
            path = mod[len(nm.unet_prefix):]
            if nm.unet == "ldm":
                alt = ldm_to_diffusers(path, ushape)
                if alt:
                    out.append(Alias("unet." + alt, k))
            else:
                alt = diffusers_to_ldm(path, ushape)
                if alt:
                    out.append(Alias(LDM_UNET + alt, k))
        if nm.flux and mod.startswith(nm.flux_prefix):
            path = mod[len(nm.flux_prefix):]
            if nm.flux == "bfl":
                out += _flux_bfl_aliases(k, path, shape)
            else:
                out += _flux_diffusers_aliases(k, path, shape, nm.flux_prefix, shapes)
    return out


def lora_naming(modules: Sequence[str]) -> str:
    """Which naming a LoRA's module names use (for ``merge inspect``)."""
    flat = [m.replace(".", "_") for m in modules]
    found = []
    if any("_input_blocks_" in m or "_output_blocks_" in m or "_middle_block_" in m for m in flat):
        found.append("UNet LDM/SGM names")
    if any("_down_blocks_" in m or "_up_blocks_" in m or "_mid_block_" in m for m in flat):
        found.append("UNet diffusers names")
    if any("double_blocks_" in m or "single_blocks_" in m for m in flat):
        found.append("Flux BFL names (fused qkv)")
    if any("single_transformer_blocks_" in m or re.search(r"(^|_)transformer_blocks_\d+_attn_(to_q|add_q_proj)", m)
           for m in flat):
        found.append("Flux diffusers names (split q/k/v)")
    if any("text_model_encoder_layers_" in m for m in flat):
        found.append("text encoder HF CLIP names")
    return ", ".join(found) or "names used as they are"
