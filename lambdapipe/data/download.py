"""Fetching official archives: mirror first, then https; resumable, md5-checked, atomic.

The archive is streamed into `<archive>.part` and renamed to its final name only after the
md5 matches, so a file with the final name is always a verified archive. An interrupted
transfer keeps the `.part` and the next call resumes it with an HTTP Range request; a
finished transfer with the wrong md5 is deleted. Plain http is allowed only for loopback
hosts (local test servers); everything else must be https.

A mirror is read-only to us and shared with other users: its archive is copied (never hard
linked) into a new temporary file of ours, hashed as it is copied, and renamed into place.
A `.part` that is a link, or has other names (a hard link into a mirror, left by an older
version), is removed and started afresh instead of written through. Concurrent downloads of
one archive wait for each other on `raw/.<archive>.lock` (filelock), so one writes while the
others find the finished archive.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from filelock import FileLock

from lambdapipe.atomic import atomic_open, md5_file
from lambdapipe.data.registry import DatasetInfo, dataset_info
from lambdapipe.errors import StateError, TransferError, UserError

MIRROR_ENV = "LAMBDAPIPE_MIRROR"
CHUNK = 1 << 20
TIMEOUT_S = 30


def download(dataset: str, raw_dir: Path, mirror: Path | None = None, url: str | None = None,
             progress: bool = True) -> Path:
    """Make sure `raw_dir/<archive>` holds DATASET's verified archive; return its path."""
    info = dataset_info(dataset)
    if info.source in ("imagenet-downsampled", "ilsvrc2012"):  # data/imagenet.py
        raise UserError(f"dataset {dataset!r} is downloaded by you after registering at "
                        "image-net.org: put its archives in a mirror directory (--mirror or "
                        f"${MIRROR_ENV}) and run `lambdapipe prepare` (docs/imagenet.md)")
    if info.url is None:
        raise UserError(f"dataset {dataset!r} has no archive to download "
                        f"({info.note or 'it ships with its library'})")
    return ensure_archive(info, Path(raw_dir), mirror=mirror, url=url, progress=progress)


def ensure_archive(info: DatasetInfo, raw_dir: Path, *, mirror: Path | None = None,
                   url: str | None = None, progress: bool = True) -> Path:
    url = url or info.url
    assert url is not None and info.archive is not None and info.md5 is not None
    _check_url(url)
    final = raw_dir / info.archive
    if final.exists():
        _check_md5(info, final, where="")
        return final
    if mirror is not None:
        source = Path(mirror) / info.archive
        if source.is_file():
            _check_md5(info, source, where="mirror copy ")
            raw_dir.mkdir(parents=True, exist_ok=True)
            with _locked(final):
                if not final.exists():  # else another process copied it while we waited
                    _copy_from_mirror(info, source, final)
            return final
    return _fetch(info, url, final, progress)


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise UserError(f"invalid download URL {url!r}: expected https:// (http:// only for "
                    "127.0.0.1/localhost test servers)")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect obeys the rule of the first URL: https never continues over plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            _check_url(newurl)
        except UserError:
            raise UserError(f"refused redirect from {req.full_url} to {newurl!r}: downloads "
                            "follow only https:// (http:// only for 127.0.0.1/localhost test "
                            "servers)") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_CheckedRedirects)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_md5(info: DatasetInfo, path: Path, where: str) -> None:
    got = md5_file(path)
    if got != info.md5:
        raise StateError(f"{where}{path} has md5 {got}, expected {info.md5} for {info.name}: "
                        "remove it (corrupt or not the official archive)")


def _copy_from_mirror(info: DatasetInfo, source: Path, final: Path) -> None:
    """Copy into a new file of ours (a hard link would make the mirror's archive ours to
    overwrite), hashing the bytes copied: the mirror may change between check and copy."""
    h = hashlib.md5()
    with open(source, "rb") as src, atomic_open(final, "wb") as dst:
        while block := src.read(CHUNK):
            h.update(block)
            dst.write(block)
        if h.hexdigest() != info.md5:  # raised inside atomic_open: the temporary goes
            raise UserError(f"mirror copy {source} changed while it was copied (md5 "
                            f"{h.hexdigest()}, expected {info.md5} for {info.name}): retry")


