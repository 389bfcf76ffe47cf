"""OFT (four PEFT generations), PEFT BOFT, HRA, LyCORIS diag-OFT/BOFT against the golden numbers of
../shared/specs/adapters.md P5-P7, P15, P16, plus orthogonality / zero-adapter properties and
one-line errors."""
from __future__ import annotations

import pytest
import torch

from adapter_goldens import bases, check, g
from mergekit_ortho.adapters import orthogonal as o
from mergekit_ortho.adapters import orthogonal_lycoris as ol
from mergekit_ortho.errors import UserError

B = bases()
THETA = g([2, 3], 0.43, 0.3, 0.2)


def hp(**config):
    return {"format": "peft", "config": config, "module": "lin"}


# --- P5: PEFT OFT ------------------------------------------------------------------------------------
OFT_GOLDENS = [
    ("0.21 neumann", {"oft_R": THETA}, dict(peft_version="0.21.2", use_cayley_neumann=True),
     -1.979405153, 2.157846883, [0.0538881121, -0.0922134605, -0.372348146, -0.114381793, 0.50047943, -0.323223295]),
    ("0.17 neumann", {"oft_R": THETA}, dict(use_cayley_neumann=True, num_cayley_neumann_terms=5),
     -1.974813979, 2.150119486, [0.055288859, -0.0901885786, -0.372048509, -0.107476947, 0.496067766, -0.327248618]),
    ("exact", {"oft_R": THETA}, dict(use_cayley_neumann=False, peft_version="0.21.2"),
     1.521752113, 2.165241794, [-0.154394665, -0.052583398, 0.351960338, -0.161259028, -0.328147301, 0.48736317]),
    ("exact 0.17", {"oft_R": THETA}, dict(use_cayley_neumann=False),
     1.521752113, 2.165241794, [-0.154394665, -0.052583398, 0.351960338, -0.161259028, -0.328147301, 0.48736317]),
    ("coft", {"oft_R": THETA}, dict(use_cayley_neumann=False, coft=True, eps=1e-3),
     0.003985132523, 0.004062432961,
     [-0.000238707116, 4.26804692e-05, 0.000823930303, -4.75964734e-05, -0.000740075038, 0.000730641543]),
    ("block_share", {"oft_R": g([1, 3], 0.43, 0.3, 0.2)}, dict(use_cayley_neumann=False, block_share=True),
     2.061663404, 1.839285193, [-0.154394665, -0.052583398, 0.351960338, 0.327550638, 0.389983531, -0.118391936]),
    ("0.15", {"oft_r": g([2, 3, 3], 0.43, 0.3, 0.2), "oft_s": 1 + g([8, 1], 0.3, 0.1, 0.1)}, dict(r=2),
     0.8614504, 1.474899783, [-0.245233602, 0.0369923921, -0.238820356, 0.0935046797, 0.105938382, -0.0771059534]),
    ("0.13", {"oft_r": g([2, 4, 4], 0.43, 0.3, 0.2)}, dict(r=2),
     -2.757451514, 1.470107013, [0.00016991576, -0.123234417, -0.048010224, 0.00381651941, -0.0431447652, 0.109074453]),
]


@pytest.mark.parametrize("name,tensors,config,total,fro,row0", OFT_GOLDENS, ids=[c[0] for c in OFT_GOLDENS])
def test_peft_oft_goldens(name, tensors, config, total, fro, row0):
    delta = o.materialise_oft(B["lin"], tensors, hp(**config))  # the spec's inputs are float64
    assert delta.dtype == torch.float32 and delta.shape == B["lin"].shape
    check(delta, total, fro, row0)


def test_neumann_series_term_rules():
    q = o.skew_from_triangle(THETA, 3)
    eye = torch.eye(3, dtype=q.dtype)
    new = o.neumann_rotation(q, 5, new_series=True)
    old = o.neumann_rotation(q, 5, new_series=False)
    q2 = q @ q
    torch.testing.assert_close(new, eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2, rtol=0, atol=1e-14)
    torch.testing.assert_close(old, eye + 2 * q + 2 * q2 + 2 * q2 @ q + 2 * q2 @ q2, rtol=0, atol=1e-14)
    # the series approximates (I + Q)(I - Q)^-1, the transpose of the exact (I - Q)(I + Q)^-1
    small = 1e-3 * q
    exact_t = torch.linalg.solve(eye - small, eye + small, left=False)
    assert torch.allclose(o.neumann_rotation(small, 12, True), exact_t, atol=1e-14)


