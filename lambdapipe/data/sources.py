"""Readers of each official archive layout into uint8 NHWC arrays + int64 labels.

Archives are read member by member straight into memory (never extracted to disk), after
every member passed the safety checks in `download`. Image datasets are decoded into
memory-mapped scratch arrays so a 100k-image set never needs to fit in RAM twice.
"""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from lambdapipe.atomic import reserved_memmap
from lambdapipe.data.download import check_tar_member, check_zip_member
from lambdapipe.data.registry import (
    IMAGENETTE_NOISE_COLUMNS,
    IMAGENETTE_WNIDS,
    DatasetInfo,
    resize_size,
)
from lambdapipe.data.whole import WholeImages, centre_crop, decode_shorter_side
from lambdapipe.errors import StateError, UserError

DIGITS_TEST_FRACTION = 0.2


@dataclass
class Official:
    """The official train and test sets of one archive (val is cut from train later)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    source: dict
    # Published noisy labels aligned with train_labels, by rate (Imagenette only).
    noisy_train_labels: dict[float, np.ndarray] = field(default_factory=dict)
    # Further test sets, by split name: (images, labels) (ImageNet-V2 beside ImageNet-2012).
    extra_tests: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # The training images kept whole (Imagenette): `WholeImages` aligned with train_labels.
    train_whole: WholeImages | None = None


def read(info: DatasetInfo, archive: Path | None, scratch: Path, image_size: int,
         progress: bool, reader: Callable[..., Official] | None = None) -> Official:
    """`reader` (default: by `info.source`) gets `archive`: one path, or for a set of several
    archives (data/imagenet.py) a mapping of them by role."""
    reader = reader or READERS[info.source]
    try:
        official = reader(info, archive, scratch, image_size, progress)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, pickle.UnpicklingError,
            KeyError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise StateError(f"cannot read {info.name} archive {archive}: {exc.__class__.__name__}: "
                        f"{exc} (remove it to download again)") from None
    if isinstance(archive, Path):
        official.source = {"url": info.url, "archive": info.archive, "md5": info.md5,
                            **official.source}
    return official


def _layout_error(info: DatasetInfo, archive: Path | None, what: str) -> UserError:
    return UserError(f"{info.name} archive {archive} is not in the official layout: {what}")


def stratified_holdout(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` samples, each class contributing its share (largest remainder).

    Per-class quotas make the held-out class histogram match the whole set's to within one
    sample per class, whatever the seed; the seed only picks *which* samples.
    """
    classes, per_class = np.unique(labels, return_counts=True)
    exact = count * per_class / per_class.sum()
    quota = np.floor(exact).astype(np.int64)
    # Hand the leftover samples to the largest remainders; ties go to the lower class id.
    order = np.lexsort((classes, -(exact - quota)))
    quota[order[: count - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota,
                                                                               strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)



# --------------------------------------------------------------------------- digits
def read_digits(info: DatasetInfo, archive: Path | None, scratch: Path, image_size: int,
                progress: bool) -> Official:
    """scikit-learn's bundled 8x8 digits (values 0..16) -> 16x16 RGB uint8, nearest upscaling.

    The set has no official test split, so a fixed stratified 20 % (seed independent of
    `--split-seed`) plays that role; val is then cut from the remaining 80 %.
    """
    import sklearn
    from sklearn.datasets import load_digits

    from lambdapipe.noise import stable_seed

    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    factor = image_size // gray.shape[1]
    gray = gray.repeat(factor, axis=1).repeat(factor, axis=2)
    images = np.repeat(gray[..., None], 3, axis=3)
    labels = bunch.target.astype(np.int64)
    test = stratified_holdout(labels, round(DIGITS_TEST_FRACTION * len(labels)),
                              stable_seed("digits", "test-split"))
    train = np.setdiff1d(np.arange(len(labels)), test)
    source = {"library": f"scikit-learn {sklearn.__version__}",
              "loader": "sklearn.datasets.load_digits",
              "raw_sha256": __import__("hashlib").sha256(bunch.images.tobytes()).hexdigest()}
    return Official(images[train], labels[train], images[test], labels[test],
                    list(info.classes or ()), source)


# --------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a pickle can otherwise run any code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickled batch")
        return super().find_class(module, name)


def _unpickle(data: bytes) -> dict:
    obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


unpickle_arrays = _unpickle  # public: downsampled ImageNet's batches are CIFAR-style pickles


def _tar_members(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Every regular member whose name `wanted` accepts, after checking all members."""
    out: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            check_tar_member(m, archive)
        for m in members:
            if m.isfile() and wanted(m.name):
                fh = tf.extractfile(m)
                assert fh is not None
                out[m.name] = fh.read()
    return out


def read_cifar(info: DatasetInfo, archive: Path | None, scratch: Path, image_size: int,
               progress: bool) -> Official:
    """The pickled python batches: rows of 3072 bytes, channel planes R, G, B of 32x32."""
    assert archive is not None
    if info.source == "cifar10":
        root, train_names = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
        test_name, meta_name, label_key, names_key = "test_batch", "batches.meta", "labels", \
            "label_names"
    else:
        root, train_names = "cifar-100-python", ["train"]
        test_name, meta_name, label_key, names_key = "test", "meta", "fine_labels", \
            "fine_label_names"
    needed = {f"{root}/{n}" for n in [*train_names, test_name, meta_name]}
    files = _tar_members(archive, lambda name: name in needed)
    missing = sorted(needed - files.keys())
    if missing:
        raise _layout_error(info, archive, f"missing {', '.join(missing)}")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        d = _unpickle(files[f"{root}/{name}"])
        data = np.asarray(d["data"], dtype=np.uint8)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), np.asarray(d[label_key], dtype=np.int64)

    parts = [batch(n) for n in train_names]
    test_images, test_labels = batch(test_name)
    meta = _unpickle(files[f"{root}/{meta_name}"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    return Official(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    test_images, test_labels, classes, {})


# --------------------------------------------------------------------------- image folders
def _decode(data: bytes, size: int, crop: bool) -> np.ndarray:
    """JPEG bytes -> size x size RGB; `crop`: shorter side to `size`, then the center square."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")  # Tiny ImageNet has grayscale images
        w, h = im.size
        if crop:
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)  # antialiased when shrinking
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        elif (w, h) != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _fill(scratch: Path, name: str, keys: list[str], size: int, fetch: Callable[[str], bytes],
          crop: bool, progress: bool, desc: str) -> np.ndarray:
    from tqdm import tqdm

    out = reserved_memmap(scratch / f"{name}.npy", np.uint8, (len(keys), size, size, 3))
    for i, key in enumerate(tqdm(keys, desc=desc, disable=not progress, leave=False)):
        out[i] = _decode(fetch(key), size, crop)
    out.flush()
    return out


