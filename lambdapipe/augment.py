"""The dataset on the device, and augmentation as tensor ops (airbench style).

A split is held as uint8 NCHW on the device, zero-padded once; a batch is gathered by index
with per-sample crop offsets and flip flags, so the training step never touches the host.
The ImageNet-style random-resized crop resamples the whole batch in one `grid_sample` call,
one affine box per sample. Every random draw of an epoch (order, offsets or boxes, flips)
comes from one CPU generator seeded by (seed, epoch): a run resumed at any step sees exactly
the batches the unbroken run saw, on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _owned(array: np.ndarray) -> np.ndarray:
    """A read-only memory map copied (torch wants to own its memory), contiguous."""
    return np.ascontiguousarray(array if array.flags.writeable else np.array(array))


class DeviceImages:
    """A split on `device`: uint8 NCHW images zero-padded by `pad`, labels, clean labels.

    `whole` (pixels (P, C), index (N, 3): offset, height, width; data.sources.WholeImages):
    the same images before any crop, each at its own shape, for random-resized crops drawn
    over the whole image (`extents` then holds each image's (height, width) on the CPU).
    """

    def __init__(self, images_nhwc: np.ndarray, labels: np.ndarray, clean_labels: np.ndarray,
                 device: str | torch.device, pad: int = 0,
                 whole: tuple[np.ndarray, np.ndarray] | None = None):
        x = torch.from_numpy(_owned(images_nhwc)).to(device)
        x = x.permute(0, 3, 1, 2).contiguous()
        self.size = x.shape[-1]
        self.pad = pad
        self.images = F.pad(x, (pad, pad, pad, pad)) if pad else x
        self.labels = torch.as_tensor(labels, dtype=torch.int64, device=device)
        self.clean_labels = torch.as_tensor(clean_labels, dtype=torch.int64, device=device)
        self.whole_pixels = self.whole_index = self.extents = None
        if whole is not None:
            pixels, index = whole
            if len(index) != len(labels):
                raise ValueError(f"{len(index)} whole images for {len(labels)} labels")
            self.whole_pixels = torch.from_numpy(_owned(pixels)).to(device)
            index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
            self.extents = index[:, 1:].clone()  # the plan is drawn on the CPU
            self.whole_index = index.to(device)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def unpadded(self) -> torch.Tensor:
        p = self.pad
        return self.images[..., p:p + self.size, p:p + self.size] if p else self.images


RESIZED_CROP_ATTEMPTS = 10  # boxes tried per image before the centre-crop fallback


@dataclass
class EpochPlan:
    """All random draws of one epoch: order, crop offsets (dy, dx) and flip flags; for a
    random-resized crop (dy, dx) is the box's top-left corner and (h, w) its size in pixels."""

    order: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    h: torch.Tensor | None = None
    w: torch.Tensor | None = None


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
               >> 1)


def plan_epoch(n: int, seed: int, epoch: int, pad: int, flip: bool,
               device: str | torch.device, *,
               resized_crop: tuple[tuple[float, float], tuple[float, float]] | None = None,
               size: int | None = None, extents: torch.Tensor | None = None) -> EpochPlan:
    """Drawn on the CPU (identical on every device), moved to the device once per epoch.

    `resized_crop` = ((scale_min, scale_max), (ratio_min, ratio_max)) draws a random-resized
    crop box per image of `size` x `size` pixels instead of pad-and-crop offsets, or, with
    `extents` ((n, 2) heights and widths: `DeviceImages.extents`), one inside each whole image.
    """
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g)
    if resized_crop is not None:
        if not size:
            raise ValueError("a random-resized crop needs the image size")
        top, left, h, w = resized_crop_boxes(n, size, *resized_crop, g, extents)
        flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
        return EpochPlan(*(t.to(device, non_blocking=True)
                           for t in (order, top, left, flips, h, w)))
    # The pad-and-crop stream is drawn in this order since the first release: old runs resume
    # onto exactly the batches they saw.
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return EpochPlan(*(t.to(device, non_blocking=True) for t in (order, dy, dx, flips)))


