"""ImageNet 32/64 px, ImageNet-2012 and ImageNet-V2 from tiny archives in the official layouts.

The archives are read from a mirror directory, as users who registered with image-net.org
would keep them; the registry's image counts (and ILSVRC2012's pinned md5s) are swapped for
the generated archives' through monkeypatch, explicitly.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from lambdapipe import data
from lambdapipe.data import imagenet, registry
from lambdapipe.data.stream import open_split
from lambdapipe.errors import StateError, UserError


def _add_bytes(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _use(monkeypatch, dataset, num_train, md5s=None):
    info = registry.DATASETS[dataset]
    monkeypatch.setitem(registry.DATASETS, dataset,
                        dataclasses.replace(info, num_train=num_train))
    if md5s is not None:
        specs = tuple(dataclasses.replace(a, md5=md5s.get(a.name)) for a in
                      imagenet.ARCHIVES[dataset])
        monkeypatch.setitem(imagenet.ARCHIVES, dataset, specs)


# --------------------------------------------------------------------------- downsampled
def _batch(rng, n, size, npz):
    d = {"data": rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8),
         "labels": [int(x) for x in rng.integers(1, 1001, n)],
         "mean": np.zeros(3 * size * size)}
    if npz:
        buf = io.BytesIO()
        np.savez(buf, data=d["data"], labels=np.asarray(d["labels"]), mean=d["mean"])
        return d, buf.getvalue()
    return d, pickle.dumps(d, protocol=4)


def make_downsampled(mirror, size, npz=False, per_batch=3, drop=None):
    """Imagenet{size}_train.zip (two parts at 64 px) + Imagenet{size}_val.zip."""
    rng = np.random.default_rng(size)
    suffix = ".npz" if npz else ""
    train_zips = ([f"Imagenet{size}_train.zip"] if size == 32
                  else [f"Imagenet{size}_train_part1.zip", f"Imagenet{size}_train_part2.zip"])
    batches = []
    for i in range(1, 11):
        d, raw = _batch(rng, per_batch, size, npz)
        batches.append(d)
        if i == drop:
            continue
        name = train_zips[0 if size == 32 or i <= 5 else 1]
        with zipfile.ZipFile(mirror / name, "a") as zf:
            zf.writestr(f"{name.removesuffix('.zip')}/train_data_batch_{i}{suffix}", raw)
    val, raw = _batch(rng, 4, size, npz)
    with zipfile.ZipFile(mirror / f"Imagenet{size}_val.zip", "w") as zf:
        zf.writestr(f"Imagenet{size}_val/val_data{suffix}", raw)
    return batches, val


def _images(d, size):
    return d["data"].reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


@pytest.mark.parametrize(("dataset", "size", "npz"), [("imagenet32", 32, False),
                                                       ("imagenet64", 64, True)])
def test_downsampled_prepare_and_read_back(tmp_path, monkeypatch, dataset, size, npz):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    batches, val = make_downsampled(mirror, size, npz)
    _use(monkeypatch, dataset, 30)
    data.prepare(dataset, tmp_path / "d", mirror=mirror, val_size=5, progress=False)
    m = data.load_manifest(tmp_path / "d", dataset)
    assert m["splits"] == {"train": 25, "val": 5, "test": 4}
    assert len(m["classes"]) == 1000
    assert [r["name"] for r in m["source"]["archives"]["val"]] == [f"Imagenet{size}_val.zip"]
    test = data.load_split(tmp_path / "d", dataset, "test")
    np.testing.assert_array_equal(test.images, _images(val, size))
    np.testing.assert_array_equal(test.labels, np.asarray(val["labels"]) - 1)
    # train + val together are the ten batches in order, labels shifted to 0..999
    all_images = np.concatenate([_images(b, size) for b in batches])
    all_labels = np.concatenate([b["labels"] for b in batches]) - 1
    for split in ("train", "val"):
        s = data.load_split(tmp_path / "d", dataset, split)
        for img, label in zip(s.images, s.labels, strict=True):
            hit = np.flatnonzero((all_images == img).all(axis=(1, 2, 3)))
            assert len(hit) == 1 and all_labels[hit[0]] == label


def test_downsampled_missing_archive_says_where_to_get_it(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _use(monkeypatch, "imagenet32", 30)
    with pytest.raises(UserError, match=r"needs Imagenet32_train.zip.*image-net.org"):
        data.prepare("imagenet32", tmp_path / "d", mirror=mirror, val_size=5, progress=False)


def test_downsampled_missing_batch_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_downsampled(mirror, 32, drop=7)
    _use(monkeypatch, "imagenet32", 27)
    with pytest.raises(UserError, match="not in the official layout.*train_data_batch_1..10"):
        data.prepare("imagenet32", tmp_path / "d", mirror=mirror, val_size=5, progress=False)
    assert not (tmp_path / "d" / "prepared" / "imagenet32").exists()


def test_downsampled_hostile_zip_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_downsampled(mirror, 32)
    with zipfile.ZipFile(mirror / "Imagenet32_val.zip", "a") as zf:
        zf.writestr("../../escape", b"x")
    _use(monkeypatch, "imagenet32", 30)
    with pytest.raises(UserError, match="refusing archive.*escape"):
        data.prepare("imagenet32", tmp_path / "d", mirror=mirror, val_size=5, progress=False)


def test_downsampled_pickle_cannot_run_code(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_downsampled(mirror, 32)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with zipfile.ZipFile(mirror / "Imagenet32_val.zip", "w") as zf:
        zf.writestr("Imagenet32_val/val_data", pickle.dumps({"data": Evil()}))
    _use(monkeypatch, "imagenet32", 30)
    with pytest.raises(StateError, match="refusing to load builtins.print"):
        data.prepare("imagenet32", tmp_path / "d", mirror=mirror, val_size=5, progress=False)


# --------------------------------------------------------------------------- ILSVRC2012
WNIDS = [f"n{10_000_000 + 7 * i:08d}" for i in range(1000)]


def _meta_mat(ids):
    """meta.mat as the devkit has it: leaf synsets (ILSVRC2012_ID, WNID, words, ...,
    num_children 0) and a parent synset, ids NOT in sorted-wnid order."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
          ("num_children", "O")]
    rows = np.zeros((1001, 1), dtype=dt)
    for wnid, i in ids.items():
        rows[i - 1, 0] = (np.array([[i]]), wnid, f"words of {wnid}", "g", np.array([[0]]))
    rows[1000, 0] = (np.array([[1001]]), "n99999999", "a parent", "g", np.array([[3]]))
    buf = io.BytesIO()
    savemat(buf, {"synsets": rows})
    return buf.getvalue()


