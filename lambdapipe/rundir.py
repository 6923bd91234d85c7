"""A run directory and what decides whether it may be (re)used: the run's config, the checks
made before a GPU is claimed, the resolved config.json, the state a checkpoint carries and
metrics.csv.

Run directory contract (docs/architecture.md): config.json, metrics.csv, last.ckpt and
best.ckpt (+ .sha256), summary.json (its presence means finished).
"""

from __future__ import annotations

import csv
import io
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambdapipe import __version__, atomic, live, runlock
from lambdapipe.errors import UserError
from lambdapipe.evaluate import build_model, load_checkpoint
from lambdapipe.feed import check_stream, image_size, split_stats
from lambdapipe.recipes import SPEED_FIELDS, Recipe, field_default, get_recipe
from lambdapipe.validate import check_model, check_out_dir, check_seed

METRIC_COLUMNS = ["iteration", "epoch", "lr", "train_loss", "train_acc", "train_clean_acc",
                  "val_loss", "val_acc", "images_per_s", "elapsed_s"]
SMALL_FILE = 64 << 20  # config.json, summary.json: read bounded (lambdapipe/atomic.py)
SPEED_WINDOW = 5000  # iter_per_min is measured over the last this many steps


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    model: str
    model_args: dict[str, Any]
    dataset: str
    data_dir: Path
    noise: str
    seed: int
    out: Path
    recipe: Recipe
    deterministic: bool = False

    @classmethod
    def build(cls, *, model: str, model_args: dict[str, Any] | None, dataset: str,
              data_dir: Path, noise: str, seed: int, out: Path, recipe: str,
              overrides: dict[str, Any] | None = None,
              deterministic: bool = False) -> TrainConfig:
        return cls(model=model, model_args=dict(model_args or {}), dataset=dataset,
                   data_dir=Path(data_dir), noise=noise, seed=check_seed(seed), out=Path(out),
                   recipe=get_recipe(recipe, overrides), deterministic=deterministic)

    def identity(self) -> dict[str, Any]:
        """What must match for a run directory to be resumed or its results reused."""
        return json.loads(json.dumps({
            "model": self.model, "model_args": self.model_args, "dataset": self.dataset,
            "noise": self.noise, "seed": self.seed, "recipe": self.recipe.to_dict()}))


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs in the experiment; speed settings (SPEED_FIELDS) do not count."""
    diffs = []
    for key, value in wanted.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and key == "recipe":
            diffs += [f"recipe.{k}: {old.get(k)!r} -> {v!r}" for k, v in value.items()
                      if old.get(k, field_default(k)) != v and k not in SPEED_FIELDS]
        elif old != value:
            diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


def load_splits(cfg: TrainConfig, verify: bool = True):
    """Train (with the noise variant) and val; `load_split` names the `prepare` command for
    a dataset or noise variant that is missing."""
    from lambdapipe.data import load_split
    from lambdapipe.data.stream import open_split, streamed

    if streamed(cfg.data_dir, cfg.dataset):  # a JPEG index (ImageNet-2012): lambdapipe/feed.py
        check_stream(cfg.recipe, cfg.noise, cfg.dataset)
        return tuple(open_split(cfg.data_dir, cfg.dataset, s) for s in ("train", "val"))
    train = load_split(cfg.data_dir, cfg.dataset, "train", noise=cfg.noise, verify=verify)
    val = load_split(cfg.data_dir, cfg.dataset, "val", verify=verify)
    return train, val


def saved_config(out: Path) -> dict[str, Any] | None:
    try:
        saved = atomic.read_json(out / "config.json", SMALL_FILE, "run config")
    except FileNotFoundError:
        return None
    except UserError as exc:
        raise UserError(f"{exc}: choose another --out") from None
    if not isinstance(saved, dict):
        raise UserError(f"refusing run config {out / 'config.json'}: not a mapping; choose "
                        "another --out")
    return saved


def finished(out: Path) -> dict[str, Any] | None:
    """A finished run's summary.json (None while it is not finished)."""
    path = out / "summary.json"
    return atomic.read_json(path, SMALL_FILE, "run summary") if path.exists() else None


