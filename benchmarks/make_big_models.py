#!/usr/bin/env python
"""Build the ~1.1B-parameter checkpoints of the at-scale benchmark (issue 17): a bf16 base and
three task models (base + 0.01 N(0,1), rounded to bf16), with a real architecture.

The architecture is TinyLlama-1.1B's Llama config (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 key/value heads, vocab 32000, untied head): 1,100,048,384 parameters, 2.05 GiB per
model in bf16. Tensor names and shapes come from ``transformers``' ``LlamaForCausalLM`` built on
the meta device (no memory); the weights are random, written shard by shard with safetensors
(at most ``--shard-gib`` per shard), so at most one shard is ever in memory. Each tensor has its
own seeded generator (model seed, tensor name), so a task model regenerates its base tensor
instead of reading the base back: the same bytes on every run, whatever the order.

    python benchmarks/make_big_models.py                       # -> /work/bigmodels/{base,task_a,task_b,task_c}
    python benchmarks/make_big_models.py --out DIR --layers 16
    python benchmarks/bench_merge.py --models /work/bigmodels --methods linear ties --repeat 1 \\
        --mergekit-venv /work/mk-venv --results benchmarks/results_merge_1b.md --timeout 3600

The layout (``<out>/<name>/config.json`` + shards + index, ``<out>/built.json``) is what
``bench_merge.py --models`` reads. The files are large (8.2 GiB for the four): remove them
afterwards (``rm -rf /work/bigmodels``). Never written inside the repository.
"""
from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

TASKS = ("task_a", "task_b", "task_c")
NOISE = 0.01


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])  # mergekit picks its architecture by this


def shapes_of(cfg) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the transformers model, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _gen(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))


def base_tensor(name: str, shape):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=_gen(0, name)).mul_(1.0 / shape[-1] ** 0.5)


def tensor(model: int, name: str, shape):
    """Model 0 is the base; model i >= 1 is bf16(bf16(base) + 0.01 N(0,1)) with its own draws."""
    import torch

    t = base_tensor(name, shape).to(torch.bfloat16)
    if model == 0:
        return t
    return t.float().add_(torch.randn(shape, generator=_gen(model, name)), alpha=NOISE).to(torch.bfloat16)


def shard_groups(shapes: dict, shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``shard_bytes`` (bf16) unless one
    tensor alone is larger."""
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2
        for d in shape:
            nbytes *= d
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    groups.append(cur)
    return groups


def write_model(out: Path, model: int, shapes: dict, cfg, shard_bytes: int) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    groups = shard_groups(shapes, shard_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: tensor(model, n, shapes[n]) for n in group}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(str(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/work/bigmodels"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gib", type=float, default=1.0, help="largest shard (default 1 GiB: 3 shards)")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    out = args.out.resolve()
    if out == repo or repo in out.parents:
        ap.error(f"--out {out} is inside the repository; the checkpoints are GiB-sized")
    cfg = llama_config(args)
    shapes = shapes_of(cfg)
    params = sum(_numel(s) for s in shapes.values())
    dims = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
            "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.kv_heads}
    shards = len(shard_groups(shapes, int(args.shard_gib * 2**30)))
    stamp = {"dims": dims, "params": params, "dtype": "bfloat16", "shards": shards, "noise": NOISE,
             "builder": "benchmarks/make_big_models.py", "architecture": "LlamaForCausalLM"}
    marker = out / "built.json"
    names = ("base",) + TASKS
    if (not args.rebuild and marker.is_file() and json.loads(marker.read_text()) == stamp
            and all((out / n / "config.json").is_file() for n in names)):
        print(f"{out}: already built ({params:,} parameters per model)")
        return 0
    print(f"LlamaForCausalLM {dims}: {params:,} parameters, {params * 2 / 2**30:.2f} GiB per model in bf16",
          flush=True)
    marker.unlink(missing_ok=True)
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        write_model(out / name, i, shapes, cfg, int(args.shard_gib * 2**30))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    marker.write_text(json.dumps(stamp, indent=2))
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    raise SystemExit(main())