def _tar_bytes(members, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, payload in members:
            _add_bytes(tf, name, payload)
    return buf.getvalue()


def make_ilsvrc(mirror, hostile_inner=False, val_classes=(999, 0, 5, 5)):
    """The four ILSVRC2012 archives, tiny: 3 classes of 3 train JPEGs, one val JPEG per
    `val_classes` entry (its class), 8 ImageNet-V2 JPEGs."""
    rng = np.random.default_rng(0)
    perm = rng.permutation(1000) + 1  # devkit id of sorted class k is perm[k]
    ids = {w: int(perm[k]) for k, w in enumerate(WNIDS)}
    train = {}  # jpeg bytes -> sorted-wnid label
    classes = [0, 5, 999]
    with tarfile.open(mirror / "ILSVRC2012_img_train.tar", "w") as outer:
        for k in classes:
            wnid = WNIDS[k]
            jpegs = [_jpeg(rng, 40 + j, 30 + 2 * j) for j in range(3)]
            train.update({b: k for b in jpegs})
            inner = _tar_bytes([(f"{wnid}_{j}.JPEG", b) for j, b in enumerate(jpegs)])
            if hostile_inner and k == 5:
                buf = io.BytesIO(inner)
                with tarfile.open(fileobj=buf, mode="a") as tf:
                    link = tarfile.TarInfo("evil")
                    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tf.addfile(link)
                inner = buf.getvalue()
            _add_bytes(outer, f"{wnid}.tar", inner)
    val_classes = list(val_classes)
    val = [_jpeg(rng, 50, 36) for _ in val_classes]
    n = len(val_classes)
    with tarfile.open(mirror / "ILSVRC2012_img_val.tar", "w") as tf:
        for i in ((3, 1, 4, 2) if n == 4 else range(n, 0, -1)):  # member order: not file order
            _add_bytes(tf, f"ILSVRC2012_val_{i:08d}.JPEG", val[i - 1])
    truth = "\n".join(str(ids[WNIDS[k]]) for k in val_classes) + "\n"
    devkit = [("ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(ids)),
              ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
               truth.encode())]
    (mirror / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(_tar_bytes(devkit, "w:gz"))
    v2_folders = ["0", "2", "10", "999"]  # numbers, not ranks: "10" sorts before "2"
    v2 = [(f"imagenetv2-matched-frequency-format-val/{f}/{j}.jpeg", _jpeg(rng, 20, 20))
          for f in v2_folders for j in range(2)]
    (mirror / "imagenetv2-matched-frequency.tar.gz").write_bytes(_tar_bytes(v2, "w:gz"))
    return train, val, val_classes, v2


def _prepare_ilsvrc(tmp_path, monkeypatch, **kw):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    made = make_ilsvrc(mirror, **kw)
    _use(monkeypatch, "imagenet2012", 9, md5s={})
    data.prepare("imagenet2012", tmp_path / "d", mirror=mirror, val_size=3, progress=False)
    return made


def test_ilsvrc2012_index_labels_and_stream(tmp_path, monkeypatch):
    train, val, val_classes, v2 = _prepare_ilsvrc(tmp_path, monkeypatch)
    m = data.load_manifest(tmp_path / "d", "imagenet2012")
    assert m["splits"] == {"train": 6, "val": 3, "test": 4, "test_v2": 8}
    assert m["classes"][0] == f"words of {WNIDS[0]}" and len(m["classes"]) == 1000
    seen = {}
    for split in ("train", "val"):
        s = open_split(tmp_path / "d", "imagenet2012", split)
        for i in range(len(s)):
            seen[s.jpeg(i)] = int(s.labels[i])  # bytes read at the indexed offsets
    assert seen == train
    test = open_split(tmp_path / "d", "imagenet2012", "test")
    assert [test.jpeg(i) for i in range(4)] == val  # file order, whatever the member order
    assert test.labels.tolist() == val_classes  # devkit ids mapped to sorted-wnid indices
    v2_split = open_split(tmp_path / "d", "imagenet2012", "test_v2")
    assert v2_split.labels.tolist() == [0, 0, 2, 2, 10, 10, 999, 999]
    assert [v2_split.jpeg(i) for i in range(8)] == [b for _, b in v2]

    images, labels = test.batch([0, 2], train=False)
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.uint8
    assert labels.tolist() == [val_classes[0], val_classes[2]]
    s = open_split(tmp_path / "d", "imagenet2012", "train")
    a, _ = s.batch(range(6), train=True, seed=1, epoch=0)
    b, _ = s.batch([5, 4, 3, 2, 1, 0], train=True, seed=1, epoch=0)
    assert torch.equal(a, b.flip(0))  # an image's crop depends on (seed, epoch, index) only
    c, _ = s.batch(range(6), train=True, seed=1, epoch=1)
    assert not torch.equal(a, c)
    with pytest.raises(UserError, match="not as arrays: read it with lambdapipe.data.stream"):
        data.load_split(tmp_path / "d", "imagenet2012", "train")


def test_ilsvrc2012_hostile_inner_tar_refused(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="refusing archive.*evil"):
        _prepare_ilsvrc(tmp_path, monkeypatch, hostile_inner=True)


def test_ilsvrc2012_wrong_md5_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_ilsvrc(mirror)
    _use(monkeypatch, "imagenet2012", 9, md5s={"ILSVRC2012_img_val.tar": "0" * 32})
    with pytest.raises(StateError, match="ILSVRC2012_img_val.tar has md5"):
        data.prepare("imagenet2012", tmp_path / "d", mirror=mirror, val_size=3, progress=False)


def test_ilsvrc2012_v2_is_optional_and_archive_change_is_caught(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_ilsvrc(mirror)
    (mirror / "imagenetv2-matched-frequency.tar.gz").unlink()
    _use(monkeypatch, "imagenet2012", 9, md5s={})
    data.prepare("imagenet2012", tmp_path / "d", mirror=mirror, val_size=3, progress=False)
    assert "test_v2" not in data.load_manifest(tmp_path / "d", "imagenet2012")["splits"]
    with open(mirror / "ILSVRC2012_img_val.tar", "ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(StateError, match="gone or changed size"):
        open_split(tmp_path / "d", "imagenet2012", "test").jpeg(0)


@pytest.mark.slow  # a 4-step training run on the CPU
def test_train_on_prepared_imagenet32(tmp_path, monkeypatch):
    """The 32 px set trains with the pipeline as it is: prepare from the mirror, then
    `lambdapipe train` with the table's recipe (budget, batch and width shrunk)."""
    import json

    from click.testing import CliRunner

    from lambdapipe.cli import main

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_downsampled(mirror, 32, per_batch=4)
    _use(monkeypatch, "imagenet32", 40)
    data.prepare("imagenet32", tmp_path / "d", mirror=mirror, val_size=8, progress=False)
    res = CliRunner().invoke(main, [
        "train", "--model", "resnet18", "--model-arg", "base_width=4", "--dataset",
        "imagenet32", "--data-dir", str(tmp_path / "d"), "--recipe", "sgdm-imagenet32",
        "--set", "iterations=2", "--set", "batch_size=8", "--set", "eval_every=2",
        "--set", "precision=fp32", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["skipped_steps"] == 0


def test_download_points_to_registration(tmp_path):
    with pytest.raises(UserError, match="registering at image-net.org.*docs/imagenet.md"):
        data.download("imagenet2012", tmp_path)
