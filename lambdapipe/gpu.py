"""Per-device lock files, so concurrent jobs on one machine never share a GPU by accident.

Snakemake's `--resources gpu=N` only bounds how many GPU jobs run at once; it does not say
*which* GPU each one gets. `claim()` closes that gap: each job takes an exclusive `flock`
on `<lock_dir>/gpu<i>.slot<j>.lock` for the first free (device, slot) and holds it while it
trains. The kernel drops an flock when its process exits for any reason (SIGKILL, OOM
killer, a crash), so a dead job never leaks a device and there is nothing to clean up.

The lock directory must be on a filesystem local to the machine (the default, a per-user
directory under the system temp dir, is): flock over NFS is not reliable across hosts, and
jobs on different hosts do not compete for the same GPUs anyway.

A job sees only the GPU it claimed: `claim()` sets CUDA_VISIBLE_DEVICES to that one device
before torch initialises CUDA and hands out `cuda:0`, so every CUDA object made on the
"current device" (a graph's capture stream, CUDA-event timers, new streams) lands on the
claimed GPU and no context is ever opened on another one - as SLURM does for a whole job.
A CUDA_VISIBLE_DEVICES already set (by SLURM or by hand) is indexed into, never replaced by
host numbering: `cuda:N` means the N-th device the job was given.

The lock is `filelock.FileLock` (flock, tried without blocking; it opens with O_NOFOLLOW,
so a symbolic link planted at `gpu0.slot0.lock` is never followed, and it never truncates).
The temp dir is shared with every local user, so a lock file is input from a possible
attacker, and we add what filelock does not check: the lock directory is created private to
its user (0700) and refused, in one line, when another user owns it (they could plant files
in it; `lock_dir_ready`), and a lock file must be a regular file (a FIFO opens and locks
like one; `_stamp`, which also writes the holder's name into it).

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

from filelock import FileLock, Timeout

from lambdapipe import logs
from lambdapipe.errors import StateError, UserError, bad_value

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
    visible: str | None = None  # CUDA_VISIBLE_DEVICES while held: the one claimed device
    parent_visible: str | None = None  # ... and what the process was given before

    def record(self) -> dict:
        """What config.json keeps of the claim: the physical GPU and how it was made visible."""
        return {"device": self.device, "physical_index": self.index, "slot": self.slot,
                "cuda_visible_devices": self.visible,
                "parent_cuda_visible_devices": self.parent_visible}


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
    """Devices visible now, counted without initialising CUDA where torch can (NVML): a
    `torch.cuda.is_available()` here would run cuInit and freeze CUDA_VISIBLE_DEVICES before
    the claim narrows it."""
    import torch

    return torch.cuda.device_count()


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _parent_visible() -> str | None:
    """CUDA_VISIBLE_DEVICES as this process was given it (a claim held in this process has
    narrowed os.environ; a nested claim still indexes the original list)."""
    return _current.parent_visible if _current is not None else os.environ.get(
        "CUDA_VISIBLE_DEVICES")


def _visible_entry(visible_index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry that shows exactly the `visible_index`-th device the
    process was given (an index, a UUID or a MIG id, as the parent wrote it)."""
    visible = _parent_visible()
    if visible is not None and visible.strip():
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if visible_index < len(parts):
            return parts[visible_index]
    return str(visible_index)


def _gpu_given() -> str | None:
    """Why this job should have a GPU, or None: a scheduler named its devices
    (CUDA_VISIBLE_DEVICES, as SLURM sets it) or the machine's NVIDIA driver lists a GPU. With
    `auto` and a CPU build of torch (a conda env solved on a GPU-less login node) the job
    would otherwise train on the CPU without a word."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles") and not visible.startswith("-"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return f"the NVIDIA driver lists {len(list(gpus.iterdir()))} GPU(s)"
    return None


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"torch {torch.__version__} is a CPU build: install a CUDA build "
                "(workflow/envs/lambdapipe.yaml asks for one)")
    return f"CUDA is not available to torch {torch.__version__} (driver, or no device)"


def _physical_index(visible_index: int) -> int:
    """Map a torch index to the host's numbering, so jobs with different
    CUDA_VISIBLE_DEVICES still agree on which lock file means which card."""
    entry = _visible_entry(visible_index)
    return int(entry) if entry.isdigit() else visible_index


@contextlib.contextmanager
def _only(claim: Claim, fake: bool) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES narrowed to the claimed device while the claim is held (restored
    after), checked to take effect. In a process that already initialised CUDA (a notebook,
    an in-process test) the variable can no longer act: the claim's `visible` is None and
    the device is made current instead, which is what objects made on "the current device"
    follow."""
    if claim.visible is None:
        import torch

        torch.cuda.set_device(claim.device)
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = claim.visible
    try:
        if not fake and _cuda_count() != 1:
            raise RuntimeError(f"CUDA_VISIBLE_DEVICES={claim.visible} did not take effect "
                               "(CUDA initialised without NVML?): refusing to run on a GPU "
                               "this job did not claim")
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


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


