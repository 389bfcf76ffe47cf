"""Hub ids read header-first (sources/hub_remote.py), against a local HTTP server standing in for the
Hub (HF_ENDPOINT=http://127.0.0.1:PORT; no test touches the network).

The server answers the routes huggingface_hub 2.x calls (``/api/models/{repo}/revision/{rev}``,
``/api/models/{repo}/tree/{rev}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``Range``) and
logs every byte of a file's body it sends. `merge validate` and `--dry-run` must fetch exactly
8 + n bytes of each weight file (its header) and the config files; `merge run` must then download
only the weight files the plan reads; a bad shape must be found before any weight byte is sent.
The files are > 100 kB, so a fixed 100 kB range request (huggingface_hub's
``get_safetensors_metadata``) would fail the assertions."""
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

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ortho.testing.checkpoints import llama_shapes, write_checkpoint

CLI = [sys.executable, "-m", "mergekit_ortho.cli"]
SHA = "0123456789abcdef0123456789abcdef01234567"
SHAPES = llama_shapes(hidden=64, layers=2, vocab=256, intermediate=128)


class FakeHub:
    """Serves ``repos`` ({"org/name": folder}) the way the Hub does; ``served[(repo, file)]`` counts
    the body bytes sent per file."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.served, self.lock = repos, {}, threading.Lock()
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

    def bytes_of(self, repo: str, name: str) -> int:
        return self.served.get((repo, name), 0)

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

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
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
        if m and m.group(1) in self.repos:
            return self._json(h, {"id": m.group(1), "sha": SHA, "private": False,
                                  "siblings": [{"rfilename": f} for f in self.files(m.group(1))]})
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/[^/]+$", path)
        if m and m.group(1) in self.repos:
            root = self.repos[m.group(1)]
            return self._json(h, [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                   "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()}
                                  for f in self.files(m.group(1))])
        m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
        if m and m.group(1) in self.repos and (self.repos[m.group(1)] / m.group(2)).is_file():
            return self._file(h, m.group(1), m.group(2), head)
        self._json(h, {"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

    def _file(self, h, repo: str, name: str, head: bool):
        data = (self.repos[repo] / name).read_bytes()
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
        h.send_header("X-Repo-Commit", SHA)
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(body)
            with self.lock:
                self.served[(repo, name)] = self.served.get((repo, name), 0) + len(body)


def header_bytes(f: Path) -> int:
    with open(f, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrepos")
    write_checkpoint(root / "base", SHAPES, seed=0, dtype="float32", shards=2)
    for i, name in enumerate(("a", "b")):
        write_checkpoint(root / name, SHAPES, seed=i + 1, base=root / "base", noise=0.05, dtype="float32", shards=2)
    bad = root / "bad"  # model a with one tensor of another shape
    write_checkpoint(bad, SHAPES, seed=1, base=root / "base", noise=0.05, dtype="float32", shards=2)
    f = bad / "model-00002-of-00002.safetensors"
    tensors = load_file(str(f))
    victim = sorted(tensors)[0]
    tensors[victim] = torch.zeros(tensors[victim].shape[0], 3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    (root / "base" / "tokenizer_config.json").write_text("{}")
    server = FakeHub({f"org/{n}": root / n for n in ("base", "a", "b", "bad")})
    server.victim = victim
    yield server
    server.close()


def run_cli(hub, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                        "ALL_PROXY", "all_proxy")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONPATH=os.pathsep.join(
                   [str(Path(__file__).parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=120)


def weight_files(hub, repo: str) -> list[str]:
    return [f for f in hub.files(repo) if f.endswith(".safetensors")]


def second_shard_names(hub) -> list[str]:
    index = json.loads((hub.repos["org/a"] / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(k for k, v in index.items() if v == "model-00002-of-00002.safetensors")


def recipe(tmp_path: Path, models, exclude=()) -> Path:
    lines = ["merge_method: linear", "base_model: org/base", "models:"] + [f"  - model: {m}" for m in models]
    if exclude:
        lines.append("exclude:")
        lines += [f"  - '^{re.escape(n)}$'" for n in exclude]
    p = tmp_path / "r.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_validate_and_dry_run_fetch_only_headers_and_config(hub, tmp_path):
    hub.reset()
    r = recipe(tmp_path, ["org/a", "org/b"])
    got = run_cli(hub, tmp_path, "validate", r)
    assert got.returncode == 0, got.stderr
    assert "ok" in got.stdout
    got = run_cli(hub, tmp_path, "run", r, "--dry-run", "--out", tmp_path / "out")
    assert got.returncode == 0, got.stderr
    assert not (tmp_path / "out").exists()
    for repo in ("org/base", "org/a", "org/b"):
        for f in weight_files(hub, repo):
            # two runs: each fetched exactly the 8-byte length and the header, no tensor byte
            assert hub.bytes_of(repo, f) == 2 * header_bytes(hub.repos[repo] / f), (repo, f)
        for f in hub.files(repo):
            if f.endswith(".json"):
                assert hub.bytes_of(repo, f) == (hub.repos[repo] / f).stat().st_size, (repo, f)  # cached after once
    assert header_bytes(hub.repos["org/a"] / "model-00001-of-00002.safetensors") < 100_000 < \
        (hub.repos["org/a"] / "model-00001-of-00002.safetensors").stat().st_size
    assert not any(p.name.startswith(".mergekit-ortho-view") for p in (tmp_path / "hf" / "hub").iterdir())


def test_bad_shape_found_before_any_weight_download(hub, tmp_path):
    hub.reset()
    r = recipe(tmp_path, ["org/a", "org/bad"])
    for args in (("validate", r), ("run", r, "--out", tmp_path / "out")):
        got = run_cli(hub, tmp_path, *args)
        assert got.returncode == 2, got.stderr
        assert hub.victim in got.stderr and "shape" in got.stderr and "Traceback" not in got.stderr
    assert not (tmp_path / "out").exists()
    for repo in ("org/base", "org/a", "org/bad"):
        for f in weight_files(hub, repo):
            assert hub.bytes_of(repo, f) == 2 * header_bytes(hub.repos[repo] / f), (repo, f)


def test_run_downloads_only_the_files_the_plan_reads(hub, tmp_path):
    hub.reset()
    skipped = second_shard_names(hub)  # every tensor of the models' second shard: copied from the base
    r = recipe(tmp_path, ["org/a", "org/b"], exclude=skipped)
    got = run_cli(hub, tmp_path, "run", r, "--out", tmp_path / "out")
    assert got.returncode == 0, got.stderr
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    for repo in ("org/a", "org/b"):
        size = (hub.repos[repo] / first).stat().st_size
        assert hub.bytes_of(repo, first) == header_bytes(hub.repos[repo] / first) + size  # header, then the file
        assert hub.bytes_of(repo, second) == 2 * header_bytes(hub.repos[repo] / second)  # never downloaded
    for f in (first, second):  # the base: both read (merged and copied tensors)
        assert hub.bytes_of("org/base", f) >= (hub.repos["org/base"] / f).stat().st_size
    # the result equals the same merge of the local folders
    local = tmp_path / "local.yaml"
    local.write_text(r.read_text().replace("org/base", str(hub.repos["org/base"])).replace(
        "org/a", str(hub.repos["org/a"])).replace("org/b", str(hub.repos["org/b"])))
    got = run_cli(hub, tmp_path, "run", local, "--out", tmp_path / "out_local")
    assert got.returncode == 0, got.stderr
    merged, ref = (load_dir(tmp_path / d) for d in ("out", "out_local"))
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert not any(p.name.startswith(".mergekit-ortho-view") for p in (tmp_path / "hf" / "hub").iterdir())


def load_dir(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_a_header_only_file_is_checked_against_its_real_size_and_never_read(tmp_path):
    from mergekit_ortho.errors import UserError
    from mergekit_ortho.io.safetensors import SafetensorsFile

    full = tmp_path / "full.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(full))
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(full.read_bytes()[:header_bytes(full)])
    h = SafetensorsFile(stub, remote_size=full.stat().st_size)
    assert h.entries["w"].shape == (4, 4)
    with pytest.raises(UserError, match="only its header"):
        h.read("w")
    with pytest.raises(UserError, match="truncated or padded"):
        SafetensorsFile(stub, remote_size=full.stat().st_size + 4)
    with pytest.raises(UserError, match="truncated or padded"):
        SafetensorsFile(stub)  # without the real size it is a truncated file
