"""Tables: ours as mean ± std over seeds, the published value beside ours where one exists.

Means and stds are over the runs that finished with status `ok`; a diverged run never enters
a mean: it is named in the status column, and a cell whose runs all diverged reads
`diverged@<iteration>`. Standard deviations are sample stds (ddof=1); one run shows no ±.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lambdapipe.reference import (
    PUBLISHED_DATASET,
    PUBLISHED_IMAGE_SIZE,
    PUBLISHED_PRECISION,
    PUBLISHED_RECIPE,
    arch_key,
    depth_width,
)
from lambdapipe.report.load import SUMMARY_FIELDS, Collection

MISSING = "—"
STAND_IN_NOTE = (" {dataset} is a demo-size stand-in for {source}: rows are matched on the "
                 "model, precision and recipe, ignoring model args, image size, budget and "
                 "batch size, so the published column is context, not a like-for-like "
                 "comparison.")
LAMBDA_TABLE_MODELS = re.compile(r"(?:lambda_)?resnet(?:18|50)(?:_u\d+_r\d+)?")
# The paper's Lambda-ResNet defaults: query depth k=16, heads h=4, intra-depth u=1, scope r=23.
LAMBDA_DEFAULTS = {"k": 16, "h": 4, "u": 1, "r": 23}
# Recipe fields whose change (summary.json `recipe_changes`) leaves the experiment the named
# recipe's: precision is a column of its own, the rest change speed or what is logged.
NOT_RECIPE = frozenset({"description", "precision", "channels_last", "compile", "tf32",
                        "track_test_every_eval"})
# What a demo-size stand-in (config `shrink.set`) changes on purpose: budget and batch.
SHRUNK = frozenset({"iterations", "epochs", "eval_every", "eval_every_epochs", "batch_size"})


@dataclass
class Table:
    """One table in two renderings: markdown for people, CSV (plain numbers) for tools."""

    name: str
    title: str
    md_rows: list[dict[str, str]]
    csv_rows: list[dict[str, object]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.md_rows:
            header = list(self.md_rows[0])
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(" --- " for _ in header) + "|")
            for row in self.md_rows:
                lines.append("| " + " | ".join(str(row[h]).replace("|", "\\|")
                                                for h in header) + " |")
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
        variant = run.path.parent.name.partition("@")[2]
        dataset = run.summary["dataset"]
        changes = run.summary.get("recipe_changes")
        changes = {k: v for k, v in (changes if isinstance(changes, dict) else {}).items()
                   if k not in NOT_RECIPE}
        name = run.summary.get("recipe")
        row.update(
            recipe_name=name, recipe_changed=bool(changes),
            recipe_changed_beyond_shrink=bool(set(changes) - SHRUNK),
            # A changed recipe is another recipe: its own rows, never the published one's.
            recipe=f"{name} ({', '.join(f'{k}={_setting(v)}' for k, v in sorted(changes.items()))})"
            if changes and name else name,
        )
        row.update(
            variant=variant, published_dataset=published_as.get(dataset, dataset),
            stand_in=dataset in published_as,
            run_id=run.run_id, noise_kind=run.noise.kind, noise_rate=run.noise.rate,
            noise_seed=run.noise.seed, condition=run.noise.condition,
            model_args=json.dumps(run.model_args, sort_keys=True) if run.model_args else "",
            model_label=run.summary["model"] + (f"@{variant}" if variant else "")
            + (f" ({args})" if args else ""),
            depth=depth, width=width,
        )
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


def like_published(first: pd.Series, table: str, published_dataset: str | None = None) -> bool:
    """Whether a group's runs were trained like the published table's rows: the source's
    recipe unchanged, its precision and image size (reference.PUBLISHED_*). A stand-in
    (a demo-size run of the grid) shrinks budget, batch, image size and widths on purpose:
    it is compared on the rest of the recipe and the precision; its table says so."""
    if first["recipe_name"] != PUBLISHED_RECIPE[table]:
        return False
    precision = PUBLISHED_PRECISION.get(table)
    if precision is not None and first["precision"] != precision:
        return False
    if first["stand_in"]:
        return not first["recipe_changed_beyond_shrink"]
    size = PUBLISHED_IMAGE_SIZE.get(published_dataset or table)
    if size is not None and not (pd.notna(first.get("image_size"))
                                 and int(first["image_size"]) == size):
        return False
    return not first["recipe_changed"]


def runs_table(df: pd.DataFrame) -> str:
    """runs.csv: every finished run, every summary field, for dvc plots and ad-hoc analysis."""
    cols = ["run_id", *[c for c in df.columns if c not in ("run_id", "series", "_cond_order")]]
    out = df.sort_values("run_id")[cols].replace({None: np.nan})
    return out.to_csv(index=False, lineterminator="\n")


def metrics_json(df: pd.DataFrame) -> dict:
    """Flat per-run summary for `dvc metrics show`."""
    out = {}
    for row in df.sort_values("run_id").itertuples():
        out[row.run_id] = {
            key: _json_number(getattr(row, key)) for key in ("tst_acc", "val_acc", "tst_nll")
        } | {"diverged": int(row.status == "diverged"), "status": row.status}
    return out


def model_metrics(df: pd.DataFrame) -> dict[str, dict]:
    """`dvc metrics show`'s compact table: one row (file) per dataset and model, mean test
    accuracy per noise variant as columns, plus how many runs finished and diverged.

    Keyed by the file's path under metrics/, `<dataset>/<model label>.json`; a model trained
    on one dataset with several recipes or precisions gets one row for each.
    """
    out: dict[str, dict] = {}
    for (dataset, series), g in df.groupby(["dataset", "series"], sort=True):
        ok = g[g["status"] == "ok"]
        acc = {cond: _json_number(round(float(np.nanmean(v)), 4)) if np.isfinite(v).any()
               else None
               for cond, v in ((c, _values(ok[ok["condition"] == c], "tst_acc"))
                               for c in _ordered_conditions(g))}
        name = re.sub(r"[^A-Za-z0-9_.@=+-]+", "_", series).strip("_")
        out[f"{dataset}/{name}.json"] = {"tst_acc": acc, "runs": int(len(ok)),
                                         "diverged": int((g["status"] == "diverged").sum())}
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


def _json_number(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


# --------------------------------------------------------------------------- cells
def _values(g: pd.DataFrame, col: str, scale: float = 1.0) -> np.ndarray:
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


def _diverged_cell(g: pd.DataFrame) -> str:
    """The runs that are no result: diverged ones by iteration, non-finite ones counted."""
    its = []
    for v in g.loc[g["status"] == "diverged", "diverged_at"]:
        its.append(str(int(v)) if v is not None and np.isfinite(v) else "?")
    parts = [f"diverged@{it}" for it in its]
    nonfinite = int((g["status"] == "non-finite").sum())
    if nonfinite:
        parts.append(f"{nonfinite} non-finite")
    return ", ".join(parts)


def metric_cell(g: pd.DataFrame, col: str, digits: int, scale: float = 1.0) -> str:
    """mean ± std over the group's ok runs; `(n=k)` when some of them lack the value."""
    ok = g[g["status"] == "ok"]
    if ok.empty:
        return _diverged_cell(g)
    mean, std, n = stat(_values(ok, col, scale))
    if n == 0:
        return MISSING
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    return text + (f" (n={n})" if n < len(ok) else "")


