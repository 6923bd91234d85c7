"""A config's wall time on this device, projected from measured costs (`lambdapipe bench
--config`). Each (dataset, model, model args, recipe) cell is measured once per slot count
(`bench.measure_slots`, synthetic data of the dataset's shape); one run then costs

    launch (process start, imports, data to device) + start-up (build, compile, capture)
    + steps / rate  +  evaluations x (images scored / eval rate + one checkpoint write)

with steps, evaluations and images scored (val, plus test where tracked) from the recipe
and the config's split, and the per-process rate with `slots` runs sharing the device. The
final test pass is not counted and runs pack perfectly onto `gpus` x `slots` processes: the
totals are lower bounds. The published figure beside each cell is training only. A run on
W = `train.gpus` x `train.nodes` ranks holds W of the `gpus`; its W-rank DDP step is measured
where this machine holds W ranks (`ranks_here`), else one rank's at the batch B/W (no
all-reduce: a lower bound). The table says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from lambdapipe import gpu
from lambdapipe.bench import measure_packed, measure_slots, process_age_s
from lambdapipe.config import Run, expand_runs
from lambdapipe.data import dataset_info
from lambdapipe.data.prepared import split_sizes
from lambdapipe.distributed import check_train
from lambdapipe.errors import UserError
from lambdapipe.noise import parse_noise_tag
from lambdapipe.recipes import Recipe, get_recipe
from lambdapipe.reference import (
    PUBLISHED_DATASET,
    arch_key,
    baseline_recipe,
    depth_width,
    read_table,
)
from lambdapipe.runtime import resolve


@dataclass
class Cell:
    """Runs that cost the same: one dataset, model, model args and recipe."""

    dataset: str
    model: str
    variant: str
    model_args: dict[str, Any]
    recipe: Recipe
    image_size: int
    train_size: int
    val_size: int
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.model}@{self.variant}" if self.variant else self.model

    @property
    def steps_per_epoch(self) -> int:
        trained = self.train_size + (self.val_size if self.recipe.train_on == "train+val" else 0)
        return self.recipe.steps_per_epoch(trained)

    @property
    def steps(self) -> int:
        return self.recipe.total_steps(self.steps_per_epoch)

    @property
    def evaluations(self) -> int:
        every = self.recipe.eval_interval(self.steps_per_epoch)
        return math.ceil(self.steps / every)


def cells(cfg: dict, datasets: list[str] | None = None,
          seeds: list[int] | None = None) -> list[Cell]:
    """The config's runs (of these datasets and seeds) grouped into cells (config order)."""
    out: dict[tuple, Cell] = {}
    for run in expand_runs(cfg):
        if (datasets and run.dataset not in datasets) or (seeds and run.seed not in seeds):
            continue
        key = (run.dataset, run.model, run.variant, run.settings())
        if key not in out:
            prep = cfg["datasets"][run.dataset].get("prepare") or {}
            info = dataset_info(run.dataset)
            train, val = split_sizes(info, prep.get("val_fraction"), prep.get("val_size"))
            out[key] = Cell(run.dataset, run.model, run.variant,
                            {k: json.loads(v) for k, v in run.model_args},
                            get_recipe(run.recipe, {k: json.loads(v) for k, v in run.overrides}),
                            prep.get("image_size") or info.image_size, train, val)
        out[key].runs.append(run)
    if not out:
        raise UserError("no run of the config is left to project: check --datasets and "
                        "--seeds against the config's datasets " + ", ".join(cfg["datasets"]))
    return list(out.values())


def published_seconds(cell: Cell, published_as: dict[str, str]) -> float | None:
    """The published training time of one run of this cell, where a source gives one."""
    source = published_as.get(cell.dataset, cell.dataset)
    if cell.model_args and source == cell.dataset:  # a changed model is not the published one
        return None
    if source in PUBLISHED_DATASET:
        # The baseline table's rates are for its ResNets under its recipe (the ImageNet
        # rows': one per batch note; measured on the 2-8 GPUs of the row's note).
        if not re.fullmatch(r"resnet\d+(x\d+)?", cell.model):
            return None
        depth, width = depth_width(cell.model)
        for row in read_table("published_resnet_baselines.csv"):
            if (row["dataset"] == PUBLISHED_DATASET[source] and row["depth"] == str(depth)
                    and row["width"] == str(width)
                    and baseline_recipe(row["dataset"], row["notes"]) == cell.recipe.name
                    and row["precision"] == cell.recipe.precision and row["iter_per_min"]):
                return 60 * cell.steps / float(row["iter_per_min"])
        return None
    if source.startswith("imagenette"):
        if cell.recipe.name != "adam-restarts":  # the study's recipe sets its time per run
            return None
        rates = {parse_noise_tag(r.noise).rate for r in cell.runs}
        times = [float(row["training_time_s"])
                 for row in read_table("published_imagenette_noisy_report.csv")
                 if arch_key(row["architecture"]) == cell.model and row["training_time_s"]
                 and any(math.isclose(float(row["noise_pct"]), 100 * r) for r in rates)]
        return sum(times) / len(times) if times else None
    return None


