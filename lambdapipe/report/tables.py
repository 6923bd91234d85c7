"""Tables: ours as mean ± std over seeds, the published value beside ours where one exists.

Means and stds are over the runs that finished with status `ok`; a run that ended in any other
status (lambdapipe.status: diverged, non-finite) never enters a mean: it is named in the status
column and in the table of runs that are no result, and a cell whose runs all failed reads
`diverged@<iteration>` or `<n> non-finite`. Standard deviations are sample stds (ddof=1); one
run shows no ±.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lambdapipe.provenance import split_model_dir
from lambdapipe.reference import (
    DRAWN,
    NOT_RECIPE,
    depth_width,
    has_official_noise,
    noise_source,
)
from lambdapipe.report.fork import curve_points, selects_on_test_note
from lambdapipe.report.load import SUMMARY_FIELDS, Collection
from lambdapipe.status import DIVERGED, FAILED, OK

MISSING = "—"
PCT = 100.0  # accuracies show and are stored in percent, as the sources print them
TIME = "training time (h:mm:ss)"
# Plain names of the summary's fields, the same in every table (summary.json keeps its own).
TEST_ACC, VAL_ACC, TEST_NLL = "test acc (%)", "val acc (%)", "test NLL"
TRAIN_CLEAN_ACC = "train acc on true labels (%)"
BEST_TRAIN_LOSS = "best train loss (CE on the training labels)"
BEST_VAL_LOSS = "best val loss (CE)"


@dataclass
class Table:
    """One table in two renderings: markdown for people, CSV (plain numbers) for tools."""

    name: str
    title: str
    md_rows: list[dict[str, str]]
    csv_rows: list[dict[str, object]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The table as markdown, without the columns empty in every row shown (a column of
        '—' says nothing a reader needs at a glance; the CSV keeps every column)."""
        lines = [f"## {self.title}", ""]
        if self.md_rows:
            frame = pd.DataFrame(self.md_rows).astype(str)
            frame = frame.loc[:, ~frame.isin(["", MISSING]).all()]
            # disable_numparse: the cells are already formatted ("0.70", "0:42:00"); tabulate
            # would otherwise reparse and reformat them as numbers. It does not escape a '|'
            # inside a cell (a recipe's list setting), so that is done here.
            lines.append(frame.map(lambda v: v.replace("|", "\\|"))
                         .to_markdown(index=False, disable_numparse=True))
        else:
            lines.append("(none)")
        lines += [""] + [f"{note}  " for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        if self.csv_rows:
            writer = csv.DictWriter(buf, fieldnames=list(self.csv_rows[0]), lineterminator="\n")
            writer.writeheader()
            for row in self.csv_rows:
                writer.writerow({k: _csv_value(v) for k, v in row.items()})
        return buf.getvalue()


def _csv_value(v: object) -> object:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


# --------------------------------------------------------------------------- the runs frame
def runs_frame(collection: Collection, published_as: dict[str, str] | None = None
               ) -> pd.DataFrame:
    """One row per finished run: every summary field plus what the tables group on.

    `published_as` maps a stand-in dataset (a demo-size run of a published grid, e.g. digits
    for cifar10) to the source whose published rows it is read against; a variant (the
    `@name` of a run directory such as `resnet18@fp16`) is its own model label.
    """
    published_as = published_as or {}
    rows = []
    for run in collection.runs:
        row = {key: run.summary.get(key) for key in SUMMARY_FIELDS}
        # Extra fields ride along into runs.csv; nested ones as JSON text.
        row.update({k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
                    for k, v in run.summary.items() if k not in row})
        depth, width = depth_width(run.summary["model"])
        args = ", ".join(f"{k}={run.model_args[k]}" for k in sorted(run.model_args))
        variant = split_model_dir(run.path.parent.name)[1]  # <model>@<variant>-<fingerprint>
        dataset = run.summary["dataset"]
        changes = run.summary.get("recipe_changes")
        changes = {k: v for k, v in (changes if isinstance(changes, dict) else {}).items()
                   if k not in NOT_RECIPE}
        name = run.summary.get("recipe")
        row.update(
            recipe_name=name, recipe_changed_fields=",".join(sorted(changes)),
            # A changed recipe is another recipe: its own rows, never the published one's.
            recipe=f"{name} ({', '.join(f'{k}={_setting(v)}' for k, v in sorted(changes.items()))})"
            if changes and name else name,
        )
        source = noise_source(dataset, run.noise.kind, run.noise.rate, run.noise.seed)
        # A draw where the dataset ships official noisy labels at that rate is another noise
        # source: its own rows, never pooled with (or shown as) the official column's.
        drawn = source == DRAWN and has_official_noise(dataset, run.noise.kind, run.noise.rate)
        row.update(
            variant=variant, published_dataset=published_as.get(dataset, dataset),
            stand_in=dataset in published_as,
            run_id=run.run_id, noise_kind=run.noise.kind, noise_rate=run.noise.rate,
            noise_seed=run.noise.seed, noise_condition=run.noise.condition,
            noise_source=source,
            condition=run.noise.condition + (" (drawn)" if drawn else ""),
            model_args=json.dumps(run.model_args, sort_keys=True) if run.model_args else "",
            model_label=run.summary["model"] + (f"@{variant}" if variant else "")
            + (f" ({args})" if args else ""),
            # The name's width multiplier (resnet20x2 -> 2) says nothing once the model args
            # set a width themselves (base_width=8): no "width 1" beside it.
            depth=depth, width=None if any("width" in k for k in run.model_args) else width,
        )
        row.update(curve_points(run.metrics))  # the community table's epochs (fork.py)
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in ("precision", "recipe", "recipe_name"):
        df[key] = df[key].fillna(MISSING)
    # Figures: a model trained on one dataset with several recipes or precisions is several
    # series (lines), never pooled; tables group on recipe and precision columns instead.
    combos = df.groupby(["dataset", "model_label"])[["recipe", "precision"]].apply(
        lambda g: len(g.drop_duplicates()))
    df["series"] = [
        f"{label} · {recipe}/{prec}" if combos[(ds, label)] > 1 else label
        for ds, label, recipe, prec in zip(df["dataset"], df["model_label"], df["recipe"],
                                           df["precision"], strict=True)
    ]
    df["_cond_order"] = [(kind != "clean", kind, rate)
                         for kind, rate in zip(df["noise_kind"], df["noise_rate"], strict=True)]
    return df


def _setting(value) -> str:
    """A recipe setting as `--set` spells it: 0.001, none, [0.08, 1.0]."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def runs_table(df: pd.DataFrame) -> str:
    """runs.csv: every finished run, every summary field, for dvc plots and ad-hoc analysis."""
    cols = ["run_id", *[c for c in df.columns if c not in ("run_id", "series", "_cond_order")]]
    out = df.sort_values("run_id")[cols].replace({None: np.nan})
    return out.to_csv(index=False, lineterminator="\n")


def metrics_json(df: pd.DataFrame) -> dict:
    """Flat per-run summary for `dvc metrics show`: accuracies in percent, as every table."""
    out = {}
    for row in df.sort_values("run_id").itertuples():
        out[row.run_id] = {
            name: _scaled(getattr(row, key), scale)
            for key, name, scale in (("tst_acc", "test_acc_pct", PCT),
                                     ("val_acc", "val_acc_pct", PCT), ("tst_nll", "test_nll", 1))
        } | {"diverged": int(row.status == DIVERGED), "status": row.status}
    return out


def model_metrics(df: pd.DataFrame) -> dict[str, dict]:
    """`dvc metrics show`'s compact table: one row (file) per dataset and model, mean test
    accuracy in percent per noise variant as columns, plus how many runs finished and diverged.

    Keyed by the file's path under metrics/, `<dataset>/<model label>.json`; a model trained
    on one dataset with several recipes or precisions gets one row for each.
    """
    out: dict[str, dict] = {}
    for (dataset, series), g in df.groupby(["dataset", "series"], sort=True):
        ok = g[g["status"] == OK]
        acc = {cond: _json_number(round(float(np.nanmean(v)), 2)) if np.isfinite(v).any()
               else None
               for cond, v in ((c, group_values(ok[ok["condition"] == c], "tst_acc", PCT))
                               for c in _ordered_conditions(g))}
        name = re.sub(r"[^A-Za-z0-9_.@=+-]+", "_", series).strip("_")
        out[f"{dataset}/{name}.json"] = {"test_acc_pct": acc, **run_counts(g, ok="runs")}
    return out


CURVE_COLUMNS = ("train_loss", "val_loss", "train_acc", "val_acc")


def curves(collection: Collection, df: pd.DataFrame) -> dict[str, str]:
    """Every finished run's metrics.csv curves, one TSV per dataset and metric, long format
    (run, step, value): `dvc plots show` draws one line per run (.dvc/plots/runs.json) and
    `dvc plots diff` the same runs at two revisions. Keyed `<metric>/<dataset>.tsv`, so
    dvc.yaml titles and labels each metric's directory once; runs named dataset/noise/
    model/seed, so a plot says which dataset it shows."""
    by_id = {run.run_id: run for run in collection.runs}
    out: dict[str, str] = {}
    for dataset, g in df.groupby("dataset", sort=True):
        for column in CURVE_COLUMNS:
            lines = [f"run\tstep\t{column}"]
            for run_id in sorted(g["run_id"]):
                m = by_id[run_id].metrics
                if m is None or column not in m.columns or "iteration" not in m.columns:
                    continue
                lines += [f"{run_id}\t{int(step)}\t{float(v)!r}"
                          for step, v in zip(m["iteration"], m[column], strict=True)
                          if np.isfinite(step) and np.isfinite(v)]
            if len(lines) > 1:
                out[f"{column}/{dataset}.tsv"] = "\n".join(lines) + "\n"
    return out


def _ordered_conditions(g: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(g.sort_values("_cond_order")["condition"]))


def _scaled(v, scale: float) -> float | None:
    """A summary number in the metrics' unit, rounded off float noise (0.925 -> 92.5)."""
    v = _json_number(v)
    return None if v is None else round(v * scale, 6)


def _json_number(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


# --------------------------------------------------------------------------- cells
def group_values(g: pd.DataFrame, col: str, scale: float = 1.0) -> np.ndarray:
    if col not in g.columns:
        return np.array([])
    v = pd.to_numeric(g[col], errors="coerce").to_numpy(dtype=float) * scale
    return v[np.isfinite(v)]


def stat(values: np.ndarray) -> tuple[float, float, int]:
    """(mean, sample std, n); std is NaN below two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else math.nan, n


def _failed_cell(g: pd.DataFrame) -> str:
    """The runs that are no result: diverged ones by iteration, every other status counted."""
    parts = [f"diverged@{int(v) if v is not None and np.isfinite(v) else '?'}"
             for v in g.loc[g["status"] == DIVERGED, "diverged_at"]]
    for status in FAILED:
        n = int((g["status"] == status).sum())
        if status != DIVERGED and n:
            parts.append(f"{n} {status}")
    return ", ".join(parts)


def metric_cell(g: pd.DataFrame, col: str, digits: int, scale: float = 1.0,
                fmt: Callable[[float], str] | None = None) -> str:
    """mean ± std over the group's ok runs; `(n=k)` when some of them lack the value."""
    ok = g[g["status"] == OK]
    if ok.empty:
        return _failed_cell(g)
    mean, std, n = stat(group_values(ok, col, scale))
    if n == 0:
        return MISSING
    fmt = fmt or (lambda v: f"{v:.{digits}f}")
    text = fmt(mean) + (f" ± {fmt(std)}" if n > 1 else "")
    return text + (f" (n={n})" if n < len(ok) else "")


def hms(seconds: float) -> str:
    """h:mm:ss, one readable form for every duration (a run of seconds or of days)."""
    if not math.isfinite(seconds):
        return MISSING
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def time_cell(g: pd.DataFrame, col: str = "wall_time_s") -> str:
    """Mean ± std of a duration in seconds, as h:mm:ss."""
    return metric_cell(g, col, 0, fmt=hms)


def params_digits(values) -> int:
    """Decimals of a parameter count in millions: two, or as many more (up to six, the unit)
    as it takes to tell every distinct count of one table apart (0.1765 beside 0.1781)."""
    v = np.unique(np.asarray([x for x in values if x is not None and math.isfinite(x)],
                             dtype=float))
    for digits in range(2, 7):
        if len({f"{x:.{digits}f}" for x in v}) == len(v) and all(
                x == 0 or abs(x) >= 10 ** (1 - digits) for x in v):
            return digits
    return 6


def fact_cell(g: pd.DataFrame, col: str, digits: int, scale: float = 1.0) -> str:
    """A property of the model (parameter count), not a result: every run counts, diverged too,
    and equal values across seeds show once."""
    v = group_values(g, col, scale)
    if len(v) == 0:
        return MISSING
    if np.allclose(v, v[0]):
        return f"{v[0]:.{digits}f}"
    mean, std, _ = stat(v)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def status_cell(g: pd.DataFrame) -> str:
    n_ok = int((g["status"] == OK).sum())
    failed = _failed_cell(g)
    if not failed:
        return OK
    return f"{n_ok} ok, {failed}" if n_ok else failed


def metric_csv(g: pd.DataFrame, col: str, name: str, scale: float = 1.0) -> dict:
    mean, std, _ = stat(group_values(g[g["status"] == OK], col, scale))
    return {f"{name}_mean": mean, f"{name}_std": std}


def pub_cell(value, digits: int, scale: float = 1.0,
             fmt: Callable[[float], str] | None = None) -> str:
    """A published value in the tables' unit (`scale`: a fraction to percent)."""
    try:
        value = float(value) * scale
    except (TypeError, ValueError):
        return MISSING
    if not math.isfinite(value):
        return MISSING
    return fmt(value) if fmt else f"{value:.{digits}f}"


def pub_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def run_groups(df: pd.DataFrame, keys: list[str]):
    order = df.sort_values(["_cond_order", "depth", "width", "model_label"],
                           key=lambda s: s.map(_sortable))
    return order.groupby(keys, sort=False, dropna=False)


def _sortable(v):
    return (1, 0) if v is None or (isinstance(v, float) and math.isnan(v)) else (0, v)


def run_counts(g: pd.DataFrame, ok: str = "seeds") -> dict:
    """How many runs are results (`ok`), and how many ended in each failed status
    (`diverged`, `non_finite`: a CSV column each, so none is silently dropped)."""
    return {ok: int((g["status"] == OK).sum()),
            **{s.replace("-", "_"): int((g["status"] == s).sum()) for s in FAILED}}


# --------------------------------------------------------------------------- the tables
def int_cell(v) -> str:
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))