def fact_cell(g: pd.DataFrame, col: str, digits: int, scale: float = 1.0) -> str:
    """A property of the model (parameter count), not a result: every run counts, diverged too,
    and equal values across seeds show once."""
    v = _values(g, col, scale)
    if len(v) == 0:
        return MISSING
    if np.allclose(v, v[0]):
        # Tiny test-width models would all read 0.00 M at the published precision.
        return f"{v[0]:.{digits}f}" if abs(v[0]) >= 10 ** (1 - digits) else f"{v[0]:.3g}"
    mean, std, _ = stat(v)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def status_cell(g: pd.DataFrame) -> str:
    n_ok = int((g["status"] == "ok").sum())
    diverged = _diverged_cell(g)
    if not diverged:
        return "ok"
    return f"{n_ok} ok, {diverged}" if n_ok else diverged


def metric_csv(g: pd.DataFrame, col: str, name: str, scale: float = 1.0) -> dict:
    mean, std, _ = stat(_values(g[g["status"] == "ok"], col, scale))
    return {f"{name}_mean": mean, f"{name}_std": std}


def pub_cell(value, digits: int) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return MISSING
    return MISSING if not math.isfinite(value) else f"{value:.{digits}f}"


def _pub_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _groups(df: pd.DataFrame, keys: list[str]):
    order = df.sort_values(["_cond_order", "depth", "width", "model_label"],
                           key=lambda s: s.map(_sortable))
    return order.groupby(keys, sort=False, dropna=False)


