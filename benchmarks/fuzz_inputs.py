"""Fuzz `merge run` with damaged inputs for as long as asked (the test suite runs 4 s of it).

    python benchmarks/fuzz_inputs.py --seconds 300 [--seed N]

Builds tiny checkpoints (no download), then damages the shard index, config.json,
adapter_config.json and a shard's safetensors header case after case; every case must exit 0 or 2
with one line, never 1, never a traceback, and leave no output on failure. Prints the case count.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint
from mergekit_ortho.testing.fuzz import fuzz_cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shapes = llama_shapes(hidden=16, layers=2, vocab=32, intermediate=24)
        write_checkpoint(root / "a", shapes, seed=1, dtype="float32")
        write_checkpoint(root / "b", shapes, seed=2, dtype="float32")
        n = fuzz_cli(root / "fuzz", root / "a", root / "b", args.seconds, args.seed)
    print(f"{n} damaged inputs: every one exited 0 or 2 with one line")


if __name__ == "__main__":
    main()
