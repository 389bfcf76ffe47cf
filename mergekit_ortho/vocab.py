"""Vocabulary alignment of ``embed_tokens`` / ``lm_head`` (mergekit-compatible; spec
mergekit_compat.md M10, with the [I] recommendations of A1, A2, A5, A6, A12).

**When.** A recipe with ``tokenizer_source`` (``base`` | ``union`` | a model) or a ``tokenizer:``
section (``source`` defaults to ``union``) gets an output tokenizer with V tokens, and every
vocabulary tensor (vocabulary axis 0) is re-indexed to it before the method merges it.
``TokenizerSpec.from_recipe`` parses the setting; ``build_vocabulary`` reads the models'
tokenizer files (never tensors) and returns a ``Vocabulary``; ``Vocabulary.align`` re-indexes one
tensor's rows for every model at once; ``Vocabulary.save`` writes the tokenizer.

**Output tokens** (``tokenizer_files.py``): ``base``: the base tokenizer without ids >= its
config ``vocab_size``; a model: that tokenizer unchanged; ``union``: the stripped base, then every
other model's plain tokens (id < its ``vocab_size``) it lacks, then all models' added tokens (first
definition wins). The ``tokens:`` keys not yet present are appended. V_out = V rounded up to
``pad_to_multiple_of``.

**Permutation.** p_m(j) = the id in model m's tokenizer of output token j, -1 when m lacks it or
that id is >= m's ``vocab_size`` (A5: mergekit raises KeyError there). One int64 array per model,
built once; aligning is then a gather.

**Rows.** E'_m[j] = E_m[p_m(j)] when m has token j and the user did not force it; else the
token's default row D[j]. Rows V..V_out-1 = the mean of E'_m's first V rows, per model. D[j], among
the models present for this tensor (the keys of ``rows``):

* a user ``tokens:`` entry: its source's row (a model's row for the same token, a model's row for
  another token or id, or zeros); ``force: true`` gives it to every model;
* else, token in exactly one model: that row; in none: zeros (warning); in >= 2 with the base
  among them: the base's row; otherwise the mean of the rows that have it (summed in model order,
  then divided, as mergekit does).

**Deliberate deviations** (all [I] recommendations of the spec): the union visits the base, then
the other models in the order given (mergekit: hash order, so new ids varied between runs, A2);
without a base the first model is the tokenizer base (A1); a ``tokens:`` entry without ``source``
uses the default rule (mergekit: NotImplementedError, A6); an id >= a model's ``vocab_size`` is
absent (A5); ``save`` also copies ``generation_config.json`` (A12). Stripping also works for
WordLevel/WordPiece tokenizers (mergekit: BPE only). Errors are one-line ``UserError``s with
mergekit's wording where it has one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import UserError, shown
from .tokenizer_spec import TokenConfig, TokenizerSpec, TokenSource

__all__ = ["TokenConfig", "TokenSource", "TokenizerSpec", "VocabModel", "Vocabulary", "build_vocabulary",
           "set_config_vocab_size", "truncate_vocab_rows", "vocab_mismatch_message"]

log = logging.getLogger(__name__)

# --- no tokenizer setting --------------------------------------------------------------------------


def vocab_mismatch_message(tensor_name: str, shapes: Sequence[Sequence[int]], hint: str = "") -> str | None:
    """mergekit's message when a vocabulary tensor's inputs differ in shape and no tokenizer
    setting aligns them (every method refuses); None when all shapes agree."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if all(s == shapes[0] for s in shapes):
        return None
    return (f"Tensor size mismatch for {tensor_name}: {shapes}. Align vocabulary axes with tokenizer configuration "
            "before merging (for example, tokenizer: {source: base}); other dimensions must already match."
            + (f" {hint}" if hint else ""))


def truncate_vocab_rows(rows: Mapping[str, Any]) -> dict[str, Any]:
    """``unsafe_truncate_embeddings``: every input cut to the smallest row count (views)."""
    n = min(int(t.shape[0]) for t in rows.values())
    return {k: t[:n] for k, t in rows.items()}


def set_config_vocab_size(config: dict, size: int, key: str = "vocab_size") -> None:
    """Write ``size`` under ``key`` in a config dict; a dotted key (``text_config.vocab_size``)
    walks nested objects."""
    *outer, last = key.split(".")
    for part in outer:
        config = config.setdefault(part, {})
    config[last] = int(size)


# --- the models and the vocabulary ---------------------------------------------------------------


@dataclass(frozen=True)
class VocabModel:
    """One merged model. ``label``: the key of its rows in ``Vocabulary.align``; ``directory``: its
    tokenizer files; ``vocab_size``: its config's vocabulary key (None: the tokenizer's length);
    ``refs``: other names the recipe may use for it (the reference as written, the resolved one)."""
    label: str
    directory: Path | None
    vocab_size: int | None = None
    refs: tuple[str, ...] = ()


