"""Per-device lock files, so concurrent jobs on one machine never share a GPU by accident.

Snakemake's `--resources gpu=N` only bounds how many GPU jobs run at once; it does not say
*which* GPU each one gets. `claim()` closes that gap: each job takes an exclusive `flock`
on `<lock_dir>/gpu<i>.slot<j>.lock` for the first free (device, slot) and holds it while it
trains. The kernel drops an flock when its process exits for any reason (SIGKILL, OOM
killer, a crash), so a dead job never leaks a device and there is nothing to clean up.

The lock directory must be on a filesystem local to the machine (the default, a per-user
directory under the system temp dir, is): flock over NFS is not reliable across hosts, and
jobs on different hosts do not compete for the same GPUs anyway.

The temp dir is shared with every local user, so a lock file is input from a possible
attacker: the lock directory is created private to its user (0700) and refused, in one
line, when another user owns it (they could plant files in it); a lock file is opened with
O_NOFOLLOW and must be a regular file, so a symbolic link planted at `gpu0.slot0.lock`
cannot make a job truncate the file it points to.

Under SLURM the scheduler has already given the job its GPUs (CUDA_VISIBLE_DEVICES), so
`auto` uses the first visible device and takes no lock.

`LAMBDAPIPE_GPU_SLOTS=k` lets k jobs share one GPU on purpose (small models that leave
the device idle); `LAMBDAPIPE_FAKE_GPUS=N` pretends N devices exist - the locks are real
but the device handed out is `cpu` - so scheduling can be tested on a machine without
CUDA. `LAMBDAPIPE_GPU_LOG=path` appends one JSON line per claim (device, index, slot,
pid, acquired, released) for auditing which job held what.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lambdapipe.errors import UserError, bad_value

LOCK_DIR_ENV = "LAMBDAPIPE_GPU_LOCK_DIR"
SLOTS_ENV = "LAMBDAPIPE_GPU_SLOTS"
FAKE_ENV = "LAMBDAPIPE_FAKE_GPUS"
LOG_ENV = "LAMBDAPIPE_GPU_LOG"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Claim:
    """What the current process holds: the torch device string and, if locked, which slot."""

    device: str
    index: int | None = None  # GPU index in lock-file numbering (physical where known)
    slot: int | None = None
    lock_path: Path | None = None


_current: Claim | None = None


def current() -> Claim | None:
    """The claim this process holds right now (None outside `claim()`)."""
    return _current


def default_lock_dir() -> Path:
    env = os.environ.get(LOCK_DIR_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"lambdapipe-gpu-locks-{os.getuid()}"


def _env_int(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise bad_value(f"${name}", raw, f"an integer >= {minimum}") from None
    if value < minimum:
        raise bad_value(f"${name}", raw, f"an integer >= {minimum}")
    return value


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _physical_index(visible_index: int) -> int:
    """Map a torch index to the host's numbering, so jobs with different
    CUDA_VISIBLE_DEVICES still agree on which lock file means which card."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if visible_index < len(parts) and parts[visible_index].isdigit():
            return int(parts[visible_index])
    return visible_index


def lock_dir_ready(lock_dir: Path | None) -> Path:
    """The lock directory, created 0700; refused in one line if it is not a directory, a
    dangling link, or owned by another user (who could plant links or files in it)."""
    explicit = lock_dir is not None or bool(os.environ.get(LOCK_DIR_ENV))
    path = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    what = "--gpu-lock-dir" if lock_dir is not None else (
        f"${LOCK_DIR_ENV}" if explicit else "GPU lock directory")
    if path.is_symlink() and not path.exists():
        raise UserError(f"invalid {what} {str(path)!r}: a symbolic link to "
                        f"{os.readlink(path)!r}, which does not exist; expected a directory")
    if not explicit and path.is_symlink():  # in the shared temp dir: anyone could plant it
        raise UserError(f"refusing {what} {str(path)!r}: it is a symbolic link in a shared "
                        f"directory; remove it, or set ${LOCK_DIR_ENV}")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except FileExistsError:
        raise UserError(f"invalid {what} {str(path)!r}: it is a file; expected a "
                        "directory") from None
    except OSError as exc:
        raise UserError(f"invalid {what} {str(path)!r}: {exc.strerror or exc}; expected a "
                        "writable directory") from None
    if st.st_uid != os.getuid():
        raise UserError(f"refusing {what} {str(path)!r}: it is owned by uid {st.st_uid}, not "
                        f"by you (uid {os.getuid()}), who could plant files in it; choose a "
                        f"directory of your own with --gpu-lock-dir or ${LOCK_DIR_ENV}")
    return path