def _stamp(path: Path):
    """filelock's on_acquired hook (a raise there releases the lock again): refuse what is
    not a regular file, then write the holder's identity, for a human looking at a busy
    machine (not used for locking)."""
    def stamp(fd: int) -> None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device someone put there
            raise UserError(f"refusing GPU lock file {path}: not a regular file (remove it)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n".encode(), 0)
    return stamp


def _try_lock(path: Path) -> FileLock | None:
    """The lock of one (device, slot), held; None if another job holds it."""
    # fallback_to_soft=False: a marker file a SIGKILLed job leaves behind would hold the GPU
    # for ever; where flock is missing, fail instead.
    lock = FileLock(path, mode=0o600, blocking=False, thread_local=False,
                    fallback_to_soft=False, on_acquired=_stamp(path))
    try:
        lock.acquire()
    except Timeout:
        return None
    except OSError as exc:  # O_NOFOLLOW refused a link (ELOOP), or a directory is there
        kind = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory"}.get(
            exc.errno, exc.strerror or str(exc))
        raise UserError(f"refusing GPU lock file {path}: {kind}; expected a regular file "
                        "(remove it)") from None
    return lock


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
def _hold(claim: Claim, lock: FileLock | None) -> Iterator[str]:
    global _current
    acquired = time.time()
    previous, _current = _current, claim
    try:
        yield claim.device
    finally:
        _current = previous
        if lock is not None:
            lock.release()
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
        given = _gpu_given()
        if kind == "cuda" or given:  # never train on the CPU when a GPU was asked for
            asked = f"device {device!r} requested" + (f" in a job given a GPU ({given})"
                                                      if kind == "auto" else "")
            raise StateError(f"{asked} but {_no_cuda_reason()}: use --device cpu to train "
                             "on the CPU")
        with _hold(Claim("cpu"), None) as dev:
            yield dev
        return
    if wanted is not None and int(wanted) >= count:
        raise bad_value("device", device, f"cuda:0 .. cuda:{count - 1}")

    parent = _parent_visible()

    def held(i: int, **lock) -> Claim:
        """The claim of the process's i-th visible device: `cuda:0` of a CUDA_VISIBLE_DEVICES
        narrowed to it (`cpu` for fake devices, whose narrowing is real all the same)."""
        if fake is None and _cuda_initialised():  # too late to narrow: see _only
            return Claim(f"cuda:{i}", index=_physical_index(i), parent_visible=parent, **lock)
        return Claim("cpu" if fake is not None else "cuda:0", index=_physical_index(i),
                     visible=_visible_entry(i), parent_visible=parent, **lock)

    in_slurm = bool(os.environ.get("SLURM_JOB_ID")) and bool((parent or "").strip())
    if in_slurm:
        i = int(wanted) if wanted is not None else 0
        c = held(i)
        with _hold(c, None) as dev, _only(c, fake is not None):
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
            lock = _try_lock(path)
            if lock is not None:
                c = held(i, slot=j, lock_path=path)
                # _hold first: it releases the lock if narrowing the devices fails
                with _hold(c, lock) as dev, _only(c, fake is not None):
                    yield dev
                return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free GPU slot in {lock_dir} after {timeout_s:g} s")
        if not waited:
            logs.emit(f"all {len(order)} GPU slot(s) busy, waiting (locks in {lock_dir})")
            waited = True
        time.sleep(poll_s)
