"""atomic writes: all-or-nothing, readable by the group like any file, temp files cleaned."""

import os
import stat

import pytest

from lambdapipe import atomic


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic.write_json(target, {"x": 1})
    atomic.write_json(target, {"x": 2})
    assert target.read_text().strip().endswith("}")
    assert '"x": 2' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_previous_version(tmp_path):
    target = tmp_path / "m.csv"
    atomic.write_text(target, "old\n")

    def boom(fh):
        fh.write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, boom, "w")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]


def test_mode_follows_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644


def test_checksums(tmp_path):
    f = tmp_path / "b"
    f.write_bytes(b"abc")
    assert atomic.sha256_file(f).startswith("ba7816bf")
    assert atomic.md5_file(f) == "900150983cd24fb0d6963f7d28e17f72"


def test_keep_read_only_takes_write_bits_off_files_only(tmp_path):
    """A pulled summary.json (checked out 0644) is protected again; a symlink (DVC's cache)
    and its target are left alone; bits are only ever removed."""
    import stat

    f = tmp_path / "summary.json"
    f.write_text("{}")
    f.chmod(0o664)
    atomic.keep_read_only(f)
    assert stat.S_IMODE(f.stat().st_mode) == 0o444
    target = tmp_path / "cache"
    target.write_text("{}")
    target.chmod(0o644)
    link = tmp_path / "linked.json"
    link.symlink_to(target)
    atomic.keep_read_only(link)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    atomic.keep_read_only(tmp_path / "missing.json")  # nothing to do, no error
