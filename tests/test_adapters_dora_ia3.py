"""DoRA (PEFT P2, LyCORIS dora_scale P14) and IA3 (PEFT P8, LyCORIS P18) against the spec's golden
numbers, plus properties and one-line errors."""
from __future__ import annotations

import pytest
import torch

from adapter_goldens import bases, check, g, ramp
from mergekit_ortho.adapters import dora, ia3
from mergekit_ortho.errors import UserError

B = bases()
A_LIN, B_LIN = g([2, 6], 1.3, 0.5, 0.5), g([8, 2], 0.9, 0.2, 0.5)
A_CONV, B_CONV = g([2, 4, 3, 3], 1.3, 0.5, 0.5), g([6, 2, 1, 1], 0.9, 0.2, 0.5)
DORA_LIN_ROW0 = [-0.161628089, -0.147095304, 0.154679838, -0.363252312, 0.24187773, 0.627814354]


def hp(module="lin", scale=2.0, **config):
    return {"format": "peft", "config": config, "module": module, "scale": scale}


def test_peft_dora_goldens():
    t = {"lora_A": A_LIN, "lora_B": B_LIN, "lora_magnitude_vector": ramp([8])}
    d = dora.materialise_peft_dora(B["lin"], t, hp())
    check(d, 0.7158357711, 2.541347424, DORA_LIN_ROW0)
    w_new = B["lin"] + d.double()
    torch.testing.assert_close(w_new[0, :6], torch.tensor(
        [0.133892118, 0.694375681, 0.196260501, -0.0517109482, -0.633574445, -0.239387826], dtype=torch.float64),
        rtol=1e-6, atol=1e-7)
    t = {"lora_A": A_CONV, "lora_B": B_CONV, "lora_magnitude_vector": ramp([1, 6, 1, 1])}
    check(dora.materialise_peft_dora(B["conv"], t, hp("conv")), -2.068619252, 7.861325577,
          [0.0187683877, -0.256757713, -0.875587663, 0.128423996, 0.276680808, -0.0947032286])


def test_lycoris_dora_goldens():
    d_lin = 2 * B_LIN @ A_LIN
    check(dora.lycoris_dora_delta(B["lin"], d_lin, ramp([8, 1])), 0.7158357711, 2.541347424, DORA_LIN_ROW0)
    check(dora.lycoris_dora_delta(B["lin"], d_lin, ramp([1, 6])), -1.613104893, 2.66010367,
          [-0.1714942, -0.326030673, 0.154279468, -0.376049177, 0.158125816, 0.565632809])
    d_conv = (0.5 * B_CONV.reshape(6, 2) @ A_CONV.reshape(2, -1)).reshape(6, 4, 3, 3)  # alpha 1, r 2
    check(dora.lycoris_dora_delta(B["conv"], d_conv, ramp([6, 1, 1, 1])), -3.765784249, 7.406936402)
    check(dora.lycoris_dora_delta(B["conv"], d_conv, ramp([1, 4, 1, 1])), -3.925562649, 8.148165767)


def test_dora_with_the_norms_of_w_plus_delta_is_exactly_the_delta():
    torch.manual_seed(0)
    w, d = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    for axis in (0, 1):
        m = (w + d).norm(dim=1 - axis)
        torch.testing.assert_close(dora.dora_delta(w, d, m, axis).double(), d, rtol=1e-6, atol=1e-6)
    # zero LoRA factors and m = ||W0|| give a zero delta
    t = {"lora_A": torch.zeros(2, 6), "lora_B": torch.zeros(8, 2), "lora_magnitude_vector": B["lin"].norm(dim=1)}
    assert dora.materialise_peft_dora(B["lin"], t, hp()).abs().max() < 1e-6


def test_dora_fan_in_fan_out_and_embedding_scale_columns():
    t = {"lora_A": A_LIN, "lora_B": B_LIN, "lora_magnitude_vector": ramp([8])}
    d = dora.materialise_peft_dora(B["lin"].T.contiguous(), t, hp(fan_in_fan_out=True))
    torch.testing.assert_close(d.T, dora.materialise_peft_dora(B["lin"], t, hp()))
    te = {"lora_embedding_A": A_LIN, "lora_embedding_B": B_LIN, "lora_magnitude_vector": ramp([8])}
    torch.testing.assert_close(dora.materialise_peft_dora(B["lin"].T.contiguous(), te, hp()).T,
                               dora.materialise_peft_dora(B["lin"], t, hp()))


def test_dora_bad_input():
    t = {"lora_A": A_LIN, "lora_B": B_LIN, "lora_magnitude_vector": ramp([7])}
    with pytest.raises(UserError, match=r"^lin: DoRA magnitude has 7 entries but the base weight \(8, 6\) has 8 rows") as e:
        dora.materialise_peft_dora(B["lin"], t, hp())
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="lin: LoRA factors give a"):
        dora.materialise_peft_dora(B["lin8"], {**t, "lora_magnitude_vector": ramp([8])}, hp())
    with pytest.raises(UserError, match="lin: DoRA depends on the base weight"):
        dora.materialise_peft_dora(None, t, hp())
    with pytest.raises(UserError, match="x: dora_scale of shape \\(5, 1\\) fits neither"):
        dora.lycoris_dora_delta(B["lin"], torch.zeros(8, 6), torch.ones(5, 1), {"module": "x"})