def read_tinyimagenet(info: DatasetInfo, archive: Path | None, scratch: Path, image_size: int,
                      progress: bool) -> Official:
    """tiny-imagenet-200/{wnids,words}.txt, train/<wnid>/images/*.JPEG, val/images + annotations.

    Classes are numbered in sorted-wnid order; the labelled official val set is our test set.
    """
    assert archive is not None
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for m in infos:
            check_zip_member(m, archive)
        names = {m.filename for m in infos if not m.is_dir()}
        root = "tiny-imagenet-200"
        for needed in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
            if f"{root}/{needed}" not in names:
                raise _layout_error(info, archive, f"missing {root}/{needed}")
        wnids = sorted(zf.read(f"{root}/wnids.txt").decode().split())
        index = {w: i for i, w in enumerate(wnids)}
        words = dict(line.split("\t", 1) for line in
                     zf.read(f"{root}/words.txt").decode().splitlines() if "\t" in line)
        train_keys: list[str] = []
        train_labels: list[int] = []
        for name in sorted(names):
            p = PurePosixPath(name)
            if (len(p.parts) == 5 and p.parts[1] == "train" and p.parts[3] == "images"
                    and p.suffix.upper() == ".JPEG"):
                if p.parts[2] not in index:
                    raise _layout_error(info, archive, f"{name}: class {p.parts[2]} not in wnids")
                train_keys.append(name)
                train_labels.append(index[p.parts[2]])
        test_keys, test_labels = [], []
        for line in zf.read(f"{root}/val/val_annotations.txt").decode().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            key = f"{root}/val/images/{fields[0]}"
            if key not in names or fields[1] not in index:
                raise _layout_error(info, archive, f"val annotation {line!r} has no image/class")
            test_keys.append(key)
            test_labels.append(index[fields[1]])
        if not train_keys or not test_keys:
            raise _layout_error(info, archive, "no train/val images")
        train = _fill(scratch, "train", train_keys, image_size, zf.read, False, progress,
                      f"{info.name} train")
        test = _fill(scratch, "test", test_keys, image_size, zf.read, False, progress,
                     f"{info.name} test")
    classes = [words.get(w, w).strip() for w in wnids]
    return Official(train, np.asarray(train_labels, dtype=np.int64), test,
                    np.asarray(test_labels, dtype=np.int64), classes, {"wnids": wnids})


CLEAN_COLUMN = "noisy_labels_0"  # the noisy-label CSV's 0 % column: the clean labels


