"""The tables beside published values: the ResNet baselines, the community Lambda-ResNet
CIFAR-10 table, and the Imagenette noisy-label report.

Each published row is described as a `reference.Setting` (what the source trained); a group
of our runs gets a published value only when `reference.differences` finds nothing unlike
(compare.match), else '—' and the `unlike published` column says why. Every published value
that stands beside runs also becomes a `compare.PublishedCell` for the verdict table.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from lambdapipe.reference import (
    CLEAN,
    FORK_RECIPES,
    IMAGENETTE_DATASETS,
    KUANGLIU,
    OFFICIAL_CSV,
    PUBLISHED_DATASET,
    PUBLISHED_IMAGE_SIZE,
    PUBLISHED_PRECISION,
    PUBLISHED_RECIPE,
    PUBLISHED_VAL_IS_OUR_TEST,
    Setting,
    arch_key,
    baseline_recipe,
    lambda_recipe,
    model_identity,
    resnet_name,
)
from lambdapipe.report.compare import PublishedCell, match, published_cells, setting_of
from lambdapipe.report.fork import CURVE_EPOCHS, curve_columns
from lambdapipe.report.tables import (
    BEST_TRAIN_LOSS,
    BEST_VAL_LOSS,
    MISSING,
    PCT,
    TEST_ACC,
    TEST_NLL,
    TIME,
    TRAIN_CLEAN_ACC,
    VAL_ACC,
    Table,
    fact_cell,
    hms,
    int_cell,
    metric_cell,
    metric_csv,
    params_digits,
    pub_cell,
    pub_float,
    run_counts,
    run_groups,
    status_cell,
    time_cell,
)

STAND_IN_NOTE = (" {dataset} is a demo-size stand-in for {source}: rows are matched on the "
                 "model, precision, recipe and noise rate, ignoring model args, image size, "
                 "budget and batch size, so the published column is context, not a "
                 "like-for-like comparison (and gets no verdict).")
LAMBDA_TABLE_MODELS = re.compile(r"(?:lambda_)?resnet(?:18|50)(?:_u\d+_r\d+)?")
# Every table groups on all fields of the like-for-like rule, so a group's runs share one
# Setting: a published value beside a group stands beside each of its runs.
SETTING_KEYS = ["dataset", "image_size", "model_label", "precision", "recipe", "condition"]
# (our column, published column, label, digits, scale of ours, scale of the published value):
# both scaled to the unit the tables show (accuracies in percent).
BASELINE_VERDICTS = [("val_acc", "val_acc", VAL_ACC, 2, PCT, PCT),
                     ("tst_acc", "test_acc", TEST_ACC, 2, PCT, PCT),
                     ("tst_nll", "test_nll", TEST_NLL, 3, 1.0, 1.0)]
LAMBDA_VERDICTS = [("tst_acc", "test_acc_pct", TEST_ACC, 2, PCT, 1.0)]
IMAGENETTE_VERDICTS = [("best_train_loss", "best_train_loss", BEST_TRAIN_LOSS, 3, 1.0, 1.0),
                       ("best_val_loss", "best_val_loss", BEST_VAL_LOSS, 3, 1.0, 1.0)]


def _published(g: pd.DataFrame, candidates, table: str, metrics, cells: list[PublishedCell]):
    """(published row or None, why not) of a group; its verdict cells appended to `cells`
    unless the group is a stand-in (context, not a reproduction)."""
    first = g.iloc[0]
    pub, why = match(setting_of(first), candidates, bool(first["stand_in"]))
    if not first["stand_in"]:
        cells += published_cells(table, g, pub, metrics)
    return pub, "; ".join(why)


# --------------------------------------------------------------------------- ResNet baselines
def resnet_settings(published: pd.DataFrame, source: str) -> list[tuple[Setting, pd.Series]]:
    """The baseline table's rows of one of our datasets, each as what it trained."""
    pub_ds = PUBLISHED_DATASET.get(source)
    out = []
    for _, row in published[published["dataset"] == pub_ds].iterrows():
        if pub_ds in PUBLISHED_VAL_IS_OUR_TEST:  # the official val set is our test split
            row = row.copy()
            row["test_acc"], row["val_acc"] = row["val_acc"], math.nan
        out.append((Setting(source, PUBLISHED_IMAGE_SIZE[pub_ds],
                            resnet_name(int(row["depth"]), int(row["width"])), (),
                            row["precision"], baseline_recipe(pub_ds, str(row["notes"]))), row))
    return out


