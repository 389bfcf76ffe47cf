"""`merge continual watch`: merge (or post to a server's queue) each complete checkpoint that
appears in an inbox, in arrival order, once.

A checkpoint is taken once its size and newest mtime are stable across two polls and its shards
are all there (:func:`_incomplete_reason`); see :func:`watch`.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .local import queued_add
from .state import State


def _entry_signature(p: Path) -> tuple | None:
    """(total size, newest mtime) of a candidate checkpoint, or None if it is not one (yet)."""
    if p.name.startswith("."):
        return None
    if p.is_file():
        if p.suffix != ".safetensors":
            return None
        st = p.stat()
        return (st.st_size, st.st_mtime_ns)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        weights = [f for f in files if f.suffix == ".safetensors" or f.name.endswith(".index.json")]
        if not weights:
            return None
        return (sum(f.stat().st_size for f in files), max(f.stat().st_mtime_ns for f in files))
    return None


_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


def _incomplete_reason(p: Path) -> str | None:
    """Why ``p`` is not (yet) a whole checkpoint, or None when it is: headers readable, every shard
    of its index present, and no numbered shard (``-00002-of-00003``) without its siblings (a copy
    whose index arrives last looks like a complete single-file model until then)."""
    from ..sources.checkpoint import CheckpointSource

    if p.is_dir():
        for f in p.glob("*.safetensors"):
            m = _SHARD_NAME.search(f.name)
            if m:
                total = int(m.group(2))
                stem = f.name[: m.start()]
                missing = [i for i in range(1, total + 1)
                           if not (p / f"{stem}-{i:05d}-of-{total:05d}.safetensors").is_file()]
                if missing:
                    return f"shard {missing[0]} of {total} has not arrived"
                if not (p / "model.safetensors.index.json").is_file() and stem == "model":
                    return "its shard index model.safetensors.index.json has not arrived"
    try:
        CheckpointSource(str(p), p.name).close()
        return None
    except UserError as e:
        return str(e)


def watch(state_dir: Path, inbox: Path, interval: float = 2.0, log: Callable[[str], None] = print,
          should_stop: Callable[[], bool] = lambda: False, max_polls: int | None = None,
          incomplete_timeout: float = 3600.0, submit: Callable[[str, str], dict] | None = None) -> int:
    """Merge each complete checkpoint that appears in ``inbox``, in arrival order.

    A checkpoint (a ``.safetensors`` file or a model directory) is taken once its total size and
    newest modification time are unchanged across two polls ``interval`` seconds apart and it is
    whole (``_incomplete_reason``). One that is still incomplete is waited for, with its reason
    logged whenever it changes, for up to ``incomplete_timeout`` seconds since it last changed;
    then it is given up with a log line. A checkpoint whose merge fails (a shape mismatch, a
    corrupt file) is logged and retried whenever its files change. Names already in the history
    (by source path) are skipped, so a restarted watcher never merges a model twice; a model whose
    tensors were already merged under another name is refused by the hash check and logged.
    Returns the number of models merged. Each goes through the state's queue
    (:func:`.local.queued_add`: merged here, or by a running server's worker, never twice);
    ``submit(path, name)`` (:func:`poster`): post each one to a server's queue over HTTP instead
    (the server's job answers for the merge).
    """
    root, inbox = Path(state_dir), Path(inbox)
    if not inbox.is_dir():
        raise UserError(f"inbox {inbox} is not a directory")
    seen: dict[Path, tuple] = {}
    changed_at: dict[Path, float] = {}
    waiting: dict[Path, str] = {}  # the last reason logged for an incomplete checkpoint
    failed: dict[Path, tuple] = {}  # signature at the failed attempt: retried when it changes
    given_up: dict[Path, tuple] = {}
    done = {h["source"] for h in State.load(root).data["history"]}
    merged = polls = 0
    while not should_stop():
        candidates = []
        now = time.time()
        for p in inbox.iterdir():
            rp = p.resolve()
            if str(rp) in done:
                continue
            sig = _entry_signature(p)
            if sig is None or failed.get(rp) == sig or given_up.get(rp) == sig:
                continue
            if seen.get(rp) != sig:
                seen[rp], changed_at[rp] = sig, now
                continue  # changed since the last poll: still arriving
            why = _incomplete_reason(p)
            if why is None:
                waiting.pop(rp, None)
                candidates.append((sig[1], p))
            elif now - changed_at[rp] > incomplete_timeout:
                given_up[rp] = sig
                waiting.pop(rp, None)
                log(f"gave up on {p.name}: still incomplete after {incomplete_timeout:g}s without a change ({why}); "
                    "it is retried if its files change")
            elif waiting.get(rp) != why:
                waiting[rp] = why
                log(f"waiting for {p.name}: {why}")
        for _, p in sorted(candidates, key=lambda c: (c[0], c[1].name)):
            if should_stop():
                break
            rp = p.resolve()
            try:
                if submit is not None:
                    job = submit(str(rp), p.name.removesuffix(".safetensors"))
                    log(f"posted {p.name} as job {job['id']} ({job['status']})")
                else:
                    entry = queued_add(root, str(p), name=p.name.removesuffix(".safetensors"))
                    log(f"merged {p.name} as model {entry['t']} (sha256 {entry['sha256'][:12]})")
                merged += 1
                done.add(str(rp))
                failed.pop(rp, None)
            except UserError as e:
                failed[rp] = seen[rp]
                log(f"skipped {p.name}: {e} (retried if its files change)")
        polls += 1
        if max_polls is not None and polls >= max_polls:
            break
        end = time.time() + interval
        while time.time() < end and not should_stop():
            time.sleep(min(0.1, interval))
    return merged


def poster(url: str, token: str | None = None, timeout: float = 30.0) -> Callable[[str, str], dict]:
    """``submit`` for :func:`watch`: POST each checkpoint to ``url``/models of `merge serve`, with
    the path as its idempotency key (a restarted watcher posts the same job, not a second one)."""
    import urllib.error
    import urllib.request

    def submit(path: str, name: str) -> dict:
        body = json.dumps({"source": path, "name": name, "idempotency_key": f"watch:{path}"}).encode()
        req = urllib.request.Request(url.rstrip("/") + "/models", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail", "")
            except ValueError:
                detail = ""
            raise UserError(f"the server refused {name}: HTTP {e.code} {detail}".strip()) from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot reach the merge server at {url}: {getattr(e, 'reason', e)}") from None

    return submit