def _sortable(v):
    return (1, 0) if v is None or (isinstance(v, float) and math.isnan(v)) else (0, v)


def _counts(g: pd.DataFrame) -> dict:
    return {"seeds": int((g["status"] == "ok").sum()),
            "diverged": int((g["status"] == "diverged").sum())}


# --------------------------------------------------------------------------- the tables
def baseline_table(dataset: str, df: pd.DataFrame, published: pd.DataFrame) -> Table:
    """The published ResNet baseline format, ours beside the published row of the same
    dataset, depth, width and precision (ResNets trained on clean labels, no model overrides)."""
    stand_in = bool(df["stand_in"].any())
    pub_ds = PUBLISHED_DATASET.get(df["published_dataset"].iloc[0] if len(df) else dataset)
    md, rows = [], []
    for (label, condition, precision, recipe), g in _groups(
            df, ["model_label", "condition", "precision", "recipe"]):
        first = g.iloc[0]
        depth, width = first["depth"], first["width"]
        pub = None
        if (pub_ds and condition == "clean" and (stand_in or not first["model_args"])
                and re.fullmatch(r"resnet\d+(x\d+)?", first["model"])
                and like_published(first, "resnet", pub_ds)):
            hit = published[(published["dataset"] == pub_ds) & (published["depth"] == depth)
                            & (published["width"] == width)
                            & (published["precision"] == precision)]
            pub = hit.iloc[0] if len(hit) else None

        def p(col, digits, pub=pub):
            return pub_cell(pub[col] if pub is not None else None, digits)

        md.append({
            "model": label, "noise": condition,
            "depth": _int_cell(depth), "width": _int_cell(width),
            "params (M)": fact_cell(g, "params", 2, 1e-6), "published params (M)":
                p("params_m", 2),
            "seeds": str(_counts(g)["seeds"]),
            "val/acc": metric_cell(g, "val_acc", 3), "published val/acc": p("val_acc", 3),
            "tst/acc": metric_cell(g, "tst_acc", 3), "published tst/acc": p("test_acc", 3),
            "tst/nll": metric_cell(g, "tst_nll", 3), "published tst/nll": p("test_nll", 3),
            "iter/min": metric_cell(g, "iter_per_min", 0),
            "published iter/min": p("iter_per_min", 0),
            "training time (h)": metric_cell(g, "wall_time_s", 2, 1 / 3600),
            "published training time (h)": p("training_time_h", 1),
            "precision": precision, "recipe": recipe, "status": status_cell(g),
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"], "variant": first["variant"],
            "noise": condition, "depth": depth, "width": width, "precision": precision,
            "recipe": recipe, **_counts(g),
            **metric_csv(g, "params", "params_m", 1e-6),
            "params_m_published": _pub_float(pub["params_m"]) if pub is not None else math.nan,
            **_with_pub(g, pub, [("val_acc", "val_acc"), ("tst_acc", "test_acc"),
                                 ("tst_nll", "test_nll"), ("iter_per_min", "iter_per_min")]),
            **metric_csv(g, "wall_time_s", "training_time_h", 1 / 3600),
            "training_time_h_published":
                _pub_float(pub["training_time_h"]) if pub is not None else math.nan,
            "status": status_cell(g),
        })
    published_note = (f"Published: {pub_ds} rows, beside ResNets on clean labels without "
                      "model overrides of the same depth, width, precision and image size, "
                      f"trained with recipe {PUBLISHED_RECIPE['resnet']} unchanged; other "
                      "rows read '—'. Training time: ours is the run's wall-clock time "
                      "(summary wall_time_s), the published one the tables' hours on one "
                      "RTX 3090 (ResNet-18 only)." if pub_ds
                      else f"No published baselines for {dataset}.")
    if pub_ds and stand_in:
        published_note += STAND_IN_NOTE.format(dataset=dataset, source=pub_ds)
    notes = ["Mean ± sample std over seeds (ok runs only); accuracies are fractions. "
             + published_note]
    return Table(f"baselines_{dataset}", f"{dataset}: results against the published ResNet "
                 "baselines", md, rows, notes)