def baseline_table(dataset: str, df: pd.DataFrame, published: pd.DataFrame,
                   cells: list[PublishedCell]) -> Table:
    """The published ResNet baseline format, ours beside the published row trained alike."""
    stand_in = bool(df["stand_in"].any())
    source = df["published_dataset"].iloc[0] if len(df) else dataset
    pub_ds = PUBLISHED_DATASET.get(source)
    candidates = resnet_settings(published, source)
    digits = params_digits(df["params"] * 1e-6)
    v2 = "test_v2_acc" in df.columns and df["test_v2_acc"].notna().any()  # ImageNet-V2
    md, rows = [], []
    for _, g in run_groups(df, SETTING_KEYS):
        first = g.iloc[0]
        depth, width, precision, recipe = (first["depth"], first["width"],
                                           first["precision"], first["recipe"])
        pub, why = _published(g, candidates, f"baselines_{dataset}", BASELINE_VERDICTS, cells)

        def p(col, digits, scale=1.0, pub=pub):
            return pub_cell(pub[col] if pub is not None else None, digits, scale)

        md.append({
            "model": first["model_label"], "noise": first["condition"],
            "depth": int_cell(depth), "width": int_cell(width),
            "px": int_cell(first["image_size"]),
            "params (M)": fact_cell(g, "params", digits, 1e-6), "published params (M)":
                p("params_m", 2),
            "seeds": str(run_counts(g)["seeds"]),
            VAL_ACC: metric_cell(g, "val_acc", 2, PCT), f"published {VAL_ACC}":
                p("val_acc", 2, PCT),
            TEST_ACC: metric_cell(g, "tst_acc", 2, PCT), f"published {TEST_ACC}":
                p("test_acc", 2, PCT),
            TEST_NLL: metric_cell(g, "tst_nll", 3), f"published {TEST_NLL}": p("test_nll", 3),
            **({V2_ACC: metric_cell(g, "test_v2_acc", 2, PCT)} if v2 else {}),
            "precision": precision, **_skipped_cells(g, precision, pub),
            "recipe": recipe, "status": status_cell(g), "unlike published": why,
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"], "variant": first["variant"],
            "noise": first["condition"], "depth": depth, "width": width,
            "image_size": first["image_size"], "precision": precision,
            "recipe": recipe, **run_counts(g),
            **metric_csv(g, "params", "params_m", 1e-6),
            "params_m_published": pub_float(pub["params_m"]) if pub is not None else math.nan,
            **_with_pub(g, pub, [("val_acc", "val_acc", "val_acc_pct", PCT),
                                 ("tst_acc", "test_acc", "test_acc_pct", PCT),
                                 ("tst_nll", "test_nll", "test_nll", 1.0)]),
            **(metric_csv(g, "test_v2_acc", "test_v2_acc_pct", PCT) if v2 else {}),
            **metric_csv(g, "skipped_steps", "skipped_steps"),
            "nan_grads_published": _nan_grads(pub),
            "status": status_cell(g), "unlike_published": why,
        })
    recipes = " / ".join(sorted({s.recipe for s, _ in candidates if s.recipe})
                         or [PUBLISHED_RECIPE["resnet"]])
    if pub_ds in PUBLISHED_VAL_IS_OUR_TEST:
        recipes += (" (their val acc, on the official ImageNet validation set, stands beside "
                    "our test acc: our val split is held out of the training set)")
    published_note = (f"Published: {pub_ds} rows, beside ResNets trained alike: clean labels, "
                      "no model overrides, the same depth, width, precision and image size, "
                      f"recipe {recipes} unchanged; other rows read '—' "
                      "and 'unlike published' says what differs. Training times and "
                      f"iteration rates: speed_{dataset}." if pub_ds
                      else f"No published baselines for {dataset}.")
    if pub_ds and stand_in:
        published_note += STAND_IN_NOTE.format(dataset=dataset, source=pub_ds)
    notes = ["Mean ± sample std over seeds (ok runs only); accuracies in percent. "
             + published_note + (SKIPPED_NOTE if (df["precision"] == "fp16").any() else "")
             + (V2_NOTE if v2 else "")]
    return Table(f"baselines_{dataset}", f"{dataset}: results against the published ResNet "
                 "baselines", md, rows, notes)


