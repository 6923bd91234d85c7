"""Crash-safe file writes and checksums shared by every module that writes artefacts.

Every artefact goes to a temporary file in the destination directory, is fsynced, then
renamed over its final name, so a reader sees either the old file or the complete new
one, never a torn write (POSIX rename is atomic within one filesystem).

The temporary is `.<name>.<pid>@<host>.<random>.tmp`: its owner is in its name, so a later
run or report can remove the ones a killed process left (`remove_temporaries`) without
touching a live writer's. And every file we read back is input: `read_small` reads regular
files only, bounded, as UTF-8, and fails in one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lambdapipe.errors import UserError


class WriteError(OSError):
    """Raised when an artefact cannot be written; the previous version is left intact."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    try:  # a read-only filesystem or a full disk: one line, as for the write itself
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        # mkstemp creates 0600; artefacts on shared storage need the user's usual umask.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    _fsync_dir(path.parent)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(path: str | os.PathLike, needed: int | None, exc: OSError) -> WriteError:
    """One line for a full disk (or quota, or file size limit): the directory and the bytes."""
    directory = Path(path).parent
    try:
        st = os.statvfs(directory)
        free = f", {st.f_bavail * st.f_frsize:,} bytes free"
    except OSError:
        free = ""
    need = f": {Path(path).name} needs {needed:,} bytes{free}" if needed is not None else ""
    return WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc} in "
                                 f"{directory}{need}")


def reserved_memmap(path: str | os.PathLike, dtype: Any, shape: tuple[int, ...]):
    """`np.lib.format.open_memmap(path, "w+", dtype, shape)` with the file's blocks allocated
    before it is mapped. A store into a mapped page the filesystem cannot back is SIGBUS
    (exit 135, no message, no cleanup); posix_fallocate turns a full disk into ENOSPC here,
    raised as one `WriteError` line naming the directory and the bytes needed."""
    import numpy as np

    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(n) for n in shape)}
    total = None
    try:
        with open(path, "wb") as fh:
            try:  # the header open_memmap writes: version 1.0 unless the shape needs 2.0
                np.lib.format.write_array_header_1_0(fh, header)
            except ValueError:
                np.lib.format.write_array_header_2_0(fh, header)
            total = fh.tell() + dtype.itemsize * math.prod(header["shape"])
            fh.flush()
            try:
                os.posix_fallocate(fh.fileno(), 0, total)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _check_free(path, total - fh.tell())  # a filesystem without fallocate
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(path, total, exc) from None
        raise
    return np.lib.format.open_memmap(path, mode="r+")


def _check_free(path: str | os.PathLike, needed: int) -> None:
    st = os.statvfs(Path(path).parent)
    if st.f_bavail * st.f_frsize < needed:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every filesystem supports it, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[IO], None], mode: str = "wb") -> None:
    """Atomically write `path` with a callback that receives the open temp file."""
    with atomic_open(path, mode) as fh:
        writer(fh)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def md5_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:  # the archives' published checksums, not a security use
        return hashlib.file_digest(fh, "md5").hexdigest()


def keep_read_only(path: str | os.PathLike) -> None:
    """Take the write bits off `path` again, as Snakemake's protected() left them: a `dvc
    pull` or a copy checks finished runs out writable, and a finished run's summary.json
    must not be easy to overwrite. Only ever removes bits; a symlink (DVC's symlink cache
    type) is left alone, its target is DVC's cache, read-only already."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return
    mode = path.stat().st_mode
    if mode & 0o222:
        with contextlib.suppress(OSError):  # not ours to change: reading it still works
            path.chmod(mode & ~0o222)


# --------------------------------------------------------------------------- temporaries
# `.<name>.<pid>@<host>.<random>.tmp` (mkstemp's random part: 8 of [a-z0-9_]); the name
# before this round had no owner: `.<name>.<random>.tmp`.
_TMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)@(?P<host>[^@/]+)\.)?"
                     r"[a-z0-9_]{8}\.tmp$")


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_temporaries(directory: str | os.PathLike, recursive: bool = False,
                       owned: bool = True) -> list[Path]:
    """Remove the temporary files of our own naming that a killed writer left in
    `directory`. `owned`: the caller holds the directory (runlock), so every such file is
    stale, old-style names included; otherwise only those of a dead pid on this host (a
    live writer's, another host's or an unowned name are left). Plain files only."""
    root = Path(directory)
    host, removed = socket.gethostname(), []
    try:
        paths = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
        for path in paths:
            m = _TMP_RE.match(path.name)
            if m is None or path.is_symlink() or not path.is_file():
                continue
            if m["pid"] is not None and int(m["pid"]) == os.getpid():
                continue
            if not owned and (m["pid"] is None or m["host"] != host or pid_alive(int(m["pid"]))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    except OSError:  # cleaning up is a courtesy; the real work reports a real problem
        pass
    return removed


# --------------------------------------------------------------------------- reading back
def read_small(path: str | os.PathLike, limit: int, what: str = "") -> str:
    """`read_small_bytes` decoded as UTF-8 (one line naming the file if it is not)."""
    data = read_small_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"refusing {f'{what} ' if what else ''}{path}: not UTF-8 "
                        "text") from None


def read_small_bytes(path: str | os.PathLike, limit: int, what: str = "") -> bytes:
    """The bytes of a small file we wrote (sidecar, summary, manifest, lock file, config),
    read as input: a regular file (a FIFO would hang, a link to /dev/zero never end), at
    most `limit` bytes. A missing file raises FileNotFoundError; anything else wrong is one
    UserError line naming the file."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {label}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"refusing {label}: not a regular file (a FIFO, device or "
                            "directory); expected the file lambdapipe wrote")
        data = os.read(fd, limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {label}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UserError(f"refusing {label}: larger than {limit:,} bytes; expected the file "
                        "lambdapipe wrote")
    return data


def read_json(path: str | os.PathLike, limit: int, what: str = "") -> Any:
    """`read_small` + json.loads; invalid JSON (truncated, empty) is one line too."""
    text = read_small(path, limit, what)
    try:
        return json.loads(text)
    except ValueError as exc:  # RecursionError is not ValueError: see below
        raise UserError(f"refusing {f'{what} ' if what else ''}{path}: not valid JSON "
                        f"({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"refusing {f'{what} ' if what else ''}{path}: JSON nested too "
                        "deep") from None