def noise_table(dataset: str, df: pd.DataFrame) -> Table:
    """Model x noise rate; noise draws (tag suffix -s<seed>) pool with the training seeds."""
    md, rows = [], []
    ordered = df.sort_values(["model_label", "_cond_order"])
    for (label, condition, _, precision, recipe), g in ordered.groupby(
            ["model_label", "condition", "image_size", "precision", "recipe"], sort=False,
            dropna=False):
        first = g.iloc[0]
        md.append({
            "model": label, "noise": first["noise_kind"]  # + " (drawn)", if so
            + first["condition"][len(first["noise_condition"]):],
            "rate": f"{first['noise_rate']:g}", "px": int_cell(first["image_size"]),
            "seeds": str(run_counts(g)["seeds"]),
            TEST_ACC: metric_cell(g, "tst_acc", 2, PCT),
            TRAIN_CLEAN_ACC: metric_cell(g, "train_clean_acc", 2, PCT),
            BEST_TRAIN_LOSS: metric_cell(g, "best_train_loss", 3),
            BEST_VAL_LOSS: metric_cell(g, "best_val_loss", 3),
            "precision": precision, "recipe": recipe, "status": status_cell(g),
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"], "variant": first["variant"],
            "noise": condition, "noise_kind": first["noise_kind"],
            "noise_rate": first["noise_rate"], "noise_source": first["noise_source"],
            "image_size": first["image_size"], "precision": precision, "recipe": recipe,
            **run_counts(g),
            **metric_csv(g, "tst_acc", "test_acc_pct", PCT),
            **metric_csv(g, "train_clean_acc", "train_clean_acc_pct", PCT),
            **metric_csv(g, "best_train_loss", "best_train_loss"),
            **metric_csv(g, "best_val_loss", "best_val_loss"),
            "status": status_cell(g),
        })
    notes = ["Mean ± sample std over training seeds and noise draws (ok runs only; a draw "
             "never pools with a dataset's official noisy-label column, which reads without "
             "'(drawn)'); train acc on true labels: training accuracy against the clean labels "
             "(the last evaluation); the losses are the lowest cross-entropy of any evaluation, "
             "on the training labels (noisy where the run is) and on val. Training times and "
             "iteration rates: the speed table."] + selects_on_test_note(df)
    return Table(f"noise_{dataset}", f"{dataset}: test accuracy and losses against label noise",
                 md, rows, notes)


