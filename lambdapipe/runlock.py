"""One owner per run directory: an exclusive flock on `<run>/.lambdapipe.lock`.

Two `lambdapipe train` on one `--out` would otherwise interleave config.json, metrics.csv,
checkpoints and summary.json of different runs. The owner takes the lock before it writes
anything and holds it until it returns; a second process refuses at once, in one line
naming the holder (pid, host, command), instead of waiting:

- Snakemake never runs two jobs with the same output, so in the workflow a second owner is
  never a job that should queue; it is a second workflow (another working directory, or
  `--nolock`) or a hand-started command, and waiting would only hide that mistake (and hold
  a GPU claim while it waits). When the first run finishes, rerunning the second command
  returns the finished summary (same config) or refuses (another config).
- The kernel drops a flock when its process dies for any reason (SIGKILL, OOM killer), so a
  lock file left by a dead owner is never "stale": the next owner simply takes it.

The lock file is removed on release. A waiter that opened the old file before the unlink
could otherwise lock a file nobody else sees, so after locking each owner checks that the
path still names the inode it locked, and retries if not.

The lock lives in the directory, so `rm -rf` of a run directory under its running owner
takes the lock with it: a second command would then own a new directory of the same name
while the first kept writing into it (both exit 0, the config of one and the metrics of the
other). So the owner checks, before each checkpoint and before its summary
(`check_still_owned`), that its lock file still exists and is the one it locked, and stops
in one line if not, instead of recreating the directory. Taking the lock also removes the
temporaries of our own naming a killed owner left (`atomic.remove_temporaries`): nobody else
writes into a directory we own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lambdapipe.atomic import read_small, remove_temporaries
from lambdapipe.errors import StateError, UserError

LOCK_NAME = ".lambdapipe.lock"

_held: dict[str, int] = {}  # lock path -> depth, so the CLI and run() may both hold it
_fds: dict[str, int] = {}  # lock path -> the descriptor holding its flock


class RunDirBusy(StateError):
    """Another live process owns the run directory."""


class RunDirGone(UserError):
    """The run directory (with its lock) was removed or replaced under its owner."""


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_still_owned(out: Path) -> None:
    """Stop (one line) if `out`'s lock file is no longer the one this process locked: the
    directory was removed, and maybe taken by another owner, while we ran."""
    path = lock_path(out)
    fd = _fds.get(str(path.absolute()))
    if fd is not None and not _same_file(fd, path):
        raise RunDirGone(f"--out {out} was removed or replaced while this run owned it: "
                         "stopping without writing more there (run the command again to "
                         "start afresh)")


def lock_path(out: Path) -> Path:
    return Path(out) / LOCK_NAME


def holder(out: Path) -> str:
    """Who holds `out` (from the lock file), for messages; "unknown" if unreadable."""
    try:
        info = json.loads(read_small(lock_path(out), 4096))
        return (f"pid {info['pid']} on {info['host']} since {info['since']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return "a process that has not written its name yet"


def check_free(out: Path) -> None:
    """Refuse now if another process owns `out`; writes nothing (a read-only probe), so it
    may run among the input checks, before anything is created."""
    path = lock_path(out)
    if str(path.absolute()) in _held:
        return
    try:  # O_NONBLOCK: a FIFO planted there must not hang the probe
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # no lock file: nobody owns it (own() reports what cannot be created)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _busy(out) from None
    finally:
        os.close(fd)  # also drops the probe's lock


def _busy(out: Path) -> RunDirBusy:
    return RunDirBusy(f"--out {out} is in use by {holder(out)}: wait for it to finish, or "
                      "choose another --out")


def _cannot(out: Path, exc: OSError) -> UserError:
    return UserError(f"invalid --out {str(out)!r}: cannot create its lock file "
                     f"({exc.strerror or exc}); expected a writable directory")


@contextlib.contextmanager
def own(out: Path) -> Iterator[None]:
    """Hold `out` exclusively for the duration (re-entrant within one process)."""
    out = Path(out)
    path = lock_path(out)
    key = str(path.absolute())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot(out, exc) from None
    fd = _acquire(out, path)
    _held[key], _fds[key] = 1, fd
    try:
        remove_temporaries(out)  # a killed owner's, of our own naming only
        yield
    finally:
        del _held[key], _fds[key]
        if _same_file(fd, path):  # never another owner's lock, in a directory made anew
            with contextlib.suppress(OSError):
                path.unlink()  # still under the lock: see the module docstring
        os.close(fd)
        if created:  # nothing was written (the run refused, or failed before starting)
            with contextlib.suppress(OSError):
                out.rmdir()


def _acquire(out: Path, path: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK, 0o644)
        except FileNotFoundError:  # a previous owner removed the directory it had created
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _cannot(out, exc) from None
            continue
        except OSError as exc:
            raise _cannot(out, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"invalid --out {str(out)!r}: its lock file {path.name} is not a "
                            "regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _busy(out) from None
            raise _cannot(out, exc) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous owner removed the file we locked: lock the new one
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "command": " ".join(sys.argv).replace("\n", " ")[:500]})
    with contextlib.suppress(OSError):  # the name is for messages; the flock is the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
    return fd