def _with_pub(g: pd.DataFrame, pub, pairs) -> dict:
    out = {}
    for ours, theirs in pairs:
        out |= metric_csv(g, ours, ours)
        out[f"{ours}_published"] = _pub_float(pub[theirs]) if pub is not None else math.nan
    return out


def _int_cell(v) -> str:
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))


def noise_table(dataset: str, df: pd.DataFrame) -> Table:
    """Model x noise rate; noise draws (tag suffix -s<seed>) pool with the training seeds."""
    md, rows = [], []
    ordered = df.sort_values(["model_label", "_cond_order"])
    for (label, condition, precision, recipe), g in ordered.groupby(
            ["model_label", "condition", "precision", "recipe"], sort=False):
        first = g.iloc[0]
        md.append({
            "model": label, "noise": first["noise_kind"],
            "rate": f"{first['noise_rate']:g}", "seeds": str(_counts(g)["seeds"]),
            "tst/acc": metric_cell(g, "tst_acc", 3),
            "train clean acc": metric_cell(g, "train_clean_acc", 3),
            "best train loss": metric_cell(g, "best_train_loss", 3),
            "best val loss": metric_cell(g, "best_val_loss", 3),
            "training time (s)": metric_cell(g, "wall_time_s", 0),
            "precision": precision, "recipe": recipe, "status": status_cell(g),
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"], "variant": first["variant"],
            "noise": condition, "noise_kind": first["noise_kind"],
            "noise_rate": first["noise_rate"], "precision": precision, "recipe": recipe,
            **_counts(g),
            **metric_csv(g, "tst_acc", "tst_acc"),
            **metric_csv(g, "train_clean_acc", "train_clean_acc"),
            **metric_csv(g, "best_train_loss", "best_train_loss"),
            **metric_csv(g, "best_val_loss", "best_val_loss"),
            **metric_csv(g, "wall_time_s", "wall_time_s"),
            "status": status_cell(g),
        })
    notes = ["Mean ± sample std over training seeds and noise draws (ok runs only); "
             "train clean acc is training accuracy against the true labels."]
    return Table(f"noise_{dataset}", f"{dataset}: test accuracy and losses against label noise",
                 md, rows, notes)


def lambda_hyper(model: str, model_args: dict) -> dict[str, int | None]:
    """k, h, u, r of a Lambda-ResNet name (`lambda_resnet18_u4_r7`), then its model args."""
    if not model.startswith("lambda_"):
        return dict.fromkeys(LAMBDA_DEFAULTS)
    hyper = dict(LAMBDA_DEFAULTS)
    m = re.search(r"_u(\d+)_r(\d+)$", model)
    if m:
        hyper["u"], hyper["r"] = int(m.group(1)), int(m.group(2))
    for key in hyper:
        if isinstance(model_args.get(key), int):
            hyper[key] = model_args[key]
    return hyper


