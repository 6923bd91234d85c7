"""The data protocol of a run: what it trains on and which split chooses its best.ckpt.

Ours holds val out of the training set and chooses on it, so test is read once, at the end,
and never takes part in a choice. The LambdaNetworks community fork trains on all 50,000
CIFAR-10 training images and keeps the epoch of best test accuracy; the recipe fields
`train_on: train+val` and `select_on: test` make a run that fork's way, named as such in the
run's identity (recipes.ADDED_FIELDS) and in every table beside it ("selects on test").

The training loop and the config check call these functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lambdapipe.errors import UserError
from lambdapipe.recipes import Recipe

# The metrics.csv column whose best value chooses best.ckpt, by `select_on`.
SELECTION_COLUMN = {"val": "val_acc", "test": "tst_acc"}


def training_split(r: Recipe, train: Any, val: Any, noise: str) -> tuple[str, Any]:
    """(its name, the split) the run trains on: `train`, or under train_on train+val the
    official training set whole again (val's images appended to train's, in that order).

    val always carries clean labels, so under a noise variant the union would be another
    noise rate than the one asked for: refused. val is still scored at every evaluation, on
    images the run then trains on (config/README.md says so)."""
    if r.train_on == "train":
        return "train", train
    check_noise(r, noise)
    joined = {k: np.concatenate([getattr(train, k), getattr(val, k)])
              for k in ("images", "labels", "clean_labels")}
    return r.train_on, dataclasses.replace(train, split=r.train_on, **joined)


def check_noise(r: Recipe, noise: str, where: str = "") -> None:
    """Refuse train_on train+val with noisy labels (the config check and the run's own)."""
    if r.train_on != "train" and noise != "clean":
        raise UserError(f"{where}invalid train_on {r.train_on} with noise {noise}: expected "
                        "clean labels (val's labels are clean, so train+val would dilute the "
                        "noise)")


def tracks_test(r: Recipe) -> bool:
    """Whether every evaluation also scores test: to report it, or to choose on it."""
    return r.track_test_every_eval or r.select_on == "test"


def selection_score(r: Recipe, row: dict[str, float]) -> float:
    """The number of one metrics row that best.ckpt maximises."""
    return row[SELECTION_COLUMN[r.select_on]]


def at_best(rows: list[dict[str, float]], best_iteration: int, column: str) -> float | None:
    """`column` of the row that chose best.ckpt (None before any evaluation)."""
    return next((row[column] for row in rows if row["iteration"] == best_iteration), None)
