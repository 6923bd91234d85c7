"""Batches of ImageNet-2012 JPEGs read from their archives through the prepared index.

Training: random-resized crop (area 8-100 %, aspect 3/4-4/3) to 224 px and a horizontal
flip; evaluation: shorter side resized to 256, centre crop 224 (the standard ImageNet
transforms). JPEGs decode with torchvision.io.decode_jpeg, on the GPU (nvJPEG) when
`device` is a CUDA device, where the CPU would otherwise be the bottleneck.

Each image's crop and flip are drawn from a generator seeded by (seed, epoch, image index)
alone, so a batch's pixels do not depend on which batch, process or rank decoded it: a run
split over several GPUs sees the images the one-process run sees. Bytes are read with
`os.pread` (no shared file offset), so a split opened before a fork is read safely by every
worker process (lambdapipe/feed.py's DataLoader workers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lambdapipe.atomic import sha256_file
from lambdapipe.data.manifest import read_manifest
from lambdapipe.data.registry import dataset_info
from lambdapipe.errors import StateError, UserError

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
RESIZE = 256  # evaluation: shorter side, then the centre `size` square
# No split statistics for 1.28 M JPEGs (computing them decodes the whole set): the ImageNet
# mean and std every torchvision ImageNet model is trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def streamed(data_dir: Path, dataset: str) -> bool:
    """Whether `dataset` is prepared in `data_dir` as a JPEG index (read here, not as arrays)."""
    from lambdapipe.data.prepared import prepared_dir

    path = prepared_dir(data_dir, dataset) / "manifest.json"
    return path.exists() and read_manifest(path)["source"].get("storage") == "jpeg-index"


class JpegSplit:
    """One split of a JPEG-index dataset: `len`, `labels`, `jpeg(i)`, `batch(indices)`."""

    def __init__(self, prepared: Path, split: str):
        self.root = Path(prepared)
        manifest = read_manifest(self.root / "manifest.json")
        if manifest["source"].get("storage") != "jpeg-index":
            raise UserError(f"{self.root} holds image arrays, not a JPEG index: read it with "
                            "lambdapipe.data.load_split")
        splits = ("train", "val", "test", *manifest.get("extra_tests", ()))
        if split not in splits:
            raise UserError(f"invalid split {split!r} for {manifest['dataset']}: expected one "
                            f"of {', '.join(splits)}")
        names = [f"{split}_images.npy", f"{split}_labels.npy"]
        for name in names:  # the index is small (24 bytes an image): check it every time
            if sha256_file(self.root / name) != manifest["arrays"][name]["sha256"]:
                raise StateError(f"corrupted index {self.root / name}: remove {self.root} and "
                                 "run `lambdapipe prepare` again")
        self.index = np.load(self.root / names[0])
        self.labels = np.load(self.root / names[1])
        self.dataset, self.split = manifest["dataset"], split
        self.size = int(manifest["image_size"])
        self.num_classes = int(manifest["num_classes"])
        self.classes = list(manifest["classes"])
        self.files = [self.root / f if not os.path.isabs(f) else Path(f)
                      for f in manifest["source"]["files"]]
        self._sizes = {r["name"]: r["bytes"] for rs in manifest["source"]["archives"].values()
                       for r in rs}
        self._handles: dict[int, object] = {}
        self._blob: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def clean_labels(self) -> np.ndarray:
        return self.labels  # noisy-label variants are not made for a JPEG index

    def _file(self, k: int):
        if k not in self._handles:
            path = self.files[k]
            expected = self._sizes.get(path.name)
            if not path.is_file() or (expected is not None and path.stat().st_size != expected):
                raise StateError(f"archive {path} is gone or changed size since `prepare` "
                                 f"indexed it: put it back, or remove {self.root} and prepare "
                                 "again")
            self._handles[k] = open(path, "rb")  # noqa: SIM115 - kept open across batches
        return self._handles[k]

    def jpeg(self, i: int) -> bytes:
        k, offset, size = (int(v) for v in self.index[i])
        if k == 2:  # ImageNet-V2, copied into the prepared directory as one uint8 array
            if self._blob is None:
                self._blob = np.load(self.files[2], mmap_mode="r")
            return bytes(self._blob[offset:offset + size])
        data = os.pread(self._file(k).fileno(), size, offset)
        if len(data) != size:
            raise StateError(f"archive {self.files[k]} ends before image {i}: changed since "
                             "`prepare`; prepare again")
        return data

    def __getstate__(self) -> dict:  # to a spawned worker: without open files
        return {**self.__dict__, "_handles": {}, "_blob": None}

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def batch(self, indices, *, train: bool, seed: int = 0, epoch: int = 0,
              device: str | torch.device = "cpu", crop: tuple | None = (CROP_SCALE, CROP_RATIO),
              flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 N x 3 x size x size on `device`, int64 labels) of images `indices`; with
        `train`, each a random-resized crop of `crop` = (scale, ratio) (None: the evaluation
        view) mirrored at random where `flip`."""
        indices = [int(i) for i in indices]
        images = self.views(self.raw(indices), indices, train=train, seed=seed, epoch=epoch,
                            device=device, crop=crop, flip=flip)
        return images, torch.as_tensor(self.labels[indices], dtype=torch.int64)

    def raw(self, indices) -> list[torch.Tensor]:
        """The JPEG files of images `indices`, as uint8 tensors (what a decoder takes)."""
        return [torch.frombuffer(bytearray(self.jpeg(int(i))), dtype=torch.uint8)
                for i in indices]

    def views(self, raw: list[torch.Tensor], indices, *, train: bool, seed: int = 0,
              epoch: int = 0, device: str | torch.device = "cpu",
              crop: tuple | None = (CROP_SCALE, CROP_RATIO), flip: bool = True
              ) -> torch.Tensor:
        """`raw` (the JPEGs of images `indices`) decoded on `device` (a CUDA device: nvJPEG,
        batched) and cropped as `batch` says."""
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        out = torch.empty((len(raw), 3, self.size, self.size), dtype=torch.uint8,
                          device=device)
        for j, (i, img) in enumerate(zip(indices, decoded, strict=True)):
            out[j] = (train_view(img, self.size, _generator(seed, epoch, int(i)), crop, flip)
                      if train else eval_view(img, self.size))
        return out


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    from lambdapipe.noise import stable_seed

    return torch.Generator().manual_seed(stable_seed("imagenet-crop", seed, epoch, index))


