"""The ImageNet tables' configs (config/imagenet{32,64,2012}.yaml) and their published rows.

Each config dry-runs with its jobs pinned (no download job: users bring the archives); each
run is like the published row of its model (recipe, precision, image size), and the rows'
val acc (the official ImageNet validation set) stands beside our test accuracy.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from test_workflow import ROOT, job_counts, snakemake

from lambdapipe.cli import main
from lambdapipe.reference import PUBLISHED_DIR, Setting, baseline_recipe
from lambdapipe.report.compare import match
from lambdapipe.report.published_tables import resnet_settings

PINNED = {  # prepare, then train/evaluate/explain per model; no download (no public URL)
    "imagenet32": {"prepare": 1, "train": 3, "evaluate": 3, "explain": 3, "report": 1,
                   "all": 1, "total": 12},
    "imagenet64": {"prepare": 1, "train": 1, "evaluate": 1, "explain": 1, "report": 1,
                   "all": 1, "total": 6},
    "imagenet2012": {"prepare": 1, "train": 6, "evaluate": 6, "explain": 6, "report": 1,
                     "all": 1, "total": 21},
}
SIZE = {"imagenet32": 32, "imagenet64": 64, "imagenet2012": 224}


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


@pytest.mark.slow  # one Snakemake DAG per config
@pytest.mark.parametrize("name", sorted(PINNED))
def test_dry_run_counts(tmp_path, name):
    res = snakemake("-n", "--configfile", str(ROOT / "config" / f"{name}.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout + res.stderr) == PINNED[name]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_check_config_counts_the_same_runs(name):
    path = ROOT / "config" / f"{name}.yaml"
    res = CliRunner().invoke(main, ["check-config", "--configfile", str(path)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"{path}: ok, {PINNED[name]['train']} runs"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_configs_say_how_many_gpus(name):
    text = (ROOT / "config" / f"{name}.yaml").read_text()
    assert "ONE GPU" in text and "DDP" in text


def _published() -> pd.DataFrame:
    return pd.read_csv(PUBLISHED_DIR / "published_resnet_baselines.csv")


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_configured_run_is_like_its_published_row(name):
    """The configs' runs (unchanged recipe, its precision, the table's size) each find their
    row, and the row's val acc is in the test column; LambdaResNet-50 has none."""
    from lambdapipe.recipes import get_recipe

    candidates = resnet_settings(_published(), name)
    found = {}
    for grid in load(name)["datasets"][name]["grids"]:
        for model in grid["models"]:
            ours = Setting(name, SIZE[name], model, (), get_recipe(grid["recipe"]).precision,
                           grid["recipe"])
            row, why = match(ours, candidates, False)
            if model.startswith("lambda"):
                assert row is None and why == []  # no row addresses it: ours, not the table's
                continue
            assert row is not None, (model, why)
            assert math.isnan(row["val_acc"]) and row["test_acc"] > 0.5
            found[model] = row["test_acc"]
    expected = {"imagenet32": {"resnet18": 0.546, "resnet34": 0.573, "resnet50": 0.613},
                "imagenet64": {"resnet50": 0.711},
                "imagenet2012": {"resnet18": 0.702, "resnet34": 0.740, "resnet50": 0.767,
                                 "resnet101": 0.784, "resnet152": 0.792}}[name]
    assert found == expected


def test_unlike_runs_get_no_published_value():
    candidates = resnet_settings(_published(), "imagenet2012")
    fp32 = Setting("imagenet2012", 224, "resnet50", (), "fp32", "sgdm-imagenet2012")
    row, why = match(fp32, candidates, False)
    assert row is None and any("precision fp32" in w for w in why)
    other_batch = Setting("imagenet2012", 224, "resnet152", (), "fp16", "sgdm-imagenet2012")
    row, why = match(other_batch, candidates, False)
    assert row is None and any("recipe sgdm-imagenet2012 (published: "
                               "sgdm-imagenet2012-b1024)" in w for w in why)
    b4096 = Setting("imagenet2012", 224, "resnet50", (), "fp16", "sgdm-imagenet2012-b4096")
    assert match(b4096, candidates, False)[0]["test_acc"] == 0.764
    at_64 = Setting("imagenet32", 64, "resnet18", (), "fp16", "sgdm-imagenet32")
    assert match(at_64, resnet_settings(_published(), "imagenet32"), False)[0] is None


def test_baseline_recipe_by_row():
    assert baseline_recipe("CIFAR10_x32") == "sgdm"
    assert baseline_recipe("ImageNet1k_x64", "206 iter/min fp16 nan-grads") == "sgdm-imagenet64"
    assert baseline_recipe("imagenet2012", "112 iter/min fp16 b1024-128k 8RTX3090") == \
        "sgdm-imagenet2012-b1024"
    assert baseline_recipe("imagenet2012", "no batch note") is None


# --------------------------------------------------------------------------- bench --config
def test_published_seconds_of_the_imagenet_rows():
    """steps / the row's iter/min, the row chosen by recipe: ResNet-152 is b1024-128k."""
    from lambdapipe.project import cells, published_seconds

    by_model = {c.model: c for c in cells(load("imagenet2012"))}
    assert published_seconds(by_model["resnet152"], {}) == pytest.approx(60 * 128_000 / 112)
    assert published_seconds(by_model["resnet50"], {}) == pytest.approx(60 * 64_000 / 152)
    assert published_seconds(by_model["lambda_resnet50"], {}) is None
    (r18,) = [c for c in cells(load("imagenet32")) if c.model == "resnet18"]
    assert published_seconds(r18, {}) == pytest.approx(60 * 128_000 / 1017)


@pytest.mark.slow  # measures one (tiny) training step on the CPU
def test_bench_config_projects_imagenet32_on_one_device():
    from lambdapipe.project import format_projection, project

    cfg = load("imagenet32")
    cfg["datasets"]["imagenet32"]["prepare"] = {"val_size": 64}
    grid = cfg["datasets"]["imagenet32"]["grids"][0]
    grid.update(models=["resnet18"], model_args={"base_width": 4}, set={"batch_size": 8})
    result = project(cfg, device="cpu", warmup=1, steps=2)
    (row,) = result["rows"]
    assert row["steps"] == 128_000 and row["iter_per_min"] > 0
    text = format_projection(result)
    assert "measured: each cell's training step" in text
    assert "a run on several GPUs (DDP) is neither measured nor projected yet" in text