def lambda_table(df: pd.DataFrame, published: pd.DataFrame) -> Table | None:
    """Our CIFAR-10 Lambda-ResNet-18/50 and ResNet-18/50 runs beside the community table."""
    sel = df[(df["published_dataset"] == "cifar10") & (df["condition"] == "clean")
             & df["model"].map(lambda m: bool(LAMBDA_TABLE_MODELS.fullmatch(m)))]
    if sel.empty:
        return None
    md, rows = [], []
    for (label, precision, recipe), g in _groups(sel, ["model_label", "precision", "recipe"]):
        first = g.iloc[0]
        args = json.loads(first["model_args"]) if first["model_args"] else {}
        hyper = lambda_hyper(first["model"], args)
        pub = None
        if (first["stand_in"] or set(args) <= set(LAMBDA_DEFAULTS)) and like_published(
                first, "lambda"):
            if first["model"].startswith("lambda_"):
                hit = published[(published["model"] == f"LambdaResNet{first['depth']}")
                                & (published["k"] == hyper["k"]) & (published["h"] == hyper["h"])
                                & (published["u"] == hyper["u"]) & (published["m"] == hyper["r"])]
            else:
                hit = published[published["model"] == f"ResNet{first['depth']} baseline"]
            pub = hit.iloc[0] if len(hit) else None

        def p(col, digits, pub=pub):
            return pub_cell(pub[col] if pub is not None else None, digits)

        md.append({
            "model": label, **{k: _int_cell(v) for k, v in hyper.items()},
            "params (M)": fact_cell(g, "params", 2, 1e-6),
            "published params (M)": p("params_m", 1), "seeds": str(_counts(g)["seeds"]),
            "tst/acc (%)": metric_cell(g, "tst_acc", 2, 100.0),
            "best tst/acc seen (%)": metric_cell(g, "tst_acc_best_seen", 2, 100.0),
            "published tst/acc (%)": p("test_acc_pct", 2),
            "published epochs": p("epochs", 0),
            "precision": precision, "recipe": recipe, "status": status_cell(g),
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"], "variant": first["variant"],
            **hyper, "precision": precision, "recipe": recipe, **_counts(g),
            **metric_csv(g, "params", "params_m", 1e-6),
            "params_m_published": _pub_float(pub["params_m"]) if pub is not None else math.nan,
            **metric_csv(g, "tst_acc", "tst_acc_pct", 100.0),
            **metric_csv(g, "tst_acc_best_seen", "tst_acc_best_seen_pct", 100.0),
            "tst_acc_pct_published":
                _pub_float(pub["test_acc_pct"]) if pub is not None else math.nan,
            "status": status_cell(g),
        })
    notes = ["k = query depth, h = heads, u = intra-depth, r = scope (the community table's m). "
             "Published: the LambdaNetworks community implementation's CIFAR-10 table, beside "
             f"runs at 32 px in fp32 trained with recipe {PUBLISHED_RECIPE['lambda']} "
             "unchanged (its ResNet baseline rows are kuangliu/pytorch-cifar's, quoted by "
             "the source, whose recipe differs); '—' where it has no row or no accuracy, or "
             "the run was trained otherwise. tst/acc is best.ckpt's (chosen on val); "
             "'best tst/acc seen' is the source's way of reading: the highest test accuracy "
             "of any evaluation during training (recipe flag track_test_every_eval), an "
             "optimistic number shown only so the gap is visible."]
    if sel["stand_in"].any():
        notes[0] += STAND_IN_NOTE.format(dataset=", ".join(sorted(sel["dataset"].unique())),
                                         source="cifar10")
    return Table("lambda_cifar10", "cifar10: Lambda-ResNets against the community table",
                 md, rows, notes)