@dataclass
class _Rule:
    """A ``tokens:`` entry resolved against the models: output id ``j``, source model label, the
    source row id (model_token), or the error to raise when the row is needed."""
    token: str
    j: int
    cfg: TokenConfig
    label: str | None = None
    src_id: int | None = None
    error: str | None = None


def _match(ref: str, models: Sequence[VocabModel]) -> VocabModel | None:
    for m in models:
        if ref == m.label or ref in m.refs:
            return m
    p = Path(ref)
    if p.exists():
        for m in models:
            if m.directory is not None and Path(m.directory).resolve() == p.resolve():
                return m
    return None


def build_vocabulary(spec: TokenizerSpec, models: Sequence[VocabModel], base: str | None = None,
                     source_dir: Path | None = None) -> Vocabulary:
    """The output vocabulary and each model's permutation, from the tokenizer files only.

    ``models``: every distinct merged model (the base included), in recipe order; ``base``: the
    label of the recipe's ``base_model`` (None: none; the first model is then the tokenizer base,
    A1, but no model is preferred by the default rule). ``source_dir``: the tokenizer directory of
    ``spec.source`` when it names a model that is not merged."""
    from . import tokenizer_files as tf

    if not models:
        raise UserError("tokenizer alignment needs at least one model")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"tokenizer alignment: model labels must be unique, got {labels}")
    if base is not None and base not in labels:
        raise UserError(f"tokenizer alignment: the base {base!r} is not among the models {labels}")
    donor = next(m for m in models if m.label == (base or labels[0]))
    order = [donor] + [m for m in models if m is not donor]  # A2: base first, then recipe order

    loaded: dict[str, tf.Loaded] = {}
    notes: list[str] = []
    borrowed: set[str] = set()  # models without a tokenizer of their own (mergekit: the base's)
    seen: dict = {}  # tokenizer.json digest -> Loaded: one parse per distinct file
    for m in order:
        got = tf.load(m.directory, m.label, m.vocab_size, seen)
        if got is None:
            if m is donor:
                raise UserError(f"tokenizer alignment: the tokenizer base {m.label} has no readable tokenizer "
                                f"(tokenizer.json) in {m.directory}")
            notes.append(f"no tokenizer found for {m.label}; assuming the same vocabulary as {donor.label}")
            got = loaded[donor.label].with_vocab_size(m.vocab_size)
            borrowed.add(m.label)
        loaded[m.label] = got

    out_dir = donor.directory
    if spec.source == "union":
        out = tf.union([loaded[m.label] for m in order])
    elif spec.source == "base":
        out = tf.stripped(loaded[donor.label])
    else:
        src = _match(spec.source, models)
        if src is not None and src.label in borrowed:
            raise UserError(f"tokenizer source {spec.source}: {src.label} has no readable tokenizer "
                            f"(tokenizer.json) in {src.directory}")
        if src is not None:
            out, out_dir = loaded[src.label].tokenizer, src.directory
        elif source_dir is not None:
            got = tf.load(Path(source_dir), spec.source, None)
            if got is None:
                raise UserError(f"tokenizer source {spec.source}: no tokenizer.json in {source_dir}")
            out, out_dir = got.tokenizer, Path(source_dir)
        else:
            raise UserError(f"tokenizer source {spec.source}: not one of the merged models; the plan must "
                            "pass its directory")
        out = tf.copy(out)
    new = [t for t in spec.tokens if out.token_to_id(t) is None]
    if new:
        tf.add_plain(out, new)
    tokens = tf.id_order(out, spec.source)

    size = len(tokens)
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size = (size // pad + 1) * pad
    perms: dict[tuple[int, int], np.ndarray] = {}  # models sharing a tokenizer share its permutation
    perm = {}
    for m in models:
        got = loaded[m.label]
        key = (id(got.vocab), got.vocab_size)
        if key not in perms:
            perms[key] = got.permutation(tokens)
        perm[m.label] = perms[key]
    vocab = Vocabulary(tokens=tokens, size=size, base=base, donor=donor.label, perm=perm,
                       rules=[], tokenizer=out,
                       tokenizer_dir=out_dir, base_dir=donor.directory, notes=notes)
    for tok, cfg in spec.tokens.items():
        vocab.rules.append(_resolve_rule(tok, out.token_to_id(tok), cfg, models, loaded, donor.label))
    return vocab


def _resolve_rule(tok, j, cfg: TokenConfig, models, loaded, donor: str) -> _Rule:
    rule = _Rule(tok, j, cfg)
    src = cfg.source
    if src.model is None:
        return rule
    m = _match(src.model, models)
    if m is None:
        raise UserError(f"tokenizer.tokens.{shown(tok, 40)}.source: Model {src.model} referenced but not part of merge")
    rule.label = m.label
    if src.kind == "model_token":
        if src.token_id is not None:
            rule.src_id = src.token_id
        else:
            # the model's own vocabulary; the tokenizer base's as stripped (mergekit's "original")
            rule.src_id = loaded[m.label].vocab.get(src.token)
            if m.label == donor and rule.src_id is not None and rule.src_id >= loaded[m.label].vocab_size:
                rule.src_id = None
            if rule.src_id is None:
                rule.error = f"Token {src.token!r} not found in model {m.label}"
    return rule


@dataclass
class Vocabulary:
    """The output vocabulary: ``tokens`` (id order, V = len), ``size`` (V_out, the config's
    vocabulary value), each model's permutation ``perm[label]`` (int64, -1 = absent)."""
    tokens: list[str]
    size: int
    base: str | None
    donor: str
    perm: dict[str, np.ndarray]
    rules: list[_Rule]
    tokenizer: Any
    tokenizer_dir: Path | None
    base_dir: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def config_vocab_size(self) -> int:
        return self.size

    def check(self, tensor_name: str, row_counts: Mapping[str, int]) -> None:
        """The errors ``align`` would raise for a tensor whose models have these row counts (a plan
        can call it before merging): unknown labels, too few rows for the tokenizer's ids, and
        token sources whose weight is missing, that lack the token, or whose id is out of range."""
        if not row_counts:
            raise UserError(f"{tensor_name}: no model to align")
        for label, n in row_counts.items():
            if label not in self.perm:
                raise UserError(f"{tensor_name}: model {label!r} is not part of the vocabulary ({list(self.perm)})")
            top = int(self.perm[label].max(initial=-1))
            if n <= top:
                raise UserError(f"{tensor_name}: model {label} has {n} rows, but its tokenizer uses id {top} "
                                "(below its config vocab_size); check that model's config and tokenizer")
        P = np.stack([self.perm[label] for label in row_counts])
        for r in self.rules:
            if not (r.cfg.force or (P[:, r.j] < 0).any()):
                continue  # every model has the token and keeps its own row: the entry has no effect
            kind = r.cfg.source.kind
            if kind in ("default", "zero"):
                continue
            if r.label not in row_counts:
                raise UserError(f"{tensor_name}: Token {r.token!r} requires a vocabulary weight from model {r.label}, "
                                "but that weight is missing")
            if kind == "model" and self.perm[r.label][r.j] < 0:
                raise UserError(f"{tensor_name}: Token {r.token!r} not found in model {r.label}")
            if r.error:
                raise UserError(f"{tensor_name}: {r.error}")
            if kind == "model_token" and not 0 <= r.src_id < row_counts[r.label]:
                raise UserError(f"{tensor_name}: Token ID {r.src_id} out of range for model {r.label}")

    def align(self, tensor_name: str, rows: Mapping[str, Any]) -> dict[str, Any]:
        """E'_m for every model in ``rows`` (label -> tensor, vocabulary on axis 0): ``size`` rows
        each. The keys are the models present for this tensor, in recipe order, the base's rows
        included when the base is merged (that is what makes the base the default donor). A model
        whose rows need no change is returned as the same tensor object."""
        import torch

        labels = list(rows)
        dtype = rows[labels[0]].dtype
        for k in labels:
            dtype = torch.promote_types(dtype, rows[k].dtype)
        aligner = self.aligner(tensor_name, {k: tuple(rows[k].shape) for k in labels}, rows.__getitem__, dtype,
                               rows[labels[0]].device)
        return {k: aligner(k, rows[k]) for k in labels}

    def aligner(self, tensor_name: str, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], Any], dtype,
                device="cpu") -> Callable[[str, Any], Any]:
        """Align one model at a time, for streaming merges: returns ``one(label, E)``, which gives
        model ``label``'s rows ``E`` (as stored) re-indexed to the output vocabulary in ``dtype``
        (``E`` itself when it needs no change and has that dtype). ``shapes``: the stored shape of
        every model present for this tensor, in recipe order (as the keys of ``align``'s
        ``rows``); ``read(label)``: that model's stored rows, called once per model here, and only
        when some token takes its row from the default rule or a ``tokens:`` source (the default
        rows D look across models: only their rows are gathered and kept). Gathers then converts,
        so the values equal ``align`` on converted rows bit for bit."""
        import torch

        labels = list(shapes)
        self.check(tensor_name, {k: int(shapes[k][0]) for k in labels})
        rest = tuple(shapes[labels[0]][1:])
        if any(tuple(shapes[k][1:]) != rest for k in labels):
            raise UserError(f"{tensor_name}: non-vocabulary dimensions must match: "
                            f"{[tuple(shapes[k]) for k in labels]}")
        V, M = len(self.tokens), len(labels)
        P = np.stack([self.perm[k] for k in labels])
        present = P >= 0
        count = present.sum(0)
        forced = np.zeros(V, bool)
        user = np.zeros(V, bool)
        for r in self.rules:
            forced[r.j] |= r.cfg.force
            user[r.j] = r.cfg.source.kind != "default"

        # D: one row per token some model takes from the default (lacking it, or forced)
        J = np.flatnonzero((count < M) | forced)
        pos = np.full(V, -1, np.int64)
        pos[J] = np.arange(J.size)
        D = torch.zeros((J.size, *rest), dtype=dtype, device=device)
        cJ, dflt = count[J], ~user[J]
        # the default rule: the one model that has it; else the base, when merged and has it; else the mean
        donor = np.full(J.size, -1)
        one = dflt & (cJ == 1)
        donor[one] = present[:, J[one]].argmax(0)
        if self.base in shapes:
            b = labels.index(self.base)
            donor[dflt & (cJ >= 2) & present[b, J]] = b
        mean = dflt & (cJ >= 2) & (donor < 0)
        configured = [r for r in self.rules if pos[r.j] >= 0 and r.cfg.source.kind not in ("default", "zero")]
        for i, k in enumerate(labels):
            take_d, take_m = np.flatnonzero(donor == i), np.flatnonzero(mean & present[i, J])
            own = [r for r in configured if r.label == k]
            if not (take_d.size or take_m.size or own):
                continue
            E = read(k)
            if take_d.size:
                D[_t(take_d, device)] = E[_t(P[i, J[take_d]], device)].to(dtype)
            if take_m.size:  # summed in model order, divided once at the end: mergekit's rounding
                D[_t(take_m, device)] += E[_t(P[i, J[take_m]], device)].to(dtype)
            for r in own:
                r_id = int(self.perm[r.label][r.j]) if r.cfg.source.kind == "model" else r.src_id
                D[int(pos[r.j])] = E[r_id].to(dtype)
            del E
        sel = np.flatnonzero(mean)
        if sel.size:
            D[_t(sel, device)] /= torch.as_tensor(cJ[sel], dtype=dtype, device=device).reshape(-1, *([1] * len(rest)))
        missing = np.flatnonzero(dflt & (cJ == 0))
        if missing.size:
            some = ", ".join(repr(self.tokens[j]) for j in J[missing[:5]])
            self._warn(f"{tensor_name}: {missing.size} token(s) are in no model ({some}{', …' if missing.size > 5 else ''}); "
                       "their rows are zeros")
        for r in self.rules:  # zero sources; configured rows overwrite the default ones above
            if pos[r.j] >= 0 and r.cfg.source.kind == "zero":
                D[int(pos[r.j])] = 0.0
        index = {k: i for i, k in enumerate(labels)}

        def aligned(k: str, E):
            i = index[k]
            take = present[i] & ~forced
            if (take.all() and E.shape[0] == V == self.size and E.dtype == dtype
                    and np.array_equal(P[i], np.arange(V))):
                return E
            new = torch.empty((self.size, *rest), dtype=dtype, device=device)
            src = np.where(take, P[i], 0)
            moved = src != np.arange(V)
            same = int(moved.argmax()) if moved.any() else V  # rows [0, same) stay where they are
            new[:same].copy_(E[:same])  # a plain copy: most rows of a fine-tune with added tokens
            src = _t(src, device)
            step = max(1, (1 << 22) // max(1, math.prod(rest)))  # gather + convert in ~16 MB row chunks
            for lo in range(same, V, step):
                hi = min(lo + step, V)
                new[lo:hi].copy_(E.index_select(0, src[lo:hi]))
            miss = np.flatnonzero(~take)
            if miss.size:
                new[_t(miss, device)] = D[_t(pos[miss], device)]
            if self.size > V:  # padding rows: the mean of this model's aligned rows
                new[V:] = new[:V].mean(0)
            return new

        return aligned

    def _warn(self, text: str) -> None:
        log.warning(text)
        if text not in self.notes:
            self.notes.append(text)

    def save(self, out_dir: Path, chat_template: str | None = None, copy_generation_config: bool = True) -> list[str]:
        """Write the output tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja) into ``out_dir``; ``chat_template``: the text from
        ``resolve_chat_template`` (None keeps the source tokenizer's template). Also copies the
        tokenizer base's generation_config.json (A12). Returns the file names written."""
        from . import tokenizer_files as tf

        names = tf.save(self.tokenizer, Path(out_dir), self.tokenizer_dir, chat_template)
        if copy_generation_config and self.base_dir is not None:
            names += tf.copy_if_present(Path(self.base_dir), Path(out_dir), "generation_config.json")
        return names


def _t(a: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