def run_seconds(cell: Cell, row: dict[str, Any], launch_s: float) -> dict[str, float]:
    """One run's projected wall time from a `bench.measure_slots` row, by part."""
    scored = cell.val_size + (dataset_info(cell.dataset).num_test
                              if cell.recipe.track_test_every_eval else 0)
    parts = {
        "launch_s": launch_s + row["data_s"],
        "startup_s": row["startup_s"],
        "train_s": 60 * cell.steps / row["iter_per_min_per_slot"],
        "eval_s": cell.evaluations * (scored / row["eval_images_per_s"] + row["ckpt_s"]),
    }
    parts["run_s"] = sum(parts.values())
    return parts


def packed_seconds(cell: Cell, one: dict[str, Any], packed: dict[str, Any], pack: int,
                   launch_s: float) -> tuple[dict[str, float], float]:
    """`train: {pack: seeds}`: the seeds of each (noise variant of a) cell run in processes of
    up to `pack` runs, each run at the per-run rate measured with `pack` runs stepping
    together (a smaller pack runs no slower); a lone run costs what `run_seconds` says.
    Returns the parts of one full pack's process (one launch and start-up, each run's data,
    evaluations and checkpoints) and the whole cell's seconds."""
    one_run = run_seconds(cell, one, launch_s)
    parts = run_seconds(cell, {"data_s": pack * packed["data_s"],
                               "startup_s": packed["startup_s"],
                               "iter_per_min_per_slot": packed["iter_per_min_per_run"],
                               "eval_images_per_s": one["eval_images_per_s"] / pack,
                               "ckpt_s": pack * one["ckpt_s"]}, launch_s)
    per_run_fixed = packed["data_s"] + one_run["eval_s"]
    total = 0.0
    for n in Counter(run.noise for run in cell.runs).values():
        for start in range(0, n, pack):
            m = min(pack, n - start)
            total += one_run["run_s"] if m == 1 else (
                parts["run_s"] - (pack - m) * per_run_fixed)
    return parts, total


def ranks(cfg: dict, gpus: int, pack: int = 1) -> int:
    """W, the ranks of each of the config's runs, checked against `gpus` and `pack`."""
    world = check_train(cfg.get("train") or {}).size  # train.gpus x train.nodes
    if gpus < world:
        raise UserError(f"invalid gpus {gpus!r}: the config's runs take {world} GPUs each "
                        f"(train.gpus x train.nodes); expected an integer >= {world}")
    if world > 1 and pack > 1:
        raise UserError(f"invalid pack {pack!r} with runs on {world} GPUs: a run on several "
                        "GPUs trains one seed; expected 1")
    return world


def ranks_here(device: str, world: int) -> str | None:
    """The device on which this machine runs a run's `world` ranks, one process each as
    `train` under torchrun: `cpu` (gloo) or `cuda` (W GPUs, a claim each); None where it
    cannot (one run, fewer GPUs, or one GPU named), and one rank's step is measured instead."""
    if world == 1 or ":" in device:
        return None
    count = 0 if device == "cpu" else torch.cuda.device_count()  # NVML: CUDA left untouched
    if device == "cuda" or count:
        return "cuda" if count >= world else None
    return "cpu"


