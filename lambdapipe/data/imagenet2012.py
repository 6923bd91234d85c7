"""ImageNet-2012 (ILSVRC2012) at 224 px, and ImageNet-V2: an index of JPEGs, not arrays.

1.28 M full-size JPEGs do not fit the prepared-array format (224 px uint8 would be 193 GB),
so `prepare` writes an index instead: per image `[file, offset, size]`, where file 0 is the
train tar, 1 the val tar, 2 ImageNet-V2's JPEGs copied into the prepared directory (its
official archive is gzipped, which cannot be read at an offset). data/stream.py reads and
decodes them batch by batch. The index is saved where `prepare` saves images
(`<split>_images.npy`, int64 N x 3), so the stratified val split, the manifest, the
checksums and the class counts are the ones every other set gets.

Official layouts read here:
* ILSVRC2012_img_train.tar: 1000 member tars `<wnid>.tar`, each of `<wnid>_<n>.JPEG`.
  Classes are numbered in sorted-wnid order (torchvision's, and ImageNet-V2's).
* ILSVRC2012_img_val.tar: `ILSVRC2012_val_<8 digits>.JPEG`, flat.
* ILSVRC2012_devkit_t12.tar.gz: `data/meta.mat` (the synsets: ILSVRC2012_ID, WNID, words,
  ..., num_children; the 1000 leaves are the classes) and
  `data/ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per val image, in file
  order). The devkit's ids are NOT the sorted-wnid indices: meta.mat maps one to the other.
* imagenetv2-matched-frequency.tar.gz: `imagenetv2-matched-frequency-format-val/<k>/*.jpeg`
  where the folder name k is the class index itself (0..999, sorted-wnid order): folders
  are read as numbers, never ranked by name ("10" sorts before "2").
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from lambdapipe.atomic import reserved_memmap
from lambdapipe.data.download import check_tar_member
from lambdapipe.data.imagenet import archive_record, layout_error
from lambdapipe.data.registry import DatasetInfo
from lambdapipe.data.sources import Official

V2_BLOB = "test_v2_jpegs.npy"  # in the prepared directory: file 2 of the index
_WNID = re.compile(r"^n\d{8}$")
_VAL = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


def read_devkit(info: DatasetInfo, path: Path) -> tuple[dict[int, str], dict[str, str],
                                                          list[int]]:
    """({ILSVRC2012_ID: wnid}, {wnid: words}, val ground-truth ids in file order)."""
    from scipy.io import loadmat  # MATLAB v5 meta.mat; scipy is a dependency already

    with tarfile.open(path, "r:*") as tf:
        files = {}
        for m in tf.getmembers():
            check_tar_member(m, path)
            if m.isfile() and PurePosixPath(m.name).name in (
                    "meta.mat", "ILSVRC2012_validation_ground_truth.txt"):
                fh = tf.extractfile(m)
                assert fh is not None
                files[PurePosixPath(m.name).name] = fh.read()
    if len(files) != 2:
        raise layout_error(info, path, "expected data/meta.mat and "
                                       "data/ILSVRC2012_validation_ground_truth.txt")
    synsets = loadmat(io.BytesIO(files["meta.mat"]), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    ids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    words = {str(s["WNID"]): str(s["words"]) for s in leaves}
    truth = [int(x) for x in files["ILSVRC2012_validation_ground_truth.txt"].split()]
    if len(ids) != info.num_classes or any(t not in ids for t in truth):
        raise layout_error(info, path, f"{len(ids)} leaf synsets (expected "
                                       f"{info.num_classes}) or ground truth ids outside them")
    return ids, words, truth


def _train_index(info: DatasetInfo, path: Path, progress: bool):
    """Offsets of every JPEG inside the per-class tars inside the train tar: the outer tar
    is seeked through (no data read), each inner tar listed in place."""
    from tqdm import tqdm

    rows: list[tuple[int, int, int]] = []
    wnids_of: list[str] = []
    with tarfile.open(path, "r:") as outer:  # uncompressed: offsets are file positions
        members = outer.getmembers()
        for m in members:
            check_tar_member(m, path)
        inner_tars = sorted((m for m in members if m.isfile()), key=lambda m: m.name)
        for m in tqdm(inner_tars, desc=f"{info.name} train index", disable=not progress,
                      leave=False):
            wnid = PurePosixPath(m.name).name.removesuffix(".tar")
            if not m.name.endswith(".tar") or not _WNID.match(wnid):
                raise layout_error(info, path, f"member {m.name!r} is not a <wnid>.tar")
            fh = outer.extractfile(m)
            assert fh is not None
            with tarfile.open(fileobj=fh, mode="r:") as inner:
                for im in inner.getmembers():
                    check_tar_member(im, path)
                    if im.isfile():
                        rows.append((0, m.offset_data + im.offset_data, im.size))
                        wnids_of.append(wnid)
    return rows, wnids_of


def _val_index(info: DatasetInfo, path: Path, truth: list[int]):
    by_number: dict[int, tuple[int, int, int]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf.getmembers():
            check_tar_member(m, path)
            match = _VAL.match(PurePosixPath(m.name).name)
            if m.isfile() and match:
                by_number[int(match[1])] = (1, m.offset_data, m.size)
    if sorted(by_number) != list(range(1, len(truth) + 1)):
        raise layout_error(info, path, f"{len(by_number)} val images numbered "
                                       f"1..{len(truth)} expected (one per ground-truth line)")
    return [by_number[i] for i in range(1, len(truth) + 1)]


def _v2_index(info: DatasetInfo, path: Path, blob: Path):
    """ImageNet-V2's JPEGs (member order) copied into one uint8 array; labels = folder
    numbers."""
    entries: list[tuple[int, bytes]] = []
    with tarfile.open(path, "r:*") as tf:
        for m in tf.getmembers():
            check_tar_member(m, path)
        for m in tf.getmembers():
            parts = PurePosixPath(m.name).parts
            if not m.isfile() or len(parts) < 2 or not parts[-1].lower().endswith(".jpeg"):
                continue
            folder = parts[-2]
            if not folder.isdigit() or not 0 <= int(folder) < info.num_classes:
                raise layout_error(info, path, f"{m.name!r}: folder {folder!r} is not a class "
                                               f"index 0..{info.num_classes - 1}")
            fh = tf.extractfile(m)
            assert fh is not None
            entries.append((int(folder), fh.read()))
    if not entries:
        raise layout_error(info, path, "no <class index>/*.jpeg images")
    out = reserved_memmap(blob, np.uint8, (sum(len(b) for _, b in entries),))
    rows, start = [], 0
    for _, data in entries:
        out[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows.append((2, start, len(data)))
        start += len(data)
    out.flush()
    return np.asarray(rows, dtype=np.int64), np.asarray([k for k, _ in entries], dtype=np.int64)


def read_ilsvrc2012(info: DatasetInfo, archives: dict[str, list[Path]], scratch: Path,
                    image_size: int, progress: bool) -> Official:
    """The index of train (sorted-wnid labels), val (devkit labels mapped to sorted wnids;
    our test) and, where its archive is present, ImageNet-V2 (test_v2)."""
    ids, words, truth = read_devkit(info, archives["devkit"][0])
    wnids = sorted(ids.values())
    index = {w: i for i, w in enumerate(wnids)}
    train_rows, train_wnids = _train_index(info, archives["train"][0], progress)
    unknown = sorted(set(train_wnids) - set(index))
    if unknown:
        raise layout_error(info, archives["train"][0], f"class {unknown[0]} not in the devkit")
    test_rows = _val_index(info, archives["val"][0], truth)
    extra = {}
    if "v2" in archives:  # file 2 lives in the prepared directory itself, beside the index
        extra["test_v2"] = _v2_index(info, archives["v2"][0], scratch.parent / V2_BLOB)
    files = [str(archives["train"][0].resolve()), str(archives["val"][0].resolve())]
    return Official(np.asarray(train_rows, dtype=np.int64),
                    np.asarray([index[w] for w in train_wnids], dtype=np.int64),
                    np.asarray(test_rows, dtype=np.int64),
                    np.asarray([index[ids[t]] for t in truth], dtype=np.int64),
                    [words[w] for w in wnids],
                    {"storage": "jpeg-index", "files": files + ([V2_BLOB] if extra else []),
                     "wnids": wnids, "archives": archive_record(archives),
                     "labels": "sorted-wnid order; val mapped from the devkit's "
                               "ILSVRC2012_IDs through meta.mat; V2 folder number = class"},
                    extra_tests=extra)
