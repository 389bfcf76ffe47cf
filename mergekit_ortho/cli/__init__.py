"""The `merge` command line: parse, call the library, render. No merge logic lives here.

Exit codes: 0 success, 2 bad input (one line, no traceback), 1 unexpected internal error,
130 interrupted. ``--verbose`` shows tracebacks. Heavy modules (torch, the executor) are imported
inside the commands so that ``merge --help`` and argument errors stay fast.

One module per command group; each registers its commands on ``app`` (cli/app.py) when imported.
"""
from __future__ import annotations

# Importing a module registers its commands; `merge --help` lists them in this order.
from . import run  # noqa: F401, I001
from . import info, rmm, lowrank, continual  # noqa: F401, I001
from . import analyze  # noqa: F401, I001
from . import sweep  # noqa: F401, I001
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    import os

    # Ask torch's CPU allocator to back large tensors with transparent huge pages (2 MiB): every
    # merged tensor is a fresh buffer, and first-touch page faults on 4 KiB pages cost more than
    # the arithmetic (measured: linear over 3 x 271M bf16 models 4.9 s -> 4.0 s, same peak RSS).
    # Read by torch when it starts; a user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Idle OpenMP workers sleep instead of spinning: when another job shares the cores, spinning
    # workers starve the one doing the work (2 cores, one busy with another job: a 1024x1024 SVD
    # took 1.2 s with libgomp's default spin-then-sleep and 3.7-5.7 s with ACTIVE at load 3, but
    # 0.46 s passive). On idle cores SVDs are as fast; chunked elementwise methods (ties, dare) pay
    # ~10-15 % for the wake-ups. OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _latch_interrupts()
    app()


def _latch_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also recorded, so that a commit point
    refuses even when the exception was raised inside a finaliser and dropped by Python."""
    import signal

    from ..placement import INTERRUPTED

    def on_interrupt(signum, frame):
        INTERRUPTED["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
