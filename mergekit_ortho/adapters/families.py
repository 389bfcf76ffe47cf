"""Every registered adapter module type, and the table that classifies a module by its stored keys.

Spec: ../shared/specs/adapters.md P10 (suffix table, dispatch per module), P26 (detection order:
a module with unknown leftover tensors is an error naming the key). The types come from each family
module's ``ADAPTER_TYPES`` (``lycoris``, ``peft_extras``, ``dora``, ``orthogonal``, ``ia3``; a
family not installed yet is simply absent) plus the plain LoRA types below, whose modules stay
exact low-rank factors (``LoraSource.factors``). Suffixes that name a known but unsupported type
(GLoRA, VeRA, FourierFT, ...) are listed so the refusal can name the type.

Classification of one module (its stored suffixes after the module name):
1. the weight type: among types (``extra['target']`` absent or "weight") whose required roles are
   all present, the one that covers most of the module's suffixes (ties: registration order);
2. the bias type (``extra['target'] == "bias"``) likewise, on the suffixes left;
3. epilogue types (``extra['epilogue']``, e.g. DoRA's magnitude) whose required roles are present;
4. ``.alpha`` is the module's alpha; any suffix left is a ``UserError`` naming the key.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

from ..errors import UserError
from .types import AdapterType

FAMILIES = ("lycoris", "peft_extras", "dora", "orthogonal", "orthogonal_lycoris", "ia3")


def _lora_delta(base, t, hp):  # a plain LoRA module as a dense delta (its factors are preferred)
    A, B = t["A"], t["B"]
    d = (B.reshape(B.shape[0], -1).float() @ A.reshape(A.shape[0], -1).float()) * float(hp.get("scale") or 1.0)
    return d.reshape(tuple(hp["shape"])) if hp.get("shape") is not None else d


LORA = AdapterType("LoRA", {"lora_A.weight": "A", "lora_B.weight": "B", "lora_A.default.weight": "A",
                            "lora_B.default.weight": "B", "lora_down.weight": "A", "lora_up.weight": "B"},
                   frozenset({"A", "B"}), _lora_delta, notes="plain LoRA / LoCon: exact factors",
                   extra={"factors": True})
LORA_EMBEDDING = AdapterType("LoRA (embedding)", {"lora_embedding_A": "eA", "lora_embedding_B": "eB"},
                             frozenset({"eA", "eB"}), _lora_delta, formats=("peft",),
                             notes="PEFT embedding LoRA: exact factors", extra={"factors": True})

# stored suffix -> the type it names, for types that are known but not supported yet
UNSUPPORTED_SUFFIXES = {
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lora_mid.weight": "LoCon Tucker (lora_mid)",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bm.weight": "GLoRA",
    "vera_lambda_b": "VeRA", "vera_lambda_d": "VeRA", "fourierft_spectrum": "FourierFT",
    "oft_blocks": "LyCORIS diag-OFT/BOFT", "oft_R.weight": "OFT", "oft_r": "OFT", "oft_s": "OFT",
    "boft_R": "BOFT", "boft_s": "BOFT", "hra_u": "HRA", "ia3_l": "IA3", "on_input": "LyCORIS IA3",
    "dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "lora_B.bias": "lora_bias (bias on lora_B)", "diff": "LyCORIS full/diff", "diff_b": "LyCORIS full/diff",
    "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
}
# adapter_config.json peft_type values refused with a hint
PEFT_TYPES_KNOWN = ("LORA", "LOHA", "LOKR", "OFT", "BOFT", "HRA", "IA3", "VERA", "FOURIERFT", "ADALORA", "BONE",
                    "MISS", "C3A", "SHIRA", "RANDLORA", "LN_TUNING", "XLORA", "GLORA")


@lru_cache(maxsize=1)
def all_types() -> tuple[AdapterType, ...]:
    types: list[AdapterType] = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"{__package__}.{fam}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{fam}":
                raise
            continue
        types += [t for t in getattr(mod, "ADAPTER_TYPES", []) if all(t is not u for u in types)]
        if fam == "dora":
            types += _lycoris_dora(mod, types)
    return tuple(types) + (LORA, LORA_EMBEDDING)


def _lycoris_dora(mod, types: list[AdapterType]) -> list[AdapterType]:
    """LyCORIS ``dora_scale`` as an epilogue on the delta of the module's LoCon/LoHa/LoKr part
    (dora.py gives the function ``lycoris_dora_delta(base, delta, dora_scale, hp)``, P14)."""
    fn = getattr(mod, "lycoris_dora_delta", None)
    if fn is None or any("dora_scale" in roles_of(t) for t in types):
        return []

    def materialise(base, t, hp):
        return fn(base, hp["delta"], t["dora_scale"], hp)

    return [AdapterType("DoRA (dora_scale)", {"dora_scale": "dora_scale"}, frozenset({"dora_scale"}), materialise,
                        needs_base=True, formats=("lycoris",), notes="LyCORIS dora_wd (P14)",
                        extra={"epilogue": True})]


def peft_type_of(t: AdapterType) -> tuple[str, ...]:
    """The adapter_config.json peft_type(s) whose files hold type ``t``: ``extra['peft_type']``,
    else the first word of its name (``OFT (peft 0.14-0.15)`` -> OFT; DoRA is a LORA option)."""
    p = t.extra.get("peft_type")
    if p is not None:
        return (p,) if isinstance(p, str) else tuple(p)
    if "peft" not in t.formats:
        return ()
    word = t.name.split()[0].upper()
    return ("LORA",) if word == "DORA" else (word,)


def roles_of(t: AdapterType) -> dict[str, str]:
    """{stored suffix without a leading dot: role}: families may write ``.hra_u`` or ``hra_u``."""
    got = _ROLES.get(id(t))
    if got is None or got[0] is not t:
        got = _ROLES[id(t)] = (t, {k.lstrip("."): v for k, v in t.roles.items()})
    return got[1]


_ROLES: dict[int, tuple[AdapterType, dict[str, str]]] = {}


def derived_bias(t: AdapterType) -> AdapterType:
    """The bias part of a type whose ``extra['bias']`` (``fn(base_bias, tensors, hp)`` -> delta or
    None) changes the module's bias too (PEFT IA3 on attention-type modules, P8). Optional: a
    module whose base has no bias has no bias part."""
    got = _DERIVED.get(id(t))
    if got is not None and got[0] is t:
        return got[1]
    fn = t.extra["bias"]

    def materialise(base, tensors, hp):
        import torch

        d = fn(base, tensors, hp)
        return torch.zeros(base.shape, dtype=torch.float32) if d is None else d

    d = AdapterType(f"{t.name} (bias)", {}, frozenset(), materialise, needs_base=True, formats=t.formats,
                    notes=t.notes, extra={"target": "bias", "optional": True})
    _DERIVED[id(t)] = (t, d)
    return d


_DERIVED: dict[int, tuple[AdapterType, AdapterType]] = {}


def target(t: AdapterType) -> str:
    return t.extra.get("target", "weight")


@lru_cache(maxsize=1)
def suffix_table() -> dict[str, list[AdapterType]]:
    """{stored suffix: types that read it}, registered types only."""
    out: dict[str, list[AdapterType]] = {}
    for t in all_types():
        for suf in roles_of(t):
            out.setdefault(suf, []).append(t)
    return out


@lru_cache(maxsize=1)
def known_suffixes() -> tuple[str, ...]:
    """Every suffix a module key may end with (registered, unsupported, ``alpha``), longest first."""
    sufs = set(suffix_table()) | set(UNSUPPORTED_SUFFIXES) | {"alpha"}
    return tuple(sorted(sufs, key=len, reverse=True))


def peft_types() -> dict[str, list[AdapterType]]:
    """{PEFT peft_type: the registered types that read its tensors} ("LORA" always)."""
    out: dict[str, list[AdapterType]] = {"LORA": [LORA, LORA_EMBEDDING]}
    for t in all_types():
        for p in peft_type_of(t):
            if t not in out.setdefault(p, []):
                out[p].append(t)
    return out


def split_key(key: str) -> tuple[str, str] | None:
    """(module stem, suffix) for a key ending in ``.<known suffix>``, else None."""
    for suf in known_suffixes():
        if key.endswith("." + suf) and len(key) > len(suf) + 1:
            return key[: -len(suf) - 1], suf
    return None


@dataclass
class Part:
    """One module's delta on one base tensor (its weight or its bias)."""

    type: AdapterType
    keys: dict[str, str]  # role -> stored key
    target: str = "weight"
    epilogues: list[tuple[AdapterType, dict[str, str]]] = field(default_factory=list)
    also: list["Part"] = field(default_factory=list)  # further deltas on the same tensor, added

    @property
    def all_keys(self) -> dict[str, str]:
        out = dict(self.keys)
        for i, p in enumerate(self.also):
            out.update({f"{i + 1}:{r}": k for r, k in p.keys.items()})
        return out

    @property
    def factors(self) -> bool:
        return bool(self.type.extra.get("factors")) and not self.epilogues

    @property
    def needs_base(self) -> bool:
        return (self.type.needs_base or any(e.needs_base for e, _ in self.epilogues)
                or any(p.needs_base for p in self.also))

    @property
    def name(self) -> str:
        return " + ".join([self.type.name] + [e.name for e, _ in self.epilogues] + [p.name for p in self.also])


