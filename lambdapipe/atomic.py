"""Crash-safe file writes and checksums shared by every module that writes artefacts.

Every artefact goes to a temporary file in the destination directory, is fsynced, then
renamed over its final name, so a reader sees either the old file or the complete new
one, never a torn write (POSIX rename is atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """Raised when an artefact cannot be written; the previous version is left intact."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    try:  # a read-only filesystem or a full disk: one line, as for the write itself
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