def resized_crop_boxes(n: int, size: int, scale: tuple[float, float],
                       ratio: tuple[float, float], g: torch.Generator,
                       extents: torch.Tensor | None = None):
    """(top, left, h, w) int64 boxes inside a `size` x `size` image, one per image, or
    inside each image's own (height, width) of `extents` (n, 2).

    Inception-style sampling, as torchvision's RandomResizedCrop draws it: area a fraction
    U(scale) of the image, aspect ratio log-uniform in `ratio`; of RESIZED_CROP_ATTEMPTS
    draws the first that fits is taken, and an image none fits gets the centre crop at its
    own aspect ratio clamped into `ratio`. All attempts are drawn for every image (a fixed
    number of draws per epoch), so the stream never depends on which attempts fitted, and
    square images of `size` draw exactly what they drew before `extents` existed.
    """
    k = RESIZED_CROP_ATTEMPTS
    if extents is None:
        extents = torch.full((n, 2), size, dtype=torch.int64)
    if extents.shape != (n, 2):
        raise ValueError(f"extents of shape {tuple(extents.shape)}: expected ({n}, 2)")
    height, width = (e.to(torch.int64)[:, None] for e in extents.unbind(1))  # (n, 1) each
    area = (height * width).double() * torch.empty(n, k, dtype=torch.float64).uniform_(
        *scale, generator=g)
    log_r = torch.empty(n, k, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    u_top = torch.rand(n, k, generator=g, dtype=torch.float64)
    u_left = torch.rand(n, k, generator=g, dtype=torch.float64)
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    # Uniform integer offsets in [0, height - h] (inclusive), as randint would give.
    top = torch.minimum((u_top * (height - h + 1)).long(), (height - h).clamp(min=0))
    left = torch.minimum((u_left * (width - w + 1)).long(), (width - w).clamp(min=0))
    first = torch.argmax(fits.long(), dim=1)  # the first fitting attempt (0 if none fits)
    pick = first[:, None]
    top, left, h, w = (t.gather(1, pick)[:, 0] for t in (top, left, h, w))
    # Fallback: the largest centred box whose ratio lies in `ratio` (torchvision's rule).
    none_fit = ~fits.any(dim=1)
    if none_fit.any():
        height, width = height[:, 0], width[:, 0]
        image_ratio = width.double() / height.double()
        narrow, wide = image_ratio < ratio[0], image_ratio > ratio[1]
        fw = torch.where(wide, torch.round(height * ratio[1]).long(), width)
        fh = torch.where(narrow, torch.round(width / ratio[0]).long(), height)
        h = torch.where(none_fit, fh, h)
        w = torch.where(none_fit, fw, w)
        top = torch.where(none_fit, (height - fh) // 2, top)
        left = torch.where(none_fit, (width - fw) // 2, left)
    return top, left, h, w


def augmented_batch(data: DeviceImages, plan: EpochPlan, step: int, batch_size: int):
    """Batch `step` of the epoch: uint8 images cropped and flipped per sample, noisy labels,
    clean labels."""
    sl = slice(step * batch_size, (step + 1) * batch_size)
    idx, dy, dx, flip = plan.order[sl], plan.dy[sl], plan.dx[sl], plan.flip[sl]
    s = data.size
    if plan.h is not None and data.whole_pixels is not None:
        x = whole_crop(data.whole_pixels, data.whole_index[idx], dy, dx, plan.h[sl],
                       plan.w[sl], flip, s)
        return x, data.labels[idx], data.clean_labels[idx]
    if plan.h is not None:
        x = resized_crop(data.unpadded()[idx], dy, dx, plan.h[sl], plan.w[sl], flip)
        return x, data.labels[idx], data.clean_labels[idx]
    if data.pad:
        ar = torch.arange(s, device=idx.device)
        rows = (dy[:, None] + ar)[:, None, :, None]  # (B, 1, s, 1)
        cols = (dx[:, None] + ar)[:, None, None, :]  # (B, 1, 1, s)
        chans = torch.arange(data.images.shape[1], device=idx.device)[None, :, None, None]
        x = data.images[idx[:, None, None, None], chans, rows, cols]
    else:
        x = data.images[idx]
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x, data.labels[idx], data.clean_labels[idx]


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
                 w: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> each image's box (top, left, h, w) resized bilinearly back to
    H x W, mirrored where `flip`: one affine grid and one `grid_sample` for the batch.

    With align_corners=False the output spans the box's pixel edges, so a full-image box
    without flip samples every pixel at its centre: the identity, exactly.
    """
    b, _, height, width = x.shape
    hf, wf = h.to(torch.float32), w.to(torch.float32)
    sx = wf / width
    theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)  # a mirrored x axis is the flip
    theta[:, 0, 2] = (2 * left.to(torch.float32) + wf) / width - 1
    theta[:, 1, 1] = hf / height
    theta[:, 1, 2] = (2 * top.to(torch.float32) + hf) / height - 1
    grid = F.affine_grid(theta, [b, x.shape[1], height, width], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def whole_crop(pixels: torch.Tensor, index: torch.Tensor, top: torch.Tensor,
               left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, flip: torch.Tensor,
               size: int) -> torch.Tensor:
    """Each image's box (top, left, h, w), cut from images of varying shape (flat `pixels`
    (P, C) uint8, `index` (B, 3): offset, height, width) and resized bilinearly to
    size x size, mirrored where `flip`: uint8 (B, C, size, size).

    The same sampling as `resized_crop` (grid_sample, align_corners=False, border padding):
    output pixel j reads x = left + (j + 1/2) w / size - 1/2, clamped into the image. It is
    written out as four gathers because grid_sample needs one rectangular tensor, and the
    images here are ragged (padding them to one canvas would double the memory).
    """
    offset, height, width = index.unbind(1)
    steps = (torch.arange(size, device=pixels.device, dtype=torch.float32) + 0.5) / size
    along_x = torch.where(flip[:, None], steps.flip(0)[None], steps[None])  # (B, size)

    def axis(start, extent, limit, frac):
        pos = (start[:, None].float() + frac * extent[:, None].float() - 0.5)
        pos = torch.minimum(pos.clamp(min=0), (limit[:, None] - 1).float())
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, limit[:, None] - 1)
        return lo, hi, pos - lo.float()

    y0, y1, wy = axis(top, h, height, steps[None])
    x0, x1, wx = axis(left, w, width, along_x)
    rows = offset[:, None, None] + width[:, None, None] * torch.stack([y0, y1])[..., None]
    # (2, B, size, 1) row starts + (2, B, 1, size) columns -> corners (2, 2, B, size, size)
    corner = rows[:, None] + torch.stack([x0, x1])[None, :, :, None, :]
    p = pixels[corner].float()  # (2, 2, B, size, size, C)
    wx, wy = wx[:, None, :, None], wy[:, :, None, None]
    top_row = p[0, 0] * (1 - wx) + p[0, 1] * wx
    bottom_row = p[1, 0] * (1 - wx) + p[1, 1] * wx
    out = top_row * (1 - wy) + bottom_row * wy
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float, standardised per channel with the training split's
    statistics (a fused pack's batches carry a leading run dimension)."""
    x = (x.float().div_(255) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channel_stats(images_nhwc: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, exact (from value histograms) and cheap in
    memory even for 50k images."""
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(images_nhwc.shape[-1]):
        counts = np.bincount(images_nhwc[..., c].ravel(), minlength=256).astype(np.float64)
        p = counts / counts.sum()
        mean = float(p @ values)
        std = float(np.sqrt(max(p @ (values - mean) ** 2, 0.0)))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return means, stds
