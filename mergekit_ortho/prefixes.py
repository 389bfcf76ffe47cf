"""Language towers under another prefix: a text-only fine-tune merged into a VLM, and back.

A VLM keeps its language model under a prefix (transformers >= 4.52: ``model.language_model.``;
older LLaVA-style checkpoints: ``language_model.model.`` and ``language_model.lm_head.``), while a
text-only fine-tune of the same language model stores ``model.*`` and ``lm_head.*``. A
:class:`RenamedSource` shows an input under the reference's (the base's, else the first model's)
names: ``pairs`` are (reference prefix, input prefix), longest input prefix first. Names the
reference does not have (a VLM input's vision tower when the base is text-only) are left out and
listed in ``dropped``; reference tensors the input lacks (the base's vision tower and projector
when the input is text-only) are kept from the base by the plan.

Detection (``detect``) tries each known layout in both directions and takes one only when it
turns a clear mismatch (under half the input's names in the reference) into a match (at least
90 %); a recipe's ``prefix_map`` replaces detection (``{}`` turns it off). When neither maps an
input, :func:`suggest` finds the prefix pair its names carry (input ``backbone.decoder.model.*``
for reference ``model.*``) for the error to name as a ``prefix_map``.
"""
from __future__ import annotations

from collections import Counter

# (reference prefix, input prefix) for a VLM reference and a text-only input; reversed for a
# text-only reference and a VLM input
LAYOUTS = (
    (("model.language_model.", "model."),),
    (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
)


def _rename(name: str, pairs) -> str | None:
    for ref_prefix, own_prefix in pairs:
        if name.startswith(own_prefix):
            return ref_prefix + name[len(own_prefix):]
    return None


def _renamed(names, reference: set[str], pairs) -> dict[str, str]:
    """reference name -> input name for every input name that lands in the reference."""
    out = {}
    for n in names:
        r = _rename(n, pairs)
        r = r if r is not None and r in reference else (n if n in reference else None)
        if r is not None and r not in out:
            out[r] = n
    return out


def detect(reference_names, names) -> tuple | None:
    """The prefix pairs that map an input's ``names`` onto ``reference_names``, or None."""
    ref, own = set(reference_names), list(names)
    if not own or sum(n in ref for n in own) >= 0.5 * len(own):
        return None
    for layout in LAYOUTS:
        for pairs in (layout, tuple((b, a) for a, b in layout)):
            pairs = tuple(sorted(pairs, key=lambda p: -len(p[1])))
            if len(_renamed(own, ref, pairs)) >= 0.9 * min(len(own), len(ref)):
                return pairs
    return None


def suggest(reference_names, names) -> dict[str, str] | None:
    """A ``prefix_map`` (input prefix -> reference prefix) that maps at least 90 % of ``names``
    onto ``reference_names``, found from the names themselves: for each input name, the longest
    tail of at least two components that ends some reference name gives one (input prefix,
    reference prefix) pair; the most common pair is checked on all names. None if none fits."""
    ref = set(reference_names)
    tails: dict[str, str] = {}  # tail -> the reference prefix in front of it
    for r in ref:
        parts = r.split(".")
        for j in range(len(parts) - 1):
            tails.setdefault(".".join(parts[j:]), ".".join(parts[:j]) + ("." if j else ""))
    votes: Counter = Counter()
    own = [n for n in names if n not in ref]
    for n in own:
        parts = n.split(".")
        for i in range(len(parts) - 1):
            tail = ".".join(parts[i:])
            if tail in tails:
                mine = ".".join(parts[:i]) + ("." if i else "")
                if mine != tails[tail]:
                    votes[(mine, tails[tail])] += 1
                break
    for (mine, theirs), _ in votes.most_common(3):
        if len(_renamed(names, ref, ((theirs, mine),))) >= 0.9 * min(len(list(names)), len(ref)):
            return {mine: theirs}
    return None


HEAD_ENDINGS = ("lm_head.weight", "head.weight", "decoder.weight", "embed_out.weight", "output.weight")


def mismatch_hint(reference_label: str, reference, source, missing: str | None = None) -> str:
    """What explains two inputs' different tensors, for the error line: their families (config.json
    ``model_type``) when they differ, else the prefix a recipe's ``prefix_map`` would map; for a
    head ``missing`` from a tied input, that it is not supported (never "exclude it": the kept
    head would not match the merged embeddings)."""
    from .planning import config_of_source

    cfg = config_of_source(source)
    if missing and missing.endswith(HEAD_ENDINGS) and cfg.get("tie_word_embeddings") is True:
        return (f"; it is the tied head of {getattr(source, 'label', 'the input')} (config.json "
                "tie_word_embeddings), read from embeddings whose name is not known for this family: "
                "not supported yet (excluding it would keep a head that does not match the merged embeddings)")
    fams = [cfg.get("model_type"), config_of_source(reference).get("model_type")]
    if all(fams) and fams[0] != fams[1]:
        return (f"; the families differ ({fams[0]} vs {fams[1]}, config.json model_type): "
                "checkpoints of different families do not merge")
    pm = suggest(list(reference.infos), list(source.infos))
    if pm:
        return (f"; {getattr(source, 'label', 'the input')} stores its tensors under another prefix: map it "
                f"with the recipe's prefix_map: {pm!r} (input prefix -> {reference_label}'s)")
    return ""


class RenamedSource:
    """An input seen under the reference's tensor names (``infos``/``get``); everything else is
    the wrapped source's."""

    def __init__(self, source, pairs, reference_names):
        self.source = source
        self.pairs = tuple(sorted(pairs, key=lambda p: -len(p[1])))
        self.own = _renamed(source.infos, set(reference_names), self.pairs)
        self.infos = {r: source.infos[n] for r, n in self.own.items()}
        kept = set(self.own.values())
        self.dropped = sorted(n for n in source.infos if n not in kept)
        self.renamed = sum(r != n for r, n in self.own.items())

    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def get(self, key: str):
        return self.source.get(self.own[key])

    def describe(self) -> str:
        return ", ".join(f"'{own}*' read as '{ref}*'" for ref, own in self.pairs)

    def close(self) -> None:
        self.source.close()
