"""A local HTTP server standing in for the Hugging Face Hub (HF_ENDPOINT=http://127.0.0.1:PORT; no
test touches the network), shared by the hub tests (test_remote_validate.py, test_shard_hub.py).

It answers the routes huggingface_hub 2.x calls (``/api/models/{repo}/revision/{rev}``,
``/api/models/{repo}/tree/{rev}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``Range``) and
logs every byte of a file's body it sends (``served[(repo, file)]``). Each repository has a commit
sha; ``commit(repo, folder)`` publishes another folder as a new commit (the old one stays
resolvable by its sha), as a push to the Hub does."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves ``repos`` ({"org/name": folder}) the way the Hub does; ``served[(repo, file)]`` counts
    the body bytes sent per file."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.served, self.lock = dict(repos), {}, threading.Lock()
        self.shas = {r: SHA for r in repos}
        self.commits = {(r, SHA): f for r, f in repos.items()}  # (repo, sha) -> folder
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, head=True)

            def do_GET(self):
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.served.clear()

    def commit(self, repo: str, folder: Path) -> str:
        """Publish ``folder`` as the new head of ``repo``; returns its commit sha."""
        sha = hashlib.sha1(f"{repo}:{folder}:{len(self.commits)}".encode()).hexdigest()
        self.repos[repo], self.shas[repo] = folder, sha
        self.commits[(repo, sha)] = folder
        return sha

    def bytes_of(self, repo: str, name: str) -> int:
        return self.served.get((repo, name), 0)

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _folder(self, repo: str, rev: str) -> tuple[Path, str]:
        sha = rev if (repo, rev) in self.commits else self.shas[repo]
        return self.commits[(repo, sha)], sha

    def _json(self, h, body, status=200, headers=None):
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def answer(self, h, head: bool):
        path = h.path.split("?", 1)[0]
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if m and m.group(1) in self.repos:
            root, sha = self._folder(m.group(1), m.group(2) or "main")
            return self._json(h, {"id": m.group(1), "sha": sha, "private": False,
                                  "siblings": [{"rfilename": f} for f in _files(root)]})
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$", path)
        if m and m.group(1) in self.repos:
            root, _ = self._folder(m.group(1), m.group(2))
            return self._json(h, [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                   "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()}
                                  for f in _files(root)])
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and m.group(1) in self.repos:
            root, sha = self._folder(m.group(1), m.group(2))
            if (root / m.group(3)).is_file():
                return self._file(h, m.group(1), root, sha, m.group(3), head)
        self._json(h, {"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

    def _file(self, h, repo: str, root: Path, sha: str, name: str, head: bool):
        data = (root / name).read_bytes()
        start, end = 0, len(data) - 1
        rng = h.headers.get("Range")
        status = 200
        if rng:
            a, b = re.match(r"bytes=(\d+)-(\d*)", rng).groups()
            start, end, status = int(a), min(int(b) if b else len(data) - 1, len(data) - 1), 206
        body = data[start:end + 1]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", sha)
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(body)
            with self.lock:
                self.served[(repo, name)] = self.served.get((repo, name), 0) + len(body)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def header_bytes(f: Path) -> int:
    with open(f, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def run_cli(hub, home: Path, *args) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose Hub is ``hub`` and whose Hugging Face cache is under
    ``home/hf`` (one ``home`` per simulated machine)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                        "ALL_PROXY", "all_proxy")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home / "hf"), HF_HUB_CACHE=str(home / "hf" / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONPATH=os.pathsep.join(
                   [str(Path(__file__).parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=120)


def weight_files(hub, repo: str) -> list[str]:
    return [f for f in hub.files(repo) if f.endswith(".safetensors")]


def load_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
