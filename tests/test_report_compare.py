"""Only like beside like (one rule, every table), and whether each published value was
reproduced: made-up runs whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from test_report import csv_rows, md_rows, pick, write_run

from lambdapipe.reference import (
    IMAGENETTE_DATASETS,
    LAMBDA_DEFAULTS,
    OFFICIAL_NOISE_RATES,
    PUBLISHED_IMAGE_SIZE,
    Setting,
    differences,
    model_identity,
    noise_source,
)
from lambdapipe.report import build_report
from lambdapipe.report.compare import interval, verdict

NETTE = ("imagenette_valfolder", "symmetric-0.25", "lr18_l3_lc")  # the report's split
LIKE = {"recipe": "adam-restarts", "best_val_loss": 2.40,
        "model_args": {"pos_init": "torch_default"}}  # lc as the report's code starts it
# One run per field of the like-for-like rule, each unlike the published row in that field
# alone (LR18_L3(lc) at 25 % noise: best val loss 2.363), beside two like runs.
UNLIKE = {
    "dataset": ({"dataset": "imagenette320"},
                "dataset imagenette320 (published: imagenette_valfolder)"),
    # our default split validates on train held out: its val loss is on another set
    "split": ({"dataset": "imagenette"}, "dataset imagenette (published: imagenette_valfolder)"),
    "image size": ({"config_size": 32}, "image size 32 px (published: 128 px)"),
    "model args": ({"model_args": {"base_width": 32, "pos_init": "torch_default"}},
                   "model args base_width=32 (published: default)"),
    "lc init": ({"model_args": {}}, "model args pos_init=default (published: torch_default)"),
    "precision": ({"precision": "bf16"}, "precision bf16 (published: fp32)"),
    "recipe": ({"recipe": "sgdm"}, "recipe sgdm (published: adam-restarts)"),
    "recipe change": ({"recipe_changes": {"lr": 0.001}}, "recipe changed: lr"),
    "noise source": ({"noise": "symmetric-0.25-s1"},
                     "noise drawn (published: official CSV column)"),
}


@pytest.fixture(scope="module")
def unlike_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        write_run(root, *NETTE, seed, **LIKE)
    for seed, (change, _) in enumerate(UNLIKE.values(), start=2):
        dataset, noise, model = NETTE
        kw = {**LIKE, **change}
        dataset, noise = kw.pop("dataset", dataset), kw.pop("noise", noise)
        if "config_size" not in kw:
            kw["config_size"] = 128
        write_run(root, dataset, noise, model, seed, **kw)
    out = tmp_path_factory.mktemp("out")
    build_report(root, out)
    return out


@pytest.mark.parametrize("field", UNLIKE)
def test_one_unlike_field_keeps_the_published_value_away(unlike_report, field):
    """Each field alone is enough: its run is its own row, '—' and the field named."""
    rows = md_rows(unlike_report / "tables" / "imagenette_noisy.md")
    row = pick(rows, **{"unlike published": UNLIKE[field][1]})
    assert row["published best val loss (CE)"] == "—" and row["seeds"] == "1"
    assert row["best val loss (CE)"] == "2.400"


def test_like_runs_alone_stand_beside_the_published_value(unlike_report):
    rows = md_rows(unlike_report / "tables" / "imagenette_noisy.md")
    like = pick(rows, **{"unlike published": ""})
    assert like["seeds"] == "2" and like["published best val loss (CE)"] == "2.363"
    assert len(rows) == 1 + len(UNLIKE)  # no unlike run pooled with the like ones
    drawn = pick(rows, noise="symmetric-0.25 (drawn)")
    assert drawn["seeds"] == "1"
    cells = [r for r in csv_rows(unlike_report / "tables" / "reproduced.csv")
             if r["metric"] == "best val loss (CE)"]
    assert [(c["dataset"], c["runs"]) for c in cells] == [("imagenette_valfolder", "2")]


def test_the_rule_directly():
    pub = Setting("imagenette", 128, "lr18_l3_lc", (), "fp32", "adam-restarts",
                  noise="symmetric-0.25", noise_source="official CSV column")
    ours = Setting("imagenette", 128, "lr18_l3_lc", (), "fp32", "adam-restarts",
                   noise="symmetric-0.25", noise_source="official CSV column")
    assert differences(ours, pub) == []
    # A Lambda-ResNet's name and its arguments are one network.
    named = Setting("cifar10", 32, "lambda_resnet18_u4_r7", (), "fp32", "sgd-restarts")
    argued = Setting("cifar10", 32, "lambda_resnet18", Setting.args({"u": 4, "r": 7}), "fp32",
                     "sgd-restarts")
    assert differences(named, argued) == []
    assert differences(named, Setting("cifar10", 32, "lambda_resnet18",
                                      Setting.args({"u": 4, "r": 5}), "fp32", "sgd-restarts")
                       ) == ["model args r=7 (published: 5)"]
    # A stand-in ignores what it shrinks on purpose, never the recipe or the model.
    small = Setting("digits", 16, "resnet20x1", Setting.args({"base_width": 8}), "fp32",
                    "sgdm", frozenset({"iterations", "batch_size"}))
    base = Setting("cifar10", 32, "resnet20x1", (), "fp32", "sgdm")
    assert differences(small, base, stand_in=True) == []
    assert len(differences(small, base)) == 4  # dataset, size, args, recipe changed


@pytest.mark.parametrize("dataset, kind, rate, seed, source", [
    ("imagenette", "symmetric", 0.25, 0, "official CSV column"),
    ("imagenette", "symmetric", 0.25, 1, "drawn"),
    ("imagenette", "symmetric", 0.3, 0, "drawn"),
    ("imagenette", "pairflip", 0.25, 0, "drawn"),
    ("imagenette320", "symmetric", 0.05, 0, "official CSV column"),
    ("cifar10", "symmetric", 0.25, 0, "drawn"),
    ("imagenette", "clean", 0.0, 3, "clean"),
])
def test_noise_source(dataset, kind, rate, seed, source):
    assert noise_source(dataset, kind, rate, seed) == source


def test_reference_facts_agree_with_the_data_code():
    """reference.py states facts the report may not import from data/: pinned here."""
    from lambdapipe.data.registry import DATASETS, IMAGENETTE_NOISE_COLUMNS, dataset_info
    from lambdapipe.models.registry import list_models, model_hyperparameters

    assert tuple(sorted(IMAGENETTE_NOISE_COLUMNS)) == OFFICIAL_NOISE_RATES
    assert set(IMAGENETTE_DATASETS) == {n for n, i in DATASETS.items()
                                        if i.source == "imagenette"}
    assert PUBLISHED_IMAGE_SIZE["imagenette"] == dataset_info("imagenette").image_size
    # A Lambda-ResNet's identity resolves k, heads, u, r as its factory does.
    names = list_models("lambda_resnet*")
    assert "lambda_resnet18_u4_r7" in names
    for name in names:
        built = model_hyperparameters(name)
        assert model_identity(name, {})[1] == {k: built[k] for k in LAMBDA_DEFAULTS}, name


# --------------------------------------------------------------------------- verdicts
T = stats.t.ppf(0.975, 2)  # 4.303: 95 %, three seeds


def test_interval_is_the_student_t_one():
    mean, low, high = interval(np.array([0.90, 0.91, 0.92]))
    half = T * 0.01 / math.sqrt(3)  # sample sd 0.01
    assert (mean, low, high) == pytest.approx((0.91, 0.91 - half, 0.91 + half))
    assert half == pytest.approx(0.024841, abs=1e-6)
    assert interval(np.array([0.5, 0.5])) == (0.5, 0.5, 0.5)
    assert math.isnan(interval(np.array([0.5]))[1])
    assert verdict(np.array([0.5]), 0.5) == "too few runs"
    assert verdict(np.array([0.5, 0.5]), 0.5) == "consistent"


# (model, published test accuracy on CIFAR10_x32 fp32, our seeds' tst_acc, verdict)
VERDICTS = [
    ("resnet20x1", 0.924, [0.90, 0.91, 0.92], "consistent"),  # 0.924 in [0.885, 0.935]
    ("resnet32x1", 0.931, [0.80, 0.81, 0.82], "below"),
    ("resnet44x1", 0.933, [0.950, 0.951, 0.952], "above"),
    ("resnet56x1", 0.934, [0.934], "too few runs"),
]


def test_verdicts_on_runs_whose_answer_is_known(tmp_path):
    runs = tmp_path / "runs"
    for model, _, accs, _ in VERDICTS:
        for seed, acc in enumerate(accs):
            write_run(runs, "cifar10", "clean", model, seed, tst_acc=acc)
    # A diverged seed is no run of the verdict: resnet56x1 stays at one.
    write_run(runs, "cifar10", "clean", "resnet56x1", 7, status="diverged", diverged_at=5,
              tst_acc=0.99)
    build_report(runs, tmp_path / "out")
    rows = csv_rows(tmp_path / "out" / "tables" / "reproduced.csv")
    for model, published, accs, word in VERDICTS:
        # Ours and the published fraction both in percent, the unit the metric names.
        row = pick(rows, model=model, metric="test acc (%)")
        assert row["verdict"] == word, row
        assert float(row["published"]) == pytest.approx(100 * published)
        assert int(row["runs"]) == len(accs)
        assert float(row["mean"]) == pytest.approx(100 * np.mean(accs))
        if len(accs) > 1:
            half = T * np.std(accs, ddof=1) / math.sqrt(len(accs))
            assert float(row["ci_low"]) == pytest.approx(100 * (np.mean(accs) - half))
            assert float(row["ci_high"]) == pytest.approx(100 * (np.mean(accs) + half))
        else:
            assert row["ci_low"] == row["ci_high"] == ""
    md = pick(md_rows(tmp_path / "out" / "tables" / "reproduced.md"), model="resnet20x1",
              metric="test acc (%)")
    assert md["ours: mean [95 % interval]"] == "91.00 [88.52, 93.48]"
    assert md["verdict"] == "consistent" and md["published"] == "92.40"


# --------------------------------------------------------------------------- paired
def test_paired_difference_lambda_minus_resnet(tmp_path):
    """Pairs share the training seed and the noise draw; the answer is known."""
    runs = tmp_path / "runs"
    common = {"recipe": "adam-restarts", "config_size": 128}
    for seed, (lam, res) in enumerate([(0.70, 0.68), (0.72, 0.69), (0.74, 0.70)]):
        write_run(runs, "imagenette", "symmetric-0.25", "lr18_l3_lc", seed, tst_acc=lam,
                  **common)
        write_run(runs, "imagenette", "symmetric-0.25", "resnet18", seed, tst_acc=res,
                  **common)
    # Unpaired: a Lambda seed without its ResNet, and two different noise draws.
    write_run(runs, "imagenette", "symmetric-0.25", "lr18_l3_lc", 3, tst_acc=0.99, **common)
    write_run(runs, "imagenette", "symmetric-0.5-s1", "lr18_l3_lc", 0, tst_acc=0.6, **common)
    write_run(runs, "imagenette", "symmetric-0.5-s2", "resnet18", 0, tst_acc=0.5, **common)
    # One pair on a drawn noise, never pooled with the official column's pairs.
    write_run(runs, "imagenette", "symmetric-0.25-s1", "lr18_l3_lc", 0, tst_acc=0.5, **common)
    write_run(runs, "imagenette", "symmetric-0.25-s1", "resnet18", 0, tst_acc=0.6, **common)
    build_report(runs, tmp_path / "out")
    rows = csv_rows(tmp_path / "out" / "tables" / "lambda_vs_resnet.csv")
    assert {r["noise"] for r in rows} == {"symmetric-0.25", "symmetric-0.25 (drawn)"}
    row = pick(rows, noise="symmetric-0.25")
    half = T * 0.01 / math.sqrt(3)  # differences 0.02, 0.03, 0.04
    assert int(row["pairs"]) == 3 and row["partner"] == "resnet18"
    # Percentage points, the unit of every accuracy in the report.
    assert float(row["test_acc_diff_pct_mean"]) == pytest.approx(3)
    assert float(row["ci_low_pct"]) == pytest.approx(100 * (0.03 - half))
    assert float(row["ci_high_pct"]) == pytest.approx(100 * (0.03 + half))
    assert row["reading"] == "Lambda-ResNet higher"
    drawn = pick(rows, noise="symmetric-0.25 (drawn)")
    assert drawn["pairs"] == "1" and drawn["reading"] == "too few pairs"
    assert float(drawn["test_acc_diff_pct_mean"]) == pytest.approx(-10)
    md = pick(md_rows(tmp_path / "out" / "tables" / "lambda_vs_resnet.md"),
              noise="symmetric-0.25")
    assert md["test acc difference (points) [95 % interval]"] == "+3.00 [+0.52, +5.48]"
