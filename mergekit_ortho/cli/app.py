"""The `merge` application and what every command shares: consoles, one-line messages, the
mapping of exceptions to exit codes.

Exit codes: 0 success, 2 bad input (one line, no traceback), 1 unexpected internal error,
130 interrupted. ``--verbose`` shows tracebacks. Heavy modules (torch, the executor) are imported
inside the commands so that ``merge --help`` and argument errors stay fast.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import typer

app = typer.Typer(
    name="merge",
    help="Merge model checkpoints and LoRA adapters with exact, streaming operators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

STATE = {"verbose": False, "quiet": False}


class PlainConsole:
    """A rich console for user text: markup off (tensor names, paths and model names are user
    text, and rich would parse '[/x]' in them as a closing tag and crash; styles go through Text,
    see say) and strings printed as cleaned single lines (see clean)."""

    def __init__(self, stderr: bool = False):
        from rich.console import Console

        self.rich = Console(stderr=stderr, highlight=False, soft_wrap=True, markup=False)

    def print(self, obj) -> None:
        from rich.text import Text

        self.rich.print(Text(clean(obj)) if isinstance(obj, str) else obj)


def stderr_console():
    return PlainConsole(stderr=True)


def stdout_console():
    return PlainConsole()


def clean(text) -> str:
    """User text made safe for one terminal line: control characters (a newline in a path would
    forge a second line) are shown escaped."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def clean_lines(text) -> str:
    """Like clean, keeping the newlines of our own multi-line text (method details)."""
    return "\n".join(clean(line) for line in str(text).split("\n"))


def say(text, label: str | None = None, style: str = "bold", err: bool = False, console=None) -> None:
    """Print one line: an optional styled label, then ``text`` as plain, cleaned text."""
    from rich.text import Text

    line = Text()
    if label:
        line.append(label, style=style)
        line.append(" ")
    line.append(clean(text))
    (console or (stderr_console() if err else stdout_console())).print(line)


def handle_errors(fn):
    """Map exceptions to exit codes and one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..errors import UserError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            say("interrupted; no output was written", "error:", "red", err=True)
            raise typer.Exit(130)
        except (UserError, OSError) as e:
            if STATE["verbose"]:
                import traceback

                traceback.print_exc()
            msg = str(e) if isinstance(e, UserError) else os_message(e)
            say(msg, "error:", "red", err=True)
            raise typer.Exit(2)
        except Exception as e:  # internal error
            if STATE["verbose"]:
                import traceback

                traceback.print_exc()
            say(f"{type(e).__name__}: {e} (run with --verbose for the traceback)", "internal error:", "red", err=True)
            raise typer.Exit(1)

    return wrapper


def os_message(e: OSError) -> str:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1,
        help="CPU threads for the tensor math (default: one per core): a full-model merge computes "
        "that many tensors at once, each on one thread, with the same result for any N. On cores "
        "shared with other jobs, --threads 1 avoids stalls of torch's thread pool."),
):
    STATE["verbose"] = verbose
    STATE["quiet"] = quiet
    if threads:
        import os

        os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch starts (it is not imported yet)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)

