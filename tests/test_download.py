"""Official datasets end to end: loopback download (resumable), mirror, md5, safe archives."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import tarfile
import zipfile

import numpy as np
import pytest
from fixtures_data import (
    NETTE_WNIDS,
    ArchiveServer,
    make_cifar,
    make_imagenette,
    make_tinyimagenet,
    use_archive,
)

from lambdapipe import data
from lambdapipe.errors import UserError

# Its tests take a tenth of a CPU-second or less, not the default 1 s: under pytest-xdist
# this short work unit goes out last, filling in around the long ones (tests/conftest.py).
pytestmark = pytest.mark.cost(0.1)


@pytest.fixture
def archive_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = ArchiveServer(root)
    yield server
    server.close()


def _serve(server, dataset, build, monkeypatch, **kw):
    name = data.dataset_info(dataset).archive
    path = server.root / name
    made = build(path, **kw)
    use_archive(monkeypatch, dataset, path, made.get("num_train") or len(made["train_y"]))
    return path, made


def _no_prepared(root):
    prepared = root / "prepared"
    return not prepared.exists() or not any(prepared.iterdir())


# --------------------------------------------------------------------------- each layout
@pytest.mark.parametrize("via", ["url", "mirror"])
def test_cifar10_end_to_end(tmp_path, archive_server, monkeypatch, via):
    path, made = _serve(archive_server, "cifar10", lambda p: make_cifar(p, False, 10),
                        monkeypatch)
    root = tmp_path / "d"
    kw = {"url": archive_server.url(path.name)} if via == "url" else {"mirror": path.parent}
    prepared = data.prepare("cifar10", root, val_size=20, progress=False, **kw)
    assert (root / "raw" / path.name).is_file()
    m = data.load_manifest(root, "cifar10")
    assert m["splits"] == {"train": 80, "val": 20, "test": 20}
    assert m["classes"] == made["classes"] and m["source"]["md5"] == data.DATASETS[
        "cifar10"].md5
    test = data.load_split(root, "cifar10", "test")
    np.testing.assert_array_equal(test.images, made["test_x"])  # channel planes -> NHWC
    np.testing.assert_array_equal(test.labels, made["test_y"])
    val = data.load_split(root, "cifar10", "val")
    assert np.all(np.bincount(val.labels, minlength=10) == 2)  # stratified 20 of 10 x 10
    train = data.load_split(root, "cifar10", "train")
    # train + val are exactly the official training images.
    both = np.concatenate([train.images, val.images]).reshape(100, -1)
    official = made["train_x"].reshape(100, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, official))
    # CIFAR-10 pairflip follows the named convention (cat <-> dog, ...).
    data.make_noise(prepared, data.noise_spec("pairflip", 0.2))
    noisy = data.load_split(root, "cifar10", "train", "pairflip-0.2")
    changed = noisy.labels != noisy.clean_labels
    assert changed.sum() == 16
    pairs = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert all(pairs[c] == n for c, n in zip(noisy.clean_labels[changed],
                                             noisy.labels[changed], strict=True))


def test_cifar100(tmp_path, archive_server, monkeypatch):
    path, made = _serve(archive_server, "cifar100", lambda p: make_cifar(p, True, 2),
                        monkeypatch)
    data.prepare("cifar100", tmp_path, url=archive_server.url(path.name), val_fraction=0.5,
                 progress=False)
    m = data.load_manifest(tmp_path, "cifar100")
    assert m["classes"][:2] == ["class000", "class001"] and m["num_classes"] == 100
    assert m["splits"] == {"train": 100, "val": 100, "test": 200}
    test = data.load_split(tmp_path, "cifar100", "test")
    np.testing.assert_array_equal(test.images, made["test_x"])


@pytest.mark.parametrize(("dataset", "size"), [("tinyimagenet32", 32), ("tinyimagenet64", 64)])
def test_tinyimagenet(tmp_path, archive_server, monkeypatch, dataset, size):
    path, made = _serve(archive_server, dataset, make_tinyimagenet, monkeypatch)
    data.prepare(dataset, tmp_path, mirror=path.parent, val_size=200, progress=False)
    m = data.load_manifest(tmp_path, dataset)
    assert m["source"]["wnids"] == made["wnids"]
    assert m["classes"][0] == f"thing {made['wnids'][0]}, alias"
    assert m["splits"] == {"train": 200, "val": 200, "test": 200}
    test = data.load_split(tmp_path, dataset, "test")
    assert test.images.shape == (200, size, size, 3)
    assert sorted(test.labels.tolist()) == list(range(200))  # one labelled val image a class
    with pytest.raises(UserError, match="image size"):
        data.prepare(dataset, tmp_path / "x", mirror=path.parent, image_size=48)


def test_imagenette_with_official_noise(tmp_path, archive_server, monkeypatch):
    path, made = _serve(archive_server, "imagenette", make_imagenette, monkeypatch)
    prepared = data.prepare("imagenette", tmp_path, url=archive_server.url(path.name),
                            val_size=10, image_size=24, progress=False)
    m = data.load_manifest(tmp_path, "imagenette")
    assert m["splits"] == {"train": 50, "val": 10, "test": 20}
    assert m["classes"][0] == "tench" and m["image_size"] == 24
    train = data.load_split(tmp_path, "imagenette", "train")
    assert train.images.shape == (50, 24, 24, 3)
    # symmetric at a published rate uses the CSV column, mapped onto our train split.
    data.make_noise(prepared, data.noise_spec("symmetric", 0.25))
    noisy = data.load_split(tmp_path, "imagenette", "train", "symmetric-0.25")
    csv_pairs = sorted((NETTE_WNIDS.index(r["noisy_labels_0"]),
                        NETTE_WNIDS.index(r["noisy_labels_25"]))
                       for r in made["rows"] if not r["is_valid"])
    ours = list(zip(noisy.clean_labels.tolist(), noisy.labels.tolist(), strict=True))
    assert set(ours) <= set(csv_pairs) and len(ours) == 50
    meta = json.loads((prepared / "noise/symmetric-0.25.json").read_text())
    assert "noisy_labels_25" in meta["source"]
    # Other rates are generated: exact counts.
    data.make_noise(prepared, data.noise_spec("symmetric", 0.3))
    gen = data.load_split(tmp_path, "imagenette", "train", "symmetric-0.3")
    assert np.sum(gen.labels != gen.clean_labels) == 15


# --------------------------------------------------------------------------- transfer faults
@pytest.mark.parametrize("mislabel", [
    ("train/n03028079/n03028079_3.JPEG",),
    ("val/n01440764/n01440764_1.JPEG", "train/n03394916/n03394916_0.JPEG"),
], ids=["one train row", "a val row and a train row"])
def test_imagenette_clean_column_must_match_the_folders(tmp_path, archive_server, monkeypatch,
                                                        mislabel):
    path, _ = _serve(archive_server, "imagenette", make_imagenette, monkeypatch,
                     mislabel=mislabel)
    with pytest.raises(UserError) as err:
        data.prepare("imagenette", tmp_path, url=archive_server.url(path.name), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "raw" / path.name) in msg
    assert (f"noisy_imagenette.csv's noisy_labels_0 disagrees with the folder labels in "
            f"{len(mislabel)} rows") in msg
    first = sorted(f"imagenette2-160/{m}" for m in mislabel)[0]
    wnid = first.split("/")[2]
    said = NETTE_WNIDS[(NETTE_WNIDS.index(wnid) + 1) % 10]
    assert f"e.g. {said!r} for {first}: expected the folder's class" in msg
    assert _no_prepared(tmp_path)


def test_resume_after_broken_transfer(tmp_path, archive_server, monkeypatch):
    path, _ = _serve(archive_server, "cifar10", lambda p: make_cifar(p, False, 10),
                     monkeypatch)
    half = path.stat().st_size // 2
    archive_server.break_after = half
    raw = tmp_path / "raw"
    url = archive_server.url(path.name)
    with pytest.raises(UserError, match="interrupted .* run the command again to resume"):
        data.download("cifar10", raw, url=url, progress=False)
    assert not (raw / path.name).exists()
    assert (raw / f"{path.name}.part").stat().st_size == half
    final = data.download("cifar10", raw, url=url, progress=False)
    assert final.read_bytes() == path.read_bytes()
    assert archive_server.requests[-1]["range"] == f"bytes={half}-"
    assert not (raw / f"{path.name}.part").exists()


def test_bad_md5_leaves_nothing(tmp_path, archive_server, monkeypatch):
    path, _ = _serve(archive_server, "cifar10", lambda p: make_cifar(p, False, 10),
                     monkeypatch)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])  # truncated on the server
    with pytest.raises(UserError) as exc:
        data.prepare("cifar10", tmp_path, url=archive_server.url(path.name), progress=False)
    msg = str(exc.value)
    assert "md5" in msg and "\n" not in msg
    # Only the (hidden) lock file may remain: no archive, no .part to resume from.
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [f".{path.name}.lock"]
    assert _no_prepared(tmp_path)


def test_bad_mirror_copy_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    path = mirror / "cifar-10-python.tar.gz"
    make_cifar(path, False, 10)
    use_archive(monkeypatch, "cifar10", path, 100)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(UserError, match="mirror copy .* has md5"):
        data.prepare("cifar10", tmp_path / "d", mirror=mirror, progress=False)
    assert not (tmp_path / "d").exists()


def test_offline_without_archive_fails_first(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    with pytest.raises(UserError) as exc:
        data.prepare("cifar10", tmp_path / "d", url=url, progress=False)
    msg = str(exc.value)
    assert "cifar10" in msg and url in msg and "LAMBDAPIPE_MIRROR" in msg and "\n" not in msg
    assert not (tmp_path / "d").exists()


def test_http_only_for_loopback(tmp_path):
    with pytest.raises(UserError, match="expected https"):
        data.download("cifar10", tmp_path, url="http://example.com/cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="no archive"):
        data.download("digits", tmp_path)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- hostile archives
def _tar_with(path, name, *, link=None):
    with tarfile.open(path, "w:gz") as tf:
        ti = tarfile.TarInfo(name)
        if link is not None:
            ti.type, ti.linkname = tarfile.SYMTYPE, link
            tf.addfile(ti)
        else:
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"bad"))


@pytest.mark.parametrize(("name", "link"), [
    ("cifar-10-batches-py/../../evil", None),
    ("/etc/evil", None),
    ("cifar-10-batches-py/escape", "/etc/passwd"),
    ("cifar-10-batches-py/escape", "../../../outside"),
])
def test_path_escaping_tar_refused(tmp_path, monkeypatch, name, link):
    mirror = tmp_path / "m"
    mirror.mkdir()
    path = mirror / "cifar-10-python.tar.gz"
    _tar_with(path, name, link=link)
    use_archive(monkeypatch, "cifar10", path, 100)
    with pytest.raises(UserError, match="refusing archive"):
        data.prepare("cifar10", tmp_path / "d", mirror=mirror, progress=False)
    assert _no_prepared(tmp_path / "d")
    assert not (tmp_path / "evil").exists()


def test_path_escaping_zip_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "m"
    mirror.mkdir()
    path = mirror / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n1\n")
        zf.writestr("../escape.txt", "x")
    use_archive(monkeypatch, "tinyimagenet32", path, 2)
    with pytest.raises(UserError, match="refusing archive .*escape"):
        data.prepare("tinyimagenet32", tmp_path / "d", mirror=mirror, val_size=1,
                     progress=False)
    assert _no_prepared(tmp_path / "d")


def test_code_in_pickle_refused(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    mirror = tmp_path / "m"
    mirror.mkdir()
    path = mirror / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
            blob = pickle.dumps({b"data": Boom()}, protocol=2)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    use_archive(monkeypatch, "cifar10", path, 100)
    with pytest.raises(UserError, match="UnpicklingError: refusing to load .*print"):
        data.prepare("cifar10", tmp_path / "d", mirror=mirror, progress=False)
    assert _no_prepared(tmp_path / "d")


def test_wrong_layout_is_one_clear_line(tmp_path, monkeypatch):
    mirror = tmp_path / "m"
    mirror.mkdir()
    path = mirror / "cifar-10-python.tar.gz"
    _tar_with(path, "something/else")
    use_archive(monkeypatch, "cifar10", path, 100)
    with pytest.raises(UserError, match="not in the official layout: missing"):
        data.prepare("cifar10", tmp_path / "d", mirror=mirror, progress=False)
    assert _no_prepared(tmp_path / "d")


def test_redirect_to_plain_http_is_refused(tmp_path, archive_server, monkeypatch):
    """An https download must not continue over http: a 302 to a non-loopback http URL
    stops before anything is written; a redirect that obeys the rule is followed."""
    path, _ = _serve(archive_server, "cifar10", lambda p: make_cifar(p, False, 10),
                     monkeypatch)
    archive_server.redirects["/moved.tar.gz"] = "http://example.com/cifar-10-python.tar.gz"
    raw = tmp_path / "raw"
    with pytest.raises(UserError, match="refused redirect .* to 'http://example.com/") as exc:
        data.download("cifar10", raw, url=archive_server.url("moved.tar.gz"), progress=False)
    assert "\n" not in str(exc.value)
    assert not raw.exists() or not [p for p in raw.iterdir() if not p.name.startswith(".")]
    archive_server.redirects["/ok.tar.gz"] = archive_server.url(path.name)
    final = data.download("cifar10", raw, url=archive_server.url("ok.tar.gz"), progress=False)
    assert final.read_bytes() == path.read_bytes()


def test_cli_network_failure_is_one_error_line_exit_1(tmp_path):
    """Not the command line's fault: no "Usage: ... Try --help" block, no exit 2."""
    from click.testing import CliRunner

    from lambdapipe.cli import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    res = CliRunner().invoke(main, ["download", "--dataset", "cifar10", "--data-dir",
                                    str(tmp_path), "--url", url])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot download cifar10"), lines
    assert url in lines[0] and "Usage" not in res.output
    assert lines[0].endswith(f"or in {tmp_path / 'raw'}")  # this --data-dir's, not data/raw
    # Bad input is still a usage error.
    res = CliRunner().invoke(main, ["download", "--dataset", "cifar10", "--data-dir",
                                    str(tmp_path), "--url", "ftp://x/y.tgz"])
    assert res.exit_code == 2 and "Usage" in res.output


