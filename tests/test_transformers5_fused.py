"""transformers 5 conversions that split or fuse tensors, for adapters (issue 15), on a tiny
Dinov2 with SwiGLU built from a config: its checkpoint stores ``mlp.weights_in`` [2h, d] which
transformers 5 splits on load (``Chunk(dim=0)``) into ``mlp.gate_proj`` and ``mlp.up_proj``.
A peft (transformers 5) LoRA on gate/up merges into the fused checkpoint exactly (A stacked, B
block-diagonal), a LoRA on the fused module (as saved under transformers 4) merges into a base
of in-memory names exactly (rows of B), a PEFT output on the fused checkpoint is written as the
in-memory parts and loads with peft; rules that are no row split are refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vit_namings import lora_deltas

from mergekit_ortho.adapters import transformers5

pytestmark = pytest.mark.skipif(transformers5.version() is None, reason="needs transformers >= 5")

L = "encoder.layer.0."


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    import transformers
    from transformers import AutoModel

    from mergekit_ortho.testing.loras import make_peft_adapter

    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                    image_size=8, patch_size=4, use_swiglu_ffn=True)
    model = transformers.Dinov2Model(cfg).eval()
    model.save_pretrained(root / "disk")
    disk = load_file(str(root / "disk" / "model.safetensors"))
    assert L + "mlp.weights_in.weight" in disk and L + "mlp.gate_proj.weight" in model.state_dict()
    (root / "memory").mkdir()  # a raw transformers 5 state dict: in-memory names, gate/up separate
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "memory" / "model.safetensors"))
    (root / "memory" / "config.json").write_text((root / "disk" / "config.json").read_text())

    def load():
        return AutoModel.from_pretrained(root / "disk", dtype=torch.float32).eval()

    a = make_peft_adapter(load(), root / "a", seed=1, r=2, lora_alpha=4,
                          target_modules=["gate_proj", "up_proj", "q_proj"])
    # the fused-module LoRA peft under transformers 4 would save: one LoRA on mlp.weights_in
    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(3, 16, generator=g) * 0.3, torch.randn(96, 3, generator=g) * 0.3
    (root / "f").mkdir()
    save_file({f"base_model.model.{L}mlp.weights_in.lora_A.weight": A,
               f"base_model.model.{L}mlp.weights_in.lora_B.weight": B}, str(root / "f" / "adapter_model.safetensors"))
    c = json.loads((a / "adapter_config.json").read_text())
    c.update(r=3, lora_alpha=6, target_modules=["weights_in"])
    (root / "f" / "adapter_config.json").write_text(json.dumps(c))
    d = 2.0 * B @ A
    torch.manual_seed(5)
    return {"root": root, "load": load, "a": a, "f": root / "f", "pixels": torch.randn(2, 3, 8, 8),
            "a_deltas": lora_deltas(a), "f_deltas": {L + "mlp.gate_proj.weight": d[:48], L + "mlp.up_proj.weight": d[48:]},
            "memory_keys": set(model.state_dict())}


def _expected(dino, deltas):
    model = dino["load"]()
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in deltas.items():
            sd[k].add_(v)
        return model(pixel_values=dino["pixels"]).last_hidden_state


def _run(cli, tmp_path, base, adapter, fmt):
    (tmp_path / "r.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                                     f"  - model: {adapter}\n    parameters: {{weight: 1.0}}\noutput: {{format: {fmt}}}\n")
    return cli("run", tmp_path / "r.yaml", "--out", tmp_path / "out")


@pytest.mark.parametrize("base,which", [("disk", "a"), ("memory", "f")])
def test_split_and_fused_loras_merge_exactly_into_the_other_naming(cli, tmp_path, dino, base, which):
    from transformers import AutoModel

    code, out, err = _run(cli, tmp_path, dino["root"] / base, dino[which], "full")
    assert code == 0, out + err
    got = AutoModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = got(pixel_values=dino["pixels"]).last_hidden_state
    want = _expected(dino, dino[f"{which}_deltas"])
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (want - dino["load"]()(pixel_values=dino["pixels"]).last_hidden_state).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["a", "f"])
def test_a_peft_output_on_the_fused_checkpoint_is_written_as_the_in_memory_parts(cli, tmp_path, dino, which):
    from peft import PeftModel

    code, out, err = _run(cli, tmp_path, dino["root"] / "disk", dino[which], "peft")
    assert code == 0, out + err
    sd = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight" for k in sd}
    assert mods <= dino["memory_keys"] and L + "mlp.gate_proj.weight" in mods, sorted(mods)
    model = PeftModel.from_pretrained(dino["load"](), tmp_path / "out").eval()
    with torch.no_grad():
        got = model(pixel_values=dino["pixels"]).last_hidden_state
    torch.testing.assert_close(got, _expected(dino, dino[f"{which}_deltas"]), rtol=1e-5, atol=1e-5)


def test_without_a_base_a_fused_and_a_split_adapter_are_refused_in_one_line(cli, tmp_path, dino):
    import shutil

    shutil.copy(dino["root"] / "disk" / "config.json", tmp_path / "config.json")
    for n in ("a", "f"):
        shutil.copytree(dino[n], tmp_path / n)
        shutil.copy(dino["root"] / "disk" / "config.json", tmp_path / n / "config.json")
    (tmp_path / "r.yaml").write_text(f"merge_method: task_arithmetic\nmodels:\n  - model: {tmp_path / 'a'}\n"
                                     f"    parameters: {{weight: 1.0}}\n  - model: {tmp_path / 'f'}\n"
                                     "    parameters: {weight: 1.0}\n")
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, out + err
    assert "weights_in" in err and "set base_model" in err, err
    assert not (tmp_path / "out").exists()


def test_a_conversion_that_is_no_row_split_is_named_in_the_refusal(monkeypatch):
    """A Transpose rule (as ergo's / ernie-4.5-VL's routers in the installed transformers): a LoRA
    on the in-memory module is no LoRA of the stored tensor's rows, so it is named and refused.
    The rule is transformers' own WeightConverter; the family table is replaced for the test."""
    from transformers.conversion_mapping import Transpose, WeightConverter

    from mergekit_ortho.adapters import transformers5_fused as fused

    conv = WeightConverter(source_patterns="feed_forward.gate_kernel", target_patterns="mlp.gate.weight",
                           operations=[Transpose(dim0=0, dim1=1)])
    rules = (([], [conv]), ([], [conv.reverse_transform()]))
    monkeypatch.setattr(transformers5, "_rules_for", lambda config: rules)
    keys = ["model.layers.0.feed_forward.gate_kernel.weight", "model.layers.0.self_attn.q_proj.weight"]
    why = fused.unsupported(["model.layers.0.mlp.gate", "model.layers.0.self_attn.nope"], keys, {})
    assert why is not None and "'model.layers.0.mlp.gate'" in why and "Transpose" in why, why
    assert "feed_forward.gate_kernel" in why
    assert fused.unsupported(["model.layers.0.self_attn.nope"], keys, {}) is None
    assert fused.aliases(keys, {keys[0]: (4, 8), keys[1]: (8, 8)}, {}) == []  # no row split: no alias