V2_ACC = "ImageNet-V2 acc (%)"
V2_NOTE = (" 'ImageNet-V2 acc': best.ckpt on ImageNet-V2 matched frequency (summary.json "
           "test_v2_acc), the extra test set; the published CSV holds no value for it.")
SKIPPED_NOTE = (" fp16 runs: 'skipped steps' counts the steps the loss scaler skipped on "
                "inf/nan gradients (summary.json skipped_steps), beside the published row's "
                "`nan-grads` mark ('published nan-grads': yes where the source's fp16 run "
                "had inf/nan gradients).")


def _nan_grads(pub) -> bool | float:
    """The published row's nan_grads flag (the source's `nan-grads` mark), NaN without one."""
    if pub is None or pd.isna(pub.get("nan_grads")):
        return math.nan
    return str(pub["nan_grads"]).strip().lower() == "true"


def _skipped_cells(g: pd.DataFrame, precision: str, pub) -> dict[str, str]:
    """fp16 only (bf16 and fp32 train without a loss scaler, so nothing is skipped): our
    skipped steps per run, and the published fp16 row's `nan-grads` mark."""
    if precision != "fp16":
        return {"skipped steps": MISSING, "published nan-grads": MISSING}
    flag = _nan_grads(pub) if pub is not None and pub.get("precision") == "fp16" else math.nan
    return {"skipped steps": metric_cell(g, "skipped_steps", 0),
            "published nan-grads": {True: "yes", False: "no"}.get(flag, MISSING)}


def speed_table(dataset: str, df: pd.DataFrame, published: dict[str, pd.DataFrame]) -> Table:
    """Iteration rates and training times apart from the results: they measure the machine
    (a shared CPU for a demo) as much as the model. Beside them the source's own, where the
    results table puts a published row beside the runs (the ResNet baselines' RTX 3090
    rates and hours; the Imagenette report's times)."""
    source = df["published_dataset"].iloc[0] if len(df) else dataset
    if source in IMAGENETTE_DATASETS:
        candidates = imagenette_settings(published["imagenette"])
        rate, time, to_s = None, "training_time_s", 1.0
        where = ("the Imagenette report's training times (P100 GPUs for the Lambda-ResNets, "
                 "the authors' own computers for the ResNets)")
    else:
        candidates = resnet_settings(published["resnet"], source)
        rate, time, to_s = "iter_per_min", "training_time_h", 3600.0
        where = ("the baseline tables' rates and hours on one RTX 3090 (training time for "
                 "ResNet-18 only)")
    md, rows = [], []
    for _, g in run_groups(df, SETTING_KEYS):
        first = g.iloc[0]
        pub, why = match(setting_of(first), candidates, bool(first["stand_in"]))

        def get(col, pub=pub):
            return pub.get(col) if pub is not None and col else None

        compiled = ", ".join(map(str, g["compile"].dropna().unique())) if "compile" in g else ""
        md.append({
            "model": first["model_label"], "noise": first["condition"],
            "px": int_cell(first["image_size"]), "precision": first["precision"],
            "compile": compiled, "seeds": str(run_counts(g)["seeds"]),
            "iter/min": metric_cell(g, "iter_per_min", 0),
            "published iter/min": pub_cell(get(rate), 0),
            TIME: time_cell(g), f"published {TIME}": pub_cell(get(time), 0, to_s, hms),
            "recipe": first["recipe"], "status": status_cell(g),
            "unlike published": "; ".join(why),
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"],
            "variant": first["variant"], "noise": first["condition"],
            "image_size": first["image_size"], "precision": first["precision"],
            "compile": compiled, "recipe": first["recipe"], **run_counts(g),
            **metric_csv(g, "iter_per_min", "iter_per_min"),
            "iter_per_min_published": pub_float(get(rate)),
            **metric_csv(g, "wall_time_s", "training_time_s"),
            "training_time_s_published": pub_float(get(time)) * to_s,
            "status": status_cell(g), "unlike_published": "; ".join(why),
        })
    note = ("Mean ± sample std over seeds (ok runs only). Measured where each run trained "
            "(for a demo: a shared CPU, so rates vary with the load): training time is the "
            "run's wall-clock time (summary wall_time_s), iter/min the training loop's rate. "
            f"Published: {where}, beside runs trained alike; hardware differs.")
    return Table(f"speed_{dataset}", f"{dataset}: training speed (machine-dependent)", md,
                 rows, [note])


