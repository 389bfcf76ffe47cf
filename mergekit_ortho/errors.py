"""Error types shared by every layer.

``UserError`` is bad input: the CLI prints its one-line message and exits 2. Anything else that
escapes is an internal error (exit 1). Messages say what is wrong, where (file, tensor) and what
to do.
"""


class UserError(ValueError):
    """Bad input: a recipe, a file or an argument the user can fix."""


def shown(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote user input (a value
    can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " …" + text[-2:]


class OutOfMemory(UserError):
    """A tensor's merge did not fit in memory."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class memory_guard:
    """``with memory_guard(name, need, estimate): ...`` turns an allocation failure while merging one
    tensor into one line naming the tensor, the bytes its step needs and the plan's peak estimate
    (torch raises MemoryError, torch.OutOfMemoryError or a RuntimeError from its CPU allocator)."""

    def __init__(self, name: str, need: int, estimate: int):
        self.name, self.need, self.estimate = name, need, estimate

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not _is_oom(exc):
            return False
        raise OutOfMemory(
            f"out of memory while merging tensor '{self.name[:120]}' (its step needs about {_gib(self.need)}; the "
            f"plan estimated a peak of {_gib(self.estimate)}); free memory, merge fewer models at once, or "
            "compute on another device") from None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc)
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower()))