def read_imagenette(info: DatasetInfo, archive: Path | None, scratch: Path, image_size: int,
                    progress: bool) -> Official:
    """imagenette2-*/{train,val}/<wnid>/*.JPEG + noisy_imagenette.csv (official val = test).

    The CSV's noisy label columns are kept, aligned with the official train images, so the
    published noise variants can be used as they are. Every image gets its evaluation view
    (shorter side to resize_size, centre crop); training images are also kept whole (shorter
    side resize_size) when `info.whole_images`, so training crops can reach every border.
    """
    assert archive is not None
    wnids = [w for w, _ in IMAGENETTE_WNIDS]
    index = {w: i for i, w in enumerate(wnids)}
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            check_tar_member(m, archive)
        files = {m.name: m for m in members if m.isfile()}
        csv_names = [n for n in files if PurePosixPath(n).name == "noisy_imagenette.csv"]
        if len(csv_names) != 1:
            raise _layout_error(info, archive, "expected one noisy_imagenette.csv")
        root = PurePosixPath(csv_names[0]).parent
        split_keys: dict[str, list[str]] = {"train": [], "val": []}
        for name in sorted(files):
            p = PurePosixPath(name)
            rel = p.relative_to(root) if p.is_relative_to(root) else None
            if rel is None or len(rel.parts) != 3 or rel.parts[0] not in split_keys:
                continue
            if rel.parts[1] not in index:
                raise _layout_error(info, archive, f"{name}: unknown class {rel.parts[1]}")
            split_keys[rel.parts[0]].append(name)
        if not split_keys["train"] or not split_keys["val"]:
            raise _layout_error(info, archive, "no train/ or val/ images")

        def fetch(name: str) -> bytes:
            fh = tf.extractfile(files[name])
            assert fh is not None
            return fh.read()

        # Decode in archive order (a forward-only pass through the gzip stream) into slots
        # fixed by sorted path, so the arrays do not depend on the archive's member order.
        arrays = {}
        for split, keys in split_keys.items():
            arrays[split] = reserved_memmap(scratch / f"{split}.npy", np.uint8,
                                            (len(keys), image_size, image_size, 3))
        slot = {name: (split, i) for split, keys in split_keys.items()
                for i, name in enumerate(keys)}
        short = resize_size(image_size)
        # Whole training images are appended to one raw file as they come; `whole_index`
        # (offset, height, width) puts each at its slot.
        whole_index = np.zeros((len(split_keys["train"]), 3), dtype=np.int64)
        from tqdm import tqdm

        with open(scratch / "train_whole.raw", "wb") as raw:
            offset = 0
            for m in tqdm([m for m in members if m.name in slot], desc=info.name,
                          disable=not progress, leave=False):
                split, i = slot[m.name]
                image = decode_shorter_side(fetch(m.name), short)
                arrays[split][i] = centre_crop(image, image_size)
                if split == "train" and info.whole_images:
                    raw.write(np.ascontiguousarray(image).tobytes())
                    whole_index[i] = (offset, *image.shape[:2])
                    offset += image.shape[0] * image.shape[1]
        whole = None
        if info.whole_images:
            pixels = (np.memmap(scratch / "train_whole.raw", np.uint8, "r", shape=(offset, 3))
                      if offset else np.zeros((0, 3), np.uint8))
            whole = WholeImages(pixels, whole_index)
        rows = list(csv.DictReader(io.StringIO(fetch(csv_names[0]).decode())))
    labels = {s: np.asarray([index[PurePosixPath(k).parts[-2]] for k in keys], dtype=np.int64)
              for s, keys in split_keys.items()}
    _check_clean_column(info, archive, rows, root, split_keys)
    noisy = _imagenette_noise(info, archive, rows, root, split_keys["train"], index)
    return Official(arrays["train"], labels["train"], arrays["val"], labels["val"],
                    [n for _, n in IMAGENETTE_WNIDS], {"wnids": wnids}, noisy,
                    train_whole=whole)


def _check_clean_column(info: DatasetInfo, archive: Path, rows: list[dict],
                        root: PurePosixPath, split_keys: dict[str, list[str]]) -> None:
    """noisy_labels_0 is the clean labelling: it must name each image's folder, or the CSV
    belongs to another archive (or was edited) and its noisy columns mean nothing here."""
    if not rows or "path" not in rows[0] or CLEAN_COLUMN not in rows[0]:
        raise _layout_error(info, archive, f"noisy_imagenette.csv lacks path/{CLEAN_COLUMN} "
                                           "columns")
    by_path = {str(root / r["path"]): r[CLEAN_COLUMN] for r in rows}
    wrong = [(k, by_path[k]) for keys in split_keys.values() for k in keys
             if k in by_path and by_path[k] != PurePosixPath(k).parts[-2]]
    if wrong:
        name, said = wrong[0]
        raise _layout_error(info, archive, f"noisy_imagenette.csv's {CLEAN_COLUMN} disagrees "
                                           f"with the folder labels in {len(wrong)} rows, e.g. "
                                           f"{said!r} for {name}: expected the folder's class")


def _imagenette_noise(info: DatasetInfo, archive: Path, rows: list[dict], root: PurePosixPath,
                      train_keys: list[str], index: dict[str, int]) -> dict[float, np.ndarray]:
    columns = list(IMAGENETTE_NOISE_COLUMNS.items())
    if not rows or any(c not in rows[0] for _, c in columns) or "path" not in rows[0]:
        raise _layout_error(info, archive, "noisy_imagenette.csv lacks path/noisy_labels_* "
                                           "columns")
    by_path = {str(root / r["path"]): r for r in rows}
    out = {}
    for rate, column in columns:
        try:
            out[rate] = np.asarray([index[by_path[k][column]] for k in train_keys],
                                   dtype=np.int64)
        except KeyError as exc:
            raise _layout_error(info, archive, f"noisy_imagenette.csv has no usable "
                                               f"{column} entry for {exc}") from None
    return out


READERS = {"digits": read_digits, "cifar10": read_cifar, "cifar100": read_cifar,
           "tinyimagenet": read_tinyimagenet, "imagenette": read_imagenette}
