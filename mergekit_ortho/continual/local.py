"""`merge continual add` (and `watch` without ``--server``) through the state's job queue, so that the
shell and a running `merge serve` can be used side by side (issue 16).

:func:`queued_add` submits the model to ``STATE/queue`` like ``POST /models`` does (the content
hash or an earlier job of the same files answers a duplicate), then:

- a server holds ``queue/serve.lock``: its worker merges the job in queue order; we wait for it
  and answer with its outcome (done / failed / refused by the gate / cancelled);
- no server: we merge the job here. The job is claimed, merged and marked done all under the
  state's lock, which a starting server's :meth:`.queue.Queue.recover` also takes, so a server
  that starts meanwhile can neither re-queue it nor merge it a second time (its worker claims only
  ``queued`` jobs). Jobs queued earlier by a stopped server stay for its next start. A job left
  ``running`` by a killed shell is recovered (done if its version committed, else failed: that
  command already reported its failure) the next time this runs with no server, or when a server
  starts.

The merge itself is :func:`.service.add`'s (the job id recorded in the history entry).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .gate import GateRefused
from .queue import Queue, content_sha256
from .state import State, _lock

_TERMINAL = ("done", "failed", "refused", "cancelled")


def _server_running(q: Queue) -> bool:
    """True when a `merge serve` holds this state's queue; otherwise recover a killed shell's job."""
    from filelock import FileLock, Timeout

    owner = FileLock(str(q.dir / "serve.lock"))
    try:
        owner.acquire(timeout=0)
    except Timeout:
        return True
    try:
        q.recover()
    finally:
        owner.release()
    return False


def _wait(q: Queue, job: dict, poll: float) -> dict:
    """The outcome of a job another worker (the server's) has: its history entry once done."""
    while job["status"] not in _TERMINAL:
        time.sleep(poll)
        job = q.get(job["id"])
    if job["status"] == "done":
        return {"name": job["name"], "source": job["source"], "sha256": job["sha256"], "t": job["t"],
                "version": job.get("version"), "job": job["id"]}
    if job["status"] == "refused":
        raise GateRefused(job["message"])
    if job["status"] == "cancelled":
        raise UserError(f"job {job['id']} ({job['name']}) was cancelled before it was merged")
    raise UserError(job["message"] or f"job {job['id']} failed")


def queued_add(state_dir: Path, model_ref: str, name: str | None = None, force: bool = False,
               params: dict | None = None, lock_timeout: float = -1, poll: float = 0.1,
               on_wait: Callable[[dict], None] | None = None) -> dict:
    """Fold one model into the state through its queue; returns the history entry (see the module
    docstring). ``on_wait(job)``: called when a server's worker has the job (we wait for it)."""
    from filelock import Timeout

    from . import service

    root = Path(state_dir)
    label = service.validate(root, model_ref, name, params)  # a bad model: its clear error, nothing queued
    source = str(Path(model_ref).resolve()) if Path(model_ref).exists() else model_ref
    q = Queue(root)
    job, existing = q.submit(source, label, params or {}, None, None if force else content_sha256(source),
                             force=force)
    if existing and job["status"] == "done":
        raise UserError(f"{model_ref} has the same files (so the same tensors) as '{job['name']}', already merged as model {job['t']} "
                        f"(job {job['id']}); pass --force to merge it again")
    if existing or _server_running(q):
        if on_wait:
            on_wait(job)
        return _wait(q, job, poll)
    try:
        with _lock(root).acquire(timeout=lock_timeout):
            mine = q.claim(job["id"], runner="shell")
            if mine is not None:
                try:
                    entry = service.add_locked(root, source, label, force, params or {}, job["id"])
                except GateRefused as e:
                    q.quarantine(job, str(e))
                    q.finish(job["id"], "refused", message=str(e))
                    raise
                except Exception as e:  # (Ctrl-C / kill: left running; recovered on the next start)
                    q.finish(job["id"], "failed", message=str(e) if isinstance(e, UserError)
                             else f"internal error: {type(e).__name__}: {e}")
                    raise
                q.finish(job["id"], "done", version=entry.get("version"), t=entry["t"], sha256=entry["sha256"])
                return entry
    except Timeout:
        try:
            q.cancel(job["id"])
        except UserError:  # a server's worker took it meanwhile: it answers for it
            return _wait(q, q.get(job["id"]), poll)
        raise UserError(f"{root} is locked by another process; try again later") from None
    if on_wait:  # a server started meanwhile and its worker took the job
        on_wait(job)
    return _wait(q, q.get(job["id"]), poll)
