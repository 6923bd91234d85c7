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

The lock is `filelock.FileLock` (flock; it opens with O_NOFOLLOW and O_NONBLOCK, never
truncates, and closes the descriptor in forked children, which so never keep the lock). What
we add on top, because filelock does not: the lock file must be a regular file and names its
owner for messages (`_stamp`, filelock's on_acquired hook), and it is removed on release.
filelock leaves its file in place so that waiters share one inode; we remove it so a finished
run directory holds only the run. A contender that opened the old file before the unlink then
locks an unlinked inode, which filelock reports as not acquired (a `Timeout` without a
holder): so a refused attempt probes whether the file now at the path is really held
(`_contended`) and tries again if not, instead of reporting a busy directory.

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
import dataclasses
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout, lock_descriptor

from lambdapipe.atomic import read_small, remove_temporaries
from lambdapipe.errors import StateError, UserError

LOCK_NAME = ".lambdapipe.lock"
_ATTEMPTS = 50  # owners releasing under us in a row before we call the directory busy


@dataclasses.dataclass
class _Owned:
    lock: FileLock
    identity: tuple[int, int]  # (st_dev, st_ino) of the file locked
    depth: int = 1  # the CLI and run() may both hold it


_held: dict[str, _Owned] = {}  # absolute lock path -> what this process holds there


class RunDirBusy(StateError):
    """Another live process owns the run directory."""


class RunDirGone(UserError):
    """The run directory (with its lock) was removed or replaced under its owner."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_still_owned(out: Path) -> None:
    """Stop (one line) if `out`'s lock file is no longer the one this process locked: the
    directory was removed, and maybe taken by another owner, while we ran."""
    path = lock_path(out)
    owned = _held.get(str(path.absolute()))
    if owned is not None and _identity(path) != owned.identity:
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


def _contended(path: Path) -> bool:
    """Whether another open file description holds the flock of the file now at `path`.
    Opens read-only and creates nothing (filelock's acquire would create the file); O_NONBLOCK:
    a FIFO planted there must not hang the probe."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # no lock file: nobody owns it (own() reports what cannot be created)
    try:
        return not lock_descriptor(fd, blocking=False)
    except OSError:
        return False  # not lockable at all: own() says what is wrong with it
    finally:
        os.close(fd)  # also drops the probe's lock


def check_free(out: Path) -> None:
    """Refuse now if another process owns `out`; writes nothing (a read-only probe), so it
    may run among the input checks, before anything is created."""
    path = lock_path(out)
    if str(path.absolute()) not in _held and _contended(path):
        raise _busy(out)


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
        _held[key].depth += 1
        try:
            yield
        finally:
            _held[key].depth -= 1
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot(out, exc) from None
    owned = _held[key] = _acquire(out, path)
    try:
        remove_temporaries(out)  # a killed owner's, of our own naming only
        yield
    finally:
        del _held[key]
        if _identity(path) == owned.identity:  # never another owner's, in a directory anew
            with contextlib.suppress(OSError):
                path.unlink()  # still under the lock: see the module docstring
        owned.lock.release()
        if created:  # nothing was written (the run refused, or failed before starting)
            with contextlib.suppress(OSError):
                out.rmdir()


def _stamp(out: Path, path: Path, locked: list[tuple[int, int]]):
    """filelock's on_acquired hook (a raise there releases the lock again): the file must be
    a regular file (a FIFO opens and locks like one), and it gets its owner's name."""
    def stamp(fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"invalid --out {str(out)!r}: its lock file {path.name} is not a "
                            "regular file; remove it")
        locked.append((st.st_dev, st.st_ino))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "command": " ".join(sys.argv).replace("\n", " ")[:500]})
        with contextlib.suppress(OSError):  # the name is for messages; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode() + b"\n", 0)
    return stamp


def _acquire(out: Path, path: Path) -> _Owned:
    for _ in range(_ATTEMPTS):
        locked: list[tuple[int, int]] = []
        # fallback_to_soft=False: where flock is missing, a marker file that a SIGKILLed
        # owner leaves behind is no substitute; fail instead.
        lock = FileLock(path, mode=0o644, blocking=False, thread_local=False,
                        fallback_to_soft=False, on_acquired=_stamp(out, path, locked))
        try:
            lock.acquire()
        except Timeout:
            if _contended(path):
                raise _busy(out) from None
            continue  # we locked a file its owner removed on release: lock the new one
        except FileNotFoundError:  # a previous owner removed the directory it had created
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _cannot(out, exc) from None
            continue
        except OSError as exc:  # a link there (O_NOFOLLOW: ELOOP), a directory, no access
            raise _cannot(out, exc) from None
        return _Owned(lock, locked[0])
    raise _busy(out)
