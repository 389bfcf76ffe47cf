"""The base-dependent types against the real peft: a tiny model with Linear and Conv2d layers is
wrapped with each peft config, its adapter weights are set to non-trivial random values, the adapter
is saved (the stored keys and adapter_config.json are what the toolkit reads), and base + our delta
must equal peft's ``merge_and_unload`` weights to 1e-5 relative."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from mergekit_ortho.adapters import dora, ia3, orthogonal  # noqa: E402

TYPES = dora.ADAPTER_TYPES + orthogonal.ADAPTER_TYPES + ia3.ADAPTER_TYPES
PREFIX = "base_model.model."


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 8)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x):
        return self.fc(self.lin(x))


def _type_for(suffixes: set[str]):
    """The most specific type whose required roles are all among the module's stored suffixes."""
    fits = [t for t in TYPES if "peft" in t.formats and {s for s, r in t.roles.items() if r in t.required} <= suffixes
            and suffixes <= set(t.roles)]
    assert fits, suffixes
    return max(fits, key=lambda t: len(t.required))


def _materialised(tmp_path, config, modules):
    torch.manual_seed(0)
    base = Tiny()
    for p in base.parameters():
        nn.init.normal_(p)
    w0 = {n: p.detach().clone() for n, p in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(tmp_path)
        merged = model.merge_and_unload().state_dict()
    stored = load_file(tmp_path / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    scale = None
    if getattr(config, "lora_alpha", None):
        scale = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    for module in modules:
        keys = {k[len(PREFIX) + len(module):]: v for k, v in stored.items() if k.startswith(PREFIX + module + ".")}
        t = _type_for(set(keys))
        tensors = {t.roles[s]: v.float() for s, v in keys.items()}
        hp = {"format": "peft", "config": cfg, "module": module, "scale": scale, "alpha": None, "rank": None}
        delta = t.materialise(w0[module + ".weight"], tensors, hp)
        got = w0[module + ".weight"] + delta
        want = merged[module + ".weight"]
        err = (got - want).norm() / want.norm()
        assert err < 1e-5, (module, t.name, float(err))
        assert (want - w0[module + ".weight"]).abs().max() > 1e-3  # the adapter did something
        if t.name == "IA3" and module + ".bias" in w0:
            bd = t.extra["bias"](w0[module + ".bias"], tensors, hp)
            b_got = w0[module + ".bias"] + (0 if bd is None else bd)
            torch.testing.assert_close(b_got, merged[module + ".bias"], rtol=1e-5, atol=1e-6)


CASES = {
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "conv"], use_dora=True),
    "dora rslora embedding": lambda: peft.LoraConfig(r=4, lora_alpha=3, target_modules=["emb", "fc"], use_dora=True,
                                                     use_rslora=True),
    "oft neumann": lambda: peft.OFTConfig(oft_block_size=2, r=0, target_modules=["lin", "conv"]),
    "oft exact coft": lambda: peft.OFTConfig(oft_block_size=3, r=0, target_modules=["lin"], use_cayley_neumann=False,
                                             coft=True, eps=0.05),
    "oft block_share": lambda: peft.OFTConfig(oft_block_size=2, r=0, target_modules=["lin", "conv"],
                                              use_cayley_neumann=False, block_share=True),
    "boft": lambda: peft.BOFTConfig(boft_block_size=2, target_modules=["lin", "conv"]),
    "hra": lambda: peft.HRAConfig(r=2, target_modules=["lin", "conv"]),
    "hra gs": lambda: peft.HRAConfig(r=2, target_modules=["lin", "conv"], apply_GS=True),
    "ia3": lambda: peft.IA3Config(target_modules=["lin", "conv", "fc"], feedforward_modules=["fc"]),
    "ia3 conv ff": lambda: peft.IA3Config(target_modules=["lin", "conv"], feedforward_modules=["conv"]),
}
MODULES = {"dora rslora embedding": ["emb", "fc"], "ia3": ["lin", "conv", "fc"], "oft exact coft": ["lin"]}


@pytest.mark.parametrize("case", list(CASES))
def test_against_peft_merge_and_unload(tmp_path, case):
    _materialised(tmp_path, CASES[case](), MODULES.get(case, ["lin", "conv"]))
