"""Bundled demo: build small Llama-shaped checkpoints locally and merge them.

``python -m mergekit_ortho.demo`` writes ``demo/base``, ``demo/task_a`` .. ``demo/task_c`` (random
base + small task-specific noise, safetensors, no download) and runs ``recipes/demo.yaml``.
The same builder makes the benchmark checkpoints (``benchmarks/``) at ~270M parameters.
"""
from __future__ import annotations

import json
import sys
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


def write_peft_adapter(out: Path, shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int,
                       alpha: float, seed: int, base_name: str | None = None) -> None:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) with random non-zero
    factors for every 2-D weight whose name ends with one of ``targets``; written directly."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        mod = name[: -len(".weight")]
        if len(shape) != 2 or not mod.endswith(targets):
            continue
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
        tensors[f"base_model.model.{mod}.lora_B.weight"] = 0.02 * torch.randn(shape[0], rank, generator=gen)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": rank,
           "lora_alpha": alpha, "target_modules": list(targets), "use_rslora": False, "fan_in_fan_out": False,
           "bias": "none", "lora_dropout": 0.0}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def build_demo(root: Path, hidden: int = 64, layers: int = 2, vocab: int = 256) -> None:
    """demo/base, demo/task_a..c (full fine-tunes) and demo/lora_a..c (PEFT LoRAs on the base)."""
    shapes = llama_shapes(hidden, layers, vocab, hidden * 2)
    cfg = {"hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab,
           "intermediate_size": hidden * 2, "num_attention_heads": 4}
    write_checkpoint(root / "base", shapes, seed=0, config=cfg)
    for i, name in enumerate(("task_a", "task_b", "task_c")):
        write_checkpoint(root / name, shapes, seed=i + 1, base=root / "base", noise=0.02, config=cfg)
    for i, name in enumerate(("lora_a", "lora_b", "lora_c")):
        write_peft_adapter(root / name, shapes, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0,
                           seed=10 + i, base_name="../base")


def main(argv: list[str] | None = None) -> int:
    from .cli import app

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    if not recipe.is_file():
        recipe = Path.cwd() / "recipes" / "demo.yaml"
    root = recipe.parent.parent / "demo"  # recipes/demo.yaml refers to ../demo
    print(f"building demo checkpoints in {root} ...", flush=True)
    build_demo(root)
    args = ["run", str(recipe), "--out", str(root / "merged"), "--overwrite"]
    print("merge " + " ".join(args), flush=True)
    try:
        app(args, standalone_mode=False)
    except SystemExit as e:  # typer.Exit from error handling
        return int(e.code or 0)
    except Exception as e:  # click.exceptions.Exit carries exit_code
        code = getattr(e, "exit_code", 1)
        return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
