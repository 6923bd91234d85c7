"""Was it reproduced? Like-for-like matching of runs to published rows, and the verdicts.

Which published row stands beside a group of runs is decided by one rule,
`reference.differences`, applied to the group's `Setting` (every run of a group shares it:
the tables group on all of its fields). For every published value that stands beside runs,
the verdict table gives our mean with a 95 % Student-t interval over seeds and says whether
the published value lies inside it. The paired table compares each Lambda-ResNet with its
ResNet run by run (same training seed, same noise draw), which cancels what the two share.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lambdapipe.reference import Setting, differences, model_identity
from lambdapipe.report.tables import MISSING, PCT, Table, group_values, run_groups
from lambdapipe.status import OK

CONFIDENCE = 0.95
CONSISTENT, BELOW, ABOVE, TOO_FEW = "consistent", "below", "above", "too few runs"


# --------------------------------------------------------------------------- like for like
def setting_of(row: pd.Series) -> Setting:
    """The like-for-like fields of a run (a runs_frame row)."""
    args = json.loads(row["model_args"]) if row["model_args"] else {}
    size = row.get("image_size")
    return Setting(
        dataset=row["dataset"],
        image_size=int(size) if size is not None and pd.notna(size) else None,
        model=row["model"], model_args=Setting.args(args),
        precision=None if row["precision"] == MISSING else row["precision"],
        recipe=None if row["recipe_name"] == MISSING else row["recipe_name"],
        recipe_changes=frozenset(filter(None, row["recipe_changed_fields"].split(","))),
        noise=row["noise_condition"], noise_source=row["noise_source"])


def match(ours: Setting, candidates: list[tuple[Setting, pd.Series]], stand_in: bool
          ) -> tuple[pd.Series | None, list[str]]:
    """The published row a group addresses (same model and noise) if it is like it, else
    None and why not (the differences from the closest such row; empty: no row addresses
    this model and noise, so nothing was left out)."""
    base = model_identity(ours.model, dict(ours.model_args))[0]
    addressed = [(s, row) for s, row in candidates
                 if model_identity(s.model, dict(s.model_args))[0] == base
                 and s.noise == ours.noise]
    best: list[str] | None = None
    for setting, row in addressed:
        why = differences(ours, setting, stand_in)
        if not why:
            return row, []
        if best is None or len(why) < len(best):
            best = why
    return None, best or []


# --------------------------------------------------------------------------- intervals
def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean over n >= 2 values; NaN bounds
    below two values. Equal values give a zero-width interval (scipy's is undefined there)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan
    sem = float(stats.sem(values))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def verdict(values: np.ndarray, published: float) -> str:
    """consistent: the published value lies inside our 95 % interval; below / above: our
    whole interval lies below / above it; too few runs: fewer than two like runs."""
    mean, low, high = interval(values)
    if len(values) < 2 or not math.isfinite(low):
        return TOO_FEW
    if high < published:
        return BELOW
    if low > published:
        return ABOVE
    return CONSISTENT


def interval_cell(values: np.ndarray, digits: int, signed: bool = False) -> str:
    mean, low, high = interval(values)
    if not math.isfinite(mean):
        return MISSING
    fmt = f"{'+' if signed else ''}.{digits}f"
    text = format(mean, fmt)
    if not math.isfinite(low):
        return text
    return f"{text} [{format(low, fmt)}, {format(high, fmt)}]"


# --------------------------------------------------------------------------- verdicts
@dataclass
class PublishedCell:
    """One published value standing beside a group of like runs, with our values of it."""

    table: str
    dataset: str
    model: str
    noise: str
    metric: str
    digits: int
    published: float
    values: np.ndarray  # the group's ok runs, finite, in the unit `published` is in


def published_cells(table: str, g: pd.DataFrame, pub: pd.Series | None,
                    metrics: list[tuple[str, str, str, int, float, float]]
                    ) -> list[PublishedCell]:
    """The cells of one group: (our column, published column, label, digits, our scale,
    published scale) each, where the published row has that value; both scaled to the
    tables' unit (accuracies in percent)."""
    if pub is None:
        return []
    first = g.iloc[0]
    out = []
    for ours, theirs, label, digits, scale, pub_scale in metrics:
        try:
            value = float(pub[theirs]) * pub_scale
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out.append(PublishedCell(table, first["dataset"], first["model_label"],
                                     first["condition"], label, digits, value,
                                     group_values(g[g["status"] == OK], ours, scale)))
    return out


