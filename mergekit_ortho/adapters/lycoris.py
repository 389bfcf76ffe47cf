"""LyCORIS module types (and PEFT's LoHa / LoKr, which store the same tensors): dense deltas.

Spec: ../shared/specs/adapters.md P3 (PEFT LoHa), P4 (PEFT LoKr), P11 (LoCon with Tucker
``lora_mid``), P12 (LoHa), P13 (LoKr), P18 (full ``diff`` / ``diff_b``, norm ``w_norm`` /
``b_norm``). Every type here is independent of the base weight (``needs_base`` false).

Math (s = the module's scale; ``flat`` = reshape to [out, in*kh*kw]):

* LoCon Tucker: dW[o,n,y,x] = s * sum_ij up[o,i] mid[i,j,y,x] down[j,n]; s = alpha / r,
  r = down.shape[0], a missing alpha means alpha = r (P11).
* LoHa: dW = s * (w1_a w1_b) * (w2_a w2_b) (elementwise); Tucker (``hada_t1``): the n-th factor is
  T_n[o,i,y,x] = sum_pq t_n[p,q,y,x] w_n_a[p,o] w_n_b[q,i]; s = alpha / r, r = w1_b.shape[0]; the
  scale is applied once (LyCORIS's forward, not its ``get_diff_weight``, P12).
* LoKr: dW = s * kron(w1, w2) with w1 = ``lokr_w1`` or w1_a w1_b, w2 = ``lokr_w2`` or w2_a w2_b, or
  Tucker sum_ij t2[i,j,y,x] w2_a[i,p] w2_b[j,q]; conv uses the flattened 2-D kron, which equals
  the 4-D one (P4). Scale: PEFT files alpha / r with r from the config (also when both factors
  are full); LyCORIS files alpha / dim when a factor is decomposed (dim its rank), else 1 (P13).
* full: dW = diff, db = diff_b; norm: dweight = w_norm, dbias = b_norm (P18).

Exact low-rank forms (``extra['factors_fn']``, P24), used where a method merges factors: Tucker
LoCon folds the core into down (rank r); LoHa is the face-splitting product (rank r1*r2); LoKr
is kron(U1, U2) kron(V1, V2) with a full factor split against an identity (rank rank1*rank2).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import UserError
from .types import AdapterType


def _f(t):
    import torch

    return t.to(torch.float32)


def _where(hp: Mapping[str, Any]) -> str:
    return f"module '{hp.get('module', '?')}' in {hp.get('file', 'the adapter')}"


def _shape_to(d, hp: Mapping[str, Any], rows_cols: tuple[int, int], what: str):
    """``d`` (2-D [rows, cols]) in the base tensor's shape when ``hp['shape']`` is known."""
    shape = hp.get("shape")
    if shape is None:
        return d
    shape = tuple(shape)
    if len(shape) < 2 or shape[0] != rows_cols[0] or math.prod(shape[1:]) != rows_cols[1]:
        raise UserError(f"{what} {_where(hp)} gives a {rows_cols[0]}x{rows_cols[1]} delta but the base tensor "
                        f"has shape {list(shape)}; is this adapter for this base model?")
    return d.reshape(shape)


def _alpha_over(hp: Mapping[str, Any], r: int) -> float:
    a = hp.get("alpha")
    if a is None or a == 0:  # LyCORIS / kohya: a missing (or 0) alpha means alpha = r
        return 1.0
    return float(a) / r


# -- LoCon with a Tucker core (P11) ----------------------------------------------------------------


def _locon_tucker_shape(s: Mapping[str, tuple], hp) -> tuple[int, ...]:
    down, up, mid = s["down"], s["up"], s["mid"]
    if len(mid) != 4 or mid[0] != up[1] or mid[1] != down[0] or len(down) != 4 or tuple(down[2:]) != (1, 1):
        raise UserError(f"LoCon Tucker {_where(hp)}: lora_down {list(down)}, lora_mid {list(mid)} and lora_up "
                        f"{list(up)} do not chain (want down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1])")
    return (up[0], down[1] * mid[2] * mid[3])


def _locon_tucker(base, t: Mapping[str, Any], hp: Mapping[str, Any]):
    import torch

    rc = _locon_tucker_shape({k: tuple(v.shape) for k, v in t.items()}, hp)
    down, up, mid = _f(t["down"]), _f(t["up"]), _f(t["mid"])
    r = down.shape[0]
    d = torch.einsum("oi,ijyx,jn->onyx", up.reshape(up.shape[0], -1), mid, down.reshape(r, -1))
    d = d * _alpha_over(hp, r)
    return _shape_to(d.reshape(rc), hp, rc, "LoCon Tucker")


