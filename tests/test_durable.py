"""io.durable.DurableFile: direct (O_DIRECT) and buffered writes give the same bytes, every size
and write pattern; errors in the helper thread surface; a file system that refuses direct writes
falls back; a merge writes the same shards either way and leaves nothing on a failed write."""
from __future__ import annotations

import errno
import os

import pytest

from conftest import write_recipe
from mergekit_ortho.io import durable

needs_direct = pytest.mark.skipif(not durable.DIRECT, reason="no O_DIRECT on this platform")


def _write(path, pieces, direct: bool, monkeypatch):
    monkeypatch.setattr(durable, "DIRECT", direct)
    f = durable.DurableFile(path)
    for p in pieces:
        f.write(p)
    f.close()
    return f


SIZES = [[], [b"x"], [os.urandom(durable.ALIGN)], [os.urandom(durable.CHUNK)], [os.urandom(durable.CHUNK + 1)],
         [os.urandom(n) for n in (7, durable.CHUNK - 3, 5, 2 * durable.CHUNK + 4093, 0, 11)]]


@pytest.mark.parametrize("pieces", SIZES, ids=lambda p: f"{len(p)}x{sum(map(len, p))}B")
def test_direct_and_buffered_write_the_same_bytes(tmp_path, pieces, monkeypatch):
    want = b"".join(pieces)
    for direct in (True, False):
        f = _write(tmp_path / f"f{direct}", pieces, direct and durable.DIRECT, monkeypatch)
        assert (tmp_path / f"f{direct}").read_bytes() == want and f.size == len(want)


@needs_direct
def test_a_direct_write_error_is_raised_at_close_and_abort_cleans_up(tmp_path, monkeypatch):
    def full(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    f = durable.DurableFile(tmp_path / "f")
    assert f.direct
    monkeypatch.setattr(durable.os, "pwrite", full)
    f.write(os.urandom(durable.CHUNK))  # submitted to the helper thread: fails there
    with pytest.raises(OSError, match="No space left"):
        f.close()
    f.abort()  # safe after a failed close


@needs_direct
def test_a_file_system_refusing_direct_writes_falls_back_to_plain_writes(tmp_path, monkeypatch):
    real, fds = os.pwrite, []

    def refuse_direct(fd, view, offset):
        if fd == fds[0]:  # the O_DIRECT descriptor
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)

    data = os.urandom(2 * durable.CHUNK + 123)
    f = durable.DurableFile(tmp_path / "f")
    fds.append(f._fd)
    monkeypatch.setattr(durable.os, "pwrite", refuse_direct)
    f.write(data)
    f.close()
    assert (tmp_path / "f").read_bytes() == data


def test_buffered_mode_syncs_in_the_background_and_surfaces_its_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "DIRECT", False)
    monkeypatch.setattr(durable, "SYNC_EVERY", 1)
    calls, real = [], os.fdatasync
    monkeypatch.setattr(durable.os, "fdatasync", lambda fd: calls.append(fd) or real(fd))
    _write(tmp_path / "f", [b"a" * 10, b"b" * 10], False, monkeypatch)
    assert calls and (tmp_path / "f").read_bytes() == b"a" * 10 + b"b" * 10

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "fdatasync", fail)
    f = durable.DurableFile(tmp_path / "g")
    f.write(b"x" * 10)
    with pytest.raises(OSError, match="No space left"):
        f.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_merge_writes_the_same_shards_either_way_and_nothing_on_a_failed_write(tiny_models, tmp_path, cli,
                                                                                monkeypatch, direct):
    from test_run import recipe_text

    if direct and not durable.DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    r = write_recipe(tmp_path / "r.yaml", recipe_text([tiny_models[k] for k in "abc"], "linear",
                                                      extra="output:\n  shard_size: 4KB\n"))
    monkeypatch.setattr(durable, "DIRECT", not direct)
    assert cli("run", r, "--out", tmp_path / "other")[0] == 0
    monkeypatch.setattr(durable, "DIRECT", direct)
    monkeypatch.setattr(durable, "CHUNK", 8192)  # many direct writes per shard
    code, _, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    shards = sorted((tmp_path / "other").glob("*.safetensors"))
    assert len(shards) > 2
    assert all(f.read_bytes() == (tmp_path / "out" / f.name).read_bytes() for f in shards)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "pwrite" if direct else "fdatasync", full)
    monkeypatch.setattr(durable, "SYNC_EVERY", 1)
    code, out, err = cli("run", r, "--out", tmp_path / "failed")
    assert code == 2 and "No space left" in (out + err)
    assert not (tmp_path / "failed").exists()
    assert not any(p.name.startswith(".failed") for p in tmp_path.iterdir())  # no temporary left
