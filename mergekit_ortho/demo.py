"""Bundled demo: build small Llama-shaped checkpoints locally and merge them.

``python -m mergekit_ortho.demo`` writes ``demo/base``, ``demo/task_a`` .. ``demo/task_c`` (random
base + small task-specific noise, safetensors, no download) and runs ``recipes/demo.yaml``.
The builders live in ``testing/`` (they also make the tests' and benchmarks' checkpoints).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .testing.checkpoints import llama_shapes, write_checkpoint
from .testing.loras import write_peft_adapter


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