def _locon_tucker_factors(t: Mapping[str, Any], hp: Mapping[str, Any]):
    """Exact rank-r factors (P24): down'[i,n,y,x] = sum_j mid[i,j,y,x] down[j,n]."""
    import torch

    down, up, mid = _f(t["down"]), _f(t["up"]), _f(t["mid"])
    r = down.shape[0]
    A = torch.einsum("ijyx,jn->inyx", mid, down.reshape(r, -1)).reshape(mid.shape[0], -1)
    return A, up.reshape(up.shape[0], -1) * _alpha_over(hp, r)


# -- LoHa (P3, P12) ------------------------------------------------------------------------------------


def _loha_shape(s: Mapping[str, tuple], hp) -> tuple[int, ...]:
    w1a, w1b, w2a, w2b = s["w1a"], s["w1b"], s["w2a"], s["w2b"]
    if ("t1" in s) != ("t2" in s):
        raise UserError(f"LoHa {_where(hp)} has only one of hada_t1 / hada_t2")
    if "t1" in s:
        t1, t2 = s["t1"], s["t2"]
        ok = (len(t1) == 4 and t1 == t2 and w1a == w2a and w1b == w2b and len(w1a) == 2 and len(w1b) == 2
              and t1[0] == w1a[0] and t1[1] == w1b[0])
        if not ok:
            raise UserError(f"LoHa Tucker {_where(hp)}: hada_t1 {list(t1)}, hada_w1_a {list(w1a)}, hada_w1_b "
                            f"{list(w1b)} (and the _2 set) do not fit (want t [r, r, kh, kw], a [r, out], b [r, in])")
        return (w1a[1], w1b[1] * t1[2] * t1[3])
    ok = (len(w1a) == 2 and len(w2a) == 2 and w1a[1] == w1b[0] and w2a[1] == w2b[0]
          and w1a[0] == w2a[0] and math.prod(w1b[1:]) == math.prod(w2b[1:]))
    if not ok:
        raise UserError(f"LoHa {_where(hp)}: hada_w1_a {list(w1a)} x hada_w1_b {list(w1b)} and hada_w2_a "
                        f"{list(w2a)} x hada_w2_b {list(w2b)} do not give two products of one shape")
    return (w1a[0], math.prod(w1b[1:]))


def _tucker(t, a, b):
    import torch

    return torch.einsum("pqyx,po,qi->oiyx", t, a, b)


def _loha(base, t: Mapping[str, Any], hp: Mapping[str, Any]):
    rc = _loha_shape({k: tuple(v.shape) for k, v in t.items()}, hp)
    w1a, w1b, w2a, w2b = (_f(t[k]) for k in ("w1a", "w1b", "w2a", "w2b"))
    if "t1" in t:
        r = w1b.shape[0]
        d = _tucker(_f(t["t1"]), w1a, w1b) * _tucker(_f(t["t2"]), w2a, w2b)
    else:
        r = w1b.shape[0]
        d = (w1a @ w1b.reshape(r, -1)) * (w2a @ w2b.reshape(w2b.shape[0], -1))
    d = d.reshape(rc) * _loha_scale(hp, r)
    return _shape_to(d, hp, rc, "LoHa")


def _loha_factors(t: Mapping[str, Any], hp: Mapping[str, Any]):
    """Exact factors of rank r1*r2 (P24, face-splitting product): B[o, (i,j)] = w1_a[o,i] w2_a[o,j],
    A[(i,j), c] = w1_b[i,c] w2_b[j,c]. None for Tucker LoHa (materialise, then SVD)."""
    if "t1" in t:
        return None
    w1a, w1b, w2a, w2b = (_f(t[k]) for k in ("w1a", "w1b", "w2a", "w2b"))
    r1, r2 = w1b.shape[0], w2b.shape[0]
    w1b, w2b = w1b.reshape(r1, -1), w2b.reshape(r2, -1)
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, -1)
    return A, B * _loha_scale(hp, r1)


def _loha_scale(hp: Mapping[str, Any], r: int) -> float:
    if hp.get("format") == "peft":
        a = hp.get("alpha")
        return (float(a) if a is not None else float(r)) / r
    return _alpha_over(hp, r)


# -- LoKr (P4, P13) ------------------------------------------------------------------------------------