def _best(cands: list[AdapterType], present: Mapping[str, str]) -> AdapterType | None:
    best, score = None, 0
    for t in cands:
        got = {roles_of(t)[s] for s in present if s in roles_of(t)}
        if not got or not t.required <= got:
            continue
        n = sum(1 for s in present if s in roles_of(t))
        if n > score:
            best, score = t, n
    return best


def classify(stem: str, suffixes: Mapping[str, str], fmt: str, file: Any,
             allowed: list[AdapterType] | None = None) -> tuple[list[Part], str | None]:
    """The parts of module ``stem`` ({suffix: stored key}) and its alpha key. ``allowed``: the
    types a PEFT config's peft_type admits (None: any type of the file's format)."""
    fam = "peft" if fmt in ("peft", "diffusers") else "lycoris"
    pool = [t for t in (allowed if allowed is not None else all_types()) if fam in t.formats]
    left = {s: k for s, k in suffixes.items() if s != "alpha"}
    for s, k in left.items():
        if s not in suffix_table() or not any(s in roles_of(t) for t in pool):
            what = UNSUPPORTED_SUFFIXES.get(s)
            if what:
                raise UserError(f"not supported yet: {what} in {file} (key '{k}')")
            raise UserError(f"not supported yet: unrecognised tensor '{k}' in {file} (not part of a "
                            f"{'/'.join(sorted({t.name for t in pool}))} module)")
    parts: list[Part] = []
    for tgt in ("weight", "bias"):
        cands = [t for t in pool if target(t) == tgt and not t.extra.get("epilogue")]
        t = _best(cands, left)
        if t is None:
            continue
        keys = {roles_of(t)[s]: k for s, k in left.items() if s in roles_of(t)}
        parts.append(Part(t, keys, tgt))
        left = {s: k for s, k in left.items() if s not in roles_of(t)}
    for e in [t for t in pool if t.extra.get("epilogue")]:
        got = {roles_of(e)[s] for s in left if s in roles_of(e)}
        if got and e.required <= got:
            host = next((p for p in parts if p.target == target(e)), None)
            if host is None:
                raise UserError(f"{file}: module '{stem}' has {e.name} tensors but no delta they re-weight")
            host.epilogues.append((e, {roles_of(e)[s]: k for s, k in left.items() if s in roles_of(e)}))
            left = {s: k for s, k in left.items() if s not in roles_of(e)}
    if left:
        k = next(iter(left.values()))
        owners = [t for t in pool if any(s in roles_of(t) for s in left)]
        owners.sort(key=lambda t: (-sum(1 for s in left if s in roles_of(t)),
                                   len(t.required - {roles_of(t)[s] for s in left if s in roles_of(t)})))
        owner = owners[0] if owners else None
        if owner is not None:
            have = {roles_of(owner)[s] for s in left if s in roles_of(owner)}
            miss = sorted(s for s, r in roles_of(owner).items() if r in owner.required - have)
            if owner.extra.get("factors"):
                lacks = "no A (down)" if not have & {"A", "eA"} else "no B (up)"
                raise UserError(f"LoRA file {file}: module '{stem}' has {lacks} tensor")
            raise UserError(f"{file}: module '{stem}' has {owner.name} tensor '{k}' but not a complete {owner.name} "
                            f"module (missing {', '.join(miss) or 'a factor'}"
                            + (f"; besides {' + '.join(p.name for p in parts)}" if parts else "") + ")")
        raise UserError(f"{file}: tensor '{k}' of module '{stem}' does not complete a known adapter module")
    alpha = suffixes.get("alpha")
    if alpha is not None and not parts:
        raise UserError(f"{file}: '{alpha}' has no matching adapter tensors")
    return parts, alpha