def crop_box(height: int, width: int, g: torch.Generator, scale=CROP_SCALE,
             ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: torchvision's rule (10 tries at a random
    area and log-uniform aspect, else the centre crop at the nearest allowed aspect), drawn
    from `g` rather than the global generator."""
    import math

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=g))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=g)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(img: torch.Tensor, size: int, g: torch.Generator,
               crop: tuple | None = (CROP_SCALE, CROP_RATIO), flip: bool = True
               ) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    if crop is None:  # a recipe without random-resized crop: the evaluation view
        out = eval_view(img, size)
    else:
        top, left, h, w = crop_box(img.shape[-2], img.shape[-1], g, *crop)
        out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    mirrored = float(torch.rand(1, generator=g)) < 0.5  # drawn always: a fixed stream
    return F.horizontal_flip(out) if flip and mirrored else out


def eval_view(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    resize = round(size * RESIZE / 224)  # 256 at 224 px: the standard ratio
    return F.center_crop(F.resize(img, resize, antialias=True), [size, size])


def open_split(data_dir: Path, dataset: str, split: str) -> JpegSplit:
    """The prepared JPEG index of `dataset` (imagenet2012) in `data_dir`, one split."""
    from lambdapipe.data.prepared import prepared_dir

    dataset_info(dataset)
    root = prepared_dir(data_dir, dataset)
    if not (root / "manifest.json").exists():
        raise StateError(f"dataset {dataset!r} is not prepared in {Path(data_dir)}: run "
                         f"`lambdapipe prepare --dataset {dataset} --data-dir {data_dir}`")
    return JpegSplit(root, split)