def _lokr_parts(s: Mapping[str, tuple], hp) -> tuple[int, int, int, int]:
    """(a, c, b, d) with w1 [a, c] and w2 [b, d] (d including the kernel), validated."""
    if "w1" in s:
        if len(s["w1"]) not in (2, 4) or math.prod(s["w1"][2:]) != 1:
            raise UserError(f"LoKr {_where(hp)}: lokr_w1 has shape {list(s['w1'])}, want [a, c]")
        a, c = s["w1"][0], s["w1"][1]
    elif "w1_a" in s and "w1_b" in s:
        if s["w1_a"][1] != s["w1_b"][0]:
            raise UserError(f"LoKr {_where(hp)}: lokr_w1_a {list(s['w1_a'])} and lokr_w1_b {list(s['w1_b'])} do not chain")
        a, c = s["w1_a"][0], math.prod(s["w1_b"][1:])
    else:
        raise UserError(f"LoKr {_where(hp)} has neither lokr_w1 nor both lokr_w1_a and lokr_w1_b")
    if "w2" in s:
        b, d = s["w2"][0], math.prod(s["w2"][1:])
    elif "t2" in s and "w2_a" in s and "w2_b" in s:
        t2, w2a, w2b = s["t2"], s["w2_a"], s["w2_b"]
        if len(t2) != 4 or t2[0] != w2a[0] or t2[1] != w2b[0]:
            raise UserError(f"LoKr Tucker {_where(hp)}: lokr_t2 {list(t2)}, lokr_w2_a {list(w2a)}, lokr_w2_b "
                            f"{list(w2b)} do not fit (want t2 [r, r, kh, kw], w2_a [r, b], w2_b [r, d])")
        b, d = w2a[1], w2b[1] * t2[2] * t2[3]
    elif "w2_a" in s and "w2_b" in s and "t2" not in s:
        if s["w2_a"][1] != s["w2_b"][0]:
            raise UserError(f"LoKr {_where(hp)}: lokr_w2_a {list(s['w2_a'])} and lokr_w2_b {list(s['w2_b'])} do not chain")
        b, d = s["w2_a"][0], math.prod(s["w2_b"][1:])
    else:
        raise UserError(f"LoKr {_where(hp)} has neither lokr_w2 nor a complete lokr_w2_a / lokr_w2_b (/ lokr_t2) set")
    return a, c, b, d


def _lokr_shape(s: Mapping[str, tuple], hp) -> tuple[int, ...]:
    a, c, b, d = _lokr_parts(s, hp)
    shape = hp.get("shape")
    if shape is not None and (len(shape) < 2 or shape[0] != a * b or math.prod(shape[1:]) != c * d):
        raise UserError(f"LoKr {_where(hp)}: kron of w1 [{a}, {c}] and w2 [{b}, {d}] gives {a * b}x{c * d}, but the "
                        f"base tensor has shape {list(shape)}; the factors do not multiply to the base shape")
    return (a * b, c * d)


def _lokr_scale(t_shapes: Mapping[str, tuple], hp: Mapping[str, Any]) -> float:
    dims = [t_shapes[k][0] for k in ("w1_b", "w2_b") if k in t_shapes]
    alpha = hp.get("alpha")
    if hp.get("format") == "peft":  # PEFT: alpha / r always, r from the config (P4)
        r = hp.get("rank") or (dims[0] if dims else None)
        if r is None:
            raise UserError(f"LoKr {_where(hp)}: both factors are full and the config gives no r "
                            "(PEFT scales by alpha / r)")
        return (float(alpha) if alpha is not None else float(r)) / r
    if not dims or alpha is None:  # LyCORIS: full-matrix mode has scale 1 whatever .alpha says (P13)
        return 1.0
    dim = dims[-1] if "w2_b" in t_shapes else dims[0]
    return _alpha_over(hp, dim)


def _lokr_w2(t: Mapping[str, Any], b: int, d: int):
    import torch

    if "w2" in t:
        return _f(t["w2"]).reshape(b, d)
    if "t2" in t:
        return torch.einsum("ijyx,ip,jq->pqyx", _f(t["t2"]), _f(t["w2_a"]), _f(t["w2_b"])).reshape(b, d)
    return _f(t["w2_a"]) @ _f(t["w2_b"]).reshape(t["w2_b"].shape[0], -1)


def _split(t: Mapping[str, Any], n: int, full, rows: int, cols: int):
    """(U, V) with U V = the factor: its stored pair, or the full matrix against an identity
    (the smaller side)."""
    import torch

    if full is None:
        return _f(t[f"w{n}_a"]), _f(t[f"w{n}_b"]).reshape(t[f"w{n}_b"].shape[0], -1)
    if rows <= cols:
        return torch.eye(rows), full
    return full, torch.eye(cols)