def test_skew_triangle_order():
    q = o.skew_from_triangle(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), 3)[0]
    assert q.tolist() == [[0, 1, 2], [-1, 0, 3], [-2, -3, 0]]


def test_oft_conv_rotates_flat_input_features():
    theta = g([18, 1], 0.43, 0.3, 0.2)  # block 2 on 4*3*3 = 36
    delta = o.materialise_oft(B["conv"], {"oft_R": theta}, hp(use_cayley_neumann=False))
    q = o.skew_from_triangle(theta, 2)
    rot = torch.block_diag(*torch.linalg.solve(torch.eye(2) + q, torch.eye(2) - q, left=False).unbind(0))
    expect = (B["conv"].reshape(6, 36) @ rot.T).reshape(6, 4, 3, 3) - B["conv"]
    torch.testing.assert_close(delta.double(), expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", [dict(use_cayley_neumann=False), dict(use_cayley_neumann=True, peft_version="0.21")])
def test_oft_zero_adapter_is_zero_delta(config):
    assert o.materialise_oft(B["lin"], {"oft_R": torch.zeros(2, 3)}, hp(**config)).abs().max() == 0
    assert o.materialise_oft(B["lin"], {"oft_r": torch.zeros(2, 3, 3), "oft_s": torch.ones(8, 1)}, hp()).abs().max() == 0
    assert o.materialise_oft(B["lin"], {"oft_r": torch.zeros(2, 4, 4)}, hp()).abs().max() == 0


def test_exact_oft_rotations_are_orthogonal():
    torch.manual_seed(0)
    for b in (2, 3, 5, 8):
        theta = torch.randn(4, b * (b - 1) // 2, dtype=torch.float64)
        rot = o.oft_rotation_v16(theta, hp(use_cayley_neumann=False))
        eye = torch.eye(b, dtype=torch.float64).expand_as(rot)
        assert (rot.transpose(1, 2) @ rot - eye).abs().max() < 1e-6
        a = torch.randn(3, b, b, dtype=torch.float64)
        rot = o.oft_rotation_v15(a, hp(), 8, 3)
        assert (rot.transpose(1, 2) @ rot - torch.eye(b, dtype=torch.float64)).abs().max() < 1e-6


def test_oft_bad_block_size_is_one_line_user_error():
    with pytest.raises(UserError, match=r"^lin: OFT block size 4 does not divide the 6 features") as e:
        o.materialise_oft(B["lin"], {"oft_R": torch.zeros(2, 6)}, hp())
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="lin: .*stores 4 blocks"):
        o.materialise_oft(B["lin"], {"oft_R": torch.zeros(4, 1)}, hp())
    with pytest.raises(UserError, match="lin: .*b\\(b-1\\)/2"):
        o.materialise_oft(B["lin"], {"oft_R": torch.zeros(2, 4)}, hp())
    with pytest.raises(UserError, match="lin: oft_s has 6 entries"):
        o.materialise_oft(B["lin"], {"oft_r": torch.zeros(2, 3, 3), "oft_s": torch.ones(6, 1)}, hp())
    with pytest.raises(UserError, match="lin: OFT depends on the base weight"):
        o.materialise_oft(None, {"oft_R": torch.zeros(2, 3)}, hp())


# --- P6: PEFT BOFT ------------------------------------------------------------------------------------
def test_peft_boft_golden_one_factor():
    t = {"boft_R": g([1, 2, 3, 3], 0.43, 0.3, 0.2), "boft_s": 1 + g([8, 1], 0.3, 0.1, 0.1)}
    check(o.materialise_boft(B["lin"], t, hp()), 0.8614504, 1.474899783,
          [-0.245233602, 0.0369923921, -0.238820356, 0.0935046797, 0.105938382, -0.0771059534])


def test_peft_boft_golden_two_factors():
    assert o.butterfly_permutation(8, 4, 2, 0) == list(range(8))
    assert o.butterfly_permutation(8, 4, 2, 1) == [0, 2, 1, 3, 4, 6, 5, 7]
    t = {"boft_R": g([2, 4, 2, 2], 0.43, 0.3, 0.2), "boft_s": 1 + g([8, 1], 0.3, 0.1, 0.1)}
    check(o.materialise_boft(B["lin8"], t, hp()), -0.03973356466, 1.278082418,
          [0.0019626421, -0.0152372019, -0.411366872, 0.00317488937, 0.361926895, -0.0178748284])


def test_peft_boft_is_orthogonal_and_zero_init_is_zero():
    torch.manual_seed(1)
    m = o.boft_matrix(torch.randn(3, 4, 4, 4, dtype=torch.float64), hp(), 16)
    assert (m.T @ m - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-6
    t = {"boft_R": torch.zeros(1, 2, 2, 2), "boft_s": torch.ones(1, 6)}
    assert o.materialise_boft(B["conv"][:, :, :1, :1].contiguous(), t, hp()).abs().max() == 0


def test_peft_boft_bad_shapes():
    with pytest.raises(UserError, match="lin: BOFT block size 4 x 2 blocks does not match the base weight's 6"):
        o.materialise_boft(B["lin"], {"boft_R": torch.zeros(1, 2, 4, 4), "boft_s": torch.ones(8, 1)}, hp())
    with pytest.raises(UserError, match="lin: boft_s has 6 entries"):
        o.materialise_boft(B["lin"], {"boft_R": torch.zeros(1, 2, 3, 3), "boft_s": torch.ones(6, 1)}, hp())


# --- P7: HRA ------------------------------------------------------------------------------------------
def test_hra_goldens():
    u = g([6, 2], 0.29, 0.4, 1.0)
    check(o.materialise_hra(B["lin"], {"hra_u": u}, hp(apply_GS=False)), -3.190798332, 6.130923733,
          [-1.18208944, -0.862507457, -0.778335695, -0.622052963, 1.29415614, 1.76812544])
    check(o.materialise_hra(B["conv"], {"hra_u": g([36, 2], 0.29, 0.4, 1.0)}, hp()), -0.3119263656, 6.130436535,
          [-0.159566073, 0.110536365, -0.486576007, -0.462190105, 0.344821919, 0.137184701])
    check(o.materialise_hra(B["lin"], {"hra_u": u}, hp(apply_GS=True)), -2.587709611, 6.275473277,
          [-1.23959718, -1.13675542, -0.425739831, -0.265221093, 1.18299634, 1.95801254])


def test_hra_is_orthogonal_low_rank_and_order_matters():
    torch.manual_seed(2)
    u = torch.randn(10, 3, dtype=torch.float64)
    for gs in (False, True):
        h = o.householder_matrix(u, gs, hp())
        assert (h.T @ h - torch.eye(10, dtype=torch.float64)).abs().max() < 1e-6
        assert torch.linalg.matrix_rank(h - torch.eye(10, dtype=torch.float64)) <= 3
    assert not torch.allclose(o.householder_matrix(u, False, hp()), o.householder_matrix(u.flip(1), False, hp()))


def test_hra_bad_input():
    with pytest.raises(UserError, match="lin: hra_u has shape \\(5, 2\\)"):
        o.materialise_hra(B["lin"], {"hra_u": torch.ones(5, 2)}, hp())
    with pytest.raises(UserError, match="lin: hra_u has an all-zero column"):
        o.materialise_hra(B["lin"], {"hra_u": torch.zeros(6, 2)}, hp())
    with pytest.raises(UserError, match="lin: hra_u columns are linearly dependent"):
        o.materialise_hra(B["lin"], {"hra_u": torch.ones(6, 2)}, hp(apply_GS=True))


# --- P15/P16: LyCORIS diag-OFT and BOFT (float32 goldens: atol 1e-6) ------------------------------------
def ly(**extra):
    return {"format": "lycoris", "config": {}, "module": "lora_unet_x", **extra}


def test_lycoris_diag_oft_goldens():
    blocks = g([4, 2, 2], 0.43, 0.3, 0.2).float()
    check(ol.materialise_lycoris_oft(B["lin"].float(), {"oft_blocks": blocks}, ly(alpha=0.0)),
          -0.6211146638, 1.23339539,
          [0.032232672, -0.00764065981, 0.0837626457, 0.0393617153, 0.0903253555, -0.0126513243], atol=1e-6)
    t = {"oft_blocks": blocks, "rescale": (1 + g([8, 1], 0.3, 0.1, 0.1)).float(), "alpha": torch.tensor(0.01)}
    check(ol.materialise_lycoris_oft(B["lin"].float(), t, ly()), -0.163740892, 0.4869152147,
          [0.0102023184, 0.00736290216, 0.0187180191, 0.011929363, 0.0103091598, -0.0120654702], atol=1e-6)
    check(ol.materialise_lycoris_oft(B["conv"].float(), {"oft_blocks": g([3, 2, 2], 0.43, 0.3, 0.2).float()}, ly()),
          -0.04848839343, 2.295391567, atol=1e-6)


def test_lycoris_boft_goldens():
    check(ol.materialise_lycoris_oft(B["lin"].float(), {"oft_blocks": g([3, 4, 2, 2], 0.43, 0.3, 0.2).float()}, ly()),
          0.3515966982, 3.271250998,
          [-0.459421039, 0.472662568, -0.172111854, -0.5937078, 0.592114508, 0.300580502], atol=1e-6)
    t = {"oft_blocks": g([2, 2, 4, 4], 0.43, 0.3, 0.2).float(), "rescale": (1 + g([8, 1], 0.3, 0.1, 0.1)).float()}
    check(ol.materialise_lycoris_oft(B["lin"].float(), t, ly()), -6.322737999, 4.498572599, atol=1e-6)
    assert ol.lycoris_oft_kind({"oft_blocks": (3, 4, 2, 2)}) == "BOFT"
    assert ol.lycoris_oft_kind({"oft_blocks": (4, 2, 2)}) == "diag-OFT"


def test_lycoris_rotations_preserve_row_space_norms_and_zero_is_zero():
    torch.manual_seed(3)
    w = torch.randn(16, 5, dtype=torch.float64)
    for blocks in (torch.randn(4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)):
        d = ol.materialise_lycoris_oft(w, {"oft_blocks": blocks}, ly()).double()
        # an orthogonal map on the rows keeps every column's norm
        torch.testing.assert_close((w + d).norm(dim=0), w.norm(dim=0), rtol=1e-5, atol=1e-6)
        assert ol.materialise_lycoris_oft(w, {"oft_blocks": torch.zeros_like(blocks)}, ly()).abs().max() == 0


def test_lycoris_oft_bad_shapes():
    with pytest.raises(UserError, match="lora_unet_x: diag-OFT oft_blocks \\(3, 2, 2\\) cover 6 rows, the base weight has 8"):
        ol.materialise_lycoris_oft(B["lin"], {"oft_blocks": torch.zeros(3, 2, 2)}, ly())
    with pytest.raises(UserError, match="lora_unet_x: rescale has 6 entries"):
        ol.materialise_lycoris_oft(B["lin"], {"oft_blocks": torch.zeros(4, 2, 2), "rescale": torch.ones(6, 1)}, ly())
    with pytest.raises(UserError, match="lora_unet_x: oft_blocks has shape"):
        ol.materialise_lycoris_oft(B["lin"], {"oft_blocks": torch.zeros(8, 2)}, ly())


def test_adapter_types_roles():
    names = {t.name: t for t in o.ADAPTER_TYPES}
    assert set(names) == {"OFT", "OFT (peft 0.14-0.15)", "OFT (peft <= 0.13)", "BOFT", "HRA", "diag-OFT/BOFT (LyCORIS)"}
    assert names["OFT"].roles == {".oft_R.weight": "oft_R"}
    assert all(t.needs_base and t.required <= set(t.roles.values()) for t in o.ADAPTER_TYPES)
