"""PEFT LoHa, LoKr, lora_bias, trained biases and modules_to_save against peft's own
merge_and_unload on a tiny model; `merge run` end to end on a mix of a LyCORIS file, a plain LoRA
and a full fine-tune; and the bad-input lines (exit 2, no output)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora
from mergekit_ortho.sources.checkpoint import CheckpointSource
from mergekit_ortho.testing.checkpoints import write_safetensors

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lin(x))


def _tiny(seed=0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _save_base(model: nn.Module, path: Path) -> Path:
    return write_safetensors(path, {k: v.detach().clone() for k, v in model.state_dict().items()})


def _peft_case(tmp_path: Path, name: str, config, perturb=None):
    """(adapter dir, base file, {key: merged - base} from peft's merge_and_unload)."""
    model = _tiny()
    base = _save_base(model, tmp_path / "base.safetensors")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, config)
    if perturb is not None:
        torch.manual_seed(7)
        perturb(pm)
    pm.save_pretrained(tmp_path / name)
    merged = pm.merge_and_unload().state_dict()
    want = {k: merged[k] - before[k] for k in before if not torch.equal(merged[k], before[k])}
    return tmp_path / name, base, want


def _ours(adapter: Path, base: Path) -> tuple[MatchedLora, dict]:
    src = LoraSource(adapter)
    b = CheckpointSource(str(base), "base")
    shapes = {k: i.shape for k, i in b.infos.items()}
    m = MatchedLora(src, match_to_base(src, list(b.infos), shapes), b)
    return m, {k: m.delta_for(k, shapes[k]) for k in m.by_base}


def _compare(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_peft_loha_matches_merge_and_unload(tmp_path):
    for eff in (False, True):
        cfg = peft.LoHaConfig(r=2, alpha=4, target_modules=["lin", "conv"], init_weights=False,
                              use_effective_conv2d=eff, rank_pattern={"lin": 3}, alpha_pattern={"lin": 1.5})
        adapter, base, want = _peft_case(tmp_path / str(eff), "loha", cfg)
        m, got = _ours(adapter, base)
        _compare(got, want)
        assert m.source.type_name("base_model.model.conv") == "LoHa"


def test_peft_lokr_matches_merge_and_unload(tmp_path):
    for i, kw in enumerate([{"r": 2}, {"r": 1, "decompose_both": True}, {"r": 1, "use_effective_conv2d": True}]):
        cfg = peft.LoKrConfig(alpha=3, target_modules=["lin", "conv"], init_weights=False, **kw)
        adapter, base, want = _peft_case(tmp_path / str(i), "lokr", cfg)
        _, got = _ours(adapter, base)
        _compare(got, want)


def _perturb_biases(pm):
    for name, p in pm.named_parameters():
        if p.requires_grad and name.endswith("bias"):
            p.data += 0.1 * torch.randn_like(p)
    for mod in pm.modules():  # the trained copy of a modules_to_save head
        if isinstance(mod, nn.Linear) and mod.weight.requires_grad and mod.weight.shape == (3, 8):
            mod.weight.data += 0.1 * torch.randn_like(mod.weight)


@pytest.mark.parametrize("kw", [
    {"lora_bias": True},
    {"bias": "all"},
    {"bias": "lora_only", "lora_bias": True},
    {"modules_to_save": ["head"]},
])
def test_peft_lora_extras_match_merge_and_unload(tmp_path, kw):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "conv"], init_lora_weights=False, **kw)
    adapter, base, want = _peft_case(tmp_path, "extras", cfg, _perturb_biases)
    m, got = _ours(adapter, base)
    _compare(got, want)
    assert m.source.is_factors("base_model.model.lin")  # the weight stays exact factors


def _run_recipe(path: Path, models, base: Path, method="task_arithmetic", output=None, params=None) -> Path:
    import yaml

    doc = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(p), "name": n, "parameters": mp} for n, p, mp in models]}
    if output:
        doc["output"] = output
    if params:
        doc["parameters"] = params
    path.write_text(yaml.safe_dump(doc))
    return path