def _with_pub(g: pd.DataFrame, pub, pairs) -> dict:
    """CSV columns `<name>_mean`, `_std`, `_published` of (ours, theirs, name, scale) each;
    the published value is scaled as ours (a fraction in the source, percent here)."""
    out = {}
    for ours, theirs, name, scale in pairs:
        out |= metric_csv(g, ours, name, scale)
        out[f"{name}_published"] = (pub_float(pub[theirs]) * scale if pub is not None
                                    else math.nan)
    return out


# --------------------------------------------------------------------------- community table
def lambda_settings(published: pd.DataFrame) -> list[tuple[Setting, pd.Series]]:
    """The community CIFAR-10 rows: its Lambda-ResNets (k, h, u, m = our r) each under the
    fork's recipe for its epochs (reference.lambda_recipe), and kuangliu's ResNet baselines
    under a recipe we have no copy of."""
    out = []
    for _, row in published.iterrows():
        m = re.fullmatch(r"(Lambda)?ResNet(\d+)( baseline)?", str(row["model"]))
        if not m:
            continue
        if m.group(1):
            args = {key: int(row[col]) for key, col in (("k", "k"), ("heads", "h"),
                                                          ("u", "u"), ("r", "m"))
                    if pd.notna(row[col])}
            setting = Setting("cifar10", PUBLISHED_IMAGE_SIZE["lambda"],
                              f"lambda_resnet{m.group(2)}", Setting.args(args),
                              PUBLISHED_PRECISION["lambda"], lambda_recipe(row["epochs"]))
        else:
            setting = Setting("cifar10", PUBLISHED_IMAGE_SIZE["lambda"], f"resnet{m.group(2)}",
                              (), None, KUANGLIU)
        out.append((setting, row))
    return out


def selects_on(g: pd.DataFrame) -> str:
    """Which split chose the group's best.ckpt (summary.json `select_on`; runs from before
    it was written chose on val). A group shares its recipe, so it shares this too."""
    values = {v if isinstance(v, str) else "val" for v in g.get("select_on", ["val"])}
    return ", ".join(sorted(values))


