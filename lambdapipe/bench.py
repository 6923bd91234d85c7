"""`lambdapipe bench`: what one training step costs, timed on the step train runs (`step.build`
or `fuse.fused_step` under the same `Runtime`, fed as in training) after `warmup` steps.
MFU = model FLOP/s (a step: 3x the forward FLOPs) / the device's dense peak. Beside the step,
what else a run pays (for project.py): start-up (the warm-up's excess over steady steps), one
evaluation pass and one checkpoint write. With `slots` > 1 the measurement runs in that many
processes at once on the device, and the row holds their sum; with `ranks` > 1 it runs as the
ranks of one DDP run (distributed.py), and the row is rank 0's: the step with its all-reduce.
`time_impls` times each lambda layer's implementations (`bench --impls`).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException, start_processes

from lambdapipe import distributed, feed, gpu
from lambdapipe.augment import DeviceImages, channel_stats
from lambdapipe.errors import UserError, bad_value
from lambdapipe.evaluate import predict, predict_split, save_checkpoint
from lambdapipe.recipes import PRECISIONS, Recipe, get_recipe
from lambdapipe.reference import depth_width
from lambdapipe.runtime import Runtime, resolve
from lambdapipe.step import COLUMN, build
from lambdapipe.train import batches

REFERENCE = "resnet18"
# Dense tensor-core peaks (no sparsity) at bf16 and fp16, FLOP/s, from the vendors' data
# sheets (the H100 SXM's: the PCIe card is lower, 756). No fp32 MFU: whether TF32 is used
# depends on global flags, so it would mislead.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
SYNTHETIC_IMAGES = 4096
EVAL_IMAGES = 5000  # a CIFAR val split; `eval_images` changes it
SLOT_TIMEOUT_S = 1800


def device_peak(device: str, precision: str) -> float | None:
    if torch.device(device).type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return None if "H100" in name and "PCIe" in name else next(
        (peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), i.e. interpreter + imports so far."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path("/proc/self/stat").read_text()
        start = int(stat.rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start, 0.0)
    except (OSError, ValueError, IndexError):
        return None


def check_args(names: list[str], batch_size: int, precision: str, warmup: int, steps: int,
               slots: int = 1) -> None:
    """Refuse bad arguments before a GPU is claimed."""
    from lambdapipe.models import list_models

    if not names:
        raise UserError("no model to benchmark: give --models NAME[,NAME...]")
    known = set(list_models("*"))
    for name in names:
        if name not in known:
            raise bad_value("model", name, "a registered model (see `lambdapipe models`)")
    for what, value, least in (("batch size", batch_size, 1), ("warmup", warmup, 0),
                               ("steps", steps, 1), ("slots", slots, 1)):
        if value < least:
            raise bad_value(what, value, f"an integer >= {least}")
    if precision not in PRECISIONS:
        raise bad_value("precision", precision, PRECISIONS)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, recipe: Recipe, world: distributed.World | None = None,
            **kwargs: Any) -> dict[str, Any]:
    """One model under `recipe` on `device`, resolved and with kernels set as a run's (on
    `world`'s processes: this rank's, as under torchrun)."""
    rt = resolve(recipe, kwargs.get("device", "cpu"), world=world)
    with rt.kernels():
        return _measure(name, recipe, rt, **kwargs)


def path_label(path: str, rt: Runtime, fused: bool = False) -> str:
    """What a row ran: eager / compiled / graphs, channels_last (never fused: the stacked
    activations' layout is vmap's), each lambda impl."""
    kind = {"eager": "eager", "reduce-overhead": "graphs", "max-autotune": "graphs+autotune",
            "step-graph": "step-graph"}
    label = kind.get(path, "compiled" if not path.startswith("eager") else "eager-fallback")
    if rt.channels_last and not fused:
        label += "/cl"
    impls = sorted(set(rt.lambda_impls.values()))
    return label + (" " + "+".join(impls) if impls else "") + (", fused" if fused else "")


def timed(one, warmup: int, steps: int, device: str, t_build: float,
          barrier: Any = None) -> tuple[float, float]:
    """`one(i)` for `warmup` steps, then `steps` timed (between CUDA events on a GPU); returns
    (seconds from `t_build` to the end of the warm-up, timed seconds)."""
    for i in range(warmup):
        one(i)
    _sync(device)  # every queued op has run
    warm_s = time.perf_counter() - t_build
    if barrier is not None:  # concurrent slots start their timed steps together
        barrier.wait()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        one(i)
    if cuda:
        end.record()
        torch.cuda.synchronize(device)
        return warm_s, start.elapsed_time(end) / 1000
    return warm_s, time.perf_counter() - t0


def _data(recipe: Recipe, dataset: str, image_size: int | None, data_dir: Path,
          real_data: bool, device: str):
    """The dataset's (info, image size, device images, mean, std) as a run holds them: its
    train split, or SYNTHETIC_IMAGES random ones of its shape."""
    from lambdapipe.data import dataset_info, load_split

    info = dataset_info(dataset)
    size = image_size or info.image_size
    if real_data and feed.streamed(Path(data_dir), dataset):  # JPEGs: fed as a run feeds them
        source = feed.BenchFeed(Path(data_dir), dataset, recipe, device)
        return info, source.size, source, *(torch.tensor(v, device=device) for v in source.stats())
    if real_data:
        split = load_split(Path(data_dir), dataset, "train")
        images, labels = split.images, split.labels
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (SYNTHETIC_IMAGES, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, info.num_classes, SYNTHETIC_IMAGES)
    if recipe.batch_size > len(labels):
        raise bad_value("batch size", recipe.batch_size, f"at most the {len(labels)} images")
    data = DeviceImages(images, labels, labels, device, pad=recipe.crop_padding)
    mean, std = (torch.tensor(v, device=device) for v in channel_stats(np.asarray(images)))
    return info, size, data, mean, std


def _measure(name: str, recipe: Recipe, rt: Runtime, *, pack: int = 1,
             dataset: str = "cifar10", image_size: int | None = None,
             data_dir: Path = Path("data"), real_data: bool = False, warmup: int = 20,
             steps: int = 50, eval_images: int = EVAL_IMAGES,
             model_args: dict[str, Any] | None = None, device: str = "cpu",
             barrier: Any = None) -> dict[str, Any]:
    """One run's step, or with `pack` > 1 the fused step of that many seeds as `train --seeds
    --fuse` builds it (fuse.py; rates count every run); evaluation and checkpoint costs are
    measured for one run only (a fused run evaluates and saves as one run does)."""
    from lambdapipe.fuse import fused_step
    from lambdapipe.models import count_params, create_model, estimate_flops

    t_data = time.perf_counter()
    info, size, data, mean, std = _data(recipe, dataset, image_size, data_dir, real_data,
                                        device)
    _sync(device)
    data_s = time.perf_counter() - t_data
    cuda = torch.device(device).type == "cuda"

    t_build = time.perf_counter()
    models = []
    for seed in range(pack):  # each run's model as its run builds it
        torch.manual_seed(seed)
        models.append(create_model(name, num_classes=info.num_classes, image_size=size,
                                   **(model_args or {})))
    rt = [rt.with_model(model, size) for model in models][0]  # the lambda impls train runs
    if cuda:  # peak from here: CUDA graphs take their memory pool at capture, in the warm-up
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if isinstance(data, feed.BenchFeed):  # a streamed set's batches (feed.py), not arrays'
        sources = [data.batches(seed, rt.world) for seed in range(pack)]
    else:
        sources = [batches(data, recipe, seed, device, rt.world) for seed in range(pack)]
    if pack == 1:  # as train builds it
        model, optimizer, step = build(models[0], recipe, rt, mean, std)
    else:
        step = fused_step([model.to(device) for model in models], recipe, rt, mean, std)

    def one(i: int) -> None:
        parts = [batch(i) for batch in sources]
        step(*(parts[0] if pack == 1 else (torch.stack(p) for p in zip(*parts, strict=True))),
             recipe.lr, i)

    warm_s, seconds = timed(one, warmup, steps, device, t_build, barrier)
    round_s = seconds / steps
    fwd = float(estimate_flops(models[0], size))
    ranks = rt.world.size if rt.world else 1  # DDP: `batch_size` is the ranks' global batch
    peak = device_peak(device, rt.precision)
    flops_per_s = 3 * fwd * pack * recipe.batch_size / round_s
    row = {
        "model": name, "params": count_params(models[0]), "dataset": dataset,
        "real_data": real_data, "batch_size": recipe.batch_size, "precision": rt.precision,
        "compile": rt.compile or False, "path": path_label(step.path, rt, fused=pack > 1),
        "channels_last": rt.channels_last, "tf32": rt.tf32,
        "lambda_impls": rt.lambda_impls, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "warmup": warmup, "steps": steps, "slots": 1, "ranks": ranks, "pack": pack,
        "fused": pack > 1, "step_ms": 1000 * round_s, "iter_per_min": pack * 60 / round_s,
        "iter_per_min_per_run": 60 / round_s, "images_per_s": pack * recipe.batch_size / round_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "forward_flops_per_image": fwd, "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": flops_per_s / (ranks * peak) if peak else None,
        "startup_s": max(warm_s - warmup * round_s, 0.0), "data_s": data_s,
        "diverged": bool((step.tally[..., COLUMN.first_nonfinite] >= 0).any()),
    }
    if pack == 1 and rt.lead:  # on several ranks rank 0 evaluates and saves alone
        row.update(_eval_costs(model, optimizer, data, mean, std, rt, eval_images))
    return row


def _eval_costs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: DeviceImages,
                mean: torch.Tensor, std: torch.Tensor, rt: Runtime, eval_images: int
                ) -> dict[str, Any]:
    """One evaluation pass as training runs it (the eager model in eval mode, after a warm
    one) and the checkpoint write every evaluation makes (last.ckpt)."""
    stream = isinstance(data, feed.BenchFeed)  # its val split, decoded as a run's evaluation
    val = data.eval_stream() if stream else data.unpadded()[:eval_images]  # decodes it: no warm
    if not stream:
        predict(model, val[:min(len(val), 500)], mean, std, rt)
    _sync(rt.device)
    t_eval = time.perf_counter()
    (predict_split if stream else predict)(model, val, mean, std, rt)
    _sync(rt.device)
    eval_s = time.perf_counter() - t_eval
    with tempfile.TemporaryDirectory() as tmp:
        t_ckpt = time.perf_counter()
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                        Path(tmp) / "last.ckpt")
        ckpt_s = time.perf_counter() - t_ckpt
    return {"eval_images": len(val), "eval_images_per_s": len(val) / max(eval_s, 1e-9),
            "ckpt_s": ckpt_s}


def release(device: str) -> None:
    """Free the last model's memory before the next one is measured."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _process(i: int, ranks: int, kwargs: dict[str, Any], barrier: Any, queue: Any,
             port: int, lock_dir: Path | None) -> None:
    """Spawned process i: a slot sharing the device, or rank i of `ranks`, which claims its
    device and joins the group as `train` does under torchrun. Its row, or its error in one
    line, goes to `queue`."""
    try:
        if ranks == 1:
            queue.put((i, "ok", measure(**kwargs, barrier=barrier)))
            return
        world = distributed.World(i, ranks, i)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as torchrun's
        with gpu.claim(distributed.rank_device(world, kwargs["device"]),
                       lock_dir=lock_dir) as dev, distributed.joined(world, dev):
            row = measure(**{**kwargs, "device": dev}, world=world, barrier=barrier)
        queue.put((i, "ok", row))
    except BaseException as exc:  # the parent raises it in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        queue.put((i, "error", f"{type(exc).__name__}: {first}"))
        raise  # a failed process ends the others (torch's spawn)


def _in_processes(n: int, ranks: int, kwargs: dict[str, Any],
                  lock_dir: Path | None = None) -> list[dict[str, Any]]:
    """`_process` in `n` spawned processes at once (CUDA cannot be forked): their rows in
    order, or one line for the first that failed, died or hung (the others are ended)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue, got = ctx.Barrier(n), ctx.SimpleQueue(), {}
    what, deadline = "rank" if ranks > 1 else "slot", time.monotonic() + SLOT_TIMEOUT_S

    def drain() -> None:  # rows are read as they come: a full pipe would block its writer
        while not queue.empty():
            i, status, value = queue.get()
            if status == "error":
                raise UserError(f"a benchmark {what} failed: {value}")
            got[i] = value

    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = start_processes(_process, (ranks, kwargs, barrier, queue, port, lock_dir), n,
                            join=False, daemon=True)
    try:
        while not procs.join(timeout=1):
            drain()
            if time.monotonic() > deadline:
                raise UserError(f"benchmark {what}s did not finish within {SLOT_TIMEOUT_S} s")
    except ProcessExitedException as exc:  # killed (out of memory, a signal) before reporting
        raise UserError(f"a benchmark {what} died with exit code {exc.exit_code} before "
                        "reporting (out of memory?)") from None
    except ProcessException:
        pass  # it raised: its one line is on the queue
    finally:  # none is left running (kill: a no-op on one that has ended)
        for proc in procs.processes:
            proc.kill()
            proc.join()
    drain()
    if len(got) < n:
        raise UserError(f"a benchmark {what} stopped without reporting")
    return [got[i] for i in range(n)]


def measure_slots(slots: int, ranks: int = 1, lock_dir: Path | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """`measure` in `slots` processes at once on the same device, whose row sums their rates
    and memory (the device's aggregate), averages their per-process costs and keeps the
    per-process iteration rate as `iter_per_min_per_slot`; or as the `ranks` processes of one
    DDP run (each claims its GPU from `lock_dir`; gloo on the CPU), whose row is rank 0's."""
    if ranks > 1:  # what DDP refuses, before any process starts
        r = kwargs["recipe"]
        distributed.check(distributed.World(0, ranks), r.batch_size, r.drop_last, r.compile)
    if slots == 1:
        row = measure(**kwargs) if ranks == 1 else _in_processes(ranks, ranks, kwargs, lock_dir)[0]
        release(kwargs.get("device", "cpu"))
        return {**row, "iter_per_min_per_slot": row["iter_per_min"]}
    rows = _in_processes(slots, 1, kwargs)
    summed = {k: None if any(r[k] is None for r in rows) else sum(r[k] for r in rows)
              for k in ("iter_per_min", "images_per_s", "peak_mem_gib", "model_tflops_per_s",
                        "mfu")}
    mean = {k: sum(r[k] for r in rows) / slots
            for k in ("step_ms", "data_s", "eval_images_per_s", "ckpt_s")}
    return {**rows[0], **summed, **mean, "slots": slots,
            "startup_s": max(r["startup_s"] for r in rows),
            "diverged": any(r["diverged"] for r in rows),
            "iter_per_min_per_slot": sum(r["iter_per_min"] for r in rows) / slots}


def measure_packed(pack: int, fuse: bool = False, slots: int = 1,
                   **kwargs: Any) -> list[dict[str, Any]]:
    """`measure_slots` for one run, then for `pack` > 1 the row of `pack` runs in one process
    as `train --seeds` trains them: with `fuse` (where training fuses) the fused step timed,
    else one run after another, the one run's rate shared. Rates are summed over the runs;
    `iter_per_min_per_run` is each run's share, `vs_one_run` aggregate / one run's."""
    one = {**measure_slots(slots, **kwargs), "vs_one_run": 1.0}
    if pack == 1:
        return [one]
    if not fuse or resolve(kwargs["recipe"], kwargs.get("device", "cpu")).why_not_fused:
        return [one, {**one, "pack": pack, "step_ms": pack * one["step_ms"],
                      "iter_per_min_per_run": one["iter_per_min"] / pack}]
    row = measure(pack=pack, **kwargs)
    release(kwargs.get("device", "cpu"))  # the pack's models, optimizer and device data
    return [one, {**one, **row, "vs_one_run": row["iter_per_min"] / one["iter_per_min"]}]


def time_impls(names: list[str], recipe: Recipe, device: str = "cpu", dataset: str = "cifar10",
               model_args: dict[str, Any] | None = None, warmup: int = 2,
               steps: int = 5) -> list[dict[str, Any]]:
    """`bench --impls`, the check of the fixed rule `auto` follows (models/lambda_layer.py,
    docs/performance.md): forward + backward of each lambda layer alone, in every
    implementation that fits (`candidate_impls`), at the recipe's batch, precision, layout."""
    from lambdapipe.data import dataset_info
    from lambdapipe.models import create_model
    from lambdapipe.models.lambda_layer import lambda_layers, map_sizes

    rt, info, rows = resolve(recipe, device), dataset_info(dataset), []
    for name in names:
        model = create_model(name, num_classes=info.num_classes, image_size=info.image_size,
                             **(model_args or {}))
        sizes = map_sizes(model, info.image_size)
        for layer_name, layer in lambda_layers(model):
            (h, w), layer = sizes[layer_name], layer.to(device)
            x = torch.randn(recipe.batch_size, layer.to_queries[0].in_channels, h, w,
                            device=device)
            if rt.channels_last:
                x, layer = (t.to(memory_format=torch.channels_last) for t in (x, layer))
            x.requires_grad_(True)
            for impl in layer.candidate_impls(h, w):
                layer.impl = impl

                def once(_i: int, layer=layer, x=x) -> None:
                    with rt.autocast():
                        out = layer(x)
                    out.float().sum().backward()
                    layer.zero_grad(set_to_none=True)

                _, seconds = timed(once, warmup, steps, device, time.perf_counter())
                rows.append({"model": name, "layer": layer_name, "map": f"{h}x{w}",
                             "impl": impl, "ms": 1000 * seconds / steps,
                             "rule": layer.rule_impl(h, w, device),
                             "batch_size": recipe.batch_size, "precision": rt.precision,
                             "channels_last": rt.channels_last, "device": str(device)})
            release(device)
    return rows


def run(names: list[str], dataset: str = "cifar10", data_dir: Path = Path("data"),
        real_data: bool = False, batch_size: int = 256, precision: str = "bf16",
        compile: bool | str = "auto", warmup: int = 20, steps: int = 50,
        model_args: dict[str, Any] | None = None, device: str = "cpu", slots: int = 1,
        eval_images: int = EVAL_IMAGES, recipe: str = "sgdm", pack: int = 1,
        fuse: bool = False, on_row: Any = None) -> list[dict[str, Any]]:
    """One row per model, compared with the ResNets among `names`; with `pack` > 1 two
    (`measure_packed`). `on_row(row)` is called as each row is measured (a time limit then
    loses only the rows not yet measured)."""
    check_args(names, batch_size, precision, warmup, steps, slots)
    r = get_recipe(recipe, {"batch_size": batch_size, "precision": precision,
                            "compile": compile})
    kwargs = {"recipe": r, "dataset": dataset, "data_dir": data_dir, "real_data": real_data,
              "warmup": warmup, "steps": steps, "eval_images": eval_images,
              "model_args": model_args, "device": device}
    rows: list[dict[str, Any]] = []
    for name in names:
        new = measure_packed(pack, fuse=fuse, slots=slots, name=name, **kwargs)
        rows.extend(new)
        _ratios(rows)  # also rows measured before their reference
        for row in new if on_row is not None else []:
            on_row(row)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput over ResNet-18's, and (issue 6's bar) each Lambda-ResNet's throughput and
    memory over the ResNet of its depth, among the rows of the same pack measured so far."""
    by_name = {(row["model"], row.get("pack", 1)): row for row in rows}
    for row in rows:
        ref = by_name.get((REFERENCE, row.get("pack", 1)))
        row["vs_resnet18"] = row["images_per_s"] / ref["images_per_s"] if ref else None
        base = by_name.get((matching_resnet(row["model"]) or "", row.get("pack", 1)))
        row["vs_resnet"] = row["images_per_s"] / base["images_per_s"] if base else None
        row["mem_vs_resnet"] = (row["peak_mem_gib"] / base["peak_mem_gib"]
                                if base and row["peak_mem_gib"] and base["peak_mem_gib"]
                                else None)


def matching_resnet(model: str) -> str | None:
    """lr34_l3_lc -> resnet34, lambda_resnet50_u4_r7 -> resnet50; None for a ResNet."""
    depth, _ = depth_width(model)
    return f"resnet{depth}" if depth and not model.startswith("resnet") else None
