"""The recipe's ``chat_template`` (mergekit-compatible, spec mergekit_compat.md M11, A11).

``resolve_chat_template(value, model_dirs)`` turns the recipe value into the Jinja text to write,
or None for "leave the tokenizer's template as it is":

* ``auto``: the most common template among the models' tokenizers, compared after stripping
  (a tokenizer with several named templates contributes its ``default`` one); a tie goes to the
  template seen first in ``model_dirs`` order (mergekit: hash order, A1); None when no model has
  one.
* a built-in name (under 256 characters, no newline, no ``{``): ``alpaca``, ``chatml``,
  ``exaone``, ``llama3``, ``mistral``. These files are ours, written from each format's public
  definition; they render those formats but are not byte-identical to mergekit's files.
* anything else with at least 20 characters and a ``{`` is literal Jinja.

Deliberate deviation (A11): mergekit only logs an invalid value and then writes no tokenizer;
here it is a ``UserError`` raised before merging, and literal Jinja is also parsed (with the
``loopcontrols`` extension and the ``{% generation %}`` tag transformers accepts) so a template
that could never render fails now, not at chat time.
"""
from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Iterable

from .errors import UserError, shown

BUILTIN = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def builtin_template(name: str) -> str | None:
    """The shipped template called ``name``, or None."""
    if name not in BUILTIN:
        return None
    return resources.files(__package__).joinpath("_data", "chat_templates", f"{name}.jinja").read_text("utf-8")


def model_chat_template(directory: Path) -> str | None:
    """The template a model's tokenizer carries, as transformers reads it: ``chat_template.jinja``
    first, else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
    ``{name, template}`` whose ``default`` entry counts)."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    cfg_path = directory / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    from .io.json_files import read_object

    value = read_object(cfg_path, "tokenizer config").get("chat_template")
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        value = named.get("default")
    elif isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) else None


def resolve_chat_template(value: str | None, model_dirs: Iterable[Path]) -> str | None:
    """The Jinja text to write for the recipe's ``chat_template``, or None (keep what the
    tokenizer has). ``model_dirs``: the referenced models, base first, then recipe order."""
    if not value:
        return None
    if not isinstance(value, str):
        raise UserError(f"chat_template must be a string (auto, a built-in name or Jinja text), not {shown(value)}")
    if value == "auto":
        found = [t.strip() for t in (model_chat_template(d) for d in model_dirs) if t and t.strip()]
        # Counter keeps first-seen order and most_common is stable: ties go to the earliest model
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in BUILTIN:
        return builtin_template(value)
    if len(value) < 20 or "{" not in value:
        raise UserError(f"Invalid chat template: {shown(value)}; use auto, a built-in name "
                        f"({', '.join(BUILTIN)}) or Jinja text (at least 20 characters, with '{{')")
    check_jinja(value)
    return value


def check_jinja(text: str) -> None:
    """Parse ``text`` as a transformers chat template would be compiled; one line on failure."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
    except ImportError:  # pragma: no cover - jinja2 comes with torch
        return

    class _Generation(Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text; parse it
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", _Generation])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat_template is not valid Jinja (line {e.lineno}: {e.message})") from None