def check_before_start(cfg: TrainConfig) -> None:
    """Every check that can fail on the user's input, before a GPU is claimed: the data and
    its checksums, the noise variant, the model and its arguments (one CPU forward pass),
    the batch size against the split, and what `--out` already holds."""
    check_out_dir(cfg.out)
    runlock.check_free(cfg.out)  # a run in progress, not an "interrupted run" below
    saved = saved_config(cfg.out)
    if saved is not None:
        diffs = differences(saved, cfg.identity())
        if diffs:
            state = "finished" if (cfg.out / "summary.json").exists() else "interrupted"
            raise UserError(f"--out {cfg.out} holds a {state} run of a different config "
                            f"({'; '.join(diffs[:3])}): choose another --out")
        if (cfg.out / "summary.json").exists():
            return  # finished with this config: run() returns its summary, trains nothing
    last = cfg.out / "last.ckpt"
    if last.exists():  # corrupted, or of another config: refuse now, not after a GPU claim
        check_same_run(cfg, last, load_checkpoint(last))
    train, val = load_splits(cfg)
    r = cfg.recipe
    if r.batch_size > len(train.labels):
        raise UserError(f"invalid batch_size {r.batch_size}: expected at most the "
                        f"{len(train.labels)} training images of {cfg.dataset}")
    size = image_size(train)
    check_model(cfg.model, train.num_classes, size, cfg.model_args)
    model = build_model(run_config(cfg, train, stats=False))  # its size checked: on meta
    model.eval()
    with torch.no_grad():
        try:
            model(torch.zeros(2, 3, size, size))
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"model {cfg.model} {cfg.model_args} cannot run on "
                            f"{cfg.dataset} images ({size} px): "
                            f"{str(exc).splitlines()[0]}") from None


def check_same_run(cfg: TrainConfig, last: Path, ckpt: dict[str, Any]) -> None:
    """At the checks and again at the resume itself: another owner may have written
    last.ckpt in between (a run directory removed and taken under a running owner)."""
    diffs = differences(ckpt["config"], cfg.identity())
    if diffs:
        raise UserError(f"{last} belongs to a different config ({'; '.join(diffs[:3])}): "
                        "choose another --out")


def run_config(cfg: TrainConfig, train, stats: bool = True, device: str = "cpu"):
    """The resolved config written to config.json and into every checkpoint."""
    mean, std = split_stats(train) if stats else ([0.0] * 3, [1.0] * 3)
    return json.loads(json.dumps({  # plain JSON types only: checkpoints load weights_only
        **cfg.identity(), "deterministic": cfg.deterministic,
        "out": str(cfg.out), "data_dir": str(cfg.data_dir), "device": str(device),
        "data": {"num_classes": int(train.num_classes), "classes": list(train.classes),
                 "image_size": image_size(train), "train_size": len(train.labels),
                 "mean": mean, "std": std},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "lambdapipe": __version__},
    }, default=str))


# --------------------------------------------------------------------------- run state
@dataclass
class RunState:
    iteration: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_iteration: int = -1
    elapsed_s: float = 0.0
    skipped_steps: int = 0


def write_metrics(out: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    columns = METRIC_COLUMNS + (["tst_acc"] if rows and "tst_acc" in rows[0] else [])
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(out / "metrics.csv", buf.getvalue())
    live.write(out, rows)  # the same rows in DVCLive's format, for `dvc plots`


def iter_per_min(rows: list[dict[str, float]], batch_size: int) -> float | None:
    """Steps per minute of pure training time (evaluation excluded) over the last
    SPEED_WINDOW steps, from each row's window length and images/s."""
    steps = seconds = 0.0
    prev = [0] + [row["iteration"] for row in rows]
    for row, start in zip(reversed(rows), reversed(prev[:-1]), strict=True):
        if steps >= SPEED_WINDOW:
            break
        n = row["iteration"] - start
        steps += n
        seconds += n * batch_size / row["images_per_s"] if row["images_per_s"] > 0 else 0.0
    return 60 * steps / seconds if seconds > 0 else None
