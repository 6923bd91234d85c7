"""Batches of a streamed split (ImageNet-2012's JPEG index, lambdapipe/data/stream.py) for the
training loop and evaluation: read (and by default decoded and cropped) by worker processes
of a torch DataLoader, one batch an item, pinned for the copy to a GPU.

Where the JPEGs decode is the recipe's speed field `jpeg_decode`:
* `cpu` (the default): in the workers (libjpeg-turbo). The pixels are then the same on every
  device, so a run resumed on another GPU, another number of GPUs or the CPU replays exactly
  the images of the unbroken run, and the CPU tests cover the path a GPU run takes; the
  workers decode the next batches while the GPU steps. It needs CPUs: ~160 images/s a core
  at 224 px (measured, docs/imagenet.md), so a GPU stepping 2,000 images/s wants ~12.
* `gpu`: the workers read the bytes only; the training process decodes each batch with
  nvJPEG (torchvision.io.decode_jpeg on the CUDA device) and crops it there. For nodes with
  too few CPUs per GPU; its pixels differ from the CPU decoder's by a level here and there
  (a resume is exact on the same kind of device only). On a CPU device this decodes in the
  training process on the CPU: the same code, its CPU stand-in.
scripts/gpu-bench.sh `decode224` measures both against a step's images/s.

Order: each epoch's order is the array path's (augment.plan_epoch from (seed, epoch)), cut to
this rank's rows of every global batch by distributed.shard_plan; each image's crop and flip
are drawn from (seed, epoch, image index) alone (stream.py), so a resumed run, a run on W
ranks and a run with any number of workers all see the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lambdapipe import distributed
from lambdapipe.augment import channel_stats, plan_epoch
from lambdapipe.data.stream import MEAN, STD, JpegSplit, open_split, streamed
from lambdapipe.errors import UserError
from lambdapipe.recipes import Recipe

EVAL_BATCH = 250  # images an evaluation batch decodes (logits of the split stay on the CPU)
AUTO_WORKERS_MAX = 8  # `loader_workers: auto`: CPUs of this process less one, at most this


def is_stream(split: Any) -> bool:
    return isinstance(split, JpegSplit)


def check_stream(r: Recipe, noise: str, dataset: str) -> None:
    """What a streamed split does not train with yet, refused in one line before a run."""
    what = ("noisy labels" if noise != "clean" else "train_on train+val"
            if r.train_on != "train" else "augment crop with padding"
            if r.augment == "crop" and r.crop_padding else None)
    if what:
        raise UserError(f"invalid {what} on {dataset}: a streamed JPEG set trains on its clean "
                        "train split with random-resized crop, a resize or none (docs/imagenet.md)")


def image_size(split: Any) -> int:
    """Pixels a side of what the model sees: the prepared arrays', or the stream's crop."""
    return split.size if is_stream(split) else int(split.images.shape[1])


def split_stats(split: Any) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a split's pixels; a stream's are ImageNet's (stream.py)."""
    return (list(MEAN), list(STD)) if is_stream(split) else channel_stats(split.images)


def workers(setting: int | str) -> int:
    """`loader_workers`: a count, or auto: this process's CPUs less one (the training loop
    itself), divided among the ranks of this node, at most AUTO_WORKERS_MAX."""
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(AUTO_WORKERS_MAX, (cpus or 1) // max(local, 1) - 1))


class _Batches(Dataset):
    """Item = one batch (a list of image indices) decoded: (uint8 images, int64 labels)."""

    def __init__(self, split: JpegSplit, train: bool, seed: int = 0, epoch: int = 0,
                 crop: Any = None, flip: bool = False, decode: str = "cpu"):
        self.split, self.train, self.seed, self.epoch = split, train, seed, epoch
        self.crop, self.flip, self.decode = crop, flip, decode

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices: list[int]) -> tuple[Any, torch.Tensor]:
        if self.decode == "gpu":  # the bytes: the training process decodes them (`views`)
            labels = torch.as_tensor(self.split.labels[indices], dtype=torch.int64)
            return self.split.raw(indices), labels
        return self.split.batch(indices, train=self.train, seed=self.seed, epoch=self.epoch,
                                crop=self.crop, flip=self.flip)

    def views(self, item: Any, indices: list[int], device: str) -> torch.Tensor:
        """An item's images on `device`: copied, or decoded there (`decode` gpu)."""
        if self.decode != "gpu":
            return item.to(device, non_blocking=True)
        return self.split.views(item, indices, train=self.train, seed=self.seed,
                                epoch=self.epoch, device=device, crop=self.crop,
                                flip=self.flip)


