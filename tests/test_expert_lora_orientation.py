"""Both orientations PEFT gives a 3-D expert parameter (``is_transposed`` modules store [E, in, out],
the others [E, out, in]) and a 2-D parameter target merge as peft's ``merge_and_unload`` does:
a tiny module with its own parameters, no transformers model needed."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe


def _module(transposed: bool):
    from torch import nn

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.is_transposed = transposed
            self.up = nn.Parameter(torch.randn(3, 8, 12))  # transposed: [E, in, out]; else [E, out, in]
            self.proj = nn.Parameter(torch.randn(5, 8))  # a 2-D parameter, [out, in]

        def forward(self, x):
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return x

    return Model()


@pytest.mark.parametrize("transposed,names", [(True, ["experts.up", "experts.proj"]), (False, ["experts.up", "experts.proj"]),
                                              (False, ["up", "proj"])])  # bare names match any module
def test_orientation_and_2d_parameters_merge_as_peft(cli, tmp_path, transposed, names):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _module(transposed)
    (tmp_path / "base").mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "toy"}))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names,
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "lora")
    want = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    r = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\n"
                                          f"models:\n  - model: {tmp_path / 'lora'}\n    parameters: {{weight: 1.0}}\n")
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert not torch.allclose(want[k], base[k])
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
