"""The community fork's way of reading, for the tables (run files only): a run's curve at the
fork's epochs, and the note on runs that chose best.ckpt on test.

The fork's Lambda-ResNet-18 rows are at 65 and 70 epochs; our sgd-restarts run trains 310. Its
test accuracy at those epochs, and the best of its curve up to them (the fork's way of reading:
it keeps the best test epoch), stand beside it in the lambda table as columns of their own:
read off a curve, chosen by nothing, never the run's result.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lambdapipe.reference import FORK_RECIPES

CURVE_EPOCHS = tuple(sorted(FORK_RECIPES))
EPOCH_TOLERANCE = 1e-3  # metrics.csv rounds `epoch` to 4 decimals


def curve_columns(epoch: int) -> tuple[str, str]:
    """(test acc at `epoch`, best test acc up to it): the runs frame's column names."""
    return f"curve_tst_acc_at_{epoch}", f"curve_tst_acc_best_to_{epoch}"


def curve_points(metrics: pd.DataFrame | None) -> dict[str, float]:
    """Per epoch of CURVE_EPOCHS: the test accuracy of the evaluation at that epoch and the
    best of every evaluation up to it; NaN where the curve holds no test accuracy (recipe
    flag track_test_every_eval off) or has no evaluation at that epoch."""
    out = {}
    have = metrics is not None and {"epoch", "tst_acc"} <= set(metrics.columns)
    for epoch in CURVE_EPOCHS:
        at = best = math.nan
        if have:
            epochs = pd.to_numeric(metrics["epoch"], errors="coerce").to_numpy(dtype=float)
            acc = pd.to_numeric(metrics["tst_acc"], errors="coerce").to_numpy(dtype=float)
            hit = np.isclose(epochs, epoch, rtol=0, atol=EPOCH_TOLERANCE)
            if hit.any():
                at = float(acc[hit][-1])
                upto = acc[epochs <= epoch + EPOCH_TOLERANCE]
                best = float(np.nanmax(upto)) if np.isfinite(upto).any() else math.nan
        at_col, best_col = curve_columns(epoch)
        out[at_col], out[best_col] = at, best
    return out


def selects_on_test_note(df: pd.DataFrame) -> list[str]:
    """A note for any table holding runs that chose best.ckpt on test (summary.json
    `select_on`, recipe field; the fork's protocol), so their test accuracy is never read
    as one chosen on val; no note when there are none."""
    if "select_on" not in df.columns:
        return []
    recipes = sorted(set(df.loc[df["select_on"] == "test", "recipe"]))
    if not recipes:
        return []
    return [f"Runs of recipe {', '.join(recipes)} select on test (the LambdaNetworks community "
            "fork's protocol, lambdapipe/protocol.py): their test acc is of the evaluation "
            "with the best test accuracy, an optimistic number chosen on test, unlike ours "
            "(chosen on val, test read once)."]