def _try_lock(path: Path) -> int | None:
    try:  # O_NOFOLLOW: a planted link must not make us truncate its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        kind = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory"}.get(
            exc.errno, exc.strerror or str(exc))
        raise UserError(f"refusing GPU lock file {path}: {kind}; expected a regular file "
                        "(remove it)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device someone put there
        os.close(fd)
        raise UserError(f"refusing GPU lock file {path}: not a regular file (remove it)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    # The holder's identity, for a human looking at a busy machine; not used for locking.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n".encode())
    return fd


def _log(claim: Claim, acquired: float, released: float) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"device": claim.device, "index": claim.index, "slot": claim.slot,
                       "pid": os.getpid(), "acquired": acquired, "released": released,
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
    # O_APPEND writes of one short line are atomic, so concurrent jobs never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def _hold(claim: Claim, fd: int | None) -> Iterator[str]:
    global _current
    acquired = time.time()
    previous, _current = _current, claim
    try:
        yield claim.device
    finally:
        _current = previous
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock
        _log(claim, acquired, time.time())


@contextlib.contextmanager
def claim(device: str = "auto", lock_dir: Path | None = None, slots: int | None = None,
          poll_s: float = 0.5, timeout_s: float | None = None) -> Iterator[str]:
    """Yield a torch device string (`cpu`, `cuda:N`) held exclusively until the block exits.

    `device`: `auto` (a free GPU if there is one, else CPU), `cpu`, `cuda` (a free GPU, an
    error without one) or `cuda:N` (wait for that GPU). Blocks, polling every `poll_s`,
    while every slot is busy; `timeout_s` bounds the wait (None: wait for ever).
    """
    match = _DEVICE_RE.match(device.strip().lower()) if isinstance(device, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise bad_value("device", device, "auto, cpu, cuda or cuda:N")
    kind, wanted = match.group(1), match.group(2)
    if kind == "cpu":
        with _hold(Claim("cpu"), None) as dev:
            yield dev
        return

    fake = _env_int(FAKE_ENV, 0)
    count = fake if fake is not None else _cuda_count()
    if count == 0:
        if kind == "cuda":
            raise UserError(f"device {device!r} requested but CUDA is not available: "
                            "use --device auto or cpu")
        with _hold(Claim("cpu"), None) as dev:
            yield dev
        return
    if wanted is not None and int(wanted) >= count:
        raise bad_value("device", device, f"cuda:0 .. cuda:{count - 1}")

    def torch_device(i: int) -> str:
        return "cpu" if fake is not None else f"cuda:{i}"

    in_slurm = bool(os.environ.get("SLURM_JOB_ID")) and bool(
        os.environ.get("CUDA_VISIBLE_DEVICES", "").strip())
    if in_slurm:
        i = int(wanted) if wanted is not None else 0
        with _hold(Claim(torch_device(i), index=_physical_index(i)), None) as dev:
            yield dev
        return

    slots = slots if slots is not None else (_env_int(SLOTS_ENV, 1) or 1)
    if slots < 1:
        raise bad_value("GPU slots", slots, "an integer >= 1")
    lock_dir = lock_dir_ready(lock_dir)
    candidates = [int(wanted)] if wanted is not None else list(range(count))
    # Slot-major order: fill every GPU's first slot before anyone shares a GPU.
    order = [(i, j) for j in range(slots) for i in candidates]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    while True:
        for i, j in order:
            phys = _physical_index(i)
            path = lock_dir / f"gpu{phys}.slot{j}.lock"
            fd = _try_lock(path)
            if fd is not None:
                with _hold(Claim(torch_device(i), index=phys, slot=j, lock_path=path),
                           fd) as dev:
                    yield dev
                return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free GPU slot in {lock_dir} after {timeout_s:g} s")
        if not waited:
            print(f"lambdapipe: all {len(order)} GPU slot(s) busy, waiting (locks in "
                  f"{lock_dir})", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_s)