def incomplete_table(collection: Collection) -> Table:
    """Runs that are no result, listed so they are seen: those without summary.json, and
    finished ones whose status is not `ok` (each named by its status)."""
    md, rows = [], []
    for inc in sorted(collection.incomplete, key=lambda i: i.run_id):
        row = {"run": inc.run_id, "dataset": inc.dataset, "noise": inc.noise,
               "model": inc.model, "seed": inc.seed, "last iteration": int_cell(
                   inc.last_iteration), "elapsed (h:mm:ss)": _hms_or_missing(inc.elapsed_s),
               "status": "running/incomplete"}
        md.append(row)
        rows.append(_incomplete_csv(row, inc.last_iteration, inc.elapsed_s))
    failed = [run for run in collection.runs if run.summary["status"] != OK]
    for run in sorted(failed, key=lambda r: r.run_id):
        s = run.summary
        status = s["status"]
        if status == DIVERGED:
            status += f"@{int_cell(s.get('diverged_at'))}"
        last, elapsed = _number(s.get("iterations")), _number(s.get("wall_time_s"))
        row = {"run": run.run_id, "dataset": s["dataset"], "noise": s["noise"],
               "model": s["model"], "seed": str(s["seed"]), "last iteration": int_cell(last),
               "elapsed (h:mm:ss)": _hms_or_missing(elapsed), "status": status}
        md.append(row)
        rows.append(_incomplete_csv(row, last, elapsed))
    return Table("incomplete", "Runs that are no result: running, incomplete or failed", md,
                 rows, ["Running, crashed or interrupted (no summary.json), or finished with a "
                        "status other than ok (diverged: the training loss went non-finite; "
                        "non-finite: training was finite but the final evaluation was not): "
                        "none of these enter any mean of a table."])


