"""The run directory's lock (filelock plus what we add): hostile lock files, the owner's
name in the file, and a contender racing an owner that removes its file on release."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from lambdapipe import runlock
from lambdapipe.errors import UserError

HOLDER = """
import sys
from lambdapipe import runlock
with runlock.own(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_owner_names_itself_and_a_second_process_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert json.loads(runlock.lock_path(out).read_text())["pid"] == holder.pid
        with pytest.raises(runlock.RunDirBusy, match=f"in use by pid {holder.pid} "):
            runlock.check_free(out)
        with pytest.raises(runlock.RunDirBusy, match=f"in use by pid {holder.pid} "), \
                runlock.own(out):
            pass
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert not out.exists()  # it created the directory and wrote nothing else there
    with runlock.own(out):
        assert json.loads(runlock.lock_path(out).read_text())["pid"] == os.getpid()
        with runlock.own(out):  # re-entrant in one process
            runlock.check_still_owned(out)
        runlock.check_still_owned(out)
    assert not out.exists()


def test_a_planted_link_at_the_lock_file_is_never_followed(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    runlock.lock_path(out).symlink_to(victim)
    with pytest.raises(UserError, match="cannot create its lock file") as exc, runlock.own(out):
        pass
    assert "\n" not in str(exc.value)
    assert victim.read_text() == "precious\n"
    runlock.check_free(out)  # the probe does not follow it either


def test_a_fifo_at_the_lock_file_is_refused_without_hanging(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(runlock.lock_path(out))
    runlock.check_free(out)
    with pytest.raises(UserError, match="is not a regular file") as exc, runlock.own(out):
        pass
    assert "\n" not in str(exc.value)
    # released again: the refusal left no flock on it
    fd = os.open(runlock.lock_path(out), os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_an_owner_releasing_while_we_open_its_file_is_not_a_busy_directory(tmp_path,
                                                                            monkeypatch):
    """The previous owner removes its lock file on release: a contender that opened the old
    file just before locks an unlinked inode. filelock calls that not acquired; the run lock
    must then take the new file, not report the directory busy."""
    out = tmp_path / "run"
    out.mkdir()
    path = runlock.lock_path(out)
    previous = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # the previous owner's lock
    fcntl.flock(previous, fcntl.LOCK_EX)
    real_open, raced = os.open, []

    def racing_open(name, flags, *args, **kwargs):
        fd = real_open(name, flags, *args, **kwargs)
        if os.fspath(name) == str(path) and flags & os.O_RDWR and not raced:
            raced.append(fd)
            os.unlink(path)  # the previous owner releases: file removed, then flock dropped
            os.close(previous)
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    with runlock.own(out):
        monkeypatch.setattr(os, "open", real_open)
        assert raced, "the race was not staged"
        assert json.loads(path.read_text())["pid"] == os.getpid()
        runlock.check_still_owned(out)
    assert not path.exists()


def test_an_owner_whose_lock_file_was_replaced_stops(tmp_path):
    out = tmp_path / "run"
    with runlock.own(out):
        path = runlock.lock_path(out)
        path.unlink()
        path.write_text("{}")  # another owner's, in a directory made anew
        with pytest.raises(runlock.RunDirGone, match="was removed or replaced"):
            runlock.check_still_owned(out)
    assert path.read_text() == "{}"  # never removes another owner's lock file