def verdict_table(cells: list[PublishedCell]) -> Table:
    """One row per published value beside like runs (stand-ins are context: none here)."""
    md, rows = [], []
    for c in cells:
        mean, low, high = interval(c.values)
        word = verdict(c.values, c.published)
        md.append({"table": c.table, "dataset": c.dataset, "model": c.model, "noise": c.noise,
                   "metric": c.metric, "published": f"{c.published:.{c.digits}f}",
                   "runs": str(len(c.values)),
                   "ours: mean [95 % interval]": interval_cell(c.values, c.digits),
                   "verdict": word})
        rows.append({"table": c.table, "dataset": c.dataset, "model": c.model,
                     "noise": c.noise, "metric": c.metric, "published": c.published,
                     "runs": len(c.values), "mean": mean, "ci_low": low, "ci_high": high,
                     "verdict": word})
    return Table("reproduced", "Was it reproduced? Our runs against each published value",
                 md, rows, [
                     "One row per published value that stands beside like runs (same "
                     "dataset, image size, model and arguments, precision, recipe and noise). "
                     "Ours: mean over seeds (ok runs only) with a 95 % Student-t interval "
                     "(n - 1 degrees of freedom). consistent: the published value lies inside "
                     "the interval; below / above: our whole interval lies below / above it; "
                     "too few runs: under two like runs, no interval. The published value is "
                     "taken as exact (the sources give one number, not a spread)."
                     + ("" if cells else " No published value stands beside like runs here "
                        "(a demo-size stand-in is context and gets no verdict).")])


# --------------------------------------------------------------------------- paired
def _is_lambda(model: str) -> bool:
    return model.startswith(("lr", "lambda_resnet"))


def paired_table(df: pd.DataFrame) -> Table | None:
    """Lambda-ResNet minus its ResNet of the same depth, run by run: pairs share dataset,
    image size, model args, variant, precision, recipe, training seed and noise draw (tag),
    and both ended ok; the interval is the paired Student-t one over the differences."""
    ok = df[(df["status"] == OK) & df["tst_acc"].map(lambda v: v is not None and pd.notna(v))]
    keys = ["dataset", "image_size", "model_args", "variant", "precision", "recipe"]
    md, rows = [], []
    lam = ok[ok["model"].map(_is_lambda)]
    for group, g in run_groups(lam, [*keys, "model", "condition"]):
        model, condition = group[-2:]
        first = g.iloc[0]
        partner = f"resnet{int(first['depth'])}" if pd.notna(first["depth"]) else None
        others = ok[(ok["model"] == partner) & (ok["condition"] == condition)]
        for key in keys:
            others = others[others[key].fillna(MISSING) == (
                MISSING if pd.isna(first[key]) else first[key])]
        by_run = others.set_index(["seed", "noise"])["tst_acc"].astype(float)
        by_run = by_run[~by_run.index.duplicated()]  # one run per seed and draw
        diffs = np.array([float(row.tst_acc) - by_run[(row.seed, row.noise)]
                          for row in g.itertuples() if (row.seed, row.noise) in by_run.index])
        if not len(diffs) or partner is None:
            continue
        mean, low, high = interval(diffs)
        if not math.isfinite(low):
            word = "too few pairs"
        elif low > 0:
            word = "Lambda-ResNet higher"
        elif high < 0:
            word = "ResNet higher"
        else:
            word = "no difference shown"
        label = first["model_label"]
        partner_label = partner + label[len(model):]  # the same variant and model args
        md.append({"dataset": first["dataset"], "Lambda-ResNet": label, "ResNet": partner_label,
                   "noise": condition, "pairs": str(len(diffs)),
                   "test acc difference (points) [95 % interval]":
                       interval_cell(diffs * PCT, 2, signed=True),
                   "reading": word, "precision": first["precision"],
                   "recipe": first["recipe"]})
        rows.append({"dataset": first["dataset"], "model": model, "model_label": label,
                     "partner": partner, "noise": condition, "noise_rate": first["noise_rate"],
                     "pairs": len(diffs), "test_acc_diff_pct_mean": mean * PCT,
                     "ci_low_pct": low * PCT, "ci_high_pct": high * PCT,
                     "reading": word, "precision": first["precision"],
                     "recipe": first["recipe"]})
    if not md:
        return None
    return Table("lambda_vs_resnet", "Lambda-ResNet minus ResNet, paired by seed and noise draw",
                 md, rows, [
                     "Test accuracy (percentage points) of each Lambda-ResNet minus that of "
                     "the ResNet of the same depth, trained alike (dataset, image size, "
                     "model args, precision, recipe) with the same training seed on the same "
                     "noisy labels (the same noise draw); mean over the pairs with a 95 % "
                     "paired Student-t interval. "
                     "Lambda-ResNet / ResNet higher: the interval excludes 0; too few pairs: "
                     "under two."])