def _out_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture()
def mix(tmp_path):
    """A base, a LyCORIS file (LoHa on lin, LoKr on conv, full diff on head with diff_b), a PEFT
    LoRA with lora_bias + modules_to_save, a full fine-tune."""
    model = _tiny()
    base = _save_base(model, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return 0.3 * torch.randn(*s, generator=g)

    ly = {"lora_unet_lin.hada_w1_a": r(8, 2), "lora_unet_lin.hada_w1_b": r(2, 6), "lora_unet_lin.hada_w2_a": r(8, 2),
          "lora_unet_lin.hada_w2_b": r(2, 6), "lora_unet_lin.alpha": torch.tensor(1.0),
          "lora_unet_conv.lokr_w1": r(2, 2), "lora_unet_conv.lokr_w2_a": r(3, 1), "lora_unet_conv.lokr_w2_b": r(1, 18),
          "lora_unet_conv.alpha": torch.tensor(2.0),
          "lora_unet_head.diff": r(3, 8), "lora_unet_head.diff_b": r(3)}
    lyc = write_safetensors(tmp_path / "lyco.safetensors", ly, {"ss_network_module": "lycoris.kohya"})
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False, lora_bias=True)
    lora, _, lora_want = _peft_case(tmp_path, "lora", cfg, _perturb_biases)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(str(base)).items()}
    full = write_safetensors(tmp_path / "ft" / "model.safetensors", ft)
    b = load_file(str(base))
    # the LyCORIS deltas by hand (P12: s * (w1a w1b) * (w2a w2b); P13: s * kron(w1, w2_a w2_b))
    ly_want = {
        "lin.weight": 0.5 * (ly["lora_unet_lin.hada_w1_a"] @ ly["lora_unet_lin.hada_w1_b"])
        * (ly["lora_unet_lin.hada_w2_a"] @ ly["lora_unet_lin.hada_w2_b"]),
        "conv.weight": 2.0 * torch.kron(ly["lora_unet_conv.lokr_w1"],
                                        ly["lora_unet_conv.lokr_w2_a"] @ ly["lora_unet_conv.lokr_w2_b"]).reshape(6, 4, 3, 3),
        "head.weight": ly["lora_unet_head.diff"], "head.bias": ly["lora_unet_head.diff_b"]}
    ft_want = {k: ft[k] - b[k] for k in b}
    return {"base": base, "lyco": lyc, "lora": lora, "full": tmp_path / "ft", "b": b,
            "deltas": {"lyco": ly_want, "lora": lora_want, "full": ft_want}}


