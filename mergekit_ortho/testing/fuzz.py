"""Fuzzing the CLI with damaged input files: byte flips and truncations of a valid safetensors
file and of each JSON file we read. Every case must exit 0 or 2 with one line, never 1, never a
traceback, and leave no output when it fails. Used by the test suite (a few seconds) and by
``benchmarks/fuzz_inputs.py`` (as long as asked)."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path


def mutate(raw: bytes, rng: random.Random, region: int | None = None) -> bytes:
    """A damaged copy: a truncation (30 %) or 1-4 bytes replaced, within the first ``region`` bytes
    when given (a header), by JSON-significant or arbitrary bytes."""
    data = bytearray(raw)
    if rng.random() < 0.3:
        return bytes(data[: rng.randrange(len(data))])
    span = min(region or len(data), len(data))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(span)] = rng.choice(b'{}[]":,0123456789aeE -\\\x00\xff')
    return bytes(data)


def build_inputs(root: Path, model: Path, other: Path) -> dict[str, Path]:
    """A sharded copy of ``model`` with a config, and a PEFT adapter, under ``root``; returns the
    files to damage (each a JSON file or a safetensors shard)."""
    import torch

    from .checkpoints import sharded_copy
    from .loras import write_peft_dir

    sharded = sharded_copy(model, root / "sharded")
    (sharded / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    adapter = write_peft_dir(root / "adapter", {"base_model.model.l.lora_A.weight": torch.ones(2, 4),
                                                "base_model.model.l.lora_B.weight": torch.ones(4, 2)},
                             {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["l"]})
    return {"index": sharded / "model.safetensors.index.json", "config": sharded / "config.json",
            "shard": sharded / "model-00001-of-00002.safetensors", "adapter_config": adapter / "adapter_config.json",
            "other": other}


def fuzz_cli(root: Path, model: Path, other: Path, seconds: float, seed: int = 0) -> int:
    """Run damaged inputs through ``merge run`` for ``seconds``; returns the number of cases.
    Raises AssertionError on the first case that breaks the rules."""
    import struct

    from typer.testing import CliRunner

    from ..cli import app

    rng = random.Random(seed)
    files = build_inputs(root, model, other)
    targets = [files[k] for k in ("index", "config", "shard", "adapter_config")]
    originals = {t: t.read_bytes() for t in targets}
    recipe = root / "r.yaml"
    deadline, cases = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        t = rng.choice(targets)
        raw = originals[t]
        region = 8 + struct.unpack("<Q", raw[:8])[0] if t.suffix == ".safetensors" else None
        damaged = mutate(raw, rng, region)
        t.write_bytes(damaged)
        if t.name == "adapter_config.json":
            recipe.write_text(f"merge_method: task_arithmetic\nmodels:\n  - model: {t.parent}\n")
        else:
            recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {t.parent}\n  - model: {files['other']}\n"
                              "out_dtype: bfloat16\n")
        out = root / f"out{cases}"
        res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
        where = f"{t.name} damaged as {damaged[:120]!r}"
        assert res.exit_code in (0, 2), f"{where}: exit {res.exit_code}: {res.stderr[-500:]}"
        assert "Traceback" not in res.stderr, where
        if res.exit_code == 2:
            assert not out.exists(), where
            assert len(res.stderr.strip().splitlines()) == 1, f"{where}: {res.stderr}"
        t.write_bytes(originals[t])
        cases += 1
    return cases