def project(cfg: dict, *, datasets: list[str] | None = None, seeds: list[int] | None = None,
            slots: list[int] = (1,), gpus: int = 1, device: str = "cpu", warmup: int = 20,
            steps: int = 50, data_dir: Any = "data", real_data: bool = False,
            compile: bool | str | None = None, progress: Any = None,
            pack: int = 1, fuse: bool = False, lock_dir: Any = None) -> dict[str, Any]:
    """Measure every cell at every slot count on `device` (claimed here from `lock_dir`, or
    by each rank) and project the config's wall time; `compile` (a mode) replaces every
    cell's recipe setting; `pack` > 1 packs each cell's seeds into processes of that many
    runs (`packed_seconds`), fused with `fuse` where training fuses."""
    if gpus < 1:
        raise UserError(f"invalid gpus {gpus!r}: expected an integer >= 1")
    if not slots or any(s < 1 for s in slots):
        raise UserError(f"invalid slots {list(slots)!r}: expected integers >= 1")
    if pack < 1 or (pack > 1 and list(slots) != [1]):
        raise UserError(f"invalid pack {pack!r}: expected an integer >= 1, with one slot")
    world = ranks(cfg, gpus, pack)
    spread = ranks_here(device, world)
    if spread and list(slots) != [1]:
        raise UserError(f"invalid slots {list(slots)!r} with runs of {world} ranks measured "
                        f"on {world} processes: expected 1")
    launch_s = process_age_s() or 0.0  # interpreter start and imports, as every run pays
    published_as = (cfg.get("report") or {}).get("published_as") or {}
    todo = cells(cfg, datasets, seeds)
    for cell in todo:
        if compile is not None:
            cell.recipe = dataclasses.replace(cell.recipe, compile=compile)
        elif world > 1 and cell.recipe.compile == "auto":  # eager, as `resolve` on W ranks
            cell.recipe = dataclasses.replace(cell.recipe, compile=False)
    pubs = [(published_seconds(cell, published_as), len(cell.runs)) for cell in todo]
    rows: list[dict[str, Any]] = []
    totals: dict[int, float | None] = {s: 0.0 for s in slots}
    with contextlib.nullcontext(spread) if spread else gpu.claim(device, lock_dir) as dev:
        for cell, (pub, _) in zip(todo, pubs, strict=True):
            kwargs = {"name": cell.model, "dataset": cell.dataset, "image_size": cell.image_size,
                      # the W ranks' global batch, or one rank's share (distributed.shard_plan)
                      "recipe": dataclasses.replace(cell.recipe, batch_size=cell.recipe
                                                    .batch_size // (1 if spread else world)),
                      "data_dir": data_dir, "real_data": real_data, "warmup": warmup,
                      "steps": steps, "eval_images": cell.val_size,
                      "model_args": cell.model_args, "device": dev,
                      **({"ranks": world, "lock_dir": lock_dir} if spread else {})}
            for s in slots:
                if progress:
                    progress(f"measuring {cell.dataset} {cell.label} " + (
                        f"with {pack} runs packed" if pack > 1 else f"on {world} ranks"
                        if spread else f"with {s} slot(s)"))
                base = {"dataset": cell.dataset, "model": cell.label,
                        "precision": cell.recipe.precision, "batch_size": cell.recipe.batch_size,
                        "compile": resolve(cell.recipe, dev).compile or False,
                        "runs": len(cell.runs), "steps": cell.steps,
                        "evaluations": cell.evaluations, "slots": s, "pack": pack,
                        "ranks": world, "published_run_s": pub}
                try:
                    if pack > 1:
                        one, row = measure_packed(pack, fuse=fuse, **kwargs)
                        parts, cell_s = packed_seconds(cell, one, row, pack, launch_s)
                    else:
                        row = measure_slots(s, **kwargs)
                        parts = run_seconds(cell, row, launch_s)
                        cell_s = parts["run_s"] * len(cell.runs) / s
                except (UserError, RuntimeError) as exc:  # e.g. two copies do not fit
                    if s == 1:
                        raise
                    totals[s] = None
                    rows.append({**base, "error": str(exc).splitlines()[0]})
                    continue
                if totals[s] is not None:
                    totals[s] += cell_s / (gpus // world)  # runs at once, W GPUs each
                per_process = "iter_per_min_per_run" if pack > 1 else "iter_per_min_per_slot"
                rows.append({**base, "iter_per_min": row["iter_per_min"],
                             "iter_per_min_per_slot": row[per_process],
                             "vs_one_run": row.get("vs_one_run"),
                             "peak_mem_gib": row["peak_mem_gib"], **parts,
                             "device_name": row["device_name"], "path": row.get("path")})
    best = min((s for s in totals if totals[s] is not None), key=totals.get)
    return {"rows": rows, "launch_s": launch_s, "gpus": gpus, "ranks": world, "total_s": totals,
            "measured_ranks": world if spread else 1, "pack": pack, "fuse": fuse,
            "best_slots": best, "runs": sum(n for _, n in pubs),
            "published_total_s": sum(p * n for p, n in pubs if p is not None) or None,
            "published_missing_runs": sum(n for p, n in pubs if p is None)}


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f}" if seconds >= 600 else f"{seconds / 60:.2f}"


def format_projection(result: dict[str, Any]) -> str:
    head = (f"{'dataset':<15} {'model':<22} {'prec':<5} {'runs':>4} {'steps':>7} {'slots':>5} "
            f"{'iter/min':>9} {'per run':>8} {'start s':>7} {'eval min':>8} {'run min':>8} "
            f"{'pub. min':>8}  path")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        at_once = f"x{r['pack']}" if r.get("pack", 1) > 1 else r["slots"]
        first = (f"{r['dataset']:<15} {r['model']:<22} {r['precision']:<5} {r['runs']:>4} "
                 f"{r['steps']:>7} {at_once:>5}")
        lines.append(f"{first}  failed: {r['error']}" if "error" in r else (
            f"{first} {r['iter_per_min']:>9.0f} {r['iter_per_min_per_slot']:>8.0f} "
            f"{r['startup_s'] + r['launch_s']:>7.1f} {_minutes(r['eval_s']):>8} "
            f"{_minutes(r['run_s']):>8} {_minutes(r['published_run_s']):>8}  "
            f"{r.get('path') or '-'}"))
    world = result.get("ranks", 1)
    device = next((r["device_name"] for r in result["rows"] if "device_name" in r), "?")
    lines.append("")
    for s, total in result["total_s"].items():
        best = s == result["best_slots"] and len(result["total_s"]) > 1
        mark = "  <- fewest minutes" if best else ""
        shown = f"{_minutes(total)} min" if total is not None else "not possible (see above)"
        at_once = (f"each cell's seeds packed {result['pack']} to a process"
                   + (" (fused)" if result.get("fuse") else "")
                   if result.get("pack", 1) > 1 else f"{s} run(s) per device at once")
        if world > 1:
            at_once = f"each run on {world} of them (DDP), {at_once}"
        lines.append(f"projected wall time, {result['runs']} runs on {result['gpus']} x "
                     f"{device}, {at_once}: {shown}{mark}")
    pub = result["published_total_s"]
    if pub is not None:
        missing = result["published_missing_runs"]
        lines.append(f"published training time of the same runs: {_minutes(pub)} min "
                     "(training only; baselines: RTX 3090 iter/min, the ImageNet rows' on "
                     "the 2-8 GPUs their notes name)"
                     + (f", {missing} runs without a published time" if missing else ""))
    if result.get("pack", 1) > 1:
        lines.append(f"(x{result['pack']}: a process of {result['pack']} seeds; iter/min of "
                     "them all, per run each's, run min the whole process)")
    lines.append("(lower bounds: perfect packing; launch = process start + data to device; "
                 "the final test pass is not counted)")
    if world == 1:
        measured = "each cell's training step, start-up and evaluation rate on one device here"
        projected = ("whole runs and the grid from them. Every run is one process on one GPU: "
                     "--gpus spreads runs over GPUs, a run on several GPUs (DDP) is neither "
                     "measured nor projected yet")
    elif result.get("measured_ranks", 1) > 1:
        measured = (f"each cell's {world}-rank DDP step (all-reduce included) on {world} "
                    f"processes here, rank 0's start-up and evaluation rate")
        projected = f"whole runs, and the grid as runs holding {world} of the --gpus each"
    else:
        measured = (f"one rank's training step at its batch (the global batch / {world} "
                    "ranks), start-up and evaluation rate, on one device here")
        projected = (f"{world} ranks stepping in parallel at that rate, all-reduce NOT "
                     f"included (a lower bound: measure the {world}-rank step on {world} "
                     f"GPUs), whole runs, and the grid as runs holding {world} of the --gpus "
                     "each")
    lines.append(f"(measured: {measured}; projected: {projected})")
    return "\n".join(lines)
