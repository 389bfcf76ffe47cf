"""`merge run --shard i/N --stage DIR` + `merge finalize` for outputs written module by module
(PEFT and kohya LoRAs, RMM bundles; mergekit_ortho/module_units.py): every file bit-identical to a
serial run's, receipts refuse missing / truncated / tampered / stale units, N is at most the
number of modules, and the sharded PEFT output loads in peft."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, write_recipe
from test_shard import _finalize_fails, sharded, tree  # one refusal check for both kinds of unit

TARGETS = ("q_proj", "v_proj", "o_proj")  # x 2 layers: 6 modules


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_models):
    from mergekit_ortho.testing.checkpoints import llama_shapes
    from mergekit_ortho.testing.loras import write_peft_adapter

    root = tmp_path_factory.mktemp("loras")
    shapes = llama_shapes(**TINY)
    write_peft_adapter(root / "la", shapes, TARGETS, rank=2, alpha=4, seed=1)
    write_peft_adapter(root / "lb", shapes, TARGETS, rank=3, alpha=3, seed=2)
    return tiny_models["base"], root / "la", root / "lb"


def adapter_recipe(path: Path, loras, method: str, params: str = "", output: str = "  format: peft\n") -> Path:
    base, a, b = loras
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4}}\n")
    if params:
        text += f"parameters: {params}\n"
    return write_recipe(path, text + "output:\n" + output)


def files_of(p: Path) -> dict[str, bytes]:
    return tree(p) if p.is_dir() else {p.name: p.read_bytes()}


CASES = {
    "task_arithmetic-peft-2": ("task_arithmetic", "", "  format: peft\n", 2),
    "task_arithmetic-peft-3": ("task_arithmetic", "", "  format: peft\n", 3),
    "ties-peft-rank-2": ("ties", "{density: 0.5}", "  format: peft\n  rank: 3\n", 2),
    "ties-peft-rank-3": ("ties", "{density: 0.5}", "  format: peft\n  rank: 3\n", 3),
    "tsv-peft-rank-3": ("tsv", "", "  format: peft\n  rank: 2\n", 3),
    "dare_ties-seeded-peft-3": ("dare_ties", "{density: 0.5, seed: 7}", "  format: peft\n  rank: 2\n", 3),
    "task_arithmetic-kohya-dir-2": ("task_arithmetic", "", "  format: kohya\n", 2),
    "ties-kohya-file-6": ("ties", "{density: 0.5}", "  format: kohya\n  rank: 2\n", 6),
    "rmm-bundle-3": ("rmm", "{pad_ranks: true}", "  format: bundle\n", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_adapter_is_bit_identical_to_serial(case, loras, tmp_path, cli):
    method, params, output, n = CASES[case]
    r = adapter_recipe(tmp_path / "r.yaml", loras, method, params, output)
    name = "lora.safetensors" if "file" in case else "lora"
    code, _, err = cli("run", r, "--out", tmp_path / "serial" / name)
    assert code == 0, err
    sharded(cli, r, tmp_path / "stage", tmp_path / "sharded" / name, n)
    a, b = files_of(tmp_path / "serial" / name), files_of(tmp_path / "sharded" / name)
    assert a and a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a.get(k) != b.get(k)]
    if "peft" in case:
        assert {"adapter_model.safetensors", "adapter_config.json", "merge_report.json", "README.md"} <= a.keys()
        assert len(json.loads(a["merge_report.json"])["modules"]) == 6
    receipt = json.loads((tmp_path / "stage" / f"unit-00000-of-{n:05d}" / "receipt.json").read_text())
    assert receipt["phase"] == "modules" and len(receipt["modules"]) == 6 // n
    assert all(t["finite"] and len(t["sha256"]) == 64 for f in receipt["files"] for t in f["tensors"])


def test_units_in_any_order_and_a_rerun_unit_give_the_same_output(loras, tmp_path, cli):
    r = adapter_recipe(tmp_path / "r.yaml", loras, "task_arithmetic")
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    sharded(cli, r, tmp_path / "st", tmp_path / "one", 3, order=[2, 0, 1, 0])
    assert tree(tmp_path / "one") == tree(tmp_path / "serial")


@pytest.fixture
def staged(loras, tmp_path, cli):
    r = adapter_recipe(tmp_path / "r.yaml", loras, "ties", "{density: 0.5}", "  format: peft\n  rank: 3\n")
    for i in range(3):
        assert cli("run", r, "--shard", f"{i}/3", "--stage", tmp_path / "st")[0] == 0
    return r, tmp_path / "st"


def test_finalize_refuses_a_missing_unit(staged, tmp_path, cli):
    import shutil

    r, st = staged
    shutil.rmtree(st / "unit-00001-of-00003")
    _finalize_fails(cli, r, st, tmp_path / "out", "missing", "--shard 1/3")


def test_finalize_refuses_a_truncated_unit(staged, tmp_path, cli):
    r, st = staged
    f = st / "unit-00001-of-00003" / "part.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    _finalize_fails(cli, r, st, tmp_path / "out", "truncated", "part.safetensors")


@pytest.mark.parametrize("where", ["data", "header"])
def test_finalize_refuses_a_tampered_unit(where, staged, tmp_path, cli):
    r, st = staged
    f = st / "unit-00001-of-00003" / "part.safetensors"
    raw = bytearray(f.read_bytes())
    if where == "data":
        raw[-3] ^= 0x40
        words = ("tampered", "does not match its receipt")
    else:
        i = raw.index(b'"shape":[') + len(b'"shape":[')
        raw[i] = ord("9") if raw[i] != ord("9") else ord("8")
        words = ("tampered", "header")
    f.write_bytes(bytes(raw))
    _finalize_fails(cli, r, st, tmp_path / "out", *words)


def test_finalize_refuses_a_stale_unit(staged, loras, tmp_path, cli):
    r, st = staged
    other = adapter_recipe(tmp_path / "other.yaml", loras, "ties", "{density: 0.6}", "  format: peft\n  rank: 3\n")
    assert cli("run", other, "--shard", "1/3", "--stage", st)[0] == 0
    _finalize_fails(cli, r, st, tmp_path / "out", "stale", "another plan")
    assert cli("run", r, "--shard", "1/3", "--stage", st)[0] == 0
    assert cli("finalize", r, "--stage", st, "--out", tmp_path / "out")[0] == 0


def test_more_units_than_modules_is_refused_in_one_line(loras, tmp_path, cli):
    r = adapter_recipe(tmp_path / "r.yaml", loras, "task_arithmetic")
    code, _, err = cli("run", r, "--shard", "0/7", "--stage", tmp_path / "st")
    assert code == 2 and "6 module(s)" in err and "at most 6" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "st").exists()
    code, out, err = cli("run", r, "--shard", "2/3", "--stage", tmp_path / "st", "--dry-run")
    assert code == 0 and "unit 2/3: module(s) 5..6 of 6" in out, out + err


def test_a_method_that_reduces_over_every_module_is_refused_in_one_line(loras, tmp_path, cli):
    r = adapter_recipe(tmp_path / "r.yaml", loras, "opcm", "", "  format: peft\n  rank: 2\n")
    code, _, err = cli("run", r, "--shard", "0/2", "--stage", tmp_path / "st")
    assert code == 2 and "not supported yet" in err and len(err.strip().splitlines()) == 1, err


def test_unit_modules_cover_every_module_once():
    from types import SimpleNamespace

    from mergekit_ortho.module_units import unit_keys

    for m in (1, 2, 5, 6, 17):
        plan = SimpleNamespace(module_keys=[f"k{j}" for j in range(m)])
        for n in range(1, m + 1):
            got = [unit_keys(plan, i, n) for i in range(n)]
            assert [x for g in got for x in g] == plan.module_keys and all(got)


def test_sharded_peft_output_loads_in_peft(tmp_path, cli):
    import torch
    from peft import PeftModel

    from mergekit_ortho.testing.hf_models import load_causal_lm, tiny_llama
    from mergekit_ortho.testing.loras import make_peft_adapter

    base = tiny_llama(tmp_path / "base")
    a = make_peft_adapter(load_causal_lm(base), tmp_path / "a", seed=1, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_peft_adapter(load_causal_lm(base), tmp_path / "b", seed=2, r=2, lora_alpha=4,
                          target_modules=["q_proj", "o_proj"])
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                     f"  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n"
                     "    parameters: {weight: -0.4}\noutput:\n  format: peft\n")
    assert cli("run", r, "--out", tmp_path / "serial")[0] == 0
    sharded(cli, r, tmp_path / "st", tmp_path / "out", 3)
    assert tree(tmp_path / "out") == tree(tmp_path / "serial")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        got = PeftModel.from_pretrained(load_causal_lm(base), str(tmp_path / "out")).eval()(ids).logits
        plain = load_causal_lm(base)(ids).logits
    assert torch.isfinite(got).all() and not torch.equal(got, plain)  # loaded, and the adapter acts


def test_safetensors_metadata_is_written_in_the_callers_order(tmp_path):
    import torch
    from safetensors import safe_open

    from mergekit_ortho.sinks import save_safetensors

    meta = {f"key{j}": f"v\u00e9\n{j}" for j in (5, 1, 9, 3, 7, 0, 2)}
    save_safetensors({"b": torch.ones(3), "a": torch.zeros(0, 2)}, tmp_path / "x.safetensors", meta)
    raw = (tmp_path / "x.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == list(meta)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), torch.ones(3))


def test_hub_adapters_sharded_on_machines_of_their_own_equal_serial(loras, tmp_path):
    """Base and LoRAs as hub ids (the local fake Hub): each unit on its own cache, finalize on a
    third, the output bit-identical to the serial run of the same recipe."""
    from fakehub import FakeHub, run_cli

    base, a, b = loras
    hub = FakeHub({"org/base": base, "org/la": a, "org/lb": b})
    try:
        r = adapter_recipe(tmp_path / "r.yaml", ("org/base", "org/la", "org/lb"), "ties", "{density: 0.5}",
                           "  format: peft\n  rank: 3\n")
        got = run_cli(hub, tmp_path / "serial-machine", "run", r, "--out", tmp_path / "serial")
        assert got.returncode == 0, got.stderr
        for i in (1, 0):
            got = run_cli(hub, tmp_path / f"machine{i}", "run", r, "--shard", f"{i}/2", "--stage", tmp_path / "st")
            assert got.returncode == 0, got.stderr
        got = run_cli(hub, tmp_path / "finalizer", "finalize", r, "--stage", tmp_path / "st", "--out", tmp_path / "out")
        assert got.returncode == 0, got.stderr
    finally:
        hub.close()
    assert tree(tmp_path / "out") == tree(tmp_path / "serial")
