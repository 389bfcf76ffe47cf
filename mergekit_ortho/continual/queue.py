"""The persistent job queue of `merge serve`, in the state directory (issue 16).

    STATE/queue/
      jobs/<id>.json   one job: id, seq (submission order), source, name, parameters,
                       idempotency_key, content_sha256, status, times, version / t / message
      quarantine.json  the models a gate refused (name, source, message, time)
      lock             held (filelock) for the few milliseconds a job file is read-modify-written
      serve.lock       held by the one server that works this queue

Status: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``refused`` (by the gate), or
``queued`` -> ``cancelled``. Every change is an atomic rewrite of the job's file, so a kill -9
leaves each job in one of its states. A job is merged under the state's lock (the same lock as
`merge continual add`), and its id is recorded in the history entry that its version commits;
:meth:`Queue.recover` (run under the state lock when a server starts, and by a shell's add when no
server runs) marks a ``running`` job ``done`` when the state's history names it (the crash came
after the commit point) and re-queues it otherwise (before: the state is as it was). So a job is
never merged twice and never lost. A job that a shell's `merge continual add` was running
(:mod:`.local`; ``runner: shell``) is marked ``failed`` instead: that command already reported
its failure, so it is not merged behind its user's back.

Duplicates: a submission with the idempotency key of an earlier job, or with the same content
hash (sha256 of the checkpoint's weight and index files) as a job that is queued, running or done,
returns that job instead of a new one.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

from ..errors import UserError
from .state import State, _lock, _write_json_atomic

STATUSES = ("queued", "running", "done", "failed", "refused", "cancelled")
_LIVE = ("queued", "running", "done")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def content_sha256(source: str) -> str | None:
    """sha256 of a local checkpoint's weight and index files (path order, streamed in 8 MiB
    blocks); None for a hub id."""
    p = Path(source)
    if not p.exists():
        return None
    if p.is_file():
        files = [p]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and (
            f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name.endswith(".index.json")
            or f.name == "adapter_config.json"))
    h = hashlib.sha256()
    for f in files:
        h.update((f.relative_to(p).as_posix() if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
    return h.hexdigest()


class Queue:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)
        self.dir = self.root / "queue"
        self.jobs_dir = self.dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.dir / "lock"))

    def _path(self, job_id: str) -> Path:
        if not job_id.isalnum() or len(job_id) > 64:
            raise KeyError(job_id)
        return self.jobs_dir / f"{job_id}.json"

    def _read(self, f: Path) -> dict | None:
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write(self, job: dict) -> None:
        _write_json_atomic(self._path(job["id"]), job)

    def get(self, job_id: str) -> dict | None:
        try:
            f = self._path(job_id)
        except KeyError:
            return None
        return self._read(f) if f.is_file() else None

    def jobs(self, status: str | None = None) -> list[dict]:
        out = [j for f in self.jobs_dir.glob("*.json") if (j := self._read(f)) is not None]
        out.sort(key=lambda j: j["seq"])
        return [j for j in out if status is None or j["status"] == status]

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(STATUSES, 0)
        for j in self.jobs():
            c[j["status"]] = c.get(j["status"], 0) + 1
        return c

    def find_duplicate(self, idempotency_key: str | None, content: str | None) -> dict | None:
        for j in self.jobs():
            if idempotency_key and j.get("idempotency_key") == idempotency_key:
                return j
            if content and j.get("content_sha256") == content and j["status"] in _LIVE:
                return j
        return None

    def submit(self, source: str, name: str, parameters: dict, idempotency_key: str | None,
               content: str | None, force: bool = False) -> tuple[dict, bool]:
        """(the job, False) for a new one; (the earlier job, True) for a duplicate. ``force``: merge
        it even if its tensors were merged before (`continual add --force`)."""
        with self._lock():
            dup = self.find_duplicate(idempotency_key, content)
            if dup is not None:
                return dup, True
            seq = max((j["seq"] for j in self.jobs()), default=0) + 1
            job = {"id": uuid.uuid4().hex[:16], "seq": seq, "source": source, "name": name,
                   "parameters": parameters, "idempotency_key": idempotency_key, "content_sha256": content,
                   "force": force, "status": "queued", "created": _now(), "started": None, "finished": None, "attempts": 0,
                   "version": None, "t": None, "sha256": None, "message": None}
            self._write(job)
            return job, False

    def cancel(self, job_id: str) -> dict:
        with self._lock():
            job = self.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job["status"] != "queued":
                raise UserError(f"job {job_id} is {job['status']}; only a queued job can be cancelled")
            job.update(status="cancelled", finished=_now())
            self._write(job)
            return job

    def claim(self, job_id: str | None = None, runner: str = "server") -> dict | None:
        """The oldest queued job (or ``job_id`` if it is still queued), marked running by
        ``runner`` (``server`` | ``shell``); None: nothing queued."""
        with self._lock():
            queued = [j for j in self.jobs("queued") if job_id is None or j["id"] == job_id]
            if not queued:
                return None
            job = queued[0]
            job.update(status="running", started=_now(), attempts=job.get("attempts", 0) + 1, runner=runner)
            self._write(job)
            return job

    def finish(self, job_id: str, status: str, **fields) -> dict:
        with self._lock():
            job = self.get(job_id)
            job.update(fields, status=status, finished=_now())
            self._write(job)
            return job

    def quarantine(self, job: dict, message: str) -> None:
        f = self.dir / "quarantine.json"
        with self._lock():
            items = json.loads(f.read_text()) if f.is_file() else []
            if any(i["job"] == job["id"] for i in items):
                return  # re-run after a crash between quarantine and finish
            items.append({"job": job["id"], "name": job["name"], "source": job["source"], "message": message,
                          "time": _now()})
            f.parent.mkdir(exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp")
            tmp.write_text(json.dumps(items, indent=1))
            tmp.replace(f)

    def quarantined(self) -> list[dict]:
        f = self.dir / "quarantine.json"
        return json.loads(f.read_text()) if f.is_file() else []

    def recover(self) -> list[dict]:
        """After a crash: each ``running`` job is ``done`` if the state's history records it, else
        queued again. Takes the state lock (no add is half-way while it looks)."""
        changed = []
        with _lock(self.root), self._lock():
            history = {h.get("job"): h for h in State.load(self.root).data["history"] if h.get("job")}
            for job in self.jobs("running"):
                h = history.get(job["id"])
                if h is not None:
                    job.update(status="done", finished=_now(), version=h.get("version"), t=h["t"],
                               sha256=h["sha256"], message="committed before a restart")
                elif job.get("runner") == "shell":  # its `continual add` died with an error: not re-run
                    job.update(status="failed", finished=_now(),
                               message="interrupted: the `merge continual add` running it was killed; add it again")
                else:
                    job.update(status="queued", started=None, message="re-queued after a restart")
                self._write(job)
                changed.append(job)
        return changed
