"""LyCORIS / PEFT LoHa, LoKr, Tucker LoCon, full and norm modules read from files and
materialised: the golden numbers of ../shared/specs/adapters.md P3, P4, P11-P13, P18 (P0 inputs),
plus the validation lines (one line each, naming the file and the module)."""
from __future__ import annotations

import pytest
import torch

from mergekit_ortho.adapters.detect import detect_lora
from mergekit_ortho.adapters.keymap import match_to_base
from mergekit_ortho.adapters.lora import LoraSource
from mergekit_ortho.adapters.matched import MatchedLora
from mergekit_ortho.errors import UserError
from mergekit_ortho.testing.checkpoints import write_safetensors
from mergekit_ortho.testing.goldens import base, base_bias, tensor
from mergekit_ortho.testing.loras import write_peft_dir

BASE_SHAPES = {"lin.weight": (8, 6), "lin.bias": (8,), "conv.weight": (6, 4, 3, 3), "conv.bias": (6,),
               "lin16.weight": (16, 16), "lin16.bias": (16,), "norm.weight": (8,), "norm.bias": (8,)}


def _base_tensors():
    t = {"lin.weight": base("lin"), "lin.bias": base_bias("lin"), "conv.weight": base("conv"),
         "conv.bias": base_bias("conv"), "lin16.weight": base("lin16"), "lin16.bias": base_bias("lin16"),
         "norm.weight": torch.ones(8, dtype=torch.float64), "norm.bias": torch.zeros(8, dtype=torch.float64)}
    return t


class _Base:  # a base source for MatchedLora (float64 goldens, read as float32 like a checkpoint)
    def __init__(self):
        self.t = _base_tensors()

    def get(self, key):
        return self.t[key].clone()


def _tensors(module: str, shapes: dict[str, tuple], dtype=torch.float64) -> dict[str, torch.Tensor]:
    """{<module>.<name>: g(shape)} with the P0 parameters of each stored name."""
    out = {}
    for name, shape in shapes.items():
        short = name.removesuffix(".weight")
        out[f"{module}.{name}"] = tensor(short, shape).to(dtype)
    return out


def _delta(path, base_key: str):
    src = LoraSource(path)
    m = MatchedLora(src, match_to_base(src, list(BASE_SHAPES), BASE_SHAPES), _Base())
    return m.delta_for(base_key, BASE_SHAPES[base_key]).double(), src


def _check(d, total, fro, row0):
    flat = d.reshape(d.shape[0], -1)
    assert float(flat.sum()) == pytest.approx(total, rel=1e-5, abs=1e-7)
    assert float(flat.norm()) == pytest.approx(fro, rel=1e-5)
    torch.testing.assert_close(flat[0, :6], torch.tensor(row0, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def _kohya(tmp_path, module, shapes, alpha=None, name="a.safetensors", extra=None):
    t = _tensors(f"lora_unet_{module}", shapes)
    if alpha is not None:
        t[f"lora_unet_{module}.alpha"] = torch.tensor(float(alpha))
    t.update(extra or {})
    return write_safetensors(tmp_path / name, t, {"ss_network_module": "lycoris.kohya"})


def _peft(tmp_path, module, shapes, config, name="peft"):
    return write_peft_dir(tmp_path / name, _tensors(f"base_model.model.{module}", shapes), config)


LOHA_LIN = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 2), "hada_w2_b": (2, 6)}
LOHA_CONV_TUCKER = {"hada_w1_a": (2, 6), "hada_w1_b": (2, 4), "hada_w2_a": (2, 6), "hada_w2_b": (2, 4),
                    "hada_t1": (2, 2, 3, 3), "hada_t2": (2, 2, 3, 3)}
LOHA_LIN_GOLD = (-0.3627080407, 0.4637798005, [-0.0320999911, 0.00766146444, -0.0245628918, 0.0134988727,
                                                0.00320746356, -0.0169786214])