def test_dora_scale_falls_back_to_alpha_over_r():
    t = {"lora_A": A_LIN, "lora_B": B_LIN, "lora_magnitude_vector": ramp([8])}
    got = dora.materialise_peft_dora(B["lin"], t, {"config": {}, "module": "lin", "scale": None, "alpha": 4.0})
    check(got, 0.7158357711, 2.541347424, DORA_LIN_ROW0)


# --- IA3 ----------------------------------------------------------------------------------------------
L_ATT, L_FF = 1 + g([8, 1], 0.3, 0.1, 0.5), 1 + g([1, 6], 0.3, 0.1, 0.5)
ATT_ROW0 = [0.014751396, 0.0420034617, 0.0020755698, 0.0155511194, -0.0436996909, -0.0432878783]
FF_ROW0 = [0.014751396, 0.163842118, 0.0200326938, 0.0521813325, 0.430045138, -0.419691025]


def test_peft_ia3_goldens():
    check(ia3.materialise_peft_ia3(B["lin"], {"ia3_l": L_ATT}, hp(feedforward_modules=["fc"])),
          -0.3371944743, 1.945536703, ATT_ROW0)
    check(ia3.materialise_peft_ia3(B["lin"], {"ia3_l": L_FF}, hp(feedforward_modules=["lin"])),
          1.29452821, 1.826767807, FF_ROW0)
    check(ia3.materialise_peft_ia3(B["conv"], {"ia3_l": 1 + g([1, 6, 1, 1], 0.3, 0.1, 0.5)}, hp("conv")),
          2.727692249, 3.814947902)
    check(ia3.materialise_peft_ia3(B["conv"], {"ia3_l": 1 + g([1, 4, 1, 1], 0.3, 0.1, 0.5)},
                                   hp("conv", feedforward_modules="conv")), -1.000543134)
    b = ia3.bias_delta(torch.cos(0.5 * torch.arange(8.0)), {"ia3_l": L_ATT}, hp())
    torch.testing.assert_close(b.double(), (L_ATT.reshape(-1) - 1) * torch.cos(0.5 * torch.arange(8.0)).double(),
                               rtol=1e-6, atol=1e-7)
    assert ia3.bias_delta(torch.ones(8), {"ia3_l": L_FF}, hp(feedforward_modules=["lin"])) is None


def test_peft_feedforward_matching_rule():
    assert ia3.peft_is_feedforward("model.layers.0.mlp.down_proj", {"feedforward_modules": ["down_proj"]})
    assert ia3.peft_is_feedforward("model.layers.0.mlp.xdown_proj", {"feedforward_modules": ["down_proj"]})  # plain endswith
    assert not ia3.peft_is_feedforward("model.layers.0.q_proj", {"feedforward_modules": ["down_proj"]})
    assert ia3.peft_is_feedforward("model.layers.0.mlp.fc2", {"feedforward_modules": r".*\.fc2"})
    assert not ia3.peft_is_feedforward("model.layers.0.mlp.fc2.x", {"feedforward_modules": r".*\.fc2"})


def test_ia3_ones_are_zero_and_fifo_transposes():
    assert ia3.materialise_peft_ia3(B["lin"], {"ia3_l": torch.ones(8, 1)}, hp()).abs().max() == 0
    d = ia3.materialise_peft_ia3(B["lin"].T.contiguous(), {"ia3_l": L_ATT}, hp(fan_in_fan_out=True))
    torch.testing.assert_close(d.T, ia3.materialise_peft_ia3(B["lin"], {"ia3_l": L_ATT}, hp()))


def test_ia3_bad_input():
    with pytest.raises(UserError, match=r"^lin: ia3_l has shape \(1, 6\), which does not fit an? attention-type module"):
        ia3.materialise_peft_ia3(B["lin"], {"ia3_l": L_FF}, hp())
    with pytest.raises(UserError, match="lin: ia3_l has 5 entries"):
        ia3.materialise_peft_ia3(B["lin"], {"ia3_l": torch.ones(5, 1)}, hp())


def test_lycoris_ia3_goldens():
    on0, on1 = torch.tensor(0.0), torch.tensor(1.0)
    w = g([8], 0.3, 0.1, 0.5)
    check(ia3.materialise_lycoris_ia3(B["lin"], {"weight": w, "on_input": on0}, {}), -0.3371944743, 1.945536703, ATT_ROW0)
    check(ia3.materialise_lycoris_ia3(B["lin"], {"weight": g([6], 0.3, 0.1, 0.5), "on_input": on1}, {}),
          1.29452821, 1.826767807, FF_ROW0)
    check(ia3.materialise_lycoris_ia3(B["conv"], {"weight": g([1, 6, 1, 1], 0.3, 0.1, 0.5), "on_input": on0}, {}),
          2.727692249)
    assert ia3.materialise_lycoris_ia3(B["lin"], {"weight": torch.zeros(8), "on_input": on0}, {}).abs().max() == 0


def test_adapter_types():
    assert {t.name for t in dora.ADAPTER_TYPES} == {"DoRA", "DoRA (embedding)"}
    assert {t.name for t in ia3.ADAPTER_TYPES} == {"IA3", "IA3 (LyCORIS)"}
    for t in dora.ADAPTER_TYPES + ia3.ADAPTER_TYPES:
        assert t.needs_base and t.required <= set(t.roles.values())
