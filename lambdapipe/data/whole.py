"""Images kept whole (Imagenette): resized on the shorter side, stored ragged, cropped later.

Training crops are drawn over the whole image at training time (augment.whole_crop), so the
prepared data keeps each training image at its own shape; evaluation reads the resize-then-
centre-crop view that `centre_crop` cuts at prepare time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lambdapipe.atomic import reserved_memmap, write_with

ARRAYS = ("train_whole.npy", "train_whole_index.npy")  # pixels, index


@dataclass
class WholeImages:
    """Images of varying shape in one memory-mappable pair: `pixels` (P, 3) uint8, every
    image's rows one after another, and `index` (N, 3) int64 (offset in pixels, height,
    width). One flat array wastes nothing on padding (a fixed canvas big enough for the widest
    image would be about twice the pixels) and needs no cap on the aspect ratio."""

    pixels: np.ndarray
    index: np.ndarray

    def image(self, i: int) -> np.ndarray:
        offset, height, width = (int(v) for v in self.index[i])
        return np.asarray(self.pixels[offset:offset + height * width]).reshape(height, width, 3)


def load_whole(root: Path) -> WholeImages:
    """The prepared training images of `root`, pixels memory-mapped."""
    return WholeImages(np.load(root / ARRAYS[0], mmap_mode="r"), np.load(root / ARRAYS[1]))


def save_whole(out: Path, whole: WholeImages, idx: np.ndarray) -> None:
    """train_whole.npy (P, 3) and train_whole_index.npy (N, 3) of the images `idx`, in that
    order, with offsets into the new pixel array."""
    sizes = whole.index[idx, 1] * whole.index[idx, 2]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    pixels = reserved_memmap(out / ARRAYS[0], np.uint8, (int(sizes.sum()), 3))
    for start, i in zip(starts, idx, strict=True):
        offset, height, width = (int(v) for v in whole.index[i])
        pixels[start:start + height * width] = whole.pixels[offset:offset + height * width]
    pixels.flush()
    del pixels
    index = np.stack([starts, whole.index[idx, 1], whole.index[idx, 2]], axis=1)
    write_with(out / ARRAYS[1], lambda fh: np.save(fh, index.astype(np.int64)))


def decode_shorter_side(data: bytes, short: int) -> np.ndarray:
    """JPEG bytes -> RGB with the shorter side resized to `short`, aspect kept (bicubic,
    antialiased when shrinking, as torchvision's Resize(int) on a PIL image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size square of an H x W x C image (offsets rounded down, as
    torchvision's CenterCrop rounds them)."""
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]
