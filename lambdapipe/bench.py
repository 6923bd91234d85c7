"""`lambdapipe bench`: what one training step costs, measured on the real training step.

The timed step is `train.TrainStep` fed by `augment` exactly as in training (index the
on-device dataset, crop and flip per sample, forward, backward, optimizer), at steady state
after `warmup` steps, bracketed by CUDA events (and a synchronize) on a GPU. Model FLOPs
utilisation (MFU) = achieved model FLOP/s / the device's dense peak, with a training step
counted as 3x the forward FLOPs (forward + two matmuls per weight in backward).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambdapipe import atomic
from lambdapipe.augment import DeviceImages, augmented_batch, channel_stats, plan_epoch
from lambdapipe.errors import UserError, bad_value
from lambdapipe.recipes import PRECISIONS, get_recipe
from lambdapipe.train import TrainStep, make_optimizer

REFERENCE = "resnet18"
# Dense tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets. fp32 has no
# entry: whether TF32 is used depends on global flags, so an MFU for it would mislead.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12},
    "H100": {"bf16": 989e12, "fp16": 989e12},  # SXM; the PCIe card is lower (756)
    "A100": {"bf16": 312e12, "fp16": 312e12},
}
SYNTHETIC_IMAGES = 4096


def device_peak(device: str, precision: str) -> float | None:
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return None
            return peaks.get(precision)
    return None


def _forward_flops(model: torch.nn.Module, image_size: int) -> float | None:
    """Forward FLOPs per image from the model registry, when it can count them."""
    from lambdapipe import models

    estimate = getattr(models, "estimate_flops", None)
    if estimate is None:
        return None
    return float(estimate(model, image_size))


def _images(dataset: str, data_dir: Path, real_data: bool, image_size: int,
            num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if real_data:
        from lambdapipe.data import load_split

        split = load_split(data_dir, dataset, "train")
        return split.images, split.labels
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (SYNTHETIC_IMAGES, image_size, image_size, 3), dtype=np.uint8)
    return images, rng.integers(0, num_classes, SYNTHETIC_IMAGES)


def check_args(names: list[str], batch_size: int, precision: str, warmup: int, steps: int) -> None:
    """Refuse bad arguments before a GPU is claimed."""
    from lambdapipe.models import list_models

    if not names:
        raise UserError("no model to benchmark: give --models NAME[,NAME...]")
    known = set(list_models("*"))
    for name in names:
        if name not in known:
            raise bad_value("model", name, "a registered model (see `lambdapipe models`)")
    if batch_size < 1:
        raise bad_value("batch size", batch_size, "an integer >= 1")
    if precision not in PRECISIONS:
        raise bad_value("precision", precision, PRECISIONS)
    if warmup < 0:
        raise bad_value("warmup", warmup, "an integer >= 0")
    if steps < 1:
        raise bad_value("steps", steps, "an integer >= 1")


def run(names: list[str], dataset: str = "cifar10", data_dir: Path = Path("data"),
        real_data: bool = False, batch_size: int = 256, precision: str = "bf16",
        compile: bool = False, warmup: int = 20, steps: int = 50,
        model_args: dict[str, Any] | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """One row per model: iter/min, images/s, step time, peak memory, FLOP/s, MFU, and the
    throughput relative to ResNet-18 when it is among `names`."""
    from lambdapipe.data import dataset_info
    from lambdapipe.models import count_params, create_model

    check_args(names, batch_size, precision, warmup, steps)
    info = dataset_info(dataset)
    images, labels = _images(dataset, Path(data_dir), real_data, info.image_size,
                             info.num_classes)
    if batch_size > len(labels):
        raise bad_value("batch size", batch_size, f"at most the {len(labels)} images")
    recipe = get_recipe("sgdm", {"batch_size": batch_size, "precision": precision,
                                 "compile": compile}).on(device)
    data = DeviceImages(images, labels, labels, device, pad=recipe.crop_padding)
    mean, std = (torch.tensor(v, device=device) for v in channel_stats(np.asarray(images)))
    steps_per_epoch = len(data) // batch_size
    cuda = torch.device(device).type == "cuda"
    peak = device_peak(device, precision)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, num_classes=info.num_classes, image_size=info.image_size,
                             **(model_args or {})).to(device)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        step = TrainStep(model, make_optimizer(model, recipe, device), recipe, device, mean, std)
        plans: dict[int, Any] = {}

        def one(i: int, step=step, plans=plans) -> None:
            epoch, k = divmod(i, steps_per_epoch)
            if epoch not in plans:
                plans.clear()
                plans[epoch] = plan_epoch(len(data), 0, epoch, recipe.crop_padding,
                                          recipe.flip, device)
            x, y, y_clean = augmented_batch(data, plans[epoch], k, batch_size)
            step(x, y, y_clean, recipe.lr, i)

        for i in range(warmup):
            one(i)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            one(i)
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1000
        else:
            step.tally.tolist()  # make sure every queued op has run
            seconds = time.perf_counter() - t0
        fwd = _forward_flops(model, info.image_size)
        flops_per_s = 3 * fwd * batch_size * steps / seconds if fwd else None
        rows.append({
            "model": name, "params": count_params(model), "dataset": dataset,
            "real_data": real_data, "batch_size": batch_size, "precision": precision,
            "compile": compile, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "warmup": warmup, "steps": steps, "step_ms": 1000 * seconds / steps,
            "iter_per_min": 60 * steps / seconds, "images_per_s": batch_size * steps / seconds,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "forward_flops_per_image": fwd, "model_tflops_per_s":
                flops_per_s / 1e12 if flops_per_s else None,
            "mfu": flops_per_s / peak if flops_per_s and peak else None,
            "diverged": step.tally[5].item() >= 0,
        })
        del model, step, one
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    ref = next((r for r in rows if r["model"] == REFERENCE), None)
    for r in rows:
        r["vs_resnet18"] = r["images_per_s"] / ref["images_per_s"] if ref else None
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one line per model."""
    head = (f"{'model':<22} {'params(M)':>9} {'iter/min':>9} {'img/s':>9} {'step ms':>8} "
            f"{'peak GiB':>8} {'TFLOP/s':>8} {'MFU':>6} {'vs r18':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<22} {r['params'] / 1e6:>9.2f} {r['iter_per_min']:>9.0f} "
            f"{r['images_per_s']:>9.0f} {r['step_ms']:>8.2f} {_fmt(r['peak_mem_gib'], '8.2f'):>8} "
            f"{_fmt(r['model_tflops_per_s'], '8.1f'):>8} {_fmt(r['mfu'], '6.1%'):>6} "
            f"{_fmt(r['vs_resnet18'], '6.2f'):>6}")
    if rows:
        r = rows[0]
        lines.append(f"({r['device_name']}, {r['precision']}, batch {r['batch_size']}, "
                     f"{'compiled' if r['compile'] else 'eager'}, "
                     f"{'real' if r['real_data'] else 'synthetic'} {r['dataset']} data, "
                     f"{r['steps']} timed steps after {r['warmup']} warm-up)")
    return "\n".join(lines)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    import datetime

    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    atomic.write_json(path, {"torch": torch.__version__, "date": when, "rows": rows})
