"""Tokenizer files for vocabulary alignment (``vocab.py``; spec mergekit_compat.md M10, M11, A2).

Reads a model's ``tokenizer.json`` with the ``tokenizers`` library (never its tensors), builds the
output tokenizer (strip, union, appended tokens) and writes it so ``transformers.AutoTokenizer``
loads it: ``tokenizer.json``, ``tokenizer_config.json`` (the source's, with its added tokens
rewritten and the template moved out), ``special_tokens_map.json`` when the source has one, and
``chat_template.jinja`` (+ ``additional_chat_templates/``), the transformers 5 layout.

Tokens appended to a tokenizer (the union's new plain tokens, the recipe's ``tokens:`` keys) are
added tokens, normalized and not special, as mergekit's ``add_tokens`` makes them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError

_DICT_VOCAB_MODELS = ("BPE", "WordLevel", "WordPiece")


@dataclass(frozen=True)
class Loaded:
    """A model's tokenizer: ``vocab`` (token -> id, added tokens included), ``vocab_size`` (its
    config's; ids at or above it are unused rows), ``added`` (id -> AddedToken)."""
    label: str
    directory: Path | None
    tokenizer: Any
    vocab: dict[str, int]
    vocab_size: int
    added: dict[int, Any]

    def with_vocab_size(self, vocab_size: int | None) -> Loaded:
        return replace(self, vocab_size=len(self.vocab) if vocab_size is None else int(vocab_size))

    def permutation(self, tokens: Sequence[str]) -> np.ndarray:
        """p(j) = this model's id for ``tokens[j]``; -1 when absent or >= vocab_size (A5)."""
        p = np.fromiter(map(self.vocab.get, tokens, repeat(-1)), dtype=np.int64, count=len(tokens))
        p[p >= self.vocab_size] = -1
        return p


def load(directory: Path | None, label: str, vocab_size: int | None, seen: dict | None = None) -> Loaded | None:
    """``directory``'s tokenizer, or None when it has none (no tokenizer.json, and transformers,
    if installed, cannot build one either). ``seen``: tokenizer.json digest -> Loaded, shared by
    the models of one merge: fine-tunes usually ship their base's file byte for byte, and parsing a
    150K-token tokenizer and listing its vocabulary costs about a second each."""
    if directory is None:
        return None
    directory = Path(directory)
    tok = None
    path = directory / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        digest = None
        if seen is not None:
            import hashlib

            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                same = seen[digest]
                return replace(same, label=label, directory=directory,
                               vocab_size=len(same.vocab) if vocab_size is None else int(vocab_size))
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses for bad files
            raise UserError(f"{path}: cannot read the tokenizer ({str(e)[:200]})") from None
    elif (directory / "tokenizer_config.json").is_file():
        tok = _via_transformers(directory)
    if tok is None:
        return None
    vocab = tok.get_vocab(with_added_tokens=True)
    size = len(vocab) if vocab_size is None else int(vocab_size)
    got = Loaded(label, directory, tok, vocab, size, dict(tok.get_added_tokens_decoder()))
    if seen is not None and path.is_file():
        seen[digest] = got
    return got


def _via_transformers(directory: Path):
    """A slow-only tokenizer (e.g. tokenizer.model alone) converted by transformers, if present."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
        return getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    except Exception:
        return None


def copy(tok):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok.to_str())


def stripped(m: Loaded):
    """``m``'s tokenizer without the tokens whose id is >= its vocab_size (a copy)."""
    from tokenizers import Tokenizer

    unused = {t for t, i in m.vocab.items() if i >= m.vocab_size}
    if not unused:
        return copy(m.tokenizer)
    data = json.loads(m.tokenizer.to_str())
    kind = (data.get("model") or {}).get("type")
    if kind not in _DICT_VOCAB_MODELS or not isinstance(data["model"].get("vocab"), dict):
        raise UserError(f"Tokenizer for {m.label} has type {kind}, but only BPE is currently supported "
                        f"(it has {len(unused)} token(s) at or above vocab_size {m.vocab_size} to strip)")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < m.vocab_size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if i < m.vocab_size}
    if kind == "BPE":
        def keep(merge):
            parts = merge.split(" ") if isinstance(merge, str) else merge
            return not any(p in unused for p in parts)
        data["model"]["merges"] = [e for e in data["model"].get("merges", []) if keep(e)]
    return Tokenizer.from_str(json.dumps(data))