def lambda_table(df: pd.DataFrame, published: pd.DataFrame,
                 cells: list[PublishedCell]) -> Table | None:
    """Our CIFAR-10 Lambda-ResNet-18/50 and ResNet-18/50 runs beside the community table."""
    sel = df[(df["published_dataset"] == "cifar10") & (df["condition"] == "clean")
             & df["model"].map(lambda m: bool(LAMBDA_TABLE_MODELS.fullmatch(m)))]
    if sel.empty:
        return None
    candidates = lambda_settings(published)
    digits = params_digits(sel["params"] * 1e-6)
    md, rows = [], []
    for _, g in run_groups(sel, SETTING_KEYS):
        first = g.iloc[0]
        precision, recipe = first["precision"], first["recipe"]
        setting = setting_of(first)
        base, args = model_identity(setting.model, dict(setting.model_args))
        hyper = {"k": args.get("k"), "h": args.get("heads"), "u": args.get("u"),
                 "r": args.get("r")}
        pub, why = _published(g, candidates, "lambda_cifar10", LAMBDA_VERDICTS, cells)
        selects = selects_on(g)

        def p(col, digits, pub=pub):
            return pub_cell(pub[col] if pub is not None else None, digits)

        def curve(epoch, g=g):
            at, best = (metric_cell(g, c, 2, PCT) for c in curve_columns(epoch))
            return MISSING if at == best == MISSING else f"{at} / {best}"

        md.append({
            "model": first["model_label"], **{k: int_cell(v) for k, v in hyper.items()},
            "px": int_cell(first["image_size"]),
            "params (M)": fact_cell(g, "params", digits, 1e-6),
            "published params (M)": p("params_m", 1), "seeds": str(run_counts(g)["seeds"]),
            TEST_ACC: metric_cell(g, "tst_acc", 2, PCT),
            "best test acc seen (%)": metric_cell(g, "tst_acc_best_seen", 2, PCT),
            f"published {TEST_ACC}": p("test_acc_pct", 2),
            "published epochs": p("epochs", 0), "selects on": selects,
            **{f"curve at epoch {e}: test acc / best so far (%)": curve(e)
               for e in CURVE_EPOCHS},
            "precision": precision, "recipe": recipe, "status": status_cell(g),
            "unlike published": why,
        })
        rows.append({
            "model": first["model"], "model_args": first["model_args"], "variant": first["variant"],
            **hyper, "image_size": first["image_size"], "precision": precision,
            "recipe": recipe, **run_counts(g),
            **metric_csv(g, "params", "params_m", 1e-6),
            "params_m_published": pub_float(pub["params_m"]) if pub is not None else math.nan,
            **metric_csv(g, "tst_acc", "test_acc_pct", PCT),
            **metric_csv(g, "tst_acc_best_seen", "test_acc_best_seen_pct", PCT),
            "test_acc_pct_published":
                pub_float(pub["test_acc_pct"]) if pub is not None else math.nan,
            "select_on": selects,
            **{k: v for e in CURVE_EPOCHS for col in curve_columns(e)
               for k, v in metric_csv(g, col, col.replace("tst_acc", "test_acc_pct"),
                                      PCT).items()},
            "status": status_cell(g), "unlike_published": why,
        })
    notes = ["k = query depth, h = heads, u = intra-depth, r = scope (the community table's m). "
             "Published: the LambdaNetworks community implementation's CIFAR-10 table, beside "
             "runs at 32 px in fp32 trained the way each row was: the fork's protocol (all "
             "50,000 training images, the rate changed once an epoch, the best epoch kept by "
             "TEST accuracy) for the row's epochs, recipe "
             + " or ".join(f"{r} ({e} epochs)" for e, r in sorted(FORK_RECIPES.items()))
             + ", unchanged. Such runs select on test ('selects on': test), like the source: "
             "their test acc is chosen on test, an optimistic number, never ours. Our "
             f"{PUBLISHED_RECIPE['lambda']} runs (310 epochs, chosen on val) stand beside no "
             "published value; the 'curve at epoch' columns read their metrics.csv at the "
             "source's epochs instead: the test accuracy of that epoch's evaluation / the best "
             "of every evaluation up to it (recipe flag track_test_every_eval; '—' without). "
             "Its ResNet baseline rows are kuangliu/pytorch-cifar's, quoted by the "
             "source and trained with that repository's own recipe, of which we have no copy: "
             "no run of ours stands beside them. '—' where the source has no row or no "
             "accuracy, or the run was trained otherwise ('unlike published' says how). "
             "test acc is best.ckpt's (chosen on val); 'best test acc seen' is the source's way "
             "of reading: the highest test accuracy of any evaluation during training (recipe "
             "flag track_test_every_eval), an optimistic number shown only so the gap is "
             "visible; the verdict reads test acc."]
    if sel["stand_in"].any():
        notes[0] += STAND_IN_NOTE.format(dataset=", ".join(sorted(sel["dataset"].unique())),
                                         source="cifar10")
    return Table("lambda_cifar10", "cifar10: Lambda-ResNets against the community table",
                 md, rows, notes)


# --------------------------------------------------------------------------- Imagenette study
# The report's split: its "best val loss" is most likely on the official val folder, and it
# trains on all 9,469 training images; dataset `imagenette_valfolder` is that split (data
# registry; pinned by tests/test_imagenette_crops.py), where test is the same val folder.
# Our default `imagenette` validates on 10 % of train held out (8,522 trained on) and tests on
# the val folder: its losses are not on the report's sets, so no published row stands there.
REPORT_SPLIT_DATASET = "imagenette_valfolder"
VAL_FOLDER_DATASETS = (REPORT_SPLIT_DATASET,)
VAL_ON = {True: "val folder (= test)", False: "held out of train"}
# The report's lambda convolutions are lucidrains' code, whose position convolution starts at
# PyTorch's default init: ours with model arg pos_init torch_default (docs/models.md).
REPORT_LC_ARGS = Setting.args({"pos_init": "torch_default"})


def imagenette_settings(published: pd.DataFrame) -> list[tuple[Setting, pd.Series]]:
    """The report's rows: its split (train on all, validate on the val folder), our
    reproduction's 128 px, its recipe, fp32, lambda convolutions initialised as its code
    does, and the official noisy-label CSV columns (uniform noise at 5, 25, 50 %)."""
    out = []
    for _, row in published.iterrows():
        pct = pd.to_numeric(row["noise_pct"], errors="coerce")
        if not np.isfinite(pct):
            continue
        noise = "clean" if pct == 0 else f"symmetric-{pct / 100:g}"
        model = arch_key(row["architecture"])
        out.append((Setting(REPORT_SPLIT_DATASET, PUBLISHED_IMAGE_SIZE["imagenette"], model,
                            REPORT_LC_ARGS if model.endswith("_lc") else (),
                            PUBLISHED_PRECISION["imagenette"], PUBLISHED_RECIPE["imagenette"],
                            noise=noise, noise_source=CLEAN if pct == 0 else OFFICIAL_CSV),
                    row))
    return out


