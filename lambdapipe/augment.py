"""The dataset on the device, and augmentation as tensor indexing (airbench style).

A split is held as uint8 NCHW on the device, zero-padded once; a batch is gathered by index
with per-sample crop offsets and flip flags, so the training step never touches the host.
Every random draw of an epoch (order, offsets, flips) comes from one generator seeded by
(seed, epoch): a run resumed at any step sees exactly the batches the unbroken run saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class DeviceImages:
    """A split on `device`: uint8 NCHW images zero-padded by `pad`, labels, clean labels."""

    def __init__(self, images_nhwc: np.ndarray, labels: np.ndarray, clean_labels: np.ndarray,
                 device: str | torch.device, pad: int = 0):
        if not images_nhwc.flags.writeable:  # a read-only memory map: torch wants to own it
            images_nhwc = np.array(images_nhwc)
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).to(device)
        x = x.permute(0, 3, 1, 2).contiguous()
        self.size = x.shape[-1]
        self.pad = pad
        self.images = F.pad(x, (pad, pad, pad, pad)) if pad else x
        self.labels = torch.as_tensor(labels, dtype=torch.int64, device=device)
        self.clean_labels = torch.as_tensor(clean_labels, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def unpadded(self) -> torch.Tensor:
        p = self.pad
        return self.images[..., p:p + self.size, p:p + self.size] if p else self.images


@dataclass
class EpochPlan:
    """All random draws of one epoch: order, crop offsets (dy, dx) and flip flags."""

    order: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
               >> 1)


def plan_epoch(n: int, seed: int, epoch: int, pad: int, flip: bool,
               device: str | torch.device) -> EpochPlan:
    """Drawn on the CPU (identical on every device), moved to the device once per epoch."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return EpochPlan(*(t.to(device, non_blocking=True) for t in (order, dy, dx, flips)))


def augmented_batch(data: DeviceImages, plan: EpochPlan, step: int, batch_size: int):
    """Batch `step` of the epoch: uint8 images cropped and flipped per sample, noisy labels,
    clean labels."""
    sl = slice(step * batch_size, (step + 1) * batch_size)
    idx, dy, dx, flip = plan.order[sl], plan.dy[sl], plan.dx[sl], plan.flip[sl]
    s = data.size
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


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> float, standardised per channel with the training split's statistics."""
    x = (x.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
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