def _lokr_factors(t: Mapping[str, Any], hp: Mapping[str, Any]):
    """Exact factors of rank rank(w1) rank(w2) (P24): kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)."""
    import torch

    shapes = {k: tuple(v.shape) for k, v in t.items()}
    a, c, b, d = _lokr_parts(shapes, hp)
    U1, V1 = _split(t, 1, _f(t["w1"]).reshape(a, c) if "w1" in t else None, a, c)
    if "t2" in t:  # Tucker w2[p,(q,y,x)] = sum_i w2_a[i,p] (sum_j t2[i,j,y,x] w2_b[j,q]): rank of the core
        w2a = _f(t["w2_a"])
        U2 = w2a.t().contiguous()
        V2 = torch.einsum("ijyx,jq->iqyx", _f(t["t2"]), _f(t["w2_b"])).reshape(w2a.shape[0], d)
    else:
        U2, V2 = _split(t, 2, None if "w2_a" in t else _lokr_w2(t, b, d), b, d)
    return _kron(V1, V2), _kron(U1, U2) * _lokr_scale(shapes, hp)


def _kron(x, y):
    """kron of two matrices (any strides): out[i*p + k, j*q + l] = x[i, j] y[k, l]."""
    return (x[:, None, :, None] * y[None, :, None, :]).reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1])


def _lokr(base, t: Mapping[str, Any], hp: Mapping[str, Any]):
    import torch

    shapes = {k: tuple(v.shape) for k, v in t.items()}
    rc = _lokr_shape(shapes, hp)
    a, c, b, d = _lokr_parts(shapes, hp)
    w1 = _f(t["w1"]).reshape(a, c) if "w1" in t else _f(t["w1_a"]) @ _f(t["w1_b"]).reshape(t["w1_b"].shape[0], -1)
    dW = torch.kron(w1.reshape(a, c), _lokr_w2(t, b, d)) * _lokr_scale(shapes, hp)
    return _shape_to(dW, hp, rc, "LoKr")


# -- full diffs and norms (P18) ------------------------------------------------------------------------


def _same_shape(role: str):
    def shape(s: Mapping[str, tuple], hp) -> tuple[int, ...]:
        return tuple(s[role])

    return shape


def _as_stored(role: str):
    def materialise(base, t: Mapping[str, Any], hp: Mapping[str, Any]):
        d = _f(t[role])
        shape = hp.get("shape")
        if shape is not None:
            if math.prod(shape) != d.numel():
                raise UserError(f"{role} of {_where(hp)} has shape {list(d.shape)} but the base tensor has "
                                f"shape {list(shape)}")
            d = d.reshape(tuple(shape))
        return d

    return materialise


ADAPTER_TYPES = [
    AdapterType("LoCon (Tucker)", {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"},
                frozenset({"down", "up", "mid"}), _locon_tucker, formats=("lycoris",),
                notes="LyCORIS LoCon use_tucker (P11)",
                extra={"shape": _locon_tucker_shape, "factors_fn": _locon_tucker_factors}),
    AdapterType("LoHa", {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
                         "hada_t1": "t1", "hada_t2": "t2"},
                frozenset({"w1a", "w1b", "w2a", "w2b"}), _loha,
                notes="LyCORIS loha / PEFT LOHA (P3, P12)",
                extra={"shape": _loha_shape, "peft_type": "LOHA", "factors_fn": _loha_factors,
                       "factors_if": lambda roles: "t1" not in roles}),
    AdapterType("LoKr", {"lokr_w1": "w1", "lokr_w1_a": "w1_a", "lokr_w1_b": "w1_b", "lokr_w2": "w2",
                         "lokr_w2_a": "w2_a", "lokr_w2_b": "w2_b", "lokr_t2": "t2"},
                frozenset(), _lokr, notes="LyCORIS lokr / PEFT LOKR (P4, P13)",
                extra={"shape": _lokr_shape, "peft_type": "LOKR", "factors_fn": _lokr_factors}),
    AdapterType("full", {"diff": "diff"}, frozenset({"diff"}), _as_stored("diff"), formats=("lycoris",),
                notes="LyCORIS full (P18)", extra={"shape": _same_shape("diff")}),
    AdapterType("full (bias)", {"diff_b": "diff_b"}, frozenset({"diff_b"}), _as_stored("diff_b"),
                formats=("lycoris",), notes="LyCORIS full diff_b (P18)",
                extra={"shape": _same_shape("diff_b"), "target": "bias"}),
    AdapterType("norm", {"w_norm": "w_norm"}, frozenset({"w_norm"}), _as_stored("w_norm"), formats=("lycoris",),
                notes="LyCORIS norm (P18)", extra={"shape": _same_shape("w_norm")}),
    AdapterType("norm (bias)", {"b_norm": "b_norm"}, frozenset({"b_norm"}), _as_stored("b_norm"),
                formats=("lycoris",), notes="LyCORIS norm b_norm (P18)",
                extra={"shape": _same_shape("b_norm"), "target": "bias"}),
]