LOKR_LIN = {"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 3)}
LOKR_LIN_GOLD = (0.5781413331, 0.4908800707, [0.0366158725, 0.068195632, -0.037708931, 0.0498580875, 0.09285874,
                                              -0.0513464531])
LOKR_FULL = {"lokr_w1": (2, 2), "lokr_w2": (4, 3)}
LOKR_BOTH16 = {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}
LOKR_CONV_TUCKER = {"lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 3), "lokr_w2_b": (1, 2)}
LOKR_CONV_TUCKER_GOLD = (0.6830781836, 0.2543690195, [0.00553985707, 0.0091496276, -0.0080228555, 0.00633799522,
                                                      0.0066801523, -0.00722063437])


# -- P3 / P12 LoHa -----------------------------------------------------------------------------------


def test_peft_loha_goldens(tmp_path):
    cfg = {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["lin", "conv"]}
    p = _peft(tmp_path, "lin", LOHA_LIN, cfg, "lin")
    assert detect_lora(p) == "peft"
    d, src = _delta(p, "lin.weight")
    assert src.type_name("base_model.model.lin") == "LoHa" and not src.is_factors("base_model.model.lin")
    _check(d, *LOHA_LIN_GOLD)
    flat = {"hada_w1_a": (6, 2), "hada_w1_b": (2, 36), "hada_w2_a": (6, 2), "hada_w2_b": (2, 36)}
    d, _ = _delta(_peft(tmp_path, "conv", flat, cfg, "conv"), "conv.weight")
    _check(d, -0.2433192789, 0.663004046, [-0.000285787483, -0.013782648, 0.0189422148, 0.00924674942,
                                           0.0290953817, 0.00614832533])
    d, _ = _delta(_peft(tmp_path, "conv", LOHA_CONV_TUCKER, cfg, "tucker"), "conv.weight")
    _check(d, 0.02442446807, 0.1195123104, [-0.0104172107, -0.00728460302, -0.00217047043, -0.000321560027,
                                            0.00153890589, 0.0150844339])


def test_lycoris_loha_goldens(tmp_path):
    d, src = _delta(_kohya(tmp_path, "lin", LOHA_LIN, alpha=4), "lin.weight")
    assert src.format == "kohya"
    _check(d, *LOHA_LIN_GOLD)  # the forward's scale, applied once (not get_diff_weight's twice)
    d, _ = _delta(_kohya(tmp_path, "conv", LOHA_CONV_TUCKER, alpha=1, name="t.safetensors"), "conv.weight")
    _check(d, 0.006106117019, 0.02987807759, [-0.00260430267, -0.00182115076, -0.000542617608, -8.03900067e-05,
                                              0.000384726472, 0.00377110847])


# -- P4 / P13 LoKr -----------------------------------------------------------------------------------


def test_peft_lokr_goldens(tmp_path):
    d, _ = _delta(_peft(tmp_path, "lin", LOKR_LIN, {"peft_type": "LOKR", "r": 1, "alpha": 2}, "a"), "lin.weight")
    _check(d, *LOKR_LIN_GOLD)
    # both factors full: PEFT still scales by alpha / r (r = 4 from the config)
    d, _ = _delta(_peft(tmp_path, "lin", LOKR_FULL, {"peft_type": "LOKR", "r": 4, "alpha": 2}, "b"), "lin.weight")
    _check(d, -0.4141868134, 0.4621953587, [0.0276126041, 0.0659672122, 0.0277330454, 0.0375987662, 0.0898244071,
                                            0.0377627654])
    d, _ = _delta(_peft(tmp_path, "lin16", LOKR_BOTH16, {"peft_type": "LOKR", "r": 1, "alpha": 1}, "c"), "lin16.weight")
    _check(d, 0.1316616389, 0.1807492928, [0.000525345273, 0.000978435045, -0.0005410279, 0.000986234451,
                                           0.00149336542, 0.00278133475])
    d, _ = _delta(_peft(tmp_path, "conv", LOKR_CONV_TUCKER, {"peft_type": "LOKR", "r": 1, "alpha": 1}, "d"),
                  "conv.weight")
    _check(d, *LOKR_CONV_TUCKER_GOLD)


def test_lycoris_lokr_goldens(tmp_path):
    d, _ = _delta(_kohya(tmp_path, "lin", LOKR_LIN, alpha=2, name="a.safetensors"), "lin.weight")
    _check(d, *LOKR_LIN_GOLD)
    # full-matrix mode: scale 1 whatever .alpha says (2x the PEFT row)
    d, _ = _delta(_kohya(tmp_path, "lin", LOKR_FULL, alpha=2, name="b.safetensors"), "lin.weight")
    _check(d, -0.8283736268, 0.9243907173, [0.0552252081, 0.131934424, 0.0554660907, 0.0751975324, 0.179648814,
                                            0.0755255308])
    d, _ = _delta(_kohya(tmp_path, "lin16", LOKR_BOTH16, alpha=2, name="c.safetensors"), "lin16.weight")
    _check(d, 0.2633232778, 0.3614985857, [0.00105069055, 0.00195687009, -0.0010820558, 0.0019724689,
                                           0.00298673085, 0.00556266951])
    d, _ = _delta(_kohya(tmp_path, "conv", LOKR_CONV_TUCKER, alpha=1, name="d.safetensors"), "conv.weight")
    _check(d, *LOKR_CONV_TUCKER_GOLD)
    plain = {"lokr_w1": (2, 2), "lokr_w2_a": (3, 1), "lokr_w2_b": (1, 18)}
    d, _ = _delta(_kohya(tmp_path, "conv", plain, alpha=1, name="e.safetensors"), "conv.weight")
    _check(d, 2.277503341, 0.6972060676, [0.0183079363, 0.034097816, -0.0188544655, 0.0343696201, 0.0204549936,
                                          0.0347731934])


# -- P11 LoCon ---------------------------------------------------------------------------------------


def test_locon_goldens(tmp_path):
    # plain k x k LoCon stays exact factors
    p = _kohya(tmp_path, "conv", {"lora_down.weight": (2, 4, 3, 3), "lora_up.weight": (6, 2, 1, 1)}, alpha=1)
    d, src = _delta(p, "conv.weight")
    assert src.is_factors("lora_unet_conv")
    _check(d, 2.463757133, 1.421309128, [0.121803696, 0.122594001, -0.105719873, -0.118739371, 0.0930320883,
                                         -0.0509802865])
    tucker = {"lora_down.weight": (2, 4, 1, 1), "lora_mid.weight": (2, 2, 3, 3), "lora_up.weight": (6, 2, 1, 1)}
    d, src = _delta(_kohya(tmp_path, "conv", tucker, alpha=1, name="t.safetensors"), "conv.weight")
    assert src.type_name("lora_unet_conv") == "LoCon (Tucker)"
    _check(d, -2.456973391, 0.6807749075, [-0.0262928736, -0.0183376782, 0.0299895508, 0.0359923442, 0.0033750264,
                                           -0.0466497037])
    # rs_lora: LyCORIS stores alpha * sqrt(r) (alpha 4, r 4 -> 8); the reader's alpha / r gives rsLoRA's scale
    d, _ = _delta(_kohya(tmp_path, "lin", {"lora_down.weight": (4, 6), "lora_up.weight": (8, 4)}, alpha=8,
                         name="rs.safetensors"), "lin.weight")
    assert float(d.sum()) == pytest.approx(0.3844718709, rel=1e-5)


# -- P18 full and norm -------------------------------------------------------------------------------


def test_full_and_norm_diffs(tmp_path):
    t = _tensors("lora_unet_lin", {"diff": (8, 6), "diff_b": (8,)})
    t.update(_tensors("lora_unet_norm", {"w_norm": (8,), "b_norm": (8,)}))
    p = write_safetensors(tmp_path / "full.safetensors", t)
    src = LoraSource(p)
    m = MatchedLora(src, match_to_base(src, list(BASE_SHAPES), BASE_SHAPES), _Base())
    assert dict(m.by_base) == {"lin.weight": "lora_unet_lin", "lin.bias": "lora_unet_lin|bias",
                               "norm.weight": "lora_unet_norm", "norm.bias": "lora_unet_norm|bias"}
    for key, name in [("lin.weight", "diff"), ("lin.bias", "diff_b"), ("norm.weight", "w_norm"),
                      ("norm.bias", "b_norm")]:
        torch.testing.assert_close(m.delta_for(key, BASE_SHAPES[key]).double(),
                                   tensor(name, BASE_SHAPES[key]), rtol=1e-6, atol=1e-7)
    assert src.one_dimensional("lora_unet_lin|bias") and not src.one_dimensional("lora_unet_lin")


# -- validation --------------------------------------------------------------------------------------


def _refused(fn, *parts):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


def test_lokr_factors_that_do_not_multiply_to_the_base_shape(tmp_path):
    p = _kohya(tmp_path, "lin", {"lokr_w1": (2, 2), "lokr_w2": (3, 3)}, alpha=1)  # 6x6, base is 8x6
    src = LoraSource(p)
    _refused(lambda: match_to_base(src, list(BASE_SHAPES), BASE_SHAPES), "LoKr", "lora_unet_lin", str(p),
             "do not multiply to the base shape")


def test_bad_lycoris_modules_are_one_line_errors(tmp_path):
    # an unknown LyCORIS algorithm's tensor
    p = _kohya(tmp_path, "lin", {"lora_down.weight": (2, 6), "lora_up.weight": (8, 2)},
               extra={"lora_unet_lin.glora_x": torch.zeros(2)}, name="u.safetensors")
    _refused(lambda: detect_lora(p), "unrecognised tensor 'lora_unet_lin.glora_x'", str(p))
    # a LoHa whose two products differ in shape
    p = _kohya(tmp_path, "lin", {**LOHA_LIN, "hada_w2_b": (2, 5)}, alpha=1, name="s.safetensors")
    _refused(lambda: detect_lora(p), "LoHa", "lora_unet_lin", "hada_w2_b")
    # a LoHa that fits no base tensor
    p = _kohya(tmp_path, "lin", {k: (v[0], 7) if k.endswith("_b") else v for k, v in LOHA_LIN.items()}, alpha=1,
               name="m.safetensors")
    src = LoraSource(p)
    _refused(lambda: match_to_base(src, list(BASE_SHAPES), BASE_SHAPES), "shape mismatch", "lora_unet_lin", "[8, 6]")
    # a Tucker core that does not chain
    p = _kohya(tmp_path, "conv", {"lora_down.weight": (2, 4, 1, 1), "lora_mid.weight": (3, 3, 3, 3),
                                  "lora_up.weight": (6, 2, 1, 1)}, alpha=1, name="t.safetensors")
    _refused(lambda: detect_lora(p), "LoCon Tucker", "lora_mid")
    # PEFT LoKr with both factors full needs r from the config
    p = _peft(tmp_path, "lin", LOKR_FULL, {"peft_type": "LOKR", "alpha": 2}, "nor")
    _refused(lambda: _delta(p, "lin.weight"), "LoKr", "no r")


def test_mixed_algorithms_in_one_file(tmp_path):
    t = _tensors("lora_unet_lin", LOKR_LIN)
    t["lora_unet_lin.alpha"] = torch.tensor(2.0)
    t.update(_tensors("lora_unet_conv", {"lora_down.weight": (2, 4, 3, 3), "lora_up.weight": (6, 2, 1, 1)}))
    t["lora_unet_conv.alpha"] = torch.tensor(1.0)
    t.update(_tensors("lora_unet_lin16", LOKR_BOTH16))
    t["lora_unet_lin16.alpha"] = torch.tensor(2.0)
    p = write_safetensors(tmp_path / "mix.safetensors", t)
    d, src = _delta(p, "lin.weight")
    _check(d, *LOKR_LIN_GOLD)
    assert src.is_factors("lora_unet_conv") and src.dense_modules() == ["lora_unet_lin", "lora_unet_lin16"]
    from mergekit_ortho.adapters.describe import describe_lora

    info = describe_lora(p)
    assert info["types"] == {"LoKr": 2, "LoRA": 1}
    assert info["hyperparameters"]["LoKr"]["alphas"] == {2.0: 2}