def imagenette_table(df: pd.DataFrame, published: pd.DataFrame) -> Table | None:
    """The Imagenette noisy-label study: losses and time beside the published report."""
    sel = df[df["published_dataset"].str.startswith("imagenette")]
    if sel.empty:
        return None
    keys = published["architecture"].map(arch_key)
    md, rows = [], []
    for (dataset, label, condition, precision, recipe), g in _groups(
            sel, ["dataset", "model_label", "condition", "precision", "recipe"]):
        first = g.iloc[0]
        pub = None
        # The published study corrupts labels uniformly: clean and symmetric noise match.
        if ((first["stand_in"] or not first["model_args"])
                and first["noise_kind"] in ("clean", "symmetric")
                and like_published(first, "imagenette")):
            hit = published[(keys == first["model"]) & np.isclose(
                pd.to_numeric(published["noise_pct"], errors="coerce"),
                100 * first["noise_rate"])]
            pub = hit.iloc[0] if len(hit) else None

        def p(col, digits, pub=pub):
            return pub_cell(pub[col] if pub is not None else None, digits)

        md.append({
            "dataset": dataset, "model": label, "noise": condition,
            "seeds": str(_counts(g)["seeds"]),
            "best train loss": metric_cell(g, "best_train_loss", 3),
            "published best train loss": p("best_train_loss", 3),
            "best val loss": metric_cell(g, "best_val_loss", 3),
            "published best val loss": p("best_val_loss", 3),
            "training time (s)": metric_cell(g, "wall_time_s", 0),
            "published training time (s)": p("training_time_s", 0),
            "tst/acc": metric_cell(g, "tst_acc", 3),
            "train clean acc": metric_cell(g, "train_clean_acc", 3),
            "precision": precision, "recipe": recipe, "status": status_cell(g),
        })
        rows.append({
            "dataset": dataset, "model": first["model"], "model_args": first["model_args"],
            "variant": first["variant"],
            "noise": condition, "noise_kind": first["noise_kind"],
            "noise_rate": first["noise_rate"], "precision": precision, "recipe": recipe,
            **_counts(g),
            **_with_pub(g, pub, [("best_train_loss", "best_train_loss"),
                                 ("best_val_loss", "best_val_loss"),
                                 ("wall_time_s", "training_time_s")]),
            **metric_csv(g, "tst_acc", "tst_acc"),
            **metric_csv(g, "train_clean_acc", "train_clean_acc"),
            "status": status_cell(g),
        })
    notes = ["Published: the Imagenette noisy-label report (uniform noise; LR18_L3(lc) is our "
             f"lr18_l3_lc), beside runs in fp32 trained with recipe "
             f"{PUBLISHED_RECIPE['imagenette']} unchanged (the report states no image size). "
             "Training time is wall-clock seconds, ours from summary wall_time_s, the "
             "published converted from the report's h m s (P100 GPUs for the "
             "Lambda-ResNets, the authors' own computers for the ResNets): it depends on "
             "the hardware."]
    if sel["stand_in"].any():
        notes[0] += STAND_IN_NOTE.format(dataset=", ".join(sorted(sel["dataset"].unique())),
                                         source="imagenette")
    return Table("imagenette_noisy", "Imagenette: noisy-label study against the published "
                 "report", md, rows, notes)


def incomplete_table(collection: Collection) -> Table:
    """Runs without summary.json: listed so they are seen, never reported as results."""
    md, rows = [], []
    for inc in sorted(collection.incomplete, key=lambda i: i.run_id):
        row = {"run": inc.run_id, "dataset": inc.dataset, "noise": inc.noise,
               "model": inc.model, "seed": inc.seed, "last iteration": _int_cell(
                   inc.last_iteration), "elapsed (s)": _int_cell(inc.elapsed_s),
               "status": "running/incomplete"}
        md.append(row)
        rows.append({**row, "last iteration": inc.last_iteration, "elapsed (s)": inc.elapsed_s})
    return Table("incomplete", "Runs without summary.json (running/incomplete)", md, rows,
                 ["Running, crashed or interrupted: none of these enter any table or figure."])


def variants_table(df: pd.DataFrame) -> Table | None:
    """Variants of one model side by side on val (an lr sweep: the best row is the lr to use).

    Chosen on val accuracy, never test: the `best on val` mark is what a tuned config copies.
    """
    sel = df[df["variant"] != ""]
    if sel.empty:
        return None
    md, rows = [], []
    for (dataset, model, condition), g in _groups(sel, ["dataset", "model", "condition"]):
        ok = g[g["status"] == "ok"]
        means = ok.groupby("variant")["val_acc"].mean() if len(ok) else pd.Series(dtype=float)
        best = means.idxmax() if len(means) and means.notna().any() else None
        for variant, v in g.groupby("variant", sort=True):
            md.append({"dataset": dataset, "model": model, "noise": condition,
                       "variant": variant, "seeds": str(_counts(v)["seeds"]),
                       "val/acc": metric_cell(v, "val_acc", 3),
                       "best val loss": metric_cell(v, "best_val_loss", 3),
                       "best on val": "yes" if variant == best else "",
                       "status": status_cell(v)})
            rows.append({"dataset": dataset, "model": model, "noise": condition,
                         "variant": variant, **_counts(v), **metric_csv(v, "val_acc", "val_acc"),
                         "best_on_val": variant == best, "status": status_cell(v)})
    return Table("variants", "Variants (e.g. a learning-rate sweep) chosen on val", md, rows,
                 ["Mean ± sample std over seeds (ok runs only). 'best on val' marks the "
                  "variant with the highest mean val accuracy per dataset, model and noise; "
                  "test accuracy plays no part in the choice."])
