"""Fetching official archives: mirror first, then https; resumable, md5-checked, atomic.

The archive is streamed into `<archive>.part` and renamed to its final name only after the
md5 matches, so a file with the final name is always a verified archive. An interrupted
transfer keeps the `.part` and the next call resumes it with an HTTP Range request; a
finished transfer with the wrong md5 is deleted. Plain http is allowed only for loopback
hosts (local test servers); everything else must be https.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import ipaddress
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from lambdapipe.atomic import md5_file
from lambdapipe.data.registry import DatasetInfo, dataset_info
from lambdapipe.errors import StateError, TransferError, UserError

MIRROR_ENV = "LAMBDAPIPE_MIRROR"
CHUNK = 1 << 20
TIMEOUT_S = 30


def download(dataset: str, raw_dir: Path, mirror: Path | None = None, url: str | None = None,
             progress: bool = True) -> Path:
    """Make sure `raw_dir/<archive>` holds DATASET's verified archive; return its path."""
    info = dataset_info(dataset)
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
            _copy_atomic(source, final)
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


def _copy_atomic(source: Path, final: Path) -> None:
    part = final.with_name(final.name + ".part")
    try:
        os.link(source, part)  # same filesystem: no copy at all
    except OSError:
        shutil.copyfile(source, part)
    os.replace(part, final)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent downloads of one archive (two jobs would corrupt one .part)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    with _locked(final.with_name(f".{final.name}.lock")):
        if final.exists():  # another process finished it while we waited
            if response is not None:
                response.close()
            _check_md5(info, final, where="")
            return final
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
        try:
            with open(part, mode) as fh:
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