def union(models: Sequence[Loaded]):
    """The union tokenizer: ``models[0]`` (the tokenizer base) stripped, then the plain tokens of
    every model (in this order, by increasing id, ids < its vocab_size) the base lacks, then every
    model's added tokens, the first definition of each winning (A2's deterministic order)."""
    first = models[0]
    out = stripped(first)
    base_vocab = {t for t, i in first.vocab.items() if i < first.vocab_size}  # the stripped base's
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    visited: set[tuple[int, int]] = set()
    for m in models:
        if (id(m.vocab), m.vocab_size) in visited:
            continue  # the same tokenizer file with the same vocab_size adds nothing the first did not
        visited.add((id(m.vocab), m.vocab_size))
        added_here = {a.content for a in m.added.values()}
        new = [(i, t) for t, i in m.vocab.items()
               if i < m.vocab_size and t not in base_vocab and t not in added_here]
        for _, tok in sorted(new):
            plain.setdefault(tok)
        for i in sorted(m.added):
            if i < m.vocab_size:
                added.setdefault(m.added[i].content, m.added[i])
    add_plain(out, [t for t in plain if t not in added])
    if added:
        out.add_tokens(list(added.values()))
    return out


def add_plain(tok, tokens: Sequence[str]) -> None:
    from tokenizers import AddedToken

    if tokens:
        tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])


def id_order(tok, source: str) -> list[str]:
    """The tokenizer's tokens by id; its ids must be 0..V-1 (one row each)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * len(vocab)
    for t, i in vocab.items():
        if i >= len(tokens):
            raise UserError(f"tokenizer ({source}): token ids are not contiguous (id {i} with {len(vocab)} tokens); "
                            "rows cannot be assigned")
        tokens[i] = t
    return tokens  # type: ignore[return-value]


# --- writing -----------------------------------------------------------------------------------------


def save(tok, out: Path, source_dir: Path | None, chat_template: str | None) -> list[str]:
    """Write ``tok`` with the source's tokenizer config; see the module docstring."""
    from .io.json_files import read_object

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    names = ["tokenizer.json"]
    cfg: dict = {}
    src_cfg = source_dir / "tokenizer_config.json" if source_dir is not None else None
    if src_cfg is not None and src_cfg.is_file():
        cfg = read_object(src_cfg, "tokenizer config")
    templates = _templates(cfg.pop("chat_template", None), source_dir)
    if chat_template is not None:
        templates = {"default": chat_template}
    for key in ("added_tokens_decoder", "tokenizer_file", "vocab_file", "merges_file", "auto_map"):
        cfg.pop(key, None)
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    cfg["added_tokens_decoder"] = {
        str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                 "single_word": a.single_word, "special": a.special}
        for i, a in sorted(tok.get_added_tokens_decoder().items())}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", "utf-8")
    names.append("tokenizer_config.json")
    if source_dir is not None:
        names += copy_if_present(source_dir, out, "special_tokens_map.json")
    for name, text in templates.items():
        if name == "default":
            (out / "chat_template.jinja").write_text(text, "utf-8")
            names.append("chat_template.jinja")
        else:
            (out / "additional_chat_templates").mkdir(exist_ok=True)
            (out / "additional_chat_templates" / f"{name}.jinja").write_text(text, "utf-8")
            names.append(f"additional_chat_templates/{name}.jinja")
    return names


def _templates(in_config: Any, source_dir: Path | None) -> dict[str, str]:
    """The source tokenizer's templates by name (``default`` is chat_template.jinja)."""
    found: dict[str, str] = {}
    if isinstance(in_config, str):
        found["default"] = in_config
    elif isinstance(in_config, list):
        found.update({e["name"]: e["template"] for e in in_config
                      if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("template"), str)})
    if source_dir is not None:
        jinja = source_dir / "chat_template.jinja"
        if jinja.is_file():
            found["default"] = jinja.read_text("utf-8")
        extra = source_dir / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                found.setdefault(f.stem, f.read_text("utf-8"))
    return found


def copy_if_present(src_dir: Path, out: Path, name: str) -> list[str]:
    from .sources.paths import contained

    src = src_dir / name
    if not (src.exists() or src.is_symlink()):
        return []
    contained(src_dir, src, "model file")  # inside the donor, a regular file
    if not src.is_file():
        return []
    shutil.copyfile(src, out / name)
    return [name]