def _hms_or_missing(seconds) -> str:
    return MISSING if seconds is None or not math.isfinite(seconds) else hms(seconds)


def _incomplete_csv(row: dict, last, elapsed) -> dict:
    """The CSV row: plain numbers, the duration in seconds (named so)."""
    out = {k: v for k, v in row.items() if k not in ("last iteration", "elapsed (h:mm:ss)")}
    return out | {"last_iteration": last, "elapsed_s": elapsed}


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def variants_table(df: pd.DataFrame) -> Table | None:
    """Variants of one model side by side on val (an lr sweep: the best row is the lr to use).

    Chosen on val accuracy, never test: the `best on val` mark is what a tuned config copies.
    """
    sel = df[df["variant"] != ""]
    if sel.empty:
        return None
    md, rows = [], []
    for (dataset, model, condition), g in run_groups(sel, ["dataset", "model", "condition"]):
        ok = g[g["status"] == OK]
        means = ok.groupby("variant")["val_acc"].mean() if len(ok) else pd.Series(dtype=float)
        best = means.idxmax() if len(means) and means.notna().any() else None
        for variant, v in g.groupby("variant", sort=True):
            md.append({"dataset": dataset, "model": model, "noise": condition,
                       "variant": variant, "seeds": str(run_counts(v)["seeds"]),
                       VAL_ACC: metric_cell(v, "val_acc", 2, PCT),
                       BEST_VAL_LOSS: metric_cell(v, "best_val_loss", 3),
                       "best on val": "yes" if variant == best else "",
                       "status": status_cell(v)})
            rows.append({"dataset": dataset, "model": model, "noise": condition,
                         "variant": variant, **run_counts(v),
                         **metric_csv(v, "val_acc", "val_acc_pct", PCT),
                         "best_on_val": variant == best, "status": status_cell(v)})
    return Table("variants", "Variants (e.g. a learning-rate sweep) chosen on val", md, rows,
                 ["Mean ± sample std over seeds (ok runs only). 'best on val' marks the "
                  "variant with the highest mean val accuracy per dataset, model and noise; "
                  "test accuracy plays no part in the choice."])