def imagenette_table(df: pd.DataFrame, published: pd.DataFrame,
                     cells: list[PublishedCell]) -> Table | None:
    """The Imagenette noisy-label study: losses and time beside the published report."""
    sel = df[df["published_dataset"].isin(IMAGENETTE_DATASETS)]
    if sel.empty:
        return None
    candidates = imagenette_settings(published)
    md, rows = [], []
    for _, g in run_groups(sel, SETTING_KEYS):
        first = g.iloc[0]
        precision, recipe, condition = first["precision"], first["recipe"], first["condition"]
        pub, why = _published(g, candidates, "imagenette_noisy", IMAGENETTE_VERDICTS, cells)

        def p(col, digits, pub=pub):
            return pub_cell(pub[col] if pub is not None else None, digits)

        val_on = VAL_ON[first["dataset"] in VAL_FOLDER_DATASETS]
        md.append({
            "dataset": first["dataset"], "model": first["model_label"], "noise": condition,
            "px": int_cell(first["image_size"]), "seeds": str(run_counts(g)["seeds"]),
            "val loss on": val_on,
            BEST_TRAIN_LOSS: metric_cell(g, "best_train_loss", 3),
            f"published {BEST_TRAIN_LOSS}": p("best_train_loss", 3),
            BEST_VAL_LOSS: metric_cell(g, "best_val_loss", 3),
            f"published {BEST_VAL_LOSS}": p("best_val_loss", 3),
            TEST_ACC: metric_cell(g, "tst_acc", 2, PCT),
            TRAIN_CLEAN_ACC: metric_cell(g, "train_clean_acc", 2, PCT),
            "precision": precision, "recipe": recipe, "status": status_cell(g),
            "unlike published": why,
        })
        rows.append({
            "dataset": first["dataset"], "model": first["model"],
            "model_args": first["model_args"], "variant": first["variant"],
            "noise": condition, "noise_kind": first["noise_kind"],
            "noise_rate": first["noise_rate"], "noise_source": first["noise_source"],
            "image_size": first["image_size"], "precision": precision, "recipe": recipe,
            **run_counts(g), "val_loss_on": val_on,
            **_with_pub(g, pub, [("best_train_loss", "best_train_loss", "best_train_loss", 1.0),
                                 ("best_val_loss", "best_val_loss", "best_val_loss", 1.0)]),
            **metric_csv(g, "tst_acc", "test_acc_pct", PCT),
            **metric_csv(g, "train_clean_acc", "train_clean_acc_pct", PCT),
            "status": status_cell(g), "unlike_published": why,
        })
    notes = ["Published: the Imagenette noisy-label report (uniform noise from the dataset's "
             "official noisy_imagenette.csv columns; LR18_L3(lc) is our lr18_l3_lc), beside "
             f"runs on {REPORT_SPLIT_DATASET} (the report's split: all 9,469 training images "
             "trained on, the official val folder validates; its \"best val loss\" is most "
             "likely on that folder) in fp32 trained with recipe "
             f"{PUBLISHED_RECIPE['imagenette']} unchanged at "
             f"{PUBLISHED_IMAGE_SIZE['imagenette']} px (the report states no image size: "
             "ours), lambda convolutions started as the report's code (lucidrains') starts "
             "them (pos_init torch_default), with the official CSV labels (noise seed 0; a "
             "noise draw of another seed reads '(drawn)' and is not like them). Losses: the "
             "lowest cross-entropy of any evaluation; train loss on the (noisy) training "
             "labels; 'val loss on' names the set of the val loss: 'held out of train' (our "
             "default imagenette: a stratified 10 % of the training folder, 8,522 images "
             "trained on, the val folder kept as test) or 'val folder (= test)' (the report's "
             "split: there is no separate test, so test acc there is the selection set's and "
             "no independent estimate). Training times, ours beside the report's: the speed "
             "table of the dataset."]
    if sel["stand_in"].any():
        notes[0] += STAND_IN_NOTE.format(dataset=", ".join(sorted(sel["dataset"].unique())),
                                         source="imagenette")
    return Table("imagenette_noisy", "Imagenette: noisy-label study against the published "
                 "report", md, rows, notes)
