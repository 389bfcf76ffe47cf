"""Where outputs land: atomic placement, overwrite rules, crash leftovers, durability.

Knows no merge math and no file format. ``AtomicDirectory`` / ``AtomicFile`` build an output
under a hidden temporary name beside the target and rename it into place only when everything is
written and fsynced; a failure, Ctrl-C or kill leaves no partial output at the target, and an
existing target is replaced only with overwrite (and only if this tool wrote it, see
``OWNER_MARKER``). Leftovers of a killed run (``.partial`` / ``.old`` names carrying the pid) are
recovered or swept on the next run. ``INTERRUPTED`` is the latch every commit point checks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import UserError

# Set by the CLI's SIGINT/SIGTERM handler. A KeyboardInterrupt raised inside a finaliser or a
# callback is printed and dropped by Python ("Exception ignored in ..."), and the run would go on
# to commit; every commit point checks this latch first, so an interrupted run never commits.
INTERRUPTED = {"signal": None}


def refuse_if_interrupted() -> None:
    if INTERRUPTED["signal"] is not None:
        raise KeyboardInterrupt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_modes(root: Path) -> None:
    """safetensors 0.8 and mkdtemp create owner-only files; give group/other what the umask allows."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Written into every directory this tool produces, so that --overwrite can tell our own output
# (safe to replace) from a user's directory that merely sits at the output path.
OWNER_MARKER = ".mergekit-ortho"


def refuse_overlap(target: Path, inputs) -> None:
    """Refuse an output path that is, contains or lies inside an input (base, a model, an adapter,
    the recipe, a continual state): replacing it would destroy what the merge reads. Inputs are
    compared after symlinks; ones that do not exist (hub ids not yet resolved) are skipped."""
    out = Path(target).absolute().resolve()
    for p in inputs:
        if p is None:
            continue
        ip = Path(p).expanduser()
        if not ip.exists():
            continue
        src = ip.resolve()
        if src == out:
            how = "is"
        elif src.is_relative_to(out):
            how = "contains"
        elif out.is_relative_to(src):
            how = "lies inside"
        else:
            continue
        raise UserError(f"output {target} {how} the input {p}; choose an output path outside every input "
                        "(nothing was written)")


def _safetensors_by_us(path: Path) -> bool:
    from .io.safetensors import SafetensorsFile

    try:
        meta = SafetensorsFile(path).metadata
    except UserError:
        return False
    return str(meta.get("merge_tool", "")).startswith("mergekit-ortho") or "rmm_task" in meta


# the first bytes of the reports `merge analyze` writes (analysis/report.py: to_json, to_html)
_REPORT_HEADS = (re.compile(rb'^\{\s*"generator":\s*"mergekit-ortho '),
                 re.compile(rb"^<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='generator' "
                            rb"content='mergekit-ortho "))


