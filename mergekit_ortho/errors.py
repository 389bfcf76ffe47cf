"""Error types shared by every layer.

``UserError`` is bad input: the CLI prints its one-line message and exits 2. Anything else that
escapes is an internal error (exit 1). Messages say what is wrong, where (file, tensor) and what
to do.
"""


class UserError(ValueError):
    """Bad input: a recipe, a file or an argument the user can fix."""


class Cancelled(UserError):
    """The user interrupted the run (Ctrl-C); nothing was written."""


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote user input (a value
    can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " …" + text[-2:]
