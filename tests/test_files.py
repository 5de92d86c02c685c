"""Safe writing (qless.files): atomic files and folders, safe names, locks, stale temporaries."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from qless.errors import BusyError, OutputError, UnsafeNameError
from qless.files import (
    atomic_folder,
    atomic_write_json,
    clean_stale,
    describe_os_error,
    hold_lock,
    output_errors,
    safe_name,
)


@pytest.mark.parametrize("name", ["mmlu", "checkpoint-1", "bbh_date_understanding", "fp16", "absmean2-global", "a.b",
                                  "00000-of-00002", "x+y=z@1"])
def test_safe_names_pass(name):
    assert safe_name(name, "name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "../../etc", "/abs", "a/b", "a\\b", ".hidden", "-flag",
                                  "x" * 129, "nul\x00", "new\nline", None, 3, {"a": 1}])
def test_unsafe_names_refused(name):
    with pytest.raises(UnsafeNameError, match="cannot be used as a file or folder name"):
        safe_name(name, "task name")


def test_atomic_folder_is_all_or_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(dest) as tmp:
            (tmp / "half.txt").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [], "an interrupted write leaves nothing behind"
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(OutputError, match="already exists"):
        with atomic_folder(dest):
            pass
    with atomic_folder(dest, replace=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_folder_creates_missing_parents_beside_dest(tmp_path):
    dest = tmp_path / "new" / "deeper" / "out"
    with atomic_folder(dest) as tmp:
        assert tmp.parent == dest.parent  # same file system as the destination: the rename cannot cross devices
    assert dest.is_dir()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_writers_are_cleaned(tmp_path):
    from qless.files import _HOST

    dest = tmp_path / "scores"
    dead = tmp_path / f".scores.tmp-{_HOST}-{_dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / "partial.npy").write_text("x")
    alive = tmp_path / f".scores.tmp-{_HOST}-{os.getpid()}-89abcdef"
    alive.mkdir()
    other_file = tmp_path / f".other.tmp-{_HOST}-{_dead_pid()}-0123abcd"
    other_file.write_text("not ours")
    assert clean_stale(dest) == [dead]
    assert not dead.exists() and alive.exists() and other_file.exists()
    # the next writer of dest does it by itself
    dead.mkdir()
    with atomic_folder(dest) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists()
    atomic_write_json(tmp_path / "other", {"a": 1})
    assert not other_file.exists()


def test_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    lock = hold_lock(tmp_path / ".x.lock", "shard 0")
    with pytest.raises(BusyError, match="shard 0 is being written by another process"):
        hold_lock(tmp_path / ".x.lock", "shard 0")
    lock.release()
    hold_lock(tmp_path / ".x.lock", "shard 0").release()


def test_lock_is_freed_when_its_holder_dies(tmp_path):
    code = ("import os, sys; sys.path.insert(0, {!r}); from qless.files import hold_lock; "
            "hold_lock({!r}, 'x'); os._exit(0)").format(str(tmp_path), str(tmp_path / ".x.lock"))
    subprocess.run([sys.executable, "-c", code], check=True)
    hold_lock(tmp_path / ".x.lock", "x").release()


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "permissions"), (errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_environment_errors_become_output_errors(tmp_path, code, fix):
    with pytest.raises(OutputError, match=fix) as info:
        with output_errors(tmp_path):
            raise OSError(code, os.strerror(code), str(tmp_path / "f.bin"))
    assert str(tmp_path / "f.bin") in str(info.value)
    assert describe_os_error(OSError(errno.ENOENT, "No such file")) is None
    with pytest.raises(FileNotFoundError):  # not the environment's doing: left alone
        with output_errors(tmp_path):
            raise FileNotFoundError(errno.ENOENT, "No such file", "x")