def test_a_reverted_peft_adapter_of_a_fused_checkpoint_is_written_as_the_parts(cli, tmp_path, dino):
    """`merge revert` names PEFT modules by `merge run`'s rule, splits included: a bundle over the
    fused checkpoint reverts to gate/up modules that peft loads, equal to the full revert."""
    from peft import PeftModel
    from transformers import AutoModel

    (tmp_path / "r.yaml").write_text(f"merge_method: rmm\nbase_model: {dino['root'] / 'disk'}\n"
                                     "parameters: {basis_size: 1, pad_ranks: true}\nmodels:\n"
                                     f"  - model: {dino['a']}\n  - model: {dino['f']}\n")
    code, out, err = cli("run", tmp_path / "r.yaml", "--out", tmp_path / "bundle")
    assert code == 0, out + err
    for task in ("a", "f"):  # tasks are named by the adapters' directory names
        label = task
        code, out, err = cli("revert", tmp_path / "bundle", "--model", label, "--out", tmp_path / f"p{task}")
        assert code == 0, out + err
        mods = {k[len("base_model.model."):].split(".lora_")[0] + ".weight"
                for k in load_file(str(tmp_path / f"p{task}" / "adapter_model.safetensors"))}
        assert mods <= dino["memory_keys"] and L + "mlp.up_proj.weight" in mods, sorted(mods)
        code, out, err = cli("revert", tmp_path / "bundle", "--model", label, "--out", tmp_path / f"full{task}",
                             "--format", "full")
        assert code == 0, out + err
        with torch.no_grad():
            got = PeftModel.from_pretrained(dino["load"](), tmp_path / f"p{task}").eval()(
                pixel_values=dino["pixels"]).last_hidden_state
            want = AutoModel.from_pretrained(tmp_path / f"full{task}", dtype=torch.float32).eval()(
                pixel_values=dino["pixels"]).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
