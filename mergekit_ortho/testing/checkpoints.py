"""Full checkpoints built on the fly: Llama-shaped random weights (or a base plus seeded noise)
written as safetensors shards, and plain tensor dicts. No download; torch imported when used."""
from __future__ import annotations

import json
from pathlib import Path


def llama_shapes(hidden: int, layers: int, vocab: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(out: Path, shapes: dict[str, tuple[int, ...]], seed: int, base: Path | None = None,
                     noise: float = 0.01, dtype: str = "bfloat16", shards: int = 1, config: dict | None = None) -> None:
    """Random weights (or ``base`` + seeded noise), written shard by shard with safetensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    names = list(shapes)
    per = -(-len(names) // shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    base_index = _weight_map(base) if base else None
    weight_map, total = {}, 0
    for fname, group in zip(files, groups):
        tensors = {}
        for name in group:
            shape = shapes[name]
            if base is not None:
                with safe_open(str(base / base_index[name]), "pt") as f:
                    t = f.get_tensor(name).float()
                t += noise * torch.randn(shape, generator=gen)
            elif name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
            tensors[name] = t.to(dt)
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
           "tie_word_embeddings": False}
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def _weight_map(d: Path) -> dict[str, str]:
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        return json.loads(idx.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def random_base(shapes: dict[str, tuple], seed: int = 0) -> dict:
    """{key: 0.1 x seeded standard-normal float32 tensor} for any shapes (a fake base state dict)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def sharded_copy(src: Path, dst: Path) -> Path:
    """A two-shard copy (with its index) of a single-file checkpoint directory."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    names = sorted(tensors)
    dst.mkdir(parents=True)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(dst / fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    return dst


def spec_llama(out: Path, value, tied: bool = False, layers: int = 4, vocab: int = 8,
               config: dict | None = None) -> Path:
    """The recipe fixture of ../shared/specs/mergekit_compat.md M0: a tiny LlamaForCausalLM
    (hidden 4, intermediate 8, 2 heads, fp32) whose every tensor is filled with ``value(name)``
    (a number, or a tensor of the right shape). ``tied``: no ``lm_head.weight`` stored and
    ``tie_word_embeddings: true``."""
    import torch

    shapes = llama_shapes(hidden=4, layers=layers, vocab=vocab, intermediate=8)
    if tied:
        shapes.pop("lm_head.weight")
    tensors = {}
    for name, shape in shapes.items():
        v = value(name)
        tensors[name] = v.reshape(shape).float() if isinstance(v, torch.Tensor) else torch.full(shape, float(v))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4,
           "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
           "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": tied,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps({**cfg, **(config or {})}, indent=2))
    return out


def code_value(k: int):
    """mergekit spec ``codeK``: layer-l tensors 100K+l, embeddings 100K+50, final norm 100K+60,
    head 100K+70."""
    def value(name: str) -> float:
        if name.startswith("model.layers."):
            return 100 * k + int(name.split(".")[2])
        return 100 * k + {"model.embed_tokens.weight": 50, "model.norm.weight": 60}.get(name, 70)
    return value
