"""`merge serve STATE`: continual merging behind an HTTP API (FastAPI + uvicorn, the ``[serve]``
extra; issue 16).

One worker thread takes jobs from the persistent queue (:mod:`.queue`) oldest first and folds each
with :func:`.service.add` under the state's lock, so `merge continual add` can be used beside it.
Requests are validated before anything is queued: ``POST /models`` opens the checkpoint's headers
and checks them against the state (names, shapes) and answers 422 with the same one line as the
CLI, else 202 with the job (200 with the earlier job for a duplicate idempotency key or content
hash). Loopback by default; any other address needs a bearer token (``--token-file``), which then
guards every endpoint but ``/healthz`` and ``/readyz``. Log lines are JSON on stderr (``--log-format text`` for
people): event, job, model, sha256, version, seconds. Metrics (Prometheus text at ``/metrics``):
jobs by status, queue depth, add duration histogram, bytes read, current version, models merged,
last success time.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime
import hmac
import ipaddress
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from . import service, versions
from .gate import GateRefused
from .queue import Queue, content_sha256
from .state import State

INSTALL_HINT = "merge serve needs the serve extra: pip install 'mergekit-ortho[serve]'"


def require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"{INSTALL_HINT} ({e.name} is not installed)") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Log:
    """One line per event on ``stream``: JSON (``fmt`` "json") or ``event key=value ...``."""

    def __init__(self, fmt: str = "json", stream=None):
        if fmt not in ("json", "text"):
            raise UserError(f"--log-format must be json or text, not '{fmt}'")
        self.fmt, self.stream, self._lock = fmt, stream or sys.stderr, threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event,
               **{k: v for k, v in fields.items() if v is not None}}
        line = (json.dumps(rec, default=str) if self.fmt == "json"
                else " ".join([rec["time"], event] + [f"{k}={v}" for k, v in rec.items() if k not in ("time", "event")]))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class Metrics:
    def __init__(self, worker: "Worker"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.duration = Histogram("mergekit_add_duration_seconds", "Seconds per merged model (one add).",
                                  registry=self.registry, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
        self.bytes_read = Counter("mergekit_bytes_read", "Model bytes read by adds.", registry=self.registry)
        self.last_success = Gauge("mergekit_last_success_timestamp_seconds", "Unix time of the last merged model.",
                                  registry=self.registry)
        self.finished = Counter("mergekit_jobs_finished", "Jobs finished since start, by outcome.", ["status"],
                                registry=self.registry)

        class Live:
            def collect(self):
                counts = worker.queue.counts()
                g = GaugeMetricFamily("mergekit_jobs", "Jobs in the queue by status.", labels=["status"])
                for k, v in counts.items():
                    g.add_metric([k], v)
                yield g
                yield GaugeMetricFamily("mergekit_queue_depth", "Jobs queued or running.",
                                        value=counts["queued"] + counts["running"])
                st = State.load(worker.root)
                yield GaugeMetricFamily("mergekit_current_version", "Number of the current version.",
                                        value=versions.number(st.data.get("current") or ""))
                yield GaugeMetricFamily("mergekit_models_merged", "Models in the current version.", value=st.t)

        self.registry.register(Live())

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Worker:
    """The one thread that merges queued jobs, in order."""

    def __init__(self, root: Path, log: Log):
        self.root, self.log = Path(root), log
        self.queue = Queue(self.root)
        self.metrics = Metrics(self)
        self.progress: dict[str, tuple[int, int]] = {}
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        for job in self.queue.recover():
            self.log("job_recovered", job=job["id"], model=job["name"], status=job["status"], version=job["version"])
        self.thread = threading.Thread(target=self._loop, name="merge-worker", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if not self.run_one():
                self.wake.wait(0.5)
                self.wake.clear()

    def run_one(self) -> bool:
        job = self.queue.claim()
        if job is None:
            return False
        jid, t0 = job["id"], time.time()
        self.log("job_started", job=jid, model=job["name"], source=job["source"])

        def progress(done: int, total: int) -> None:
            self.progress[jid] = (done, total)

        try:
            entry = service.add(self.root, job["source"], name=job["name"], params=job["parameters"], job=jid,
                                force=job.get("force", False),
                                on_progress=progress)
        except GateRefused as e:
            # quarantine first: a reader that sees the job refused also sees it quarantined
            self.queue.quarantine(job, str(e))
            self.queue.finish(jid, "refused", message=str(e))
            self.metrics.finished.labels("refused").inc()
            self.log("job_refused", job=jid, model=job["name"], message=str(e), seconds=round(time.time() - t0, 3))
        except UserError as e:
            self.queue.finish(jid, "failed", message=str(e))
            self.metrics.finished.labels("failed").inc()
            self.log("job_failed", job=jid, model=job["name"], message=str(e), seconds=round(time.time() - t0, 3))
        except Exception as e:  # an internal error fails the job, not the server
            self.queue.finish(jid, "failed", message=f"internal error: {type(e).__name__}: {e}")
            self.metrics.finished.labels("failed").inc()
            self.log("job_failed", job=jid, model=job["name"], message=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc(limit=5))
        else:
            secs = time.time() - t0
            self.queue.finish(jid, "done", version=entry.get("version"), t=entry["t"], sha256=entry["sha256"])
            self.metrics.duration.observe(secs)
            self.metrics.bytes_read.inc(self.progress.get(jid, (0, 0))[1])
            self.metrics.last_success.set(time.time())
            self.metrics.finished.labels("done").inc()
            self.log("job_done", job=jid, model=job["name"], sha256=entry["sha256"], version=entry.get("version"),
                     t=entry["t"], seconds=round(secs, 3))
        finally:
            self.progress.pop(jid, None)
        return True

    def view(self, job: dict) -> dict:
        out = dict(job)
        if job["status"] == "running" and job["id"] in self.progress:
            out["bytes_done"], out["bytes_total"] = self.progress[job["id"]]
        return out


def create_app(state_dir: Path, token: str | None = None, log: Log | None = None, start_worker: bool = True):
    """The FastAPI app over ``state_dir`` (its worker starts with the app's lifespan)."""
    require_extra()
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, Field

    root = Path(state_dir)
    State.load(root)
    log = log or Log()
    worker = Worker(root, log)

    @asynccontextmanager
    async def lifespan(app):
        if start_worker:
            worker.start()
        yield
        worker.stop()

    app = FastAPI(title="mergekit-ortho merge server", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.worker = worker

    def auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"{where or 'body'}: {e.get('msg')}"}, status_code=422)

    class ModelIn(BaseModel):
        source: str = Field(min_length=1, description="Checkpoint directory, file or hub id.")
        name: str | None = Field(None, description="Label recorded in the history.")
        parameters: dict[str, Any] | None = Field(None, description="Per-model parameters (e.g. weight).")
        idempotency_key: str | None = Field(None, max_length=200)

    class TagIn(BaseModel):
        name: str

    class ExportIn(BaseModel):
        path: str = Field(min_length=1)
        version: str | None = None
        overwrite: bool = False

    guarded = [Depends(auth)]

    def job_or_404(job_id: str) -> dict:
        job = worker.queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.post("/models", status_code=202, dependencies=guarded)
    def submit(body: ModelIn):
        q = worker.queue
        dup = q.find_duplicate(body.idempotency_key, None)
        if dup is not None:
            return JSONResponse({**worker.view(dup), "duplicate": True}, status_code=200)
        label = service.validate(root, body.source, body.name, body.parameters)  # 422 on a bad model
        source = str(Path(body.source).resolve()) if Path(body.source).exists() else body.source
        job, existing = q.submit(source, label, body.parameters or {}, body.idempotency_key, content_sha256(source))
        if existing:
            return JSONResponse({**worker.view(job), "duplicate": True}, status_code=200)
        worker.wake.set()
        log("job_queued", job=job["id"], model=label, source=source)
        return {**job, "duplicate": False}

    @app.get("/jobs/{job_id}", dependencies=guarded)
    def get_job(job_id: str):
        return worker.view(job_or_404(job_id))

    @app.get("/jobs", dependencies=guarded)
    def list_jobs(status: str | None = None):
        return [worker.view(j) for j in worker.queue.jobs(status)]

    @app.delete("/jobs/{job_id}", dependencies=guarded)
    def cancel(job_id: str):
        job_or_404(job_id)
        try:
            job = worker.queue.cancel(job_id)
        except UserError as e:
            raise HTTPException(409, str(e)) from None
        log("job_cancelled", job=job_id, model=job["name"])
        return job

    @app.get("/state", dependencies=guarded)
    def state():
        s = service.status(root)
        s["quarantine"] = worker.queue.quarantined()
        return s

    @app.get("/versions", dependencies=guarded)
    def list_versions():
        return versions.list_versions(root)

    def _version_error(e: UserError):
        raise HTTPException(404 if "no version" in str(e) else 422, str(e)) from None

    @app.post("/versions/{version}/promote", dependencies=guarded)
    def promote(version: str):
        try:
            r = versions.promote(root, version)
        except UserError as e:
            _version_error(e)
        log("promoted", version=r["version"], t=r["t"])
        return r

    @app.post("/versions/{version}/tag", dependencies=guarded)
    def tag(version: str, body: TagIn):
        try:
            return versions.tag(root, version, body.name)
        except UserError as e:
            _version_error(e)

    @app.post("/export", dependencies=guarded)
    def export(body: ExportIn):
        t0 = time.time()
        try:
            out = service.export(root, Path(body.path), overwrite=body.overwrite, version=body.version)
        except UserError as e:
            _version_error(e)
        log("exported", path=str(out), version=body.version, seconds=round(time.time() - t0, 3))
        return {"path": str(out)}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        try:
            State.load(root)
        except UserError as e:
            return JSONResponse({"status": "not ready", "detail": str(e)}, status_code=503)
        if start_worker and not worker.alive:
            return JSONResponse({"status": "not ready", "detail": "the merge worker is not running"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", dependencies=guarded)
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(worker.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(state_dir: Path, host: str = "127.0.0.1", port: int = 8321, token_file: Path | None = None,
          retain: int | None = None, log_format: str = "json", read_token: Callable[[Path], str] | None = None) -> None:
    """Run the server until SIGTERM / Ctrl-C (one server per state: a second one is refused)."""
    require_extra()
    import socket

    import uvicorn
    from filelock import FileLock, Timeout

    root = Path(state_dir)
    log = Log(log_format)
    State.load(root)
    token = read_token(token_file) if token_file else None
    if token is None and not is_loopback(host):
        raise UserError(f"--host {host} is not a loopback address: pass --token-file with a bearer token "
                        "(every request must then send 'Authorization: Bearer TOKEN')")
    Queue(root)
    owner = FileLock(str(root / "queue" / "serve.lock"))
    try:
        owner.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{root} is already served by another `merge serve`") from None
    try:
        if retain is not None:
            versions.set_retain(root, retain)
        app = create_app(root, token, log)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        sock.listen(128)
        log("listening", host=host, port=sock.getsockname()[1], state=str(root), auth=token is not None)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: a graceful stop, exit 0 (not re-raised)
                super().handle_exit(sig, frame)
                getattr(self, "_captured_signals", []).clear()

        _Server(config).run(sockets=[sock])
        log("stopped")
    finally:
        owner.release()