def _report_by_us(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return any(p.match(head) for p in _REPORT_HEADS)


def written_by_us(path: Path) -> bool:
    """True for an output of ours: a directory with our marker (or, from before the marker, one whose
    safetensors files carry our ``merge_tool`` metadata), a single safetensors file we wrote, or a
    JSON / HTML report of ours (its generator mark at the very start)."""
    if path.is_file():
        return (_safetensors_by_us(path) if path.suffix == ".safetensors" else _report_by_us(path))
    if (path / OWNER_MARKER).is_file():
        return True
    return any(_safetensors_by_us(f) for f in sorted(path.glob("*.safetensors"))[:1])


def _is_continual_state(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def check_replaceable(target: Path, overwrite: bool, force_replace: bool = False, want_dir: bool = True) -> None:
    """An existing output is replaced only with --overwrite, and then only when this tool wrote it
    (or it is an empty directory); anything else needs --force-replace. A continual state is the
    only copy of its merge, so it too needs --force-replace."""
    if not (target.exists() or target.is_symlink()):
        return
    if want_dir and not target.is_dir():
        raise UserError(f"output {target} exists and is not a directory")
    if not want_dir and target.is_dir():
        raise UserError(f"output {target} is a directory; a .safetensors path must be a file")
    if not (overwrite or force_replace):
        raise UserError(f"output {target} already exists; pass --overwrite to replace it")
    if force_replace:
        return
    if _is_continual_state(target):
        raise UserError(f"output {target} is a continual state (the only copy of its merge); --overwrite does "
                        "not replace it: choose another path, or pass --force-replace")
    if target.is_dir() and not any(target.iterdir()):
        return
    if not written_by_us(target):
        raise UserError(f"output {target} exists and was not written by mergekit-ortho; --overwrite only "
                        "replaces our own outputs: choose another path, or pass --force-replace")


def check_output(target: Path, overwrite: bool, inputs=(), force_replace: bool = False) -> None:
    """Every rule an output path must pass, checked before anything is read: clear of the inputs,
    and replaceable (a ``.safetensors`` target is a file, anything else a directory)."""
    target = Path(target).absolute()
    refuse_overlap(target, inputs)
    check_replaceable(target, overwrite, force_replace, want_dir=target.suffix != ".safetensors")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or the file system cannot."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_path(d: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# Leftovers our commands create beside an output NAME, each tagged with the creating process's pid:
# .NAME.partial-PID-x (being written, or after an exchange the replaced old copy), .NAME.old-PID-x
# (the old copy of a two-step swap), .NAME.state-PID-x (a temporary continual state), and the swap
# journal .NAME.swap-PID-x.json.
_LEFTOVER_KINDS = ("partial", "old", "state")


def _leftover_pid(p: Path, name: str) -> int | None:
    for kind in _LEFTOVER_KINDS + ("swap",):
        prefix = f".{name}.{kind}-"
        if p.name.startswith(prefix):
            try:
                return int(p.name[len(prefix):].split("-", 1)[0])
            except ValueError:
                return None
    return None


def recover_and_sweep(target: Path) -> None:
    """Finish or roll back a two-step swap a killed run left half done, then remove the leftovers of
    dead processes beside ``target``. Called before every write to ``target``."""
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return
    for journal in sorted(parent.glob(f".{name}.swap-*.json")):
        pid = _leftover_pid(journal, name)
        if pid is None or _pid_alive(pid):
            continue
        try:
            rec = json.loads(journal.read_text(encoding="utf-8"))
            old, new = Path(rec["old"]), Path(rec["new"])
        except (OSError, ValueError, KeyError, TypeError):
            journal.unlink(missing_ok=True)
            continue
        if not (target.exists() or target.is_symlink()):
            if new.exists():  # the old copy was moved aside: complete the swap
                os.rename(new, target)
            elif old.exists():  # nothing new to put in place: roll back
                os.rename(old, target)
            fsync_path(parent)
        journal.unlink(missing_ok=True)
    for p in parent.glob(f".{name}.*"):
        pid = _leftover_pid(p, name)
        if pid is not None and not _pid_alive(pid):
            _remove(p)


def replace_atomically(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``, replacing what is there, such that a crash at any point leaves the
    old or the new output at ``target`` (never nothing), and no copy that nothing cleans up.

    Directories are swapped with RENAME_EXCHANGE where the platform has it; elsewhere the two
    renames are recorded in a journal that the next write to ``target`` completes or rolls back
    (``recover_and_sweep``). Files are replaced by one ``os.replace``."""
    parent = target.parent
    if not target.exists() or target.is_file():
        os.replace(new, target)
        fsync_path(parent)
        return
    if _exchange(new, target):  # target holds the new output, ``new`` the old one
        fsync_path(parent)
        _remove(new)
        return
    tag = f"{os.getpid()}-{os.urandom(3).hex()}"
    old = parent / f".{target.name}.old-{tag}"
    journal = parent / f".{target.name}.swap-{tag}.json"
    with open(journal, "w", encoding="utf-8") as f:
        json.dump({"old": str(old), "new": str(new)}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(parent)
    os.rename(target, old)
    os.rename(new, target)
    fsync_path(parent)
    journal.unlink()
    _remove(old)


class AtomicDirectory:
    """``with AtomicDirectory(target, overwrite) as tmp: ...write into tmp...; commit()``.

    ``inputs`` are the paths the output must stay clear of (``refuse_overlap``); ``force_replace``
    lets --overwrite replace a directory this tool did not write."""

    def __init__(self, target: Path, overwrite: bool = False, inputs=(), force_replace: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.force_replace = force_replace
        self.inputs = list(inputs)
        self.tmp: Path | None = None
        self._committed = False

    def check(self) -> None:
        refuse_overlap(self.target, self.inputs)
        check_replaceable(self.target, self.overwrite, self.force_replace)

    def __enter__(self) -> Path:
        self.check()
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output directory {parent}: {e.strerror}") from None
        recover_and_sweep(self.target)
        self.tmp = parent / f".{self.target.name}.partial-{os.getpid()}-{os.urandom(3).hex()}"
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None
        from . import __version__

        (self.tmp / OWNER_MARKER).write_text(json.dumps({"written_by": f"mergekit-ortho {__version__}"}) + "\n")
        fix_modes(self.tmp)
        fsync_tree(self.tmp)
        if self.target.exists() and not (self.overwrite or self.force_replace):  # appeared while we worked
            raise UserError(f"output {self.target} appeared during the run; pass --overwrite to replace it")
        refuse_if_interrupted()
        replace_atomically(self.tmp, self.target)
        self._committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class AtomicFile:
    """``with AtomicFile(target, overwrite) as tmp: write tmp`` -> moved onto ``target`` on success,
    under the same rules as ``AtomicDirectory``."""

    def __init__(self, target: Path, overwrite: bool = False, inputs=(), force_replace: bool = False):
        self.target = Path(target).absolute()
        refuse_overlap(self.target, inputs)
        check_replaceable(self.target, overwrite, force_replace, want_dir=False)

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output directory {self.target.parent}: {e.strerror}") from None
        recover_and_sweep(self.target)
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}-{os.urandom(3).hex()}"
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_umask())
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            if INTERRUPTED["signal"] is not None:
                self.tmp.unlink()
                raise KeyboardInterrupt
            replace_atomically(self.tmp, self.target)
        elif self.tmp.exists():
            self.tmp.unlink()
