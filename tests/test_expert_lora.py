"""PEFT LoRAs on MoE expert parameters (``target_parameters``) merge into full checkpoints exactly
as peft's own ``merge_and_unload`` does, into bases storing the experts per expert (as published)
or fused (as transformers 5 holds them); LoRA outputs and bad inputs are refused with one line
(issue 15)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe
from test_run import load_dir

IDS = torch.tensor([[1, 4, 9, 2, 7, 3]])


def _config(kind: str, experts: int = 3):
    import transformers

    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  vocab_size=32, max_position_embeddings=32, tie_word_embeddings=False)
    if kind == "mixtral":
        return transformers.MixtralConfig(intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2,
                                          **common), transformers.MixtralForCausalLM
    return transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                       num_experts=experts, num_experts_per_tok=2, **common), \
        transformers.Qwen2MoeForCausalLM


def _lora(model, seed: int, path, rslora: bool = False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], use_rslora=rslora,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(path)
    return peft_model.unload()


def _save_fused(model, d):
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    cfg, cls = _config(kind)
    torch.manual_seed(0)
    base = cls(cfg).eval()
    base.save_pretrained(root / "base")  # on disk per expert (transformers converts on save)
    _save_fused(base, root / "fused")  # the in-memory layout: experts.gate_up_proj [E, 2I, H]
    for i, seed in enumerate((1, 2)):
        _lora(cls.from_pretrained(root / "base"), seed, root / f"lora{i}", rslora=(i == 1))
    return kind, root, cls


def _peft_merged(cls, root, lora):
    from peft import PeftModel

    model = PeftModel.from_pretrained(cls.from_pretrained(root / "base"), str(root / lora))
    return model.merge_and_unload().eval()


def _recipe(tmp_path, base, loras, method="task_arithmetic"):
    models = "".join(f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in loras)
    return write_recipe(tmp_path / "r.yaml", f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}")


@pytest.mark.parametrize("layout", ["base", "fused"])
def test_expert_lora_merges_as_peft_merges_it(cli, tmp_path, moe, layout):
    kind, root, cls = moe
    code, _, err = cli("run", _recipe(tmp_path, root / layout, [(root / "lora0", 1.0)]), "--out", tmp_path / "out")
    assert code == 0, err
    assert "onto expert tensors (target_parameters)" in err
    want = _peft_merged(cls, root, "lora0")
    got = cls.from_pretrained(tmp_path / "out").eval()
    base = cls.from_pretrained(root / "base").state_dict()
    ws, gs = want.state_dict(), got.state_dict()
    changed = [k for k in ws if not torch.equal(ws[k], base[k])]
    assert any(k.endswith("experts.gate_up_proj") for k in changed) and any("down_proj" in k for k in changed)
    for k in ws:
        assert torch.allclose(gs[k], ws[k], atol=1e-6, rtol=0), k
    with torch.no_grad():
        assert torch.allclose(got(IDS).logits, want(IDS).logits, atol=1e-5)
    names = set(load_dir(tmp_path / "out"))
    fused = set(load_dir(root / layout))
    assert names == fused  # written in the base's own layout


def test_two_expert_loras_weighted(cli, tmp_path, moe):
    """task_arithmetic of two expert LoRAs (one rsLoRA) = base + 0.5 d0 + 1.5 d1, each d from peft."""
    kind, root, cls = moe
    code, _, err = cli("run", _recipe(tmp_path, root / "base", [(root / "lora0", 0.5), (root / "lora1", 1.5)]),
                       "--out", tmp_path / "out")
    assert code == 0, err
    base = cls.from_pretrained(root / "base").state_dict()
    d0, d1 = (_peft_merged(cls, root, n).state_dict() for n in ("lora0", "lora1"))
    got = cls.from_pretrained(tmp_path / "out").state_dict()
    for k in base:
        want = base[k] + 0.5 * (d0[k] - base[k]) + 1.5 * (d1[k] - base[k])
        assert torch.allclose(got[k], want, atol=1e-5, rtol=0), k


def test_peft_output_is_peft_loadable_and_exact(cli, tmp_path, moe):
    """Two expert LoRAs merged to a PEFT adapter (target_parameters, concatenated ranks): peft
    loads it on the base and its merge is the full-model merge of the same recipe."""
    from peft import PeftModel

    kind, root, cls = moe
    r = _recipe(tmp_path, root / "base", [(root / "lora0", 0.5), (root / "lora1", 1.5)])
    (tmp_path / "p.yaml").write_text(r.read_text() + "output: {format: peft}\n")
    code, _, err = cli("run", tmp_path / "p.yaml", "--out", tmp_path / "peft")
    assert code == 0, err
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"] and cfg["r"] == 4
    code, _, err = cli("run", r, "--out", tmp_path / "full")
    assert code == 0, err
    got = PeftModel.from_pretrained(cls.from_pretrained(root / "base"), str(tmp_path / "peft")).merge_and_unload()
    want = cls.from_pretrained(tmp_path / "full").state_dict()
    gs = got.state_dict()
    for k in want:
        assert torch.allclose(gs[k], want[k], atol=1e-5, rtol=0), k


def test_lora_outputs_that_cannot_hold_it_are_refused(cli, tmp_path, moe):
    _, root, _ = moe
    for base, fmt, what in ((root / "fused", "peft", "stores the experts fused"),
                            (root / "base", "kohya", "has no form for")):
        r = _recipe(tmp_path, base, [(root / "lora0", 1.0)])
        r.write_text(r.read_text() + f"output: {{format: {fmt}}}\n")
        code, _, err = cli("run", r, "--out", tmp_path / "out")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "target_parameters" in err or what in err, err
        assert what in err, err
        assert not (tmp_path / "out").exists()


def test_expert_count_mismatch_is_one_line(cli, tmp_path, moe):
    kind, root, cls = moe
    cfg, _ = _config(kind, experts=4)
    torch.manual_seed(0)
    cls(cfg).save_pretrained(tmp_path / "base4")
    _save_fused(cls(cfg), tmp_path / "fused4")
    for base, what in ((tmp_path / "base4", "expert count mismatch"), (tmp_path / "fused4", "fits none of")):
        code, _, err = cli("run", _recipe(tmp_path, base, [(root / "lora0", 1.0)]), "--out", tmp_path / "out")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert what in err and "lora0" in err, err
        assert not (tmp_path / "out").exists()


def test_without_a_base_it_is_refused(cli, tmp_path, moe):
    _, root, _ = moe
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: linear\nmodels:\n  - model: {root / 'lora0'}\n"
                                          f"  - model: {root / 'lora1'}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "target_parameters" in err or "base_model" in err
    assert not (tmp_path / "out").exists()


def test_model_plus_lora_reference(cli, tmp_path, moe):
    """``base+lora`` (an expert LoRA applied in place) is the peft-merged model."""
    kind, root, cls = moe
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
                                          f"  - model: {root / 'base'}+{root / 'lora0'}\n    parameters: {{weight: 1.0}}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    want = _peft_merged(cls, root, "lora0").state_dict()
    got = cls.from_pretrained(tmp_path / "out").state_dict()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k


def test_mixed_recipe_fused_fine_tune_and_expert_lora(cli, tmp_path, moe):
    """A per-expert base, a full fine-tune saved fused (transformers 5's in-memory layout) and an
    expert LoRA in one recipe: the fused model is converted, the LoRA mapped per expert."""
    kind, root, cls = moe
    cfg, _ = _config(kind)
    torch.manual_seed(5)
    ft = cls(cfg).eval()
    _save_fused(ft, tmp_path / "ft_fused")
    code, _, err = cli("run", _recipe(tmp_path, root / "base", [(tmp_path / "ft_fused", 0.5), (root / "lora0", 1.0)]),
                       "--out", tmp_path / "out")
    assert code == 0, err
    assert "fused experts read as" in err and "onto expert tensors" in err
    base = cls.from_pretrained(root / "base").state_dict()
    lora = _peft_merged(cls, root, "lora0").state_dict()
    fts = ft.state_dict()
    got = cls.from_pretrained(tmp_path / "out").state_dict()
    for k in base:
        want = base[k] + 0.5 * (fts[k] - base[k]) + (lora[k] - base[k])
        assert torch.allclose(got[k], want, atol=1e-5, rtol=0), k


def test_inspect_describes_the_expert_parameters(cli, moe):
    _, root, _ = moe
    code, out, err = cli("inspect", root / "lora1")
    assert code == 0, err
    assert "expert parameters (target_parameters): experts.down_proj, experts.gate_up_proj" in out
    assert "3 experts each, rank 2 per expert" in out and f"scale {round(6 / 2 ** 0.5, 6)}" in out  # rsLoRA


def test_continual_add_of_an_expert_lora(cli, tmp_path, moe):
    kind, root, cls = moe
    r = write_recipe(tmp_path / "c.yaml", f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\n")
    state = tmp_path / "state"
    assert cli("continual", "init", state, "--recipe", r)[0] == 0
    code, _, err = cli("continual", "add", state, root / "lora0")
    assert code == 0, err
    code, _, err = cli("continual", "export", state, "--out", tmp_path / "out")
    assert code == 0, err
    want = _peft_merged(cls, root, "lora0").state_dict()
    got = cls.from_pretrained(tmp_path / "out").state_dict()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
