"""blockwise.py: elementwise methods merged block by block into the output dtype write the same bytes
as the whole-tensor fold (every output file), for weights and deltas methods, recipe dtypes, output
dtypes, sharded inputs and slices; values past the output's range and NaNs are refused as before.
The block path is forced onto tiny tensors (MIN_ENTRIES 1, blocks of 3 rows: many blocks, the last
one partial) and counted, so a test cannot pass without it."""
from __future__ import annotations

import pytest

from conftest import TINY, write_recipe
from mergekit_ortho import blockwise
from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    shapes = llama_shapes(**TINY)
    write_checkpoint(root / "base", shapes, seed=0, dtype="bfloat16", shards=2)
    for i, name in enumerate("abc"):
        write_checkpoint(root / name, shapes, seed=i + 1, base=root / "base", noise=0.05, dtype="bfloat16",
                         shards=1 + i % 2)
    return root


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _both_ways(cli, tmp_path, monkeypatch, text: str):
    """The outputs of the whole-tensor path and of the block path, and how many tensors took blocks."""
    r = write_recipe(tmp_path / "r.yaml", text)
    monkeypatch.setattr(blockwise, "MIN_ENTRIES", 1 << 40)
    code, _, err = cli("run", r, "--out", tmp_path / "whole")
    assert code == 0, err
    monkeypatch.setattr(blockwise, "MIN_ENTRIES", 1)
    monkeypatch.setattr(blockwise, "BLOCK_ENTRIES", 3 * TINY["hidden"])
    taken, real = [], blockwise.merge
    monkeypatch.setattr(blockwise, "merge", lambda plan, name: taken.append(name) or real(plan, name))
    code, _, err = cli("run", r, "--out", tmp_path / "blocks")
    assert code == 0, err
    return _files(tmp_path / "whole"), _files(tmp_path / "blocks"), taken


CASES = {
    "linear weights": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.37}}\n"
                      "  - model: {b}\n    parameters: {{weight: 1.0}}\n  - model: {c}\n    parameters: {{weight: -0.2}}\n",
    "linear unnormalized, float32 out": "merge_method: linear\nparameters: {{normalize: false}}\nout_dtype: float32\n"
                                        "models:\n  - model: {a}\n  - model: {b}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.7, normalize: true}}\n"
                       "models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n"
                       "    parameters: {{weight: 0.3}}\n  - model: {c}\n",
    "recipe dtype float16": "merge_method: task_arithmetic\nbase_model: {base}\ndtype: float16\n"
                            "models:\n  - model: {a}\n  - model: {b}\n",
    "magmax": "merge_method: magmax\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "slices": "merge_method: linear\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [1, 2]\n"
              "      - model: {b}\n        layer_range: [1, 2]\n  - sources:\n      - model: {b}\n"
              "        layer_range: [0, 1]\n      - model: {c}\n        layer_range: [0, 1]\n",
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_write_the_same_bytes_as_the_whole_tensor(bf16_models, tmp_path, cli, monkeypatch, case):
    text = CASES[case].format(**{k: bf16_models / k for k in ("base", "a", "b", "c")})
    whole, blocks, taken = _both_ways(cli, tmp_path, monkeypatch, text)
    assert len(taken) >= 5  # every merged tensor of the tiny model
    assert whole.keys() == blocks.keys()
    assert [k for k in whole if whole[k] != blocks[k]] == []


def test_magmax_random_selection_is_not_merged_in_blocks(bf16_models, tmp_path, cli, monkeypatch):
    text = (f"merge_method: magmax\nbase_model: {bf16_models / 'base'}\nparameters: {{selection: random, seed: 3}}\n"
            f"models:\n  - model: {bf16_models / 'a'}\n  - model: {bf16_models / 'b'}\n")
    whole, blocks, taken = _both_ways(cli, tmp_path, monkeypatch, text)
    assert taken == [] and whole == blocks


def test_values_past_the_output_range_are_refused_in_blocks(bf16_models, tmp_path, cli, monkeypatch):
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {bf16_models / 'base'}\n"
                     f"out_dtype: float16\nparameters: {{lambda: 1.0e+8}}\nmodels:\n  - model: {bf16_models / 'a'}\n")
    monkeypatch.setattr(blockwise, "MIN_ENTRIES", 1)
    monkeypatch.setattr(blockwise, "BLOCK_ENTRIES", 3 * TINY["hidden"])
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "beyond the range of float16" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_nan_in_one_block_is_refused(bf16_models, tmp_path, cli, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    f = next((bf16_models / "a").glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name][-1, -1] = float("nan")  # the last block only
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((bf16_models / "a" / "config.json").read_text())
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {bad}\n"
                     f"  - model: {bf16_models / 'b'}\n")
    monkeypatch.setattr(blockwise, "MIN_ENTRIES", 1)
    monkeypatch.setattr(blockwise, "BLOCK_ENTRIES", 3 * TINY["hidden"])
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "NaN or Inf" in err and name in err, err
    assert not (tmp_path / "out").exists() and torch.isnan(load_file(str(bad / "model.safetensors"))[name]).any()