# --------------------------------------------------------------------------- a shared mirror
def test_concurrent_mirror_copies_wait_and_never_link_the_mirror(tmp_path, monkeypatch):
    """Issue 28.1: four downloads of one archive from a mirror into one data directory all
    succeed (one SameFileError traceback in 2 of 3 trials before), and the archive they
    leave is a file of our own, not a second name of the mirror's (a hard link)."""
    from concurrent.futures import ThreadPoolExecutor

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    source = mirror / "cifar-10-python.tar.gz"
    make_cifar(source, False, 10)
    use_archive(monkeypatch, "cifar10", source, 100)
    original = source.read_bytes()
    raw = tmp_path / "d" / "raw"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: data.download("cifar10", raw, mirror=mirror, progress=False), range(4)))
    final = raw / source.name
    assert results == [final] * 4
    assert final.stat().st_nlink == 1 and source.stat().st_nlink == 1
    assert not final.samefile(source)
    assert final.read_bytes() == original == source.read_bytes()
    assert sorted(p.name for p in raw.iterdir()) == [f".{source.name}.lock", source.name]


def test_a_part_linked_to_the_mirror_is_never_written_through(tmp_path, archive_server,
                                                              monkeypatch):
    """Issue 28.1: a `.part` hard-linked to the mirror's archive (what the old mirror copy
    left) and a server that sends wrong bytes: the download fails on md5, and the mirror's
    archive keeps its bytes (it was appended to, in place, before)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    source = mirror / "cifar-10-python.tar.gz"
    make_cifar(source, False, 10)
    use_archive(monkeypatch, "cifar10", source, 100)
    original = source.read_bytes()
    served = archive_server.root / source.name  # longer than the real one: a resume appends
    served.write_bytes(original + b"garbage" * 1000)
    raw = tmp_path / "d" / "raw"
    raw.mkdir(parents=True)
    os.link(source, raw / f"{source.name}.part")
    (raw / "elsewhere").write_bytes(b"keep")
    with pytest.raises(UserError, match="md5"):
        data.download("cifar10", raw, url=archive_server.url(source.name), progress=False)
    assert source.read_bytes() == original
    os.symlink(raw / "elsewhere", raw / f"{source.name}.part")  # a symlink is not followed
    with pytest.raises(UserError, match="md5"):
        data.download("cifar10", raw, url=archive_server.url(source.name), progress=False)
    assert (raw / "elsewhere").read_bytes() == b"keep"
    assert archive_server.requests[-1]["range"] is None  # started afresh both times