def test_merge_run_mixes_lycoris_lora_and_full_finetune(mix, tmp_path, cli):
    w = {"lyco": 0.7, "lora": 0.5, "full": 0.3}
    r = _run_recipe(tmp_path / "r.yaml", [(n, mix[n], {"weight": w[n]}) for n in ("lyco", "lora", "full")], mix["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    got = _out_tensors(tmp_path / "out")
    for k, b in mix["b"].items():
        want = b + sum(w[n] * mix["deltas"][n].get(k, torch.zeros_like(b)) for n in w)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=k)


def test_ties_on_the_mix_equals_ties_on_the_dense_deltas(mix, tmp_path, cli):
    from mergekit_ortho.ops import registry

    r = _run_recipe(tmp_path / "r.yaml", [(n, mix[n], {"weight": 1.0, "density": 0.5}) for n in ("lyco", "lora", "full")],
                    mix["base"], method="ties")
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    got = _out_tensors(tmp_path / "out")
    op = registry.get("ties")
    k = "conv.weight"
    b = mix["b"][k]
    deltas = [mix["deltas"][n].get(k, torch.zeros_like(b)) for n in ("lyco", "lora", "full")]
    task = registry.TensorTask(name=k, base=b, inputs=deltas, params=op.resolve_params({}),
                               model_params=[op.resolve_model_params({"weight": 1.0, "density": 0.5}, n)
                                             for n in ("lyco", "lora", "full")], model_names=["lyco", "lora", "full"])
    torch.testing.assert_close(got[k], b + op.fn(task), rtol=1e-5, atol=1e-6)


def test_lora_output_approximates_non_lora_modules_by_svd_and_says_so(mix, tmp_path, cli):
    r = _run_recipe(tmp_path / "r.yaml", [("lyco", mix["lyco"], {"weight": 1.0})], mix["base"],
                    output={"format": "peft", "rank": 2})
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 2 and "head" in out + err and "format full" in out + err  # the diff_b bias has no LoRA form
    assert not (tmp_path / "out").exists()
    # LoHa + LoKr only: extracted at rank 2, the error and the approximation reported per module
    t = {k: v for k, v in load_file(str(mix["lyco"])).items() if "head" not in k}
    lyc = write_safetensors(tmp_path / "l2.safetensors", t)
    r = _run_recipe(tmp_path / "r2.yaml", [("lyco", lyc, {"weight": 1.0})], mix["base"],
                    output={"format": "peft", "rank": 2})
    code, out, err = cli("run", r, "--out", tmp_path / "out2")
    assert code == 0, out + err
    rep = json.loads((tmp_path / "out2" / "merge_report.json").read_text())
    mods = rep["modules"]
    # LoHa and LoKr have exact low-rank forms (P24): nothing is approximated on the input side;
    # only output.rank truncates the merged result (LoHa rank 2*2 = 4 > 2), and that is reported
    assert "approximated_inputs" not in mods["lin.weight"], mods["lin.weight"]
    assert 0 < mods["lin.weight"]["truncation_relative_error"] < 1, mods["lin.weight"]
    # without output.rank the merge is exact: LoHa rank r1*r2 = 4, LoKr rank(w1)*rank(w2)
    r = _run_recipe(tmp_path / "r3.yaml", [("lyco", lyc, {"weight": 1.0})], mix["base"], output={"format": "peft"})
    code, out, err = cli("run", r, "--out", tmp_path / "out3")
    assert code == 0, out + err
    from mergekit_ortho.adapters.keymap import match_to_base
    from mergekit_ortho.adapters.lora import LoraSource
    from mergekit_ortho.adapters.matched import MatchedLora

    src = LoraSource(tmp_path / "out3")
    src = MatchedLora(src, match_to_base(src, list(mix["b"]), {k: v.shape for k, v in mix["b"].items()}))
    assert src.rank(src.by_base["lin.weight"]) == 4
    want = mix["deltas"]["lyco"]["lin.weight"].double()
    got = src.delta_for("lin.weight", want.shape).double()
    assert float((got - want.double()).norm() / want.double().norm()) < 1e-6


def test_auto_output_is_full_for_non_lora_inputs(mix, tmp_path, cli):
    r = _run_recipe(tmp_path / "r.yaml", [("lyco", mix["lyco"], {"weight": 1.0}), ("lora", mix["lora"], {})],
                    mix["base"])
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, out + err
    assert (tmp_path / "out" / "config.json").exists() or list((tmp_path / "out").glob("*.safetensors"))
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_bad_inputs_exit_2_without_output(mix, tmp_path, cli):
    t = load_file(str(mix["lyco"]))
    bad = {
        "lokr": {**t, "lora_unet_conv.lokr_w1": torch.zeros(3, 2)},  # kron no longer gives the base shape
        "algo": {**t, "lora_unet_lin.glora_b9": torch.zeros(2)},
        "shape": {**t, "lora_unet_lin.hada_w1_b": torch.zeros(2, 5), "lora_unet_lin.hada_w2_b": torch.zeros(2, 5)},
    }
    for name, tensors in bad.items():
        f = write_safetensors(tmp_path / f"{name}.safetensors", tensors)
        r = _run_recipe(tmp_path / f"{name}.yaml", [("x", f, {"weight": 1.0})], mix["base"])
        code, out, err = cli("run", r, "--out", tmp_path / f"out_{name}")
        msg = (out + err).strip()
        assert code == 2, msg
        assert "Traceback" not in msg and str(f) in msg
        assert not (tmp_path / f"out_{name}").exists()
    # a bias delta on a module whose base has no bias
    model = _tiny()
    sd = {k: v for k, v in model.state_dict().items() if k != "lin.bias"}
    nob = write_safetensors(tmp_path / "nobias.safetensors", sd)
    r = _run_recipe(tmp_path / "nb.yaml", [("lora", mix["lora"], {"weight": 1.0})], nob)
    code, out, err = cli("run", r, "--out", tmp_path / "out_nb")
    assert code == 2 and "lin.bias" in out + err and not (tmp_path / "out_nb").exists()


def test_inspect_names_types_and_hyperparameters(mix, cli):
    code, out, err = cli("inspect", mix["lyco"])
    assert code == 0, out + err
    assert "LoHa" in out and "LoKr" in out and "full" in out
    code, out, err = cli("inspect", mix["lora"])
    assert code == 0 and "lora_bias" in out


def test_low_rank_operator_truncates_non_lora_inputs_and_reports_the_error(mix, tmp_path, cli):
    t = {k: v for k, v in load_file(str(mix["lyco"])).items() if "head" not in k and "conv" not in k}
    lyc = write_safetensors(tmp_path / "loha.safetensors", t)  # LoHa on lin (rank <= 4)
    models = [("lyco", lyc, {"weight": 1.0}), ("lora", mix["lora"], {"weight": 1.0})]
    r = _run_recipe(tmp_path / "r.yaml", models, mix["base"], method="core_space",
                    params={"inner_method": "mean"}, output={"format": "peft"})
    code, out, err = cli("run", r, "--out", tmp_path / "o1")
    assert code == 2 and "output.rank" in out + err and not (tmp_path / "o1").exists()
    r = _run_recipe(tmp_path / "r2.yaml", models, mix["base"], method="core_space",
                    params={"inner_method": "mean"}, output={"format": "peft", "rank": 4})
    code, out, err = cli("run", r, "--out", tmp_path / "o2")
    assert code == 2 and "lora_bias" in out + err and "not a low-rank delta" in out + err, out + err
    assert not (tmp_path / "o2").exists()  # the LoRA's bias has no LoRA form
    lora = tmp_path / "plain"
    import shutil

    shutil.copytree(mix["lora"], lora)
    sd = {k: v for k, v in load_file(str(lora / "adapter_model.safetensors")).items() if "bias" not in k}
    write_safetensors(lora / "adapter_model.safetensors", sd)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["lora_bias"] = False
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    r = _run_recipe(tmp_path / "r3.yaml", [models[0], ("lora", lora, {"weight": 1.0})], mix["base"],
                    method="core_space", params={"inner_method": "mean"}, output={"format": "peft", "rank": 4})
    code, out, err = cli("run", r, "--out", tmp_path / "o3")
    assert code == 0, out + err
    rep = json.loads((tmp_path / "o3" / "merge_report.json").read_text())["modules"]["lin.weight"]
    a = rep["approximated_inputs"]["lyco"]
    assert a["type"] == "LoHa" and 0 <= a["relative_error"] < 1e-5  # rank(LoHa r=2) <= 4: exact at rank 4


def test_model_plus_lycoris_reference_applies_the_delta(mix):
    from mergekit_ortho.planning import open_source

    src = open_source(f"{mix['base']}+{mix['lyco']}", "x")
    for k, d in mix["deltas"]["lyco"].items():
        torch.testing.assert_close(src.get(k), mix["b"][k] + d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(src.get("lin.bias"), mix["b"]["lin.bias"])