def _loader(batches: _Batches, plan: list[list[int]], n_workers: int,
            device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images on `device`, labels) of each step of `plan`, read ahead by the workers."""
    loader = DataLoader(batches, sampler=plan, batch_size=None, num_workers=n_workers,
                        pin_memory=torch.device(device).type == "cuda",
                        prefetch_factor=4 if n_workers else None)
    for indices, (item, labels) in zip(plan, loader, strict=True):
        yield batches.views(item, indices, device), labels


class TrainStream:
    """A streamed training split: `batch(epoch, step)` is step `step` of that epoch, this
    rank's rows (uint8 images, labels, clean labels on the device). Consecutive steps come
    from one DataLoader an epoch, decoded ahead by its workers; any other step (a resume)
    opens the epoch's loader at it."""

    def __init__(self, split: JpegSplit, r: Recipe, seed: int, world: distributed.World | None,
                 device: str, steps_per_epoch: int):
        self.split, self.r, self.seed, self.world = split, r, seed, world
        self.device, self.steps_per_epoch = device, steps_per_epoch
        self.size, self.extents = split.size, None
        self.workers = workers(r.loader_workers)
        self._next: tuple[int, int] | None = None
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return len(self.split)

    def plan(self, epoch: int, step: int = 0) -> list[list[int]]:
        """This rank's image indices of steps `step`.. of `epoch`, one list a step."""
        r, world = self.r, self.world
        plan = plan_epoch(len(self.split), self.seed, epoch, 0, False, "cpu")  # its order
        if world is not None:
            plan = distributed.shard_plan(plan, r.batch_size, world)
        b = r.batch_size // (world.size if world else 1)
        order = plan.order.tolist()
        return [order[k * b:(k + 1) * b] for k in range(step, self.steps_per_epoch)]

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._next != (epoch, step):
            self.close()
            source = _Batches(self.split, True, self.seed, epoch, self.r.resized_crop,
                              self.r.flip, self.r.jpeg_decode)
            self._it = _loader(source, self.plan(epoch, step), self.workers, self.device)
        assert self._it is not None
        x, y = next(self._it)
        self._next = (epoch, step + 1)
        y = y.to(self.device, non_blocking=True)
        return x, y, y

    def close(self) -> None:
        """Let the workers of the current epoch go (they stop when their loader is freed)."""
        self._it, self._next = None, None


class EvalStream:
    """A streamed evaluation split: `batches()` yields its images in order, resized and
    centre-cropped, EVAL_BATCH at a time; `labels` on the CPU."""

    def __init__(self, split: JpegSplit, device: str, n_workers: int | str = "auto",
                 decode: str = "cpu"):
        self.split, self.device, self.decode = split, device, decode
        self.labels = torch.as_tensor(split.labels, dtype=torch.int64)
        self.clean_labels = self.labels
        self.workers = workers(n_workers)

    def __len__(self) -> int:
        return len(self.split)

    def batches(self) -> Iterator[torch.Tensor]:
        n = len(self.split)
        plan = [list(range(i, min(i + EVAL_BATCH, n))) for i in range(0, n, EVAL_BATCH)]
        source = _Batches(self.split, False, decode=self.decode)
        for x, _ in _loader(source, plan, self.workers, self.device):
            yield x


def eval_split(data_dir: Path, dataset: str, split: str, device: str,
               n_workers: int | str = "auto", decode: str = "cpu") -> EvalStream | None:
    """`split` of `dataset` as an EvalStream when it is a JPEG index; None for arrays."""
    if not streamed(Path(data_dir), dataset):
        return None
    return EvalStream(open_split(Path(data_dir), dataset, split), device, n_workers, decode)


class BenchFeed:
    """`lambdapipe bench --real-data` on a streamed set (ImageNet-2012): the training split
    fed to the timed step as a run feeds it (a TrainStream a seed: its workers decode ahead,
    so the step's rate includes whatever the decoding leaves waiting), and the val split read
    as a run's evaluation reads it (an EvalStream, decoding included)."""

    def __init__(self, data_dir: Path, dataset: str, r: Recipe, device: str):
        self.split, self.r, self.device = open_split(data_dir, dataset, "train"), r, device
        self.val = open_split(data_dir, dataset, "val")
        self.size = self.split.size
        if r.batch_size > len(self.split):
            raise UserError(f"invalid batch size {r.batch_size}: expected at most the "
                            f"{len(self.split)} images of {dataset}'s train split")

    def __len__(self) -> int:
        return len(self.split)

    def stats(self) -> tuple[list[float], list[float]]:
        return split_stats(self.split)

    def batches(self, seed: int, world: distributed.World | None = None):
        """Step i's batch (images, labels, clean labels on the device), as train draws it."""
        steps = self.r.steps_per_epoch(len(self.split))
        stream = TrainStream(self.split, self.r, seed, world, self.device, steps)
        return lambda i: stream.batch(*divmod(i, steps))

    def eval_stream(self) -> EvalStream:
        return EvalStream(self.val, self.device, self.r.loader_workers, self.r.jpeg_decode)
