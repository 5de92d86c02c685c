"""Writing results safely: whole or not at all, one writer at a time, never outside the output.

Every stage writes through these helpers:

* :func:`atomic_write_text` / :func:`atomic_write_json`: a file appears complete or not at all
  (temporary sibling, fsync, rename).
* :func:`atomic_folder`: a folder of results appears complete at once, or replaces an older one
  in two renames; on any error the partial folder is removed.
* :func:`safe_name`: the one check for every name that becomes a path component (set, task,
  checkpoint and shard names), so that names read from data or from an artefact can never
  choose a path outside the output folder.
* :func:`hold_lock`: an exclusive operating-system file lock, refused at once (with the
  reason) when another process holds it; released by the kernel if its holder dies.
* :func:`output_errors`: operating-system refusals (permission denied, read-only file system,
  full disk) turned into an :class:`~qless.errors.OutputError` naming the path and the fix.

Temporary names are ``.NAME.tmp-HOST-PID-RANDOM``; the next writer of ``NAME`` removes those
left by killed writers (a dead PID on this host, or older than a day on another host).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qless.errors import BusyError, OutputError, UnsafeNameError

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")
_STALE_ELSEWHERE_S = 86400

# ---------------------------------------------------------------------------------------------
# Names

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}")


def safe_name(name: Any, what: str) -> str:
    """``name`` if it can be one path component inside an output folder, else UnsafeNameError.

    Allowed: letters, digits and ``. _ - + = @``, not starting with ``.`` or ``-``, at most 128
    characters. No separators, no ``..``, nothing absolute, no hidden or temporary names."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise UnsafeNameError(
            f"{what} {name!r} cannot be used as a file or folder name: use letters, digits and . _ - + = @ "
            "(not starting with . or -, at most 128 characters)"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Temporary siblings


def _temp_sibling(dest: Path, kind: str = "tmp") -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove temporary siblings of ``dest`` left by writers that were killed; returns them."""
    dest = Path(dest)
    removed = []
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = _TEMP.fullmatch(p.name)
        if not m or m["name"] != dest.name:
            continue
        if m["host"] == _HOST:
            stale = not _alive(int(m["pid"]))
        else:
            try:
                stale = time.time() - p.lstat().st_mtime > _STALE_ELSEWHERE_S
            except OSError:
                continue
        if stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Atomic files and folders


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    clean_stale(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps(obj: Any) -> str:
    """The JSON text qless writes: indented, keys sorted, non-ASCII kept, newline-terminated."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


INPUTS = "inputs.json"


def made_from(folder: str | Path, inputs: Any) -> bool:
    """Whether ``folder`` records (in its ``inputs.json``) that it was made from ``inputs``: a
    derived output that can be reused. Missing or unreadable records say no."""
    try:
        return json.loads((Path(folder) / INPUTS).read_text(encoding="utf-8")) == inputs
    except (OSError, ValueError):
        return False


def read_json(path: str | Path, error: type[Exception], fix: str) -> Any:
    """The JSON value in ``path``; ``error`` naming the file, the problem and ``fix`` when it is
    unreadable or not JSON (an artefact damaged or written by something else)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON with sorted keys."""
    atomic_write_text(path, dumps(obj))


def create_json_once(path: str | Path, obj: Any) -> bool:
    """Write ``obj`` to ``path`` only if no file is there; True if this call created it.

    Safe when several processes race: the file appears whole (a hard link of a finished
    temporary file) and exactly one of them writes it."""
    path = Path(path)
    clean_stale(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps(obj))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextmanager
def atomic_folder(dest: str | Path, *, replace: bool = False, what: str = "the output") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it becomes ``dest``.

    ``replace=False`` refuses an existing ``dest`` (OutputError); ``replace=True`` swaps the
    old folder out (two renames; the old one is then deleted). On any error, or if another
    process created ``dest`` meanwhile, the temporary folder is removed and ``dest`` is left
    as it was."""
    dest = Path(dest)
    if dest.exists() and not replace:
        raise OutputError(f"{dest}: already exists; choose a new folder for {what} (or delete the old one)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = _temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            if not replace:
                raise OutputError(f"{dest}: was created by another process meanwhile; choose a new folder for {what}")
            old = _temp_sibling(dest, "old")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dest)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise OutputError(f"{dest}: was created by another process meanwhile; "
                                      f"choose a new folder for {what}") from None
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Locks


def hold_lock(path: str | Path, what: str, wait: float = 0) -> Any:
    """Take the exclusive lock file ``path`` (waiting up to ``wait`` seconds), or raise BusyError
    naming ``what``.

    Returns the held lock; call ``.release()`` when done (the kernel releases it if the process
    dies, so a killed writer never blocks the next one)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    lock = FileLock(str(path), timeout=wait, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise BusyError(
            f"{what} is being written by another process right now (it holds {path}); wait for it to "
            "finish, or write to another folder"
        ) from None
    return lock


@contextmanager
def locked(path: str | Path, what: str, wait: float = 0) -> Iterator[None]:
    """:func:`hold_lock` for the duration of a ``with`` block."""
    lock = hold_lock(path, what, wait)
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Operating-system refusals

_FIXES = {
    errno.EACCES: "qless cannot write (or read) there: fix the permissions or choose another folder",
    errno.EPERM: "qless cannot write (or read) there: fix the permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose an output folder on a writable one",
    errno.ENOSPC: "the disk is full: free some space or choose an output folder on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose an output folder elsewhere",
}


def describe_os_error(e: OSError, where: str | Path | None = None) -> str | None:
    """A one-line message with the fix for an OSError that is the environment's doing, else None."""
    if e.errno not in _FIXES:
        return None
    path = e.filename or where or "the output folder"
    return (f"{path}: {e.strerror or os.strerror(e.errno)}; {_FIXES[e.errno]}. Nothing partial is kept as a "
            "result: once fixed, the same command resumes or redoes the work")


@contextmanager
def output_errors(where: str | Path | None = None) -> Iterator[None]:
    """Turn permission, read-only and full-disk OSErrors into OutputError (see describe_os_error)."""
    try:
        yield
    except OSError as e:
        message = describe_os_error(e, where)
        if message is None:
            raise
        raise OutputError(message) from e