def _locked(final: Path) -> FileLock:
    """Concurrent downloads of one archive wait for each other (two writers would corrupt
    one .part). filelock rather than our own flock loop: it is installed with torch."""
    lock = final.with_name(f".{final.name}.lock")
    if lock.is_symlink():  # filelock opens with O_TRUNC: never through a link
        raise UserError(f"refusing lock file {lock}: it is a symbolic link; remove it")
    return FileLock(lock)


def _part_size(part: Path) -> int:
    """Bytes already in `part` to resume from; a `.part` that is not a plain file with one
    name (a link, a hard link into a mirror) is removed, never written through."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.unlink(part)
        return 0
    return st.st_size


def _offline_error(info: DatasetInfo, url: str, reason: object, final: Path) -> TransferError:
    # final.parent: the raw directory of this --data-dir, not the default data/raw
    return TransferError(f"cannot download {info.name} from {url} ({reason}): put "
                         f"{info.archive} in a mirror directory (--mirror or ${MIRROR_ENV}) "
                         f"or in {final.parent}")


def _open(info: DatasetInfo, url: str, offset: int, final: Path):
    request = urllib.request.Request(url, headers={"User-Agent": "lambdapipe"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return _OPENER.open(request, timeout=TIMEOUT_S)  # scheme checked, redirects too
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part already holds every byte
            return None
        raise _offline_error(info, url, f"HTTP {exc.code}", final) from None
    except (urllib.error.URLError, OSError) as exc:
        raise _offline_error(info, url, getattr(exc, "reason", exc), final) from None


def _fetch(info: DatasetInfo, url: str, final: Path, progress: bool) -> Path:
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    response = _open(info, url, offset, final)  # fails before anything is created when offline
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final):
        if final.exists():  # another process finished it while we waited
            if response is not None:
                response.close()
            _check_md5(info, final, where="")
            return final
        now = _part_size(part)
        if now != offset:  # another process moved the .part on while we waited
            if response is not None:
                response.close()
            offset, response = now, _open(info, url, now, final)
        if response is not None:
            _stream(info, url, response, part, offset, progress)
        got = md5_file(part)
        if got != info.md5:
            part.unlink()
            raise TransferError(f"download of {info.name} from {url} has md5 {got}, expected "
                                f"{info.md5}: removed it (corrupt transfer or wrong file)")
        os.replace(part, final)
    return final


def _stream(info: DatasetInfo, url: str, response, part: Path, offset: int,
            progress: bool) -> None:
    with response:
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise TransferError(f"server for {url} resumed at byte {start}, not {offset}: "
                                    f"remove {part} and retry")
            mode = "ab"
        else:  # 200: the server ignored the Range header, start over
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else info.size
        bar = _progress_bar(total, offset, info.archive, progress)
        received = offset
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (
            os.O_APPEND if mode == "ab" else os.O_TRUNC)
        try:
            with os.fdopen(os.open(part, flags, 0o644), "wb") as fh:
                while block := response.read(CHUNK):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"download of {info.name} interrupted after {received} bytes "
                                f"({exc.__class__.__name__}); run the command again to resume "
                                f"from {part}") from None
        finally:
            bar.close()
        if length is not None and received != total:
            raise TransferError(f"download of {info.name} interrupted after {received} of {total} "
                                f"bytes; run the command again to resume from {part}")


def _content_range_start(header: str) -> int:
    # "bytes 100-199/200"
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _progress_bar(total: int | None, initial: int, name: str | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, disable=not enabled, leave=False)


# --------------------------------------------------------------------------- archive safety
def check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse what could escape an extraction root: `..`, absolute paths, outside links, devices.

    We never extract to disk (readers stream members into memory), but such a member still
    means a tampered archive, so the whole archive is refused.
    """
    try:
        tarfile.data_filter(member, "/nonexistent-extraction-root")
    except tarfile.FilterError as exc:
        raise UserError(f"refusing archive {archive}: unsafe member {member.name!r} "
                        f"({exc.__class__.__name__})") from None
    _check_name(member.name, archive)


def check_zip_member(member: zipfile.ZipInfo, archive: Path) -> None:
    _check_name(member.filename, archive)
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        raise UserError(f"refusing archive {archive}: member {member.filename!r} is a link "
                        "or device file")


def _check_name(name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UserError(f"refusing archive {archive}: member {name!r} would escape the "
                        "extraction directory")
