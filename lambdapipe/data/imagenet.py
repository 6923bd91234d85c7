"""ImageNet archives that users download themselves, and the downsampled ImageNet (32/64 px).

image-net.org hands its archives out only after registration, so there is no URL to fetch:
each archive is looked for in `data/raw/` and then in the mirror directory (`--mirror` or
$LAMBDAPIPE_MIRROR), and read where it lies (a 147 GB ILSVRC2012 train tar is never copied).
An archive is checked by md5 where a published one is known (ILSVRC2012: the ones torchvision
pins), else by its layout and image counts; the md5 measured is recorded in the manifest.

Downsampled ImageNet (Chrabaszcz et al. 2017) ships as zips of pickled batches,
`train_data_batch_1..10` and `val_data`: a dict with `data` (N x 3*S*S uint8, the R, G and B
planes of an S x S image, as CIFAR), `labels` (1..1000) and `mean`. Imagenet64's train set
comes in two zips (batches 1-5 and 6-10). The npz release (`*.npz` members, same keys) is
read too. Labels are stored 0-based (label - 1); their order is the archive's own (the
ILSVRC devkit's ids, per the dataset's scripts), not the sorted-wnid order of ImageNet-2012
at 224 px: the two tables' class indices are not interchangeable.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from lambdapipe.atomic import md5_file, reserved_memmap
from lambdapipe.data.download import MIRROR_ENV, check_zip_member
from lambdapipe.data.registry import DatasetInfo
from lambdapipe.data.sources import Official, unpickle_arrays
from lambdapipe.errors import StateError, UserError

REGISTER = "https://image-net.org/download-images (free registration, non-commercial terms)"


@dataclass(frozen=True)
class Archive:
    """One file a dataset is made from: its official name and md5 (None: none published)."""

    role: str  # train, val, devkit, v2
    name: str
    md5: str | None = None
    optional: bool = False


ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "imagenet32": (Archive("train", "Imagenet32_train.zip"), Archive("val", "Imagenet32_val.zip")),
    "imagenet64": (Archive("train", "Imagenet64_train_part1.zip"),
                   Archive("train", "Imagenet64_train_part2.zip"),
                   Archive("val", "Imagenet64_val.zip")),
    # md5s as torchvision.datasets.ImageNet pins them; ImageNet-V2 publishes none.
    "imagenet2012": (
        Archive("train", "ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e"),
        Archive("val", "ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622"),
        Archive("devkit", "ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf"),
        Archive("v2", "imagenetv2-matched-frequency.tar.gz", optional=True),
    ),
}
V2_URL = "https://imagenetv2public.s3-us-west-2.amazonaws.com/imagenetv2-matched-frequency.tar.gz"


def locate(info: DatasetInfo, raw_dir: Path, mirror: Path | None) -> dict[str, list[Path]]:
    """Each archive of `info` by role, from raw_dir or else the mirror, md5-checked where a
    published md5 exists; a missing one is one line saying where to get it and put it."""
    found: dict[str, list[Path]] = {}
    for spec in ARCHIVES[info.name]:
        places = [Path(raw_dir) / spec.name] + ([Path(mirror) / spec.name] if mirror else [])
        path = next((p for p in places if p.is_file()), None)
        if path is None:
            if spec.optional:
                continue
            where = " or ".join(str(p.parent) for p in places)
            source = V2_URL if spec.role == "v2" else REGISTER
            raise UserError(f"{info.name} needs {spec.name}, not found in {where}: download it "
                            f"from {source} and put it in a mirror directory (--mirror or "
                            f"${MIRROR_ENV}) or in {Path(raw_dir)}")
        if spec.md5 is not None and (got := md5_file(path)) != spec.md5:
            raise StateError(f"{path} has md5 {got}, expected {spec.md5} for {info.name}: not "
                             "the official archive (or corrupt): replace it")
        found.setdefault(spec.role, []).append(path)
    return found


def archive_record(archives: dict[str, list[Path]]) -> dict:
    """What the manifest keeps of the archives read: name, bytes, md5 (measured, or the
    published one already checked)."""
    pinned = {a.name: a.md5 for specs in ARCHIVES.values() for a in specs}
    return {role: [{"name": p.name, "bytes": p.stat().st_size,
                    "md5": pinned.get(p.name) or md5_file(p)} for p in paths]
            for role, paths in archives.items()}


def layout_error(info: DatasetInfo, where: object, what: str) -> UserError:
    return UserError(f"{info.name} archive {where} is not in the official layout: {what}")


# --------------------------------------------------------------------------- downsampled
_BATCH = re.compile(r"^(train_data_batch_(\d+)|val_data)(\.npz)?$")


def _batches(info: DatasetInfo, zips: list[Path]) -> dict[str, tuple[Path, str]]:
    """{train_data_batch_N | val_data: (zip, member)}, each name exactly once."""
    out: dict[str, tuple[Path, str]] = {}
    for path in zips:
        with zipfile.ZipFile(path) as zf:
            for m in zf.infolist():
                check_zip_member(m, path)
                match = _BATCH.match(PurePosixPath(m.filename).name)
                if m.is_dir() or match is None:
                    continue
                if match[1] in out:
                    raise layout_error(info, path, f"{match[1]} appears twice")
                out[match[1]] = (path, m.filename)
    return out


def _load_batch(info: DatasetInfo, zip_path: Path, member: str, size: int):
    with zipfile.ZipFile(zip_path) as zf:
        raw = zf.read(member)
    if member.endswith(".npz"):
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            batch = {k: npz[k] for k in ("data", "labels")}
    else:
        batch = unpickle_arrays(raw)
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * size * size or len(data) != len(labels):
        raise layout_error(info, zip_path, f"{member}: data {data.shape} / labels "
                                           f"{labels.shape}, expected N x {3 * size * size}")
    if len(labels) and (labels.min() < 1 or labels.max() > info.num_classes):
        raise layout_error(info, zip_path, f"{member}: labels outside 1..{info.num_classes}")
    images = data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)  # CHW planes -> HWC
    return images, labels - 1


def read_downsampled(info: DatasetInfo, archives: dict[str, list[Path]], scratch: Path,
                     image_size: int, progress: bool) -> Official:
    """train_data_batch_1..10 (train) and val_data (our test) into memory-mapped arrays,
    one batch in memory at a time."""
    found = _batches(info, archives["train"] + archives["val"])
    train_names = sorted((n for n in found if n.startswith("train")),
                         key=lambda n: int(n.rsplit("_", 1)[1]))
    expected = [f"train_data_batch_{i}" for i in range(1, 11)]
    if train_names != expected or "val_data" not in found:
        raise layout_error(info, ", ".join(p.name for p in archives["train"]),
                           f"train batches {train_names} and val_data "
                           f"{'present' if 'val_data' in found else 'missing'}; expected "
                           "train_data_batch_1..10 and val_data")

    train, train_labels = _fill_batches(info, found, train_names, "train", scratch, image_size,
                                        progress)
    test, test_labels = _fill_batches(info, found, ["val_data"], "test", scratch, image_size,
                                      progress)
    classes = [f"ilsvrc-id-{i}" for i in range(1, info.num_classes + 1)]
    return Official(train, train_labels, test, test_labels, classes,
                    {"archives": archive_record(archives),
                     "labels": "archive label - 1 (the archive's class order)"})


def _fill_batches(info: DatasetInfo, found: dict, names: list[str], split: str, scratch: Path,
                  size: int, progress: bool):
    """Two passes over the batches (count, then copy), so only one batch (1.5 GB at 64 px)
    is ever in memory beside the memory-mapped output."""
    from tqdm import tqdm

    counts = []
    for name in names:
        zip_path, member = found[name]
        counts.append(len(_load_batch(info, zip_path, member, size)[1]))
    out = reserved_memmap(scratch / f"{split}.npy", np.uint8, (sum(counts), size, size, 3))
    labels = np.empty(sum(counts), dtype=np.int64)
    start = 0
    for name, n in tqdm(list(zip(names, counts, strict=True)), desc=f"{info.name} {split}",
                        disable=not progress, leave=False):
        images, batch_labels = _load_batch(info, *found[name], size)
        out[start:start + n] = images
        labels[start:start + n] = batch_labels
        start += n
    out.flush()
    return out, labels
