"""The recipe's tokenizer setting (mergekit-compatible; spec mergekit_compat.md M10).

``TokenizerSpec.from_recipe(tokenizer_source, tokenizer)`` parses either mergekit form:
``tokenizer_source: base | union | <model>``, or the ``tokenizer:`` section
``{source (default union), tokens: {<token>: {source, force}}, pad_to_multiple_of}`` where a
token's ``source`` is a model reference, ``{kind: model_token, model, token | token_id}`` or
``{kind: zero}``. Model references stay as written; ``vocab.build_vocabulary`` matches them to
the merged models. Every problem is one ``UserError`` line naming the key (mergekit's wording for
the ``model_token`` errors); unknown keys are refused with the nearest known one (mergekit
ignores them, A14). An entry without ``source`` is kept as ``kind: default`` (A6).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import UserError, shown

@dataclass(frozen=True)
class TokenSource:
    """Where a configured token's row comes from. ``kind``: ``model`` (that model's row for the
    same token), ``model_token`` (that model's row for ``token`` or row ``token_id``), ``zero``, or
    ``default`` (no ``source``: the default rule, A6). ``model`` is the recipe's reference."""
    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenConfig:
    source: TokenSource
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """``source``: ``union``, ``base`` or a model reference as written in the recipe."""
    source: str = "union"
    tokens: Mapping[str, TokenConfig] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_recipe(cls, tokenizer_source: Any = None, tokenizer: Any = None) -> TokenizerSpec | None:
        """The recipe's ``tokenizer_source`` / ``tokenizer:`` values as a spec; None when neither is
        set (tensors are then merged row by row, see ``vocab_mismatch_message``)."""
        if tokenizer_source is not None and tokenizer is not None:
            raise UserError("Cannot specify both tokenizer_source and tokenizer; keep one (tokenizer: {source: ...} "
                            "also takes tokens and pad_to_multiple_of)")
        if tokenizer is None:
            if tokenizer_source is None:
                return None
            return cls(source=_ref(tokenizer_source, "tokenizer_source"))
        if not isinstance(tokenizer, Mapping):
            raise UserError(f"tokenizer must be a mapping (source, tokens, pad_to_multiple_of), not {shown(tokenizer)}")
        _keys(tokenizer, ("source", "tokens", "pad_to_multiple_of"), "tokenizer")
        source = _ref(tokenizer.get("source", "union"), "tokenizer.source")
        pad = tokenizer.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
            raise UserError(f"tokenizer.pad_to_multiple_of must be a positive integer, not {shown(pad)}")
        tokens = tokenizer.get("tokens") or {}
        if not isinstance(tokens, Mapping):
            raise UserError(f"tokenizer.tokens must map tokens to {{source, force}}, not {shown(tokens)}")
        parsed = {}
        for tok, entry in tokens.items():
            if not isinstance(tok, str) or not tok:
                raise UserError(f"tokenizer.tokens: a key must be a non-empty token string, not {shown(tok)}")
            parsed[tok] = _token_config(tok, entry)
        return cls(source=source, tokens=parsed, pad_to_multiple_of=pad or None)

    def model_refs(self) -> list[str]:
        """The model references the spec names (the source and the token sources), so a plan can
        check them before reading any file."""
        refs = [] if self.source in ("union", "base") else [self.source]
        refs += [c.source.model for c in self.tokens.values() if c.source.model is not None]
        return list(dict.fromkeys(refs))


def _keys(entry: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in entry:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(allowed)})"
            raise UserError(f"{where}: unknown key {shown(key)}{hint}")


def _ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} must be union, base or a model reference, not {shown(value)}")
    return value


def _token_config(tok: str, entry: Any) -> TokenConfig:
    where = f"tokenizer.tokens.{shown(tok, 40)}"
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping):
        raise UserError(f"{where} must be a mapping {{source, force}}, not {shown(entry)}")
    _keys(entry, ("source", "force"), where)
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise UserError(f"{where}.force must be true or false, not {shown(force)}")
    src = entry.get("source")
    if src is None:
        return TokenConfig(TokenSource("default"), force)
    if isinstance(src, str):
        return TokenConfig(TokenSource("model", model=_ref(src, f"{where}.source")), force)
    if not isinstance(src, Mapping):
        raise UserError(f"{where}.source must be a model reference or {{kind: ...}}, not {shown(src)}")
    kind = src.get("kind")
    if kind == "zero":
        _keys(src, ("kind",), f"{where}.source")
        return TokenConfig(TokenSource("zero"), force)
    if kind != "model_token":
        raise UserError(f"{where}.source.kind must be model_token or zero, not {shown(kind)}")
    _keys(src, ("kind", "model", "token", "token_id"), f"{where}.source")
    model = _ref(src.get("model"), f"{where}.source.model")
    token, token_id = src.get("token"), src.get("token_id")
    if token is None and token_id is None:
        raise UserError(f"{where}.source: token_id or token must be specified")
    if token is not None and token_id is not None:
        raise UserError(f"{where}.source: only one of token_id or token may be specified")
    if token is not None and not isinstance(token, str):
        raise UserError(f"{where}.source.token must be a string, not {shown(token)}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise UserError(f"{where}.source.token_id must be a non-negative integer, not {shown(token_id)}")
    return TokenConfig(TokenSource("model_token", model=model, token=token, token_id=token_id), force)
